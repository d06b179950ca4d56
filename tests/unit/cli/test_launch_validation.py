"""Every recipe error is caught in the launching process, before any worker or job starts
(run_plan.build_plan): ``acmoe-pretrain`` and ``acmoe-launch slurm --dry-run`` exit 2 with one
line naming the key. The cases include each one a new user met only inside the workers, 30-47 s
after start (warm-up = train_iters, a non-integer hidden size, experts vs expert parallelism, a
sequence length other than the shards', a damaged shard) and wrong types of our own keys.

Each case runs in this process (the launchers' ``main``) with ``subprocess`` replaced by a stand-in
that fails the test if called: no worker, no ``torchrun``, no ``sbatch``. The wall time of each
case is printed (``-s``) and written to the test report; one case also runs as a real command.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from acmoe_megatron.cli import launch as slurm_launch
from acmoe_megatron.cli import pretrain as launcher

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from acmoe_megatron.data import prepare

    out = tmp_path_factory.mktemp("launch_validation") / "data"
    prepare(source="stdlib", out_dir=out, seq_length=64, max_bytes=200_000)
    return out


@pytest.fixture(scope="module")
def damaged(shards, tmp_path_factory):
    """A copy of the shards with one training shard truncated."""
    import shutil

    copy = tmp_path_factory.mktemp("launch_validation_damaged") / "data"
    shutil.copytree(shards, copy)
    shard = sorted(copy.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-512])
    return copy


# (name, overrides, expected text in the one-line error, checked by acmoe-launch slurm too)
CASES = [
    ("warmup_equals_train_iters", ["megatron.train_iters=30", "megatron.lr_warmup_iters=30"], "megatron.lr_warmup_iters", True),
    ("hidden_size_not_int", ["megatron.hidden_size=abc"], "megatron.hidden_size", True),
    ("experts_vs_expert_parallel", ["megatron.num_experts=7"], "num_experts", True),
    ("seq_length_vs_shards", ["megatron.seq_length=128"], "megatron.seq_length=128", True),
    ("damaged_shard", ["DAMAGED"], "bytes, the manifest records", True),
    ("data_seed_type", ["data.seed=abc"], "data.seed='abc'", True),
    ("keep_last_type", ["run.keep_last_checkpoints=two"], "run.keep_last_checkpoints='two'", True),
    ("first_ac_layer_float", ["acmoe.first_ac_layer=3.7"], "acmoe.first_ac_layer=3.7", True),
    ("first_ac_layer_beyond_moe_layers", ["acmoe.first_ac_layer=9"], "acmoe.first_ac_layer=9", True),
    ("unknown_megatron_key", ["megatron.hiden_size=64"], "did you mean 'hidden_size'", True),
    ("global_batch_not_divisible", ["megatron.global_batch_size=7"], "global_batch", True),
    ("topk_above_experts", ["megatron.moe_router_topk=9"], "moe_router_topk", True),
    ("tensor_parallel_vs_world", ["megatron.tensor_model_parallel_size=3"], "tensor", True),
    ("unknown_router", ["acmoe.router=linear"], "acmoe.router='linear'", True),
    # a dry run only warns (the shards may exist on the cluster alone); a submission refuses
    ("missing_data", ["data.path=/nonexistent/shards", "data.prepare_stdlib=false"], "/nonexistent/shards", False),
    ("elliptical_beyond_layers", ["elliptical.enabled=true", "elliptical.first_layer=9"], "elliptical.first_layer=9", True),
    ("train_split_below_one_batch", ["megatron.global_batch_size=160000"], "fewer than one global batch", True),
    ("forced_balance_with_ac", ["megatron.moe_router_force_load_balancing=true"], "moe_router_force_load_balancing", True),
    ("bf16_on_this_cpu", ["megatron.bf16=true"], "megatron.bf16: False", False),  # a host check: not for SLURM
]


def _overrides(case_overrides, shards, damaged, run_dir):
    data = damaged if case_overrides == ["DAMAGED"] else shards
    given = [o for o in case_overrides if o != "DAMAGED"]
    base = [f"data.path={data}", "megatron.seq_length=64", f"run.dir={run_dir}"]
    if any(o.startswith("megatron.seq_length=") for o in given):
        base.remove("megatron.seq_length=64")
    if any(o.startswith("data.path=") for o in given):
        base = [b for b in base if not b.startswith("data.path=")]
    return base + given


@pytest.fixture
def no_processes(monkeypatch):
    """Any attempt to start a process (torchrun, sbatch) fails the test. megatron runs `git` once
    when first imported (package_info): import it before the stand-in goes in."""
    from acmoe_megatron.runtime.recipe import megatron_actions

    megatron_actions()

    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")

    for name in ("call", "run", "Popen", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)


def _one_line_error(err: str, expected: str) -> str:
    lines = [line for line in err.splitlines() if "config error" in line]
    assert len(lines) == 1, err[-3000:]
    assert expected in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name, case, expected, slurm", CASES, ids=[c[0] for c in CASES])
def test_bad_recipe_fails_before_any_process(name, case, expected, slurm, shards, damaged, tmp_path, capsys,
                                             no_processes, record_property):
    run_dir = tmp_path / "run"
    overrides = _overrides(case, shards, damaged, run_dir)
    start = time.perf_counter()
    rc = launcher.main(["--config", str(TINY), "--nproc", "2", *overrides])
    wall = time.perf_counter() - start
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    line = _one_line_error(err, expected)
    assert not (run_dir / "tensorboard").exists()  # nothing was written for a run that never started
    record_property("acmoe_pretrain_wall_s", round(wall, 2))
    report = [f"[{name}] acmoe-pretrain: exit 2 in {wall:.2f} s: {line}"]
    if not slurm:
        print(*report, sep="\n")
        return
    start = time.perf_counter()
    rc = slurm_launch.main(["slurm", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "0",
                            "--procs-per-node", "2", "--dry-run", *overrides])
    wall = time.perf_counter() - start
    out = capsys.readouterr()
    assert rc == 2 and not out.out, out.out[-2000:] + out.err[-3000:]  # no job script rendered
    line = _one_line_error(out.err, expected)
    record_property("acmoe_launch_slurm_wall_s", round(wall, 2))
    report.append(f"[{name}] acmoe-launch slurm --dry-run: exit 2 in {wall:.2f} s: {line}")
    print(*report, sep="\n")


def test_a_good_recipe_passes_the_plan(shards, tmp_path, capsys, no_processes):
    """The same checks accept the recipe the cases start from (the dry run renders a job)."""
    overrides = [f"data.path={shards}", "megatron.seq_length=64", f"run.dir={tmp_path / 'run'}"]
    rc = slurm_launch.main(["slurm", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "0",
                            "--procs-per-node", "2", "--dry-run", *overrides])
    out = capsys.readouterr()
    assert rc == 0 and "#SBATCH" in out.out, out.err[-3000:]


def test_the_command_itself_exits_2_within_seconds(shards, tmp_path):
    """One case end to end, as a user runs it: the real command, its exit code and wall time."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", str(TINY), "--nproc", "2",
         f"data.path={shards}", "megatron.seq_length=64", f"run.dir={tmp_path / 'run'}", "megatron.hidden_size=abc"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    wall = time.perf_counter() - start
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "acmoe-pretrain: config error: megatron.hidden_size: argument --hidden-size: invalid int value: 'abc'")
    assert "torch.distributed.run" not in out.stdout  # the launcher never printed its torchrun command
    print(f"acmoe-pretrain megatron.hidden_size=abc: exit 2 in {wall:.1f} s (interpreter start and imports included)")
