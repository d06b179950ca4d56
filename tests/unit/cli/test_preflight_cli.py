"""acmoe-preflight / acmoe-launch --preflight: what is refused or printed before any process starts."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _run(*args, module="acmoe_megatron.cli.preflight", cwd=ROOT):
    return subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_memory_only_for_the_multinode_recipe():
    out = _run("--config", "configs/multinode_h100_fp8.yaml", "--memory-only", "--world-size", "16",
               "--gpu-memory-gib", "80", "--vocab-size", "32000")
    assert out.returncode == 0, out.stderr
    assert "world size 16 (tp 2, pp 2, ep 8, etp 1, dp 4)" in out.stdout and "bf16" in out.stdout
    for key in ("parameters", "gradients", "optimizer", "activations", "total"):
        assert f"  {key}" in out.stdout
    assert "verdict: PASS" in out.stdout
    small = _run("--config", "configs/multinode_h100_fp8.yaml", "--memory-only", "--world-size", "16",
                 "--gpu-memory-gib", "16", "--vocab-size", "32000")
    assert small.returncode == 3 and "verdict: FAIL: will not fit" in small.stdout


def test_wrong_layout_is_refused_before_any_process(tmp_path):
    out = _run("--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--nproc", "3", "--out", str(tmp_path / "r"),
               cwd=tmp_path)
    assert out.returncode == 2 and "config error" in out.stderr
    assert not (tmp_path / "r").exists()


def test_then_submit_needs_preflight():
    out = _run("slurm", "--config", "configs/tiny_cpu.yaml", "--nodes", "1", "--gpus-per-node", "0", "--then-submit",
               module="acmoe_megatron.cli.launch")
    assert out.returncode == 2 and "--then-submit needs --preflight" in out.stderr


def test_preflight_dry_run_renders_the_plan(tmp_path):
    out = _run("slurm", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--nodes", "2", "--gpus-per-node", "0",
               "--preflight", "--dry-run", "--preflight-dir", str(tmp_path / "pf"), f"run.dir={tmp_path / 'run'}",
               f"data.path={ROOT / 'data' / 'stdlib_s256'}", module="acmoe_megatron.cli.launch", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"export PREFLIGHT_PLAN={tmp_path / 'pf' / 'plan.json'}" in out.stdout
    assert "#SBATCH --no-requeue" in out.stdout and "#SBATCH --time=00:15:00" in out.stdout
    assert "#SBATCH --job-name=acmoe-tiny_cpu-preflight" in out.stdout
    assert (tmp_path / "pf" / "plan.json").is_file() and (tmp_path / "pf" / "shrunk.yaml").is_file()
    assert not (tmp_path / "run").exists()  # nothing written into the run directory
