"""Hooks around Megatron's training loop that its flags do not offer.

* ``install_checkpoint_retention``: ``run.keep_last_checkpoints`` — after each completed save keep
  only the newest N ``iter_*`` directories.
* ``install_expert_norm``: ``acmoe.expert_norm`` — registers expert_norm.py's rescale on the
  optimizer megatron builds (after its checkpoint load, so a resume continues on the sphere).
* ``log_router_grad_norms``: ``run.log_router_grad_norms`` — per-step router gradient norms after
  megatron's gradient reduction (used by the parallel-layout parity tests).
* Fault injection for the reliability tests, off unless the environment asks for it:
  ``ACMOE_FAULT_SAVE_DELAY_S`` (+ ``ACMOE_FAULT_SAVE_ITER``) holds a checkpoint save open after its
  shards are written and before megatron records it; ``ACMOE_FAULT_NAN_AT_ITER`` makes one
  iteration's loss NaN.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def install_checkpoint_retention(keep_last: int) -> None:
    """Keep only the newest ``keep_last`` checkpoints: after megatron's save_checkpoint returns (the
    tracker names the new one), rank 0 deletes older ``iter_*`` directories. A directory newer than
    the tracker (a save still in flight) and the tracked one are never touched."""
    if keep_last <= 0:
        return
    import shutil

    import megatron.training.training as training
    from megatron.training import get_args

    save = training.save_checkpoint

    def save_and_prune(*args, **kwargs):
        out = save(*args, **kwargs)
        margs = get_args()
        if torch.distributed.get_rank() == 0 and margs.save:
            root = Path(margs.save)
            tracker = root / "latest_checkpointed_iteration.txt"
            if tracker.is_file() and tracker.read_text().strip().isdigit():
                latest = int(tracker.read_text().strip())
                done = sorted(int(d.name[5:]) for d in root.glob("iter_*") if d.name[5:].isdigit()
                              and int(d.name[5:]) <= latest)
                for it in done[:-keep_last]:
                    shutil.rmtree(root / f"iter_{it:07d}", ignore_errors=True)
        return out

    training.save_checkpoint = save_and_prune


def install_expert_norm() -> None:
    """Wrap megatron's ``setup_model_and_optimizer`` so that the optimizer it returns keeps the
    routers' expert embeddings at ``acmoe.expert_norm`` after every step (expert_norm.install);
    a no-op for models without such routers."""
    import megatron.training.training as training

    from acmoe_megatron import expert_norm

    setup = training.setup_model_and_optimizer

    def setup_with_expert_norm(*args, **kwargs):
        model, optimizer, scheduler = setup(*args, **kwargs)
        held = expert_norm.install(optimizer, model)
        if held and torch.distributed.get_rank() == 0:
            print(f"[acmoe] expert embeddings of {held} router(s) held at their fixed row norm after every "
                  "optimizer step", flush=True)
        return model, optimizer, scheduler

    training.setup_model_and_optimizer = setup_with_expert_norm


def log_router_grad_norms(model, run_dir: Path) -> None:
    """Wrap megatron's finalize_model_grads (once) to append each step's reduced router gradient
    norms, by global layer number, to ``run_dir/router_grad_norms_rank<R>.jsonl`` (for parity
    checks across parallel layouts)."""
    import json

    from megatron.core.transformer.moe.router import TopKRouter

    from acmoe_megatron.chunk_state import unwrap_chunk

    config = unwrap_chunk(model).config
    finalize = config.finalize_model_grads_func
    if finalize is None or getattr(finalize, "_acmoe_logged", False):
        return
    path = run_dir / f"router_grad_norms_rank{torch.distributed.get_rank()}.jsonl"
    steps = [0]

    def logged(chunks, *args, **kwargs):
        out = finalize(chunks, *args, **kwargs)
        steps[0] += 1
        norms = {}
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    grad = getattr(module.weight, "main_grad", None)
                    grad = module.weight.grad if grad is None else grad
                    norms[module.layer_number] = None if grad is None else grad.float().norm().item()
        with path.open("a") as f:
            f.write(json.dumps({"step": steps[0], "norms": norms}) + "\n")
        return out

    logged._acmoe_logged = True
    config.finalize_model_grads_func = logged


def install_fault_injection() -> None:
    """Test hook: ``ACMOE_FAULT_SAVE_DELAY_S=<s>`` sleeps after a checkpoint's shards are written
    and before megatron records it in ``latest_checkpointed_iteration.txt`` — the window in which
    a kill must leave the previous checkpoint as the one to resume from (tests/integration/test_reliability)."""
    delay = float(os.environ.get("ACMOE_FAULT_SAVE_DELAY_S", "0") or 0)
    only = os.environ.get("ACMOE_FAULT_SAVE_ITER")  # e.g. "4": only the save of iter_0000004
    if delay <= 0:
        return
    import megatron.core.dist_checkpointing as dist_checkpointing

    save = dist_checkpointing.save

    def slow_save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        out = save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        if only and not str(checkpoint_dir).rstrip("/").endswith(f"iter_{int(only):07d}"):
            return out
        print(f"[acmoe] fault injection: checkpoint shards written, sleeping {delay} s before the "
              "tracker update", flush=True)
        time.sleep(delay)
        return out

    dist_checkpointing.save = slow_save


def maybe_inject_nan(output: torch.Tensor) -> torch.Tensor:
    """Test hook: ``ACMOE_FAULT_NAN_AT_ITER=k`` makes the loss of training iteration k NaN."""
    at = os.environ.get("ACMOE_FAULT_NAN_AT_ITER")
    if not at or not torch.is_grad_enabled():
        return output
    from megatron.training import get_args

    if get_args().curr_iteration + 1 == int(at):
        return output * float("nan")
    return output
