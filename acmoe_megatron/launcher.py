"""``acmoe-pretrain``: one command from a recipe to a finished run on one machine.

It validates the recipe in a single process first (run_plan.build_plan: unknown keys, wrong types,
megatron's own argument checks at this world size, the shard manifest; every error exits 2 before
any worker starts), builds the embedded stdlib corpus when the recipe's data directory is missing and
``data.prepare_stdlib`` allows it, writes the resolved recipe to ``<run.dir>/config.yaml``, starts
``torchrun --nproc_per_node N -m acmoe_megatron.train`` on it, and finally prints where the
TensorBoard logs, the checkpoints and the run summary are.

Examples::

    acmoe-pretrain --config configs/tiny_cpu.yaml --nproc 2
    acmoe-pretrain --config configs/tiny_cpu.yaml --nproc 2 megatron.train_iters=20 run.dir=runs/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from acmoe_megatron.checkpoint_check import check_resume_checkpoint, resume_from
from acmoe_megatron.config import ConfigError, load_recipe, write_resolved
from acmoe_megatron.exit_codes import EXIT_CONFIG, EXIT_NONFINITE, EXIT_REASON_FILE, EXIT_STOPPED_EARLY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(module: str, nproc: int, args: list[str], *, prog: str, what: str, echo: bool = False) -> int:
    """torchrun ``nproc`` local processes of ``python -m module args`` (the workers of acmoe-eval,
    acmoe-generate, acmoe-export-hf); their exit code, with a line naming ``what`` failed."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", module, *args]
    if echo:
        print(f"[{prog}] " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"{prog}: {what} failed (exit {rc}); see the log above", file=sys.stderr)
    return rc


def ensure_data(recipe) -> None:
    """Build the embedded default corpus if the recipe points at a missing directory."""
    from acmoe_megatron.data.megatron_indexed import uses_megatron_data
    from acmoe_megatron.data.remote import is_remote

    path = Path(recipe.data.path)
    if uses_megatron_data(recipe.megatron) or is_remote(recipe.data.path) or (path / "manifest.json").is_file():
        return  # megatron's indexed data needs no shards; a remote manifest is read by the launch checks
    if not recipe.data.prepare_stdlib:
        raise ConfigError(
            f"no shard manifest at {path}/manifest.json; build shards with "
            f"`acmoe-data prepare --source ... --out {path}` or set data.prepare_stdlib: true"
        )
    from acmoe_megatron.data.cli import main as data_main

    seq = recipe.megatron.get("seq_length")
    if seq is None:
        raise ConfigError("megatron.seq_length is needed to build the embedded corpus shards")
    print(f"[acmoe] building the embedded stdlib corpus at {path} (seq_length {seq})", flush=True)
    rc = data_main(["prepare", "--source", "stdlib", "--out", str(path), "--seq-length", str(seq)])
    if rc:
        raise SystemExit(rc)



# Parallel sizes a resume cannot change. Measured with megatron-core 0.19 (docs/reliability.md):
# the model and optimizer tensors of a torch_dist checkpoint are stored by global name and reshard,
# but the non-tensor optimizer state (param groups, step) is saved per optimizer, and megatron builds
# one optimizer at expert-parallel size 1 and a dense + expert chain above it, so a 1 <-> >1 change
# fails inside megatron's load ("Could not find parameter group ..."); an expert-parallel size
# change between sizes > 1 (e.g. 2 -> 4) resumes with the step losses of the uninterrupted run.
# The number of data-parallel processes may change: the data position is megatron's global
# consumed-sample count, and with the same global batch every step holds the same samples
# (tests/integration/test_reliability.py records them with run.trace_samples).
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_tensor_parallel_size",
               "context_parallel_size", "num_layers_per_virtual_pipeline_stage")
EXPERT_PARALLEL = "expert_model_parallel_size"

# Keys that may change between a run and its resumption; any other difference is refused.
RESUMABLE_CHANGES = {
    "megatron": {"train_iters", "exit_interval", "exit_duration_in_mins", "exit_signal_handler", "exit_signal",
                 "save_interval", "eval_interval", "eval_iters", "log_interval", "lr_decay_iters",
                 "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler", "tensorboard_dir", "load",
                 "save", "finetune",
                 "no_load_optim", "no_load_rng", "ckpt_step", "wandb_project", "wandb_exp_name", "wandb_save_dir",
                 "wandb_entity"},
    "run": {"dir", "name", "log_router_grad_norms", "keep_last_checkpoints", "peak_tflops", "per_expert_scalars_max",
            "image_interval", "trace_samples"},
    "acmoe": {"compile"},  # the same maths, other kernels
    "data": {"verify_checksums"},
}


