"""``acmoe-preflight``: prove a recipe's layout, precision, storage and memory on the machines it will
run on, in minutes, before the real job spends the allocation.

    acmoe-preflight --config configs/tiny_cpu.yaml --nproc 2          # this machine (CPU: gloo)
    acmoe-preflight --config configs/gpu_debug.yaml                   # one process per GPU
    acmoe-preflight --config configs/multinode_h100_fp8.yaml --memory-only --world-size 16 \\
        --gpu-memory-gib 80 --vocab-size 32000                        # the estimate alone, anywhere
    acmoe-preflight --report DIR                                      # merge a finished run's rank files
    acmoe-launch slurm ... --preflight [--then-submit]                # on the job's own nodes (SLURM)

Before any process starts, the full recipe is planned at the world size (megatron's own argument
checks, exit 2 on a wrong recipe) and its memory per GPU estimated (runtime/preflight/memory.py).
Then the recipe's exact parallel layout runs on the real processes with the model shrunk
(runtime/preflight/plan.py) and every process reports its items (runtime/preflight/worker.py):
environment, fused paths, FP8 GEMM, memory against its GPU, storage, training steps, pipeline
labels, collectives, checkpoint and TensorBoard round trips. Output: one table on stdout and
``preflight.json`` in ``--out`` (default ``preflight/<run name>-<time>`` under the current
directory, not inside run.dir, whose file system is one of the checks); exit 0 when every required
item passed, 3 when one failed (the table names the node, the rank, the item and the fix), 2 when
the recipe is refused. GPU items report "skipped: no GPU" on a CPU machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from acmoe_megatron.cli.common import ensure_data, free_port
from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.core.exit_codes import EXIT_CONFIG, EXIT_PREFLIGHT_FAILED
from acmoe_megatron.runtime.lifetime import wrapped
from acmoe_megatron.runtime.preflight.memory import estimate_memory, memory_fix, memory_verdict, size
from acmoe_megatron.runtime.preflight.plan import PLAN_FILE, SHRUNK_FILE, PreflightPlan, expert_shape, shrink
from acmoe_megatron.runtime.preflight.report import merge, read_ranks, table, write_report
from acmoe_megatron.runtime.recipe import load_recipe, write_resolved
from acmoe_megatron.runtime.run_plan import build_plan

WORKER = "acmoe_megatron.runtime.preflight.worker"
DEFAULT_STEPS = 4


def default_out(recipe, stamp: str) -> Path:
    """``preflight/<run name>-<time>`` under the current directory: not inside run.dir, whose file
    system is one of the things checked (an unwritable run.dir must still get its report)."""
    name = recipe.run.name or Path(recipe.run.dir).name
    return Path("preflight") / f"{name}-{stamp}"


def prepare(config: str, overrides: list[str], world_size: int, out: Path | None, *, steps: int = DEFAULT_STEPS,
            remote: bool = False, gpu_memory_gib: float | None = None, vocab_size: int | None = None,
            keep: bool = False) -> PreflightPlan:
    """Plan the full recipe at ``world_size`` (ConfigError when it is refused), estimate its memory,
    write the shrunk recipe and ``plan.json`` into the output directory; the plan."""

    if steps < 3:
        raise ConfigError(f"--steps {steps}: the preflight trains at least 3 steps")
    recipe = load_recipe(config, overrides)
    full = build_plan(recipe, world_size, host_checks=not remote, vocab_standin=vocab_size)
    try:
        memory, memory_error = estimate_memory(full.args), None
    except Exception as err:  # noqa: BLE001 - megatron's estimator does not cover every model; say so
        memory, memory_error = None, f"megatron's theoretical-memory estimate failed: {type(err).__name__}: {err}"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (out or default_out(recipe, stamp)).absolute()
    shrunk, dirs = shrink(recipe, full.layout, steps, stamp)
    if full.data_ready:  # the shrunk recipe passes the same checks (our shrinking must never be the failure)
        try:
            build_plan(shrunk, world_size, host_checks=False)
        except ConfigError as err:
            raise ConfigError(f"the preflight's shrunk model of this recipe is refused ({err}); please report "
                              "it with the recipe") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("rank_*.json"):
            stale.unlink()
        write_resolved(shrunk, out).rename(out / SHRUNK_FILE)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write the preflight's report there ({err}); pass --out DIR") from None
    plan = PreflightPlan(
        config=str(config), recipe_hash=recipe.hash(), world_size=world_size, layout=full.layout,
        shrunk=str(out / SHRUNK_FILE), steps=steps, out=str(out), scratch=dirs["scratch"],
        checkpoint_dir=dirs["checkpoint_dir"], tensorboard_dir=dirs["tensorboard_dir"], memory=memory,
        memory_error=memory_error, expert_shape=expert_shape(recipe), fp8=recipe.megatron.get("fp8"),
        fp8_recipe=recipe.megatron.get("fp8_recipe"), keep=keep,
        stated_gpu_memory=int(gpu_memory_gib * 2**30) if gpu_memory_gib else None)
    plan.write(out)
    return plan


def finish(out: Path, log: str | None = None) -> tuple[int, str]:
    """Merge the rank files in ``out`` into preflight.json; (exit code, table)."""
    plan = PreflightPlan.read(out / PLAN_FILE)
    report = merge(vars(plan), read_ranks(out, plan.world_size), log=log)
    write_report(out, report)
    return (0 if report["verdict"] == "pass" else EXIT_PREFLIGHT_FAILED), table(report)


def _run_local(plan: PreflightPlan, nproc: int, timeout: float) -> None:
    """torchrun ``nproc`` workers; stopped (the whole process group) at ``timeout`` seconds."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    log = Path(plan.out) / "workers.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", WORKER,
           "--plan", str(Path(plan.out) / PLAN_FILE), "--timeout", str(timeout)]
    print(f"[acmoe-preflight] {nproc} process(es), shrunk recipe {plan.shrunk}; log {log}", flush=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(wrapped(cmd), env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"[acmoe-preflight] stopped after --timeout {timeout:.0f} s", flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acmoe-preflight", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--config", help="YAML recipe")
    p.add_argument("--nproc", type=int, default=None, help="processes on this machine (default: GPUs, or 2)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    p.add_argument("--out", default=None, help="report directory (default: preflight/<run name>-<time>)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the workers are stopped (default 600)")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="compare the memory estimate with a GPU of this size where none is visible")
    p.add_argument("--memory-only", action="store_true", help="print the memory estimate and stop (no processes)")
    p.add_argument("--world-size", type=int, default=None, help="with --memory-only: the job's process count")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="with --memory-only: the tokenizer's vocabulary when the data is not prepared yet")
    p.add_argument("--keep", action="store_true", help="keep the shrunk run's checkpoint and TensorBoard files")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="merge the rank files of a preflight in DIR into preflight.json, print the table")
    p.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides")
    return p


