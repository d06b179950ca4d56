"""Fault injection for the reliability tests (tests/integration/test_reliability.py), off unless the
environment asks for it; kept apart from the production hooks (``runtime/hooks.py``), whose table
and ``wrap`` it uses:

* ``ACMOE_FAULT_SAVE_DELAY_S`` (+ ``ACMOE_FAULT_SAVE_ITER``) holds a checkpoint save open after its
  shards are written and before megatron records it — the window in which a kill must leave the
  previous checkpoint as the one to resume from;
* ``ACMOE_FAULT_FSIZE_AT_ITER`` (+ ``ACMOE_FAULT_FSIZE_BYTES``) sets a real file-size limit
  (RLIMIT_FSIZE) on the process during that iteration's save, so the writes fail with EFBIG exactly
  as the kernel fails them on a full disk;
* ``ACMOE_FAULT_NAN_AT_ITER`` makes one training iteration's loss NaN;
* ``ACMOE_FAULT_STOP_AT_ITER`` (+ ``ACMOE_FAULT_STOP_RANK``, ``ACMOE_FAULT_STOP_PHASE``) SIGSTOPs one
  rank when it enters that phase of that iteration: a hung rank (on a SLURM job's first start only,
  so that the requeued job can finish).
"""

from __future__ import annotations

import os
import resource
import signal
import time

import torch

from acmoe_megatron.runtime.heartbeat import Heartbeat
from acmoe_megatron.runtime.hooks import wrap


def install_fault_injection() -> None:
    """``ACMOE_FAULT_SAVE_DELAY_S=<s>``: sleep after a checkpoint's shards are written and before
    megatron records it in ``latest_checkpointed_iteration.txt``."""
    delay = float(os.environ.get("ACMOE_FAULT_SAVE_DELAY_S", "0") or 0)
    only = os.environ.get("ACMOE_FAULT_SAVE_ITER")  # e.g. "4": only the save of iter_0000004
    if delay <= 0:
        return

    def make(save):
        def slow_save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
            out = save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
            if only and not str(checkpoint_dir).rstrip("/").endswith(f"iter_{int(only):07d}"):
                return out
            print(f"[acmoe] fault injection: checkpoint shards written, sleeping {delay} s before the "
                  "tracker update", flush=True)
            time.sleep(delay)
            return out

        return slow_save

    wrap("fault_save_delay", make)


def install_file_size_fault() -> None:
    """``ACMOE_FAULT_FSIZE_AT_ITER=k``: this process's file size is limited (RLIMIT_FSIZE) to
    ``ACMOE_FAULT_FSIZE_BYTES`` (default 64 KiB) during the checkpoint save of iteration k, with
    SIGXFSZ ignored: the writes then fail with EFBIG exactly as the kernel fails them."""
    at = os.environ.get("ACMOE_FAULT_FSIZE_AT_ITER")
    if not at:
        return
    limit = int(os.environ.get("ACMOE_FAULT_FSIZE_BYTES", str(64 * 1024)))

    def make(save):
        def limited_save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
            if not str(checkpoint_dir).rstrip("/").endswith(f"iter_{int(at):07d}"):
                return save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
            print(f"[acmoe] fault injection: file-size limit {limit} bytes during the save into {checkpoint_dir}",
                  flush=True)
            old = resource.getrlimit(resource.RLIMIT_FSIZE)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
            try:
                return save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
            finally:  # the run's own log files must stay writable
                resource.setrlimit(resource.RLIMIT_FSIZE, old)

        return limited_save

    wrap("fault_file_size", make)


def install_stop_fault(beat: Heartbeat | None, rank: int) -> None:
    """``ACMOE_FAULT_STOP_AT_ITER=k``: rank ``ACMOE_FAULT_STOP_RANK`` (default 1) stops itself with
    SIGSTOP when it enters ``ACMOE_FAULT_STOP_PHASE`` (default backward) of iteration k, after its
    heartbeat record says so. Not on a requeued SLURM job (SLURM_RESTART_COUNT > 0)."""
    at = os.environ.get("ACMOE_FAULT_STOP_AT_ITER")
    if not at or beat is None or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        return
    if rank != int(os.environ.get("ACMOE_FAULT_STOP_RANK", "1")):
        return
    phase = os.environ.get("ACMOE_FAULT_STOP_PHASE", "backward")

    def stop(step, entered):
        if step == int(at) and entered == phase:
            beat.flush()
            print(f"[acmoe] fault injection: rank {rank} stops itself (SIGSTOP) in {phase} of iteration {step} "
                  f"at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)

    beat.on_mark = stop


def maybe_inject_nan(output: torch.Tensor) -> torch.Tensor:
    """``ACMOE_FAULT_NAN_AT_ITER=k`` makes the loss of training iteration k NaN."""
    at = os.environ.get("ACMOE_FAULT_NAN_AT_ITER")
    if not at or not torch.is_grad_enabled():
        return output
    from megatron.training import get_args  # the trainer's state, imported after the CPU runtime

    if get_args().curr_iteration + 1 == int(at):
        return output * float("nan")
    return output
