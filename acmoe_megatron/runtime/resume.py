"""What a resume may change: a run directory that holds checkpoints is resumed only with the recipe
it was trained with, up to the keys listed here (run length, logging, paths, the data-parallel
process count and an expert-parallel size > 1); any other difference is refused before a process
starts, with the keys named (``acmoe-pretrain`` and ``acmoe-launch resolve`` call it).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from acmoe_megatron.core.errors import ConfigError

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
            "image_interval", "trace_samples", "checkpoint_checksums", "checkpoint_verify", "hang_timeout_s",
            "hang_timeout_checkpoint_s"},
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
