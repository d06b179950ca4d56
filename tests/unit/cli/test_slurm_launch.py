"""``acmoe-launch`` and ``slurm/pretrain.sbatch`` without a SLURM cluster (tests/integration/test_slurm_cluster.py
runs them on a real one).

- ``acmoe-launch slurm --dry-run``: the rendered sbatch directives and the job environment, errors
  before submission, and the submission itself through a stand-in ``sbatch``;
- the sbatch script run by bash: clear errors when CONFIG / RUN_DIR / DATA / the Python environment
  are missing, and with ``DRY_RUN=1`` (a stand-in ``scontrol``) the commands it would run for both
  launch modes, containers, restarts;
- the helpers: ``torchrun_node.sh`` hands the exit signal to the workers and not to torchrun,
  ``task_env.sh`` maps SLURM's ranks; ``acmoe-launch resolve``; the recipes of this change.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from acmoe_megatron.cli import launch as slurm_launch
from acmoe_megatron.core import layers
from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.runtime.recipe import load_recipe
from acmoe_megatron.runtime.run_plan import parallel_layout

ROOT = Path(__file__).resolve().parents[3]
SBATCH = ROOT / "slurm" / "pretrain.sbatch"
TINY = ROOT / "configs" / "tiny_cpu.yaml"
MULTINODE = ROOT / "configs" / "multinode_h100_fp8.yaml"


def dry_run(capsys, *args: str) -> tuple[int, str, str]:
    rc = slurm_launch.main(["slurm", *args, "--dry-run"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def directives(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def block(script: str, begin: str) -> list[str]:
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(begin))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("# <<<"))
    return lines[start + 1 : end]


# ---------------------------------------------------------------------------------------------
# acmoe-launch slurm --dry-run


def test_dry_run_renders_directives_and_environment(capsys, tmp_path):
    rc, script, err = dry_run(
        capsys, "--config", str(MULTINODE), "--nodes", "4", "--gpus-per-node", "8",
        "--partition", "batch", "--time", "04:00:00", "--account", "proj42",
        "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path / "shards"),
        "megatron.lr=1e-4", "run.name=with space",
    )
    assert rc == 0, err
    d = directives(script)
    for expected in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive",
                     "--partition=batch", "--account=proj42", "--time=04:00:00", "--signal=USR1@300",
                     "--requeue", "--open-mode=append", "--job-name=acmoe-with_space",
                     f"--output={tmp_path}/run/slurm_logs/%x-%j.out"):
        assert expected in d, (expected, d)
    # exactly one block of directives: the template's own defaults are replaced, not appended
    assert sum(x.startswith("--nodes=") for x in d) == 1 and sum(x.startswith("--time=") for x in d) == 1
    assert "--output=slurm-%x-%j.out" not in d
    # the job environment: absolute paths, this interpreter, the launch mode
    env = block(script, "# >>> environment")
    assert f"export CONFIG={MULTINODE}" in env
    assert f"export RUN_DIR={tmp_path}/run" in env and f"export DATA={tmp_path}/shards" in env
    assert f"export ACMOE_ROOT={ROOT}" in env  # the directory acmoe-launch ran in (the tests run from the checkout)
    assert f"export ACMOE_SCRIPTS={ROOT / 'acmoe_megatron' / 'cli' / 'slurm'}" in env  # the package's own helper scripts
    assert f"export ACMOE_PYTHON={sys.executable}" in env
    assert "export NPROC_PER_NODE=8" in env and "export LAUNCHER=torchrun" in env
    assert "export EXIT_SIGNAL=USR1" in env and "export REQUEUE=1" in env
    assert not any("CONTAINER_IMAGE" in line for line in env)
    # the parallel layout is reported (world 32: dense DP 8, expert DP 2)
    assert "world size 32" in err and "dp 8" in err and "expert_dp 2" in err
    # directives come before the first command, so sbatch reads all of them
    first_command = next(i for i, line in enumerate(script.splitlines())
                         if line.strip() and not line.startswith("#"))
    last_directive = max(i for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH"))
    assert last_directive < first_command
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_dry_run_overrides_survive_bash_quoting(capsys, tmp_path):
    overrides = ["megatron.lr=3e-4", "run.name=two words", "megatron.moe_layer_freq=[1, 0, 1, 0]",
                 "acmoe.router=cosine", "acmoe.first_ac_layer=2", "run.name=it's $HOME"]
    rc, script, err = dry_run(capsys, "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "0",
                              "--run-dir", str(tmp_path / "r"), *overrides)
    assert rc == 0, err
    env = "\n".join(block(script, "# >>> environment"))
    assert "unset OVERRIDES" in env  # the submitting shell's OVERRIDES must not leak into the job
    out = subprocess.run(["bash", "-c", env + '\nprintf "%s\\n" "$@"', "job", "extra=1"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == overrides + ["extra=1"]  # script arguments given to sbatch come last


def test_dry_run_cpu_nodes_srun_launcher_and_container(capsys, tmp_path):
    rc, script, err = dry_run(capsys, "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "0",
                              "--run-dir", str(tmp_path / "r"))
    assert rc == 0, err
    d = directives(script)
    assert not any(x.startswith("--gpus") for x in d)  # no GPU request on CPU nodes
    assert "--ntasks-per-node=1" in d and "--nodes=2" in d
    assert not any(x.startswith(("--account", "--partition", "--time", "--qos")) for x in d)
    assert "export NPROC_PER_NODE=1" in block(script, "# >>> environment")

    rc, script, err = dry_run(
        capsys, "--config", str(MULTINODE), "--nodes", "2", "--gpus-per-node", "8", "--launcher", "srun",
        "--container-image", "nvcr.io#nvidia/pytorch:25.09-py3", "--container-mounts", "/lustre:/lustre",
        "--signal-seconds", "600", "--exit-signal", "SIGUSR2", "--no-requeue", "--no-exclusive",
        "--sbatch-arg=--mem=0", "--qos", "high", "--run-dir", str(tmp_path / "r"),
    )
    assert rc == 0, err
    d = directives(script)
    assert "--ntasks-per-node=8" in d and "--gpus-per-node=8" in d  # one task per GPU
    assert "--signal=USR2@600" in d and "--no-requeue" in d and "--mem=0" in d and "--qos=high" in d
    assert "--exclusive" not in d and "--requeue" not in d
    env = block(script, "# >>> environment")
    assert "export LAUNCHER=srun" in env and "export EXIT_SIGNAL=USR2" in env and "export REQUEUE=0" in env
    assert "export CONTAINER_IMAGE='nvcr.io#nvidia/pytorch:25.09-py3'" in env
    assert "export CONTAINER_MOUNTS=/lustre:/lustre" in env
    assert "export ACMOE_PYTHON=python" in env  # the container's python


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", str(MULTINODE), "--nodes", "1", "--gpus-per-node", "8"],
         "8 processes cannot hold expert parallel 8 x expert-tensor 1 x pipeline 2 (= 16"),
        (["--config", str(MULTINODE), "--nodes", "3", "--gpus-per-node", "4"],
         "12 processes"),
        (["--config", str(TINY), "--nodes", "1", "--gpus-per-node", "0", "megatron.num_layer=2"],
         "unknown megatron option megatron.num_layer"),
        (["--config", str(TINY), "--nodes", "3", "--gpus-per-node", "0"],
         "3 processes cannot hold expert parallel 2 x expert-tensor 1 x pipeline 1 (= 2"),
        (["--config", str(TINY), "--nodes", "4", "--gpus-per-node", "0"],
         "megatron.global_batch_size=16 is not divisible by micro_batch_size x data parallel = 8 x 4"),
        (["--config", "configs/nope.yaml", "--nodes", "1", "--gpus-per-node", "0"], "not found"),
        (["--config", str(TINY), "--nodes", "0", "--gpus-per-node", "0"], "--nodes must be >= 1"),
        (["--config", str(TINY), "--nodes", "1", "--gpus-per-node", "2", "--procs-per-node", "4"],
         "--procs-per-node 4 > --gpus-per-node 2"),
        (["--config", str(TINY), "--nodes", "1", "--gpus-per-node", "2", "--time", "4h"], "--time '4h'"),
    ],
)
def test_slurm_refuses_bad_requests_before_submitting(capsys, args, message):
    rc, out, err = dry_run(capsys, *args)
    assert rc == 2
    assert message in err, err
    assert out == ""  # nothing rendered


def test_missing_data_is_an_error_when_submitting_and_a_warning_in_dry_run(capsys, tmp_path):
    cfg = ROOT / "configs" / "switch_m_wt103.yaml"
    args = ["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "4", "--data", str(tmp_path / "none")]
    rc, out, err = dry_run(capsys, *args)
    assert rc == 0 and "warning: no shard manifest" in err and "acmoe-data prepare" in err
    rc = slurm_launch.main(["slurm", *args])
    err = capsys.readouterr().err
    assert rc == 2 and "no shard manifest" in err


def test_submission_calls_sbatch_with_the_rendered_script(capsys, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch_args"
    (bin_dir / "sbatch").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        printf '%s\\n' "$PWD" "$@" > {record}
        echo "4711;cluster"
        """))
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    rc = slurm_launch.main(["slurm", "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "0",
                            "--run-dir", str(run_dir), "--data", str(tmp_path / "d"), "megatron.train_iters=8",
                            "megatron.lr_warmup_iters=2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "submitted job 4711" in out
    cwd, *argv = record.read_text().splitlines()
    assert cwd == str(ROOT) and argv[0] == "--parsable"
    script = Path(argv[1])
    assert script.parent == run_dir / "slurm_logs" and script.suffix == ".sbatch"
    text = script.read_text()
    assert "--nodes=2" in directives(text)
    assert "set -- megatron.train_iters=8" in text


def test_sbatch_not_found(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc = slurm_launch.main(["slurm", "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "0",
                            "--run-dir", str(tmp_path / "r")])
    assert rc == 2 and "sbatch not found" in capsys.readouterr().err


def test_local_reuses_the_launcher(monkeypatch):
    from acmoe_megatron.cli import pretrain as launcher
    seen = []
    monkeypatch.setattr(launcher, "main", lambda argv: seen.append(argv) or 0)
    assert slurm_launch.main(["local", "--nproc", "2", "--config", str(TINY), "megatron.train_iters=5"]) == 0
    assert seen == [["--config", str(TINY), "--nproc", "2", "megatron.train_iters=5"]]


# ---------------------------------------------------------------------------------------------
# the template itself


def test_template_has_no_site_specific_settings():
    text = SBATCH.read_text()
    d = directives(text)
    assert not any(x.startswith(("--account", "--partition", "--qos", "--gpus", "--gres", "--reservation"))
                   for x in d), d
    for path in [SBATCH, *sorted((ROOT / "slurm").glob("*.sh"))]:
        body = path.read_text()
        assert not re.search(r"(?<![\w$}])/(work|home|lustre|scratch|gpfs|project|data)\b", body), path
        # no variable defaults to a literal absolute path: every location comes from the environment
        assert not re.findall(r"(?m)^\s*(?:export\s+)?\w+=[\"']?/", body), path
        assert not re.findall(r"\$\{\w+:-[\"']?/", body), path
    assert os.access(SBATCH, os.X_OK)


# ---------------------------------------------------------------------------------------------
# the sbatch script run by bash (no SLURM: a stand-in scontrol, DRY_RUN=1)


@pytest.fixture
def fake_slurm_bin(tmp_path) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(textwrap.dedent("""\
        #!/bin/bash
        case "$1 $2" in
          "show hostnames") printf 'gpu-x17\\ngpu-x18\\n' ;;
          "show node") echo "NodeName=$3 Arch=x86_64"; echo "   NodeAddr=10.9.8.17 NodeHostName=$3" ;;
          *) echo "unexpected scontrol $*" >&2; exit 1 ;;
        esac
        """))
    (bin_dir / "scontrol").chmod(0o755)
    return bin_dir


def run_sbatch(env: dict, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(["bash", str(SBATCH), *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def job_env(fake_slurm_bin: Path, tmp_path: Path, **extra) -> dict:
    env = {
        "PATH": f"{fake_slurm_bin}:{os.environ['PATH']}",
        "DRY_RUN": "1", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu-x[17-18]",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT),
        "CONFIG": "configs/tiny_cpu.yaml", "RUN_DIR": str(tmp_path / "run"), "DATA": str(tmp_path / "data"),
        "ACMOE_PYTHON": sys.executable,
    }
    env.update(extra)
    return env


@pytest.mark.parametrize("missing", ["CONFIG", "RUN_DIR", "DATA"])
def test_sbatch_errors_when_an_input_is_unset(missing, fake_slurm_bin, tmp_path):
    env = job_env(fake_slurm_bin, tmp_path)
    del env[missing]
    out = run_sbatch(env)
    assert out.returncode == 2
    assert f"error: {missing} is not set" in out.stderr
    assert "[dry-run]" not in out.stdout


def test_sbatch_errors_on_a_bad_environment(fake_slurm_bin, tmp_path):
    env = job_env(fake_slurm_bin, tmp_path)
    del env["ACMOE_PYTHON"]
    out = run_sbatch(env)
    assert out.returncode == 2 and "export ACMOE_PYTHON=" in out.stderr and "VENV=" in out.stderr

    out = run_sbatch({**env, "VENV": str(tmp_path / "novenv")})
    assert out.returncode == 2 and "has no bin/python" in out.stderr

    out = run_sbatch({**env, "ACMOE_PYTHON": "/bin/false", "DRY_RUN": "0"})
    assert out.returncode == 2 and "cannot import acmoe_megatron" in out.stderr

    out = run_sbatch(job_env(fake_slurm_bin, tmp_path, CONFIG="configs/none.yaml"))
    assert out.returncode == 2 and "configs/none.yaml: no such file" in out.stderr

    out = run_sbatch(job_env(fake_slurm_bin, tmp_path, LAUNCHER="mpirun"))
    assert out.returncode == 2 and "LAUNCHER=mpirun" in out.stderr

    env = job_env(fake_slurm_bin, tmp_path, DRY_RUN="0")
    del env["SLURM_JOB_ID"]
    out = run_sbatch(env)
    assert out.returncode == 2 and "not inside a SLURM job" in out.stderr

    out = run_sbatch(job_env(fake_slurm_bin, tmp_path, SLURM_SUBMIT_DIR=str(tmp_path),
                             CONFIG=str(TINY)), cwd=tmp_path)
    assert out.returncode == 2 and "has no torchrun_node.sh; submit with acmoe-launch slurm" in out.stderr


def _dry_run_lines(out: subprocess.CompletedProcess) -> list[list[str]]:
    assert out.returncode == 0, out.stderr
    return [shlex.split(line[len("[dry-run] "):]) for line in out.stdout.splitlines()
            if line.startswith("[dry-run] ")]


def test_sbatch_dry_run_torchrun_per_node(fake_slurm_bin, tmp_path):
    out = run_sbatch(job_env(fake_slurm_bin, tmp_path, OVERRIDES="acmoe.router=cosine"), "megatron.lr=1e-4")
    mkdir, resolve, step = _dry_run_lines(out)
    assert mkdir == ["mkdir", "-p", f"{tmp_path}/run/slurm_logs"]
    # the recipe is resolved once, with the overrides (arguments first, then $OVERRIDES)
    assert resolve[:3] == [sys.executable, "-m", "acmoe_megatron.cli.launch"]
    assert resolve[resolve.index("--world-size") + 1] == "16"
    assert resolve[resolve.index("--exit-signal") + 1] == "SIGUSR1"
    assert resolve[resolve.index("--config") + 1] == str(TINY)  # made absolute (submit dir)
    assert "--reuse" not in resolve
    assert resolve[resolve.index("--") + 1:] == ["megatron.lr=1e-4", "acmoe.router=cosine"]
    # one task per node; torchrun via the signal-forwarding wrapper; c10d rendezvous on the head
    # node's address (gpu-x17 does not resolve here: SLURM's NodeAddr), port from the job id
    assert step[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash"]
    assert step[6] == str(ROOT / "slurm" / "torchrun_node.sh")
    assert step[7:10] == [sys.executable, "-m", "torch.distributed.run"]
    port = 61000 + 123456 % 4536
    for arg in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=10.9.8.17:{port}", "--rdzv-id=acmoe-123456-0", "--max-restarts=0"):
        assert arg in step, (arg, step)
    assert step[-4:] == ["-m", "acmoe_megatron.runtime.train", "--config", f"{tmp_path}/run/config.yaml"]
    assert f"head node gpu-x17 address 10.9.8.17 port {port}" in out.stdout
    assert "world size 16, launcher torchrun" in out.stdout


def test_ft_launcher_is_refused_where_nvrx_is_absent_or_too_old(capsys, tmp_path, monkeypatch):
    """NVRx's ft_launcher is an optional extra: without a release megatron-core accepts, the job is
    refused before anything is rendered or submitted, naming the package, the fix and the default."""
    from acmoe_megatron.runtime import dependencies

    args = ("--config", str(TINY), "--nodes", "2", "--gpus-per-node", "0", "--launcher", "ft",
            "--run-dir", str(tmp_path / "run"))
    monkeypatch.setattr(dependencies, "_version", lambda dist: None)
    rc, script, err = dry_run(capsys, *args)
    assert rc == 2 and not script
    assert "nvidia-resiliency-ext >= 0.6.0, which is not installed" in err and "--launcher torchrun" in err
    monkeypatch.setattr(dependencies, "_version", lambda dist: "0.4.1")
    rc, script, err = dry_run(capsys, *args)
    assert rc == 2 and "nvidia-resiliency-ext 0.4.1 is installed, and megatron-core 0.19 needs >= 0.6.0" in err
    monkeypatch.setattr(dependencies, "_version", lambda dist: "0.6.1")
    rc, script, err = dry_run(capsys, *args)
    assert rc == 0, err
    assert "--ntasks-per-node=1" in directives(script)  # one ft_launcher per node
    env = block(script, "# >>> environment")
    assert "export LAUNCHER=ft" in env
    assert any(line.startswith("set -- ") and "megatron.enable_ft_package=true" in line for line in env), env


def test_sbatch_dry_run_ft_launcher_gets_the_recipes_hang_bounds(fake_slurm_bin, tmp_path):
    out = run_sbatch(job_env(fake_slurm_bin, tmp_path, LAUNCHER="ft", HANG_TIMEOUT_S="180",
                             HANG_TIMEOUT_CHECKPOINT_S="540", HANG_REQUEUES="2"))
    step = _dry_run_lines(out)[-1]
    assert step[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash"]
    assert step[7:10] == [sys.executable, "-m", "nvidia_resiliency_ext.fault_tolerance.launcher"]
    for arg in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-id=acmoe-123456-0", "--max-restarts=2",
                "--ft-rank-section-timeouts=setup:540,step:180,checkpointing:540",
                "--ft-rank-out-of-section-timeout=540", "--ft-rank-heartbeat-timeout=none"):
        assert arg in step, (arg, step)
    assert step[-4:] == ["-m", "acmoe_megatron.runtime.train", "--config", f"{tmp_path}/run/config.yaml"]
    assert "launcher ft" in out.stdout


def test_sbatch_dry_run_resolvable_head_node_keeps_its_name(fake_slurm_bin, tmp_path):
    (fake_slurm_bin / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    out = run_sbatch(job_env(fake_slurm_bin, tmp_path, SLURM_JOB_NUM_NODES="1", MASTER_PORT_BASE="20000"))
    step = _dry_run_lines(out)[-1]
    assert f"--rdzv-endpoint=localhost:{20000 + 123456 % 4536}" in step


def test_cluster_admin_options_mem_cpus_env_hook(capsys, tmp_path, fake_slurm_bin):
    """--mem=0 and --cpus-per-task by default (torchrun: one task holds all of a node's workers),
    --env / --env-file for NCCL and fabric settings, sourced by the job after the documented defaults."""
    rc, script, err = dry_run(capsys, "--config", str(MULTINODE), "--nodes", "2", "--gpus-per-node", "8",
                              "--run-dir", str(tmp_path / "r"))
    assert rc == 0, err
    d = directives(script)
    assert "--mem=0" in d and "--cpus-per-task=64" in d  # 8 GPU processes x 8 cores, one torchrun task per node
    rc, script, err = dry_run(capsys, "--config", str(MULTINODE), "--nodes", "2", "--gpus-per-node", "8",
                              "--launcher", "srun", "--mem", "480G", "--run-dir", str(tmp_path / "r"))
    assert "--mem=480G" in directives(script) and "--cpus-per-task=8" in directives(script)  # one task per GPU
    rc, script, err = dry_run(capsys, "--config", str(MULTINODE), "--nodes", "2", "--gpus-per-node", "8", "--mem",
                              "none", "--sbatch-arg=--cpus-per-task=12", "--run-dir", str(tmp_path / "r"))
    assert not any(x.startswith("--mem") for x in directives(script))
    assert [x for x in directives(script) if x.startswith("--cpus-per-task")] == ["--cpus-per-task=12"]

    env_file = tmp_path / "cluster_env.sh"
    env_file.write_text("export NCCL_IB_HCA=mlx5\nexport NCCL_NVLS_ENABLE=1\n")
    rc, script, err = dry_run(capsys, "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "0", "--env",
                              "NCCL_DEBUG=WARN", "--env-file", str(env_file), "--run-dir", str(tmp_path / "r"))
    assert rc == 0, err
    env = block(script, "# >>> environment")
    assert "export NCCL_DEBUG=WARN" in env and f"export ENV_FILE={env_file}" in env
    # the job sources env_defaults.sh, then the file: what the training step sees
    probe = tmp_path / "probe.sh"
    probe.write_text(textwrap.dedent(f"""\
        source {ROOT / 'slurm' / 'env_defaults.sh'}
        source {env_file}
        echo "$NCCL_IB_HCA $NCCL_NVLS_ENABLE $TORCH_NCCL_AVOID_RECORD_STREAMS $CUDA_DEVICE_MAX_CONNECTIONS $NCCL_DEBUG"
        """))
    out = subprocess.run(["bash", str(probe)], env={**os.environ, "NCCL_DEBUG": "WARN"}, capture_output=True, text=True)
    assert out.stdout.split() == ["mlx5", "1", "1", "1", "WARN"]  # the file overrides a default
    out = run_sbatch(job_env(fake_slurm_bin, tmp_path, ENV_FILE=str(env_file)))
    assert out.returncode == 0 and f"environment from {env_file}" in out.stdout, out.stderr
    out = run_sbatch(job_env(fake_slurm_bin, tmp_path, ENV_FILE=str(tmp_path / "missing.sh")))
    assert out.returncode == 2 and "missing.sh: no such file" in out.stderr
    for bad, message in [(["--env", "1X=2"], "--env '1X=2': write KEY=VALUE"), (["--mem", "lots"], "--mem 'lots'"),
                         (["--env-file", str(tmp_path / "nope.sh")], "nope.sh: no such file")]:
        rc, _, err = dry_run(capsys, "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "0", *bad)
        assert rc == 2 and message in err, err


def test_sbatch_dry_run_one_task_per_gpu_in_a_container_after_a_restart(fake_slurm_bin, tmp_path):
    env = job_env(fake_slurm_bin, tmp_path, LAUNCHER="srun", CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.09-py3",
                  CONTAINER_MOUNTS="/scratch:/scratch", EXIT_SIGNAL="SIGUSR2", SLURM_RESTART_COUNT="2",
                  CONFIG=str(tmp_path / "recipes" / "r.yaml"))
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text(TINY.read_text())
    del env["ACMOE_PYTHON"]
    mkdir, resolve, step = _dry_run_lines(run_sbatch(env))
    mounts = (f"--container-mounts={ROOT}:{ROOT},{tmp_path}/run:{tmp_path}/run,{tmp_path}/data:{tmp_path}/data,"
              f"{tmp_path}/recipes:{tmp_path}/recipes,/scratch:/scratch")
    # one named container per job: imported once, shared by the resolve and the training step
    container = ["--container-image=nvcr.io#nvidia/pytorch:25.09-py3", "--container-name=acmoe-123456", mounts,
                 f"--container-workdir={ROOT}"]
    # the resolve step runs once, inside the container, and re-uses the first start's config
    assert resolve[:3] == ["srun", "--nodes=1", "--ntasks=1"] and resolve[3:7] == container
    assert resolve[7:10] == ["python", "-m", "acmoe_megatron.cli.launch"]
    assert "--reuse" in resolve and resolve[resolve.index("--exit-signal") + 1] == "SIGUSR2"
    # one task per GPU: 16 tasks, 8 per node, each mapped to RANK/LOCAL_RANK/WORLD_SIZE
    assert step[:5] == ["srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--kill-on-bad-exit=1"]
    assert step[5:9] == container
    assert step[9:11] == ["bash", str(ROOT / "slurm" / "task_env.sh")]
    assert step[11:] == ["python", "-m", "acmoe_megatron.runtime.train", "--config", f"{tmp_path}/run/config.yaml"]


# ---------------------------------------------------------------------------------------------
# helpers


def test_task_env_maps_slurm_ranks_and_ignores_an_early_exit_signal():
    env = {"PATH": os.environ["PATH"], "SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
           "EXIT_SIGNAL": "USR2"}
    code = ("import os, signal; print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['LOCAL_RANK'], "
            "signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN)")
    out = subprocess.run(["bash", str(ROOT / "slurm" / "task_env.sh"), sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["13", "16", "5", "True"]


_FAKE_TORCHRUN = """
import os, signal, subprocess, sys
sig = getattr(signal, sys.argv[1])
print("torchrun ignores the exit signal:", signal.getsignal(sig) == signal.SIG_IGN, flush=True)
print("torchrun handles:", os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE"), flush=True)
worker = ("import signal, sys, time\\n"
          f"signal.signal(signal.{sys.argv[1]}, lambda *a: (print('worker saved and exits', flush=True), sys.exit(0)))\\n"
          "print('worker ready', flush=True)\\n"
          "time.sleep(60); sys.exit(3)\\n")
procs = [subprocess.Popen([sys.executable, "-c", worker], start_new_session=True) for _ in range(2)]
sys.exit(sum(p.wait() for p in procs) + 5)
"""


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_torchrun_node_forwards_the_exit_signal_to_the_workers(tmp_path, sig):
    """torchrun starts with the signal ignored (and, for SIGTERM, told not to handle it); the workers
    (in their own sessions, as torchrun starts them) receive it from the wrapper; the wrapper exits
    with torchrun's code."""
    fake = tmp_path / "fake_torchrun.py"
    fake.write_text(_FAKE_TORCHRUN)
    proc = subprocess.Popen(["bash", str(ROOT / "slurm" / "torchrun_node.sh"), sys.executable, str(fake), sig],
                            env={**os.environ, "EXIT_SIGNAL": sig.removeprefix("SIG"), "SLURMD_NODENAME": "n7"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    # the wrapper's traps are set ("torchrun started") and both workers' handlers installed
    while "".join(lines).count("worker ready") < 2 or "torchrun started" not in "".join(lines):
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the wrapper ended before the workers were ready:\n{''.join(lines)}")
        lines.append(line)
    proc.send_signal(getattr(signal, sig))
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    log = "".join(lines) + rest
    assert proc.returncode == 5, log  # both workers exited 0 after the signal; torchrun's code
    assert "torchrun ignores the exit signal: True" in log
    handled = {"SIGUSR1": "SIGTERM,SIGINT,SIGHUP,SIGQUIT", "SIGTERM": "SIGINT,SIGHUP,SIGQUIT"}[sig]
    assert f"torchrun handles: {handled}" in log
    assert log.count("worker saved and exits") == 2, log
    assert re.search(rf"\[acmoe-node n7\] {sig} received: forwarding to the workers \(pids \d+ \d+ \)", log), log


def test_torchrun_node_passes_sigterm_to_torchrun_when_usr1_is_the_exit_signal(tmp_path):
    fake = tmp_path / "fake_torchrun.py"
    fake.write_text("import signal, sys, time\n"
                    "signal.signal(signal.SIGTERM, lambda *a: (print('torchrun stops', flush=True), sys.exit(9)))\n"
                    "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen(["bash", str(ROOT / "slurm" / "torchrun_node.sh"), sys.executable, str(fake)],
                            env={**os.environ, "EXIT_SIGNAL": "USR1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    head = proc.stdout.readline() + proc.stdout.readline()
    assert "ready" in head and "torchrun started" in head, head
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 9 and "torchrun stops" in out and "SIGTERM received: stopping torchrun" in out


def test_resolve_writes_config_git_sha_and_run_env(tmp_path, capsys):
    from acmoe_megatron.data import prepare

    prepare(source="stdlib", out_dir=tmp_path / "data", seq_length=64, max_bytes=50_000)
    run_dir = tmp_path / "run"
    args = ["resolve", "--config", str(TINY), "--run-dir", str(run_dir), "--data", str(tmp_path / "data"),
            "--world-size", "2", "--exit-signal", "SIGUSR1", "--root", str(ROOT), "--",
            "megatron.seq_length=64", "megatron.max_position_embeddings=64", "megatron.train_iters=30",
            "megatron.lr_warmup_iters=2"]
    assert slurm_launch.main(args) == 0, capsys.readouterr().err
    recipe = load_recipe(run_dir / "config.yaml")
    assert recipe.megatron["exit_signal_handler"] is True and recipe.megatron["exit_signal"] == "SIGUSR1"
    assert recipe.run.dir == str(run_dir) and recipe.data.path == str(tmp_path / "data")
    assert recipe.megatron["train_iters"] == 30
    env = dict(line.split("=", 1) for line in (run_dir / "run.env").read_text().splitlines())
    assert env["TRAIN_ITERS"] == "30" and env["CHECKPOINT_DIR"] == str(run_dir / "checkpoints")
    assert env["CONFIG_HASH"] == recipe.hash()
    assert (env["HANG_TIMEOUT_S"], env["HANG_TIMEOUT_CHECKPOINT_S"]) == ("180", "540")  # the ft launcher's bounds
    sha = (run_dir / "git_sha.txt").read_text().strip()
    assert re.match(r"^([0-9a-f]{40}|acmoe-megatron \d)", sha), sha
    assert "parallel layout: world 2, tp 1, pp 1, cp 1, ep 2" in capsys.readouterr().out
    # a restart re-uses the resolved config even when the original recipe would now differ
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace("train_iters: 30", "train_iters: 31"))
    assert slurm_launch.main([*args[:args.index("--")], "--reuse", "--", "megatron.train_iters=99"]) == 0
    assert load_recipe(run_dir / "config.yaml").megatron["train_iters"] == 31
    assert "TRAIN_ITERS=31" in (run_dir / "run.env").read_text()
    # the world size is checked against the parallel sizes
    assert slurm_launch.main([*args[:args.index("--world-size") + 1], "4", *args[args.index("--world-size") + 2:]]) == 2
    assert "global_batch_size=16 is not divisible" in capsys.readouterr().err


def test_resolve_refuses_to_mix_checkpoints_of_another_configuration(tmp_path, capsys):
    from acmoe_megatron.data import prepare

    prepare(source="stdlib", out_dir=tmp_path / "data", seq_length=64, max_bytes=50_000)
    run_dir = tmp_path / "run"
    base = ["resolve", "--config", str(TINY), "--run-dir", str(run_dir), "--data", str(tmp_path / "data"),
            "--exit-signal", "SIGUSR1", "--", "megatron.seq_length=64", "megatron.max_position_embeddings=64"]
    assert slurm_launch.main(base) == 0
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("5")
    capsys.readouterr()
    # a tracker naming an iteration that is not there: refused before the job starts training
    assert slurm_launch.main(base) == 2
    assert "iter_0000005 does not exist" in capsys.readouterr().err
    (run_dir / "checkpoints" / "iter_0000005" / "mp_rank_00").mkdir(parents=True)  # megatron's legacy layout
    # a longer run: fine when told which schedule to keep (megatron refuses a changed one; the weight-decay
    # length train_iters x global batch changes even with a fixed lr_decay_iters)
    assert slurm_launch.main([*base, "megatron.train_iters=500", "megatron.use_checkpoint_opt_param_scheduler=true"]) == 0
    assert slurm_launch.main([*base, "megatron.train_iters=500", "megatron.lr_decay_iters=400"]) == 2
    assert "use_checkpoint_opt_param_scheduler=true to keep the checkpoint's schedule" in capsys.readouterr().err
    assert slurm_launch.main([*base, "megatron.hidden_size=64"]) == 2
    assert "megatron.hidden_size: 128 -> 64" in capsys.readouterr().err


def test_train_iters_and_checkpoint_dir():
    assert slurm_launch.train_iters({"train_iters": 7}) == 7
    assert slurm_launch.train_iters({"train_samples": 1000, "global_batch_size": 96}) == 10
    assert slurm_launch.train_iters({"train_samples": 1000, "global_batch_size": 96,
                                     "rampup_batch_size": [16, 16, 500]}) is None
    recipe = load_recipe(TINY, ["run.dir=/x/run"])
    assert slurm_launch.checkpoint_dir(recipe) == Path("/x/run/checkpoints")
    recipe = load_recipe(TINY, ["megatron.save=/y/ckpt"])
    assert slurm_launch.checkpoint_dir(recipe) == Path("/y/ckpt")


# ---------------------------------------------------------------------------------------------
# the recipes


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))  # every shipped recipe
def test_recipes_load(name):
    recipe = load_recipe(ROOT / "configs" / f"{name}.yaml")
    assert recipe.megatron["num_experts"] and recipe.acmoe.router == "ac"


def _moe_and_ac_layers(recipe):

    mg = recipe.megatron
    freq = mg.get("moe_layer_freq", 1)
    return (layers.moe_layers(mg["num_layers"], freq),
            layers.ac_layers(mg["num_layers"], freq, recipe.acmoe.first_ac_layer))


def test_paper_medium_models():
    switch = load_recipe(ROOT / "configs" / "switch_m_wt103.yaml")
    glam = load_recipe(ROOT / "configs" / "glam_m_wt103.yaml")
    for r in (switch, glam):
        mg = r.megatron
        assert (mg["hidden_size"], mg["num_attention_heads"], mg["num_experts"], mg["moe_router_topk"]) == (352, 8, 16, 2)
        assert mg["moe_ffn_hidden_size"] == 352 and mg["seq_length"] == 512
        assert mg["lr"] == pytest.approx(7e-4) and mg["lr_warmup_iters"] == 4000 and mg["lr_decay_style"] == "constant"
        assert mg["hidden_dropout"] == mg["attention_dropout"] == 0.1
        assert r.acmoe.first_ac_layer == 3 and r.data.path == "data/wikitext103" and not r.data.prepare_stdlib
    # Switch-M: 6 layers, all MoE, AC on MoE layers 3-6
    assert switch.megatron["num_layers"] == 6
    assert _moe_and_ac_layers(switch) == ([1, 2, 3, 4, 5, 6], [3, 4, 5, 6])
    assert (switch.megatron["global_batch_size"], switch.megatron["train_iters"]) == (96, 80000)
    # GLaM-M: 12 layers, MoE and dense blocks alternating, AC on MoE layers 3-6
    assert glam.megatron["num_layers"] == 12
    assert glam.megatron["moe_layer_freq"] == [1, 0] * 6
    assert _moe_and_ac_layers(glam) == ([1, 3, 5, 7, 9, 11], [5, 7, 9, 11])
    assert (glam.megatron["global_batch_size"], glam.megatron["train_iters"]) == (48, 120000)
    from acmoe_megatron.runtime.recipe import megatron_argv

    argv = megatron_argv(glam.megatron)
    assert argv[argv.index("--moe-layer-freq") + 1] == "[1,0,1,0,1,0,1,0,1,0,1,0]"


def test_multinode_recipe_layout():
    recipe = load_recipe(MULTINODE)
    mg = recipe.megatron
    assert (mg["num_experts"], mg["hidden_size"]) == (8, 4096)
    assert (mg["tensor_model_parallel_size"], mg["pipeline_model_parallel_size"], mg["expert_model_parallel_size"]) == (2, 2, 8)
    assert mg["sequence_parallel"] is True and mg["fp8"] == "hybrid" and mg["transformer_impl"] == "transformer_engine"
    layout = parallel_layout(mg, 16)  # 2 nodes x 8 GPUs
    assert (layout["dp"], layout["expert_dp"], layout["grad_accum"]) == (4, 1, 64)
    assert parallel_layout(mg, 32)["dp"] == 8
    with pytest.raises(ConfigError, match="8 processes cannot hold expert parallel 8"):
        parallel_layout(mg, 8)
    assert yaml.safe_load(MULTINODE.read_text())["megatron"] == mg


def test_min_nodes_asks_for_a_node_range_checked_at_every_count(capsys, tmp_path):
    tiny = str(ROOT / "configs" / "tiny_cpu.yaml")
    common = ["--config", tiny, "--gpus-per-node", "0", "--run-dir", str(tmp_path / "run")]
    data = f"data.path={tmp_path / 'data'}"
    rc, script, err = dry_run(capsys, *common, "--nodes", "2", "--min-nodes", "1", data,
                              "megatron.expert_model_parallel_size=1")
    assert rc == 0, err
    assert "--nodes=1-2" in directives(script)
    assert not [d for d in directives(script) if d.startswith("--ntasks-per-node")]  # it would pin the minimum
    # SLURM may start a 2-4 node job on 3 nodes: EP=2 on 3 processes does not tile
    rc, _, err = dry_run(capsys, *common, "--nodes", "4", "--min-nodes", "2", data, "megatron.micro_batch_size=2")
    assert rc == 2 and "--min-nodes 2: on 3 node(s) x 1 process(es): 3 processes cannot hold expert parallel 2" in err
    # EP=2 on one process per node cannot run on 1 node: refused now, naming the count
    rc, _, err = dry_run(capsys, *common, "--nodes", "2", "--min-nodes", "1", data)
    assert rc == 2 and "--min-nodes 1: on 1 node(s) x 1 process(es)" in err
    rc, _, err = dry_run(capsys, *common, "--nodes", "2", "--min-nodes", "3", data)
    assert rc == 2 and "--min-nodes 3: between 1 and --nodes 2" in err
    rc, script, _ = dry_run(capsys, *common, "--nodes", "2", data)
    assert "--nodes=2" in directives(script)