def memory_only(cli) -> int:

    if not cli.world_size:
        raise ConfigError("--memory-only needs --world-size (the job's process count)")
    recipe = load_recipe(cli.config, cli.overrides)
    plan = build_plan(recipe, cli.world_size, host_checks=False, vocab_standin=cli.vocab_size)
    mem = estimate_memory(plan.args)
    lay = plan.layout
    print(f"acmoe-preflight: memory of {cli.config} per GPU at world size {cli.world_size} ("
          + ", ".join(f"{k} {lay[k]}" for k in ("tp", "pp", "ep", "etp", "dp")) + f"), {mem['stage']}, "
          f"{mem['precision']}, vocabulary {plan.args.padded_vocab_size or cli.vocab_size}:")
    for key in ("parameters", "gradients", "optimizer", "activations", "total"):
        print(f"  {key:<12} {size(mem[key + '_bytes'])}")
    print(f"  ({mem['parameters_on_stage'] / 1e9:.3f} B parameters on the stage; activations: "
          f"{mem['activation_formula']}, {mem['micro_batches']} micro-batches)")
    if cli.gpu_memory_gib:
        status, line = memory_verdict(mem, int(cli.gpu_memory_gib * 2**30), "--gpu-memory-gib")
        print(f"verdict: {status.upper()}: {line}" + (f"; fix: {memory_fix()}" if status == "fail" else ""))
        return 0 if status == "pass" else EXIT_PREFLIGHT_FAILED
    return 0


def main(argv=None) -> int:
    cli = _parser().parse_args(argv)
    if cli.report:
        code, text = finish(Path(cli.report))
        print(text)
        return code
    if not cli.config:
        print("acmoe-preflight: error: --config is required (or --report DIR)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if cli.memory_only:
            return memory_only(cli)
        recipe = load_recipe(cli.config, cli.overrides)
        import torch

        nproc = cli.nproc or torch.cuda.device_count() or 2
        ensure_data(recipe)
        # with a GPU, what this machine lacks (TE, FP8 capability) is a reported item, not a refusal;
        # without one, a GPU recipe is refused here with the fix (megatron_args: CPU recipe on a CPU)
        plan = prepare(cli.config, cli.overrides, nproc, Path(cli.out) if cli.out else None, steps=cli.steps,
                       remote=torch.cuda.is_available(), gpu_memory_gib=cli.gpu_memory_gib, keep=cli.keep)
    except ConfigError as err:
        print(f"acmoe-preflight: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    start = time.time()
    _run_local(plan, nproc, cli.timeout)
    code, text = finish(Path(plan.out), log=str(Path(plan.out) / "workers.log"))
    print(text)
    print(f"[acmoe-preflight] {time.time() - start:.0f} s; report {Path(plan.out) / 'preflight.json'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
