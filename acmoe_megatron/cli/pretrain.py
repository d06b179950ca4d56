"""``acmoe-pretrain``: one command from a recipe to a finished run on one machine.

It validates the recipe in a single process first (run_plan.build_plan: unknown keys, wrong types,
megatron's own argument checks at this world size, the shard manifest; every error exits 2 before
any worker starts), builds the embedded stdlib corpus when the recipe's data directory is missing and
``data.prepare_stdlib`` allows it, writes the resolved recipe to ``<run.dir>/config.yaml``, starts
``torchrun --nproc_per_node N -m acmoe_megatron.runtime.train`` on it with the hang watch beside it
(``runtime/hang_watch.py``: a rank that makes no progress within ``run.hang_timeout_s`` ends the run,
exit 124, naming it), and finally prints where the TensorBoard logs, the checkpoints and the run
summary are.

Examples::

    acmoe-pretrain --config configs/tiny_cpu.yaml --nproc 2
    acmoe-pretrain --config configs/tiny_cpu.yaml --nproc 2 megatron.train_iters=20 run.dir=runs/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from acmoe_megatron.cli.common import ensure_data, free_port
from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.core.exit_codes import EXIT_CONFIG, EXIT_NONFINITE, EXIT_REASON_FILE, EXIT_STOPPED_EARLY
from acmoe_megatron.runtime.checkpoint_check import check_resume_checkpoint, resume_from
from acmoe_megatron.runtime.hang_watch import Bounds, WatchThread
from acmoe_megatron.runtime.heartbeat import INSTANCE_ENV
from acmoe_megatron.runtime.lifetime import wrapped
from acmoe_megatron.runtime.recipe import load_recipe, write_resolved
from acmoe_megatron.runtime.resume import check_resume_compatible
from acmoe_megatron.runtime.run_plan import build_plan


def default_nproc() -> int:
    """One process per GPU, or 2 without a GPU (imports torch: call it after the recipe's own checks)."""
    import torch

    return torch.cuda.device_count() or 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="acmoe-pretrain", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny_cpu.yaml")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes on this machine (default: GPUs, or 2 without a GPU)")
    parser.add_argument("--resume-from", type=int, default=None, metavar="N",
                        help="resume from complete checkpoint iteration N: newer iterations are set aside as "
                             "iter_*.damaged (after a damaged save; the launcher names N when it finds one)")
    parser.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides")
    cli = parser.parse_args(argv)
    try:
        recipe = load_recipe(cli.config, cli.overrides)  # our own keys: refused here, before torch is imported
        check_resume_compatible(recipe, Path(recipe.run.dir))
        ckpt_dir = Path(recipe.megatron.get("load") or Path(recipe.run.dir) / "checkpoints")
        if cli.resume_from is not None:
            for d in resume_from(ckpt_dir, cli.resume_from):
                print(f"[acmoe] set aside {d} (newer than the checkpoint to resume from)", flush=True)
        check_resume_checkpoint(ckpt_dir, recipe.megatron.get("ckpt_step"), recipe.run.checkpoint_verify)
        nproc = cli.nproc if cli.nproc is not None else default_nproc()
        build_plan(recipe, nproc)  # megatron's own argument checks + ours, before any process starts
        ensure_data(recipe)
    except ConfigError as err:
        print(f"acmoe-pretrain: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    run_dir = Path(recipe.run.dir)
    resolved = write_resolved(recipe, run_dir)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "acmoe_megatron.runtime.train", "--config", str(resolved),
    ]
    print("[acmoe] " + " ".join(cmd), flush=True)
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)  # a stale summary must not describe this run
    reason_path = run_dir / EXIT_REASON_FILE
    reason_path.unlink(missing_ok=True)
    env[INSTANCE_ENV] = instance = uuid.uuid4().hex[:12]  # this start's heartbeats (runtime/heartbeat.py)
    proc = subprocess.Popen(wrapped(cmd), env=env)  # torchrun dies with this launcher (runtime/lifetime.py)
    watcher = None
    if recipe.run.hang_timeout_s:
        bounds = Bounds(recipe.run.hang_timeout_s, recipe.run.hang_timeout_checkpoint_s)
        watcher = WatchThread(run_dir, instance, bounds, proc).start()
    try:
        rc = proc.wait()
    except BaseException:  # as subprocess.call does (Ctrl-C reached torchrun too)
        proc.kill()
        raise
    finally:
        if watcher is not None:
            watcher.stop()
    if rc != 0 and reason_path.is_file():  # a worker's distinct exit (torchrun reports every failure as 1)
        code, _, why = reason_path.read_text().partition("\n")
        print(f"acmoe-pretrain: {why.strip()}; the latest complete checkpoint is unchanged (see the message "
              f"above). Exit {code}.", file=sys.stderr)
        return int(code)
    if rc != 0 and summary_path.is_file() and json.loads(summary_path.read_text()).get("stopped_on_nonfinite"):
        print("acmoe-pretrain: stopped on a non-finite loss/gradient; the latest checkpoint is the last "
              f"good state (see the log above). Exit {EXIT_NONFINITE}.", file=sys.stderr)
        return EXIT_NONFINITE
    if rc != 0:
        print(f"acmoe-pretrain: training failed (exit {rc}); see the log above", file=sys.stderr)
        return rc
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if summary.get("stopped_early"):
        print(f"[acmoe] stopped early at iteration {summary.get('iterations')} of {summary.get('train_iters')}; "
              f"checkpoint in {summary.get('checkpoint_dir')}. Run the same command again to resume "
              f"(exit {EXIT_STOPPED_EARLY}).")
        return EXIT_STOPPED_EARLY
    print("\n[acmoe] run finished")
    print(f"  TensorBoard logs : {summary.get('tensorboard_dir', run_dir / 'tensorboard')}"
          f"   (tensorboard --logdir {run_dir / 'tensorboard'})")
    print(f"  checkpoints      : {summary.get('checkpoint_dir', run_dir / 'checkpoints')}")
    print(f"  run summary      : {summary_path}")
    if summary:
        print(f"  final valid loss : {summary.get('final_valid_loss')} nats/token "
              f"(uniform baseline {summary.get('uniform_baseline_loss'):.3f}); "
              f"wall {summary.get('wall_time_s')} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