def _schedule_length_change(old: dict, new: dict) -> list[str]:
    """megatron's optimizer-parameter scheduler stores its lengths in the checkpoint (the lr decay
    length: lr_decay_iters, or train_iters when unset; the weight-decay length: train_iters x global
    batch) and asserts on resume when one changed, unless told which schedule to keep: say so before
    any process starts."""
    if new.get("override_opt_param_scheduler") or new.get("use_checkpoint_opt_param_scheduler"):
        return []
    changed = []
    if old.get("train_iters") != new.get("train_iters"):
        changed.append(f"train_iters {old.get('train_iters')} -> {new.get('train_iters')} (the length of megatron's "
                       "weight-decay schedule)")
    before = old.get("lr_decay_iters") or old.get("train_iters")
    after = new.get("lr_decay_iters") or new.get("train_iters")
    if before != after:
        changed.append(f"the learning-rate decay length {before} -> {after} (lr_decay_iters, or train_iters when "
                       "unset)")
    if not changed:
        return []
    return [", ".join(changed) + ": megatron refuses a changed schedule on resume. Set "
            "megatron.use_checkpoint_opt_param_scheduler=true to keep the checkpoint's schedule, or "
            "megatron.override_opt_param_scheduler=true to take the new one"]


def _expert_parallel_change(old: dict, new: dict) -> list[str]:
    """An expert-parallel size change across 1 <-> >1 (megatron cannot load the optimizer state)."""
    before, after = int(old.get(EXPERT_PARALLEL) or 1), int(new.get(EXPERT_PARALLEL) or 1)
    if before == after or (before > 1 and after > 1):
        return []
    return [f"megatron.{EXPERT_PARALLEL}: {before} -> {after}: megatron-core keeps the optimizer state of "
            "an expert-parallel size of 1 in one optimizer and of a larger size in two (dense, experts), "
            "and cannot load one into the other. Resume with an expert-parallel size "
            f"{'> 1' if before > 1 else 'of 1'} (e.g. {before}), or start the optimizer afresh from the "
            "weights with megatron.no_load_optim=true (loses Adam's moments)"]


def check_resume_compatible(recipe, run_dir: Path) -> None:
    """Resuming a run directory that has checkpoints with a different recipe: name the keys."""
    import yaml

    previous_path = run_dir / "config.yaml"
    ckpt = Path(recipe.megatron.get("load") or recipe.megatron.get("save") or run_dir / "checkpoints")
    if not previous_path.is_file() or not (ckpt / "latest_checkpointed_iteration.txt").is_file():
        return
    previous = yaml.safe_load(previous_path.read_text()) or {}
    current = recipe.to_dict()
    defaults = type(recipe)().to_dict()  # keys added since the old run was written keep their defaults
    diffs = []
    for section, values in current.items():
        old = {**defaults.get(section, {}), **(previous.get(section, {}) or {})}
        for key in sorted(set(values) | set(old)):
            if key in RESUMABLE_CHANGES.get(section, set()) or (section, key) == ("megatron", EXPERT_PARALLEL):
                continue
            if values.get(key) != old.get(key):
                diffs.append(f"{section}.{key}: {old.get(key)!r} -> {values.get(key)!r}")
    diffs += _schedule_length_change(previous.get("megatron", {}) or {}, current.get("megatron", {}))
    if not current["megatron"].get("no_load_optim"):
        diffs += _expert_parallel_change(previous.get("megatron", {}) or {}, current.get("megatron", {}))
    layout = [d for d in diffs if d.split(":")[0] in {f"megatron.{k}" for k in LAYOUT_KEYS}]
    if diffs:
        raise ConfigError(
            f"{run_dir} holds checkpoints of a run with a different configuration; resuming would mix "
            "them. Differences: " + "; ".join(diffs) + ". Use a new run.dir, or restore these values."
            + (" A resume keeps the run's tensor/pipeline/context parallel sizes (not measured to reshard); the "
               "number of data-parallel processes (--nproc, same global batch) and an expert-parallel size "
               "> 1 may change." if layout else "")
        )


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
    nproc = cli.nproc
    if nproc is None:
        import torch

        nproc = torch.cuda.device_count() or 2
    try:
        from acmoe_megatron.run_plan import build_plan

        recipe = load_recipe(cli.config, cli.overrides)
        check_resume_compatible(recipe, Path(recipe.run.dir))
        ckpt_dir = Path(recipe.megatron.get("load") or Path(recipe.run.dir) / "checkpoints")
        if cli.resume_from is not None:
            for d in resume_from(ckpt_dir, cli.resume_from):
                print(f"[acmoe] set aside {d} (newer than the checkpoint to resume from)", flush=True)
        check_resume_checkpoint(ckpt_dir, recipe.megatron.get("ckpt_step"))
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
        "-m", "acmoe_megatron.train", "--config", str(resolved),
    ]
    print("[acmoe] " + " ".join(cmd), flush=True)
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)  # a stale summary must not describe this run
    reason_path = run_dir / EXIT_REASON_FILE
    reason_path.unlink(missing_ok=True)
    rc = subprocess.call(cmd, env=env)
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
