"""Hooks around Megatron's training loop that its flags do not offer.

* ``install_checkpoint_retention``: ``run.keep_last_checkpoints`` — after each completed save keep
  only the newest N ``iter_*`` directories.
* ``install_expert_norm``: ``acmoe.expert_norm`` — registers expert_norm.py's rescale on the
  optimizer megatron builds (after its checkpoint load, so a resume continues on the sphere).
* ``log_router_grad_norms``: ``run.log_router_grad_norms`` — per-step router gradient norms after
  megatron's gradient reduction (used by the parallel-layout parity tests).
* ``install_disk_full_exit``: a checkpoint save that fails for lack of space (ENOSPC, EDQUOT, or
  EFBIG from a file-size limit) ends the run with ``EXIT_DISK_FULL`` and a message naming the
  directory, the space the save needed and what is free; the half-written iteration is removed (it
  was never recorded as latest) so that its space comes back.
* Fault injection for the reliability tests, off unless the environment asks for it:
  ``ACMOE_FAULT_SAVE_DELAY_S`` (+ ``ACMOE_FAULT_SAVE_ITER``) holds a checkpoint save open after its
  shards are written and before megatron records it; ``ACMOE_FAULT_FSIZE_AT_ITER`` (+
  ``ACMOE_FAULT_FSIZE_BYTES``) sets a real file-size limit (RLIMIT_FSIZE) on the process during that
  iteration's save, so the writes fail with EFBIG as on a full disk; ``ACMOE_FAULT_NAN_AT_ITER``
  makes one iteration's loss NaN.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
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

    from acmoe_megatron.model import expert_norm
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

    from acmoe_megatron.model.chunk_state import unwrap_chunk

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


SPACE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "a file exceeded the process's file-size limit (ulimit -f)"}
NEARLY_FULL = 16 * 2**20  # with no earlier checkpoint to measure: a filesystem with less free is full


_WRITE_ERRORS: list[OSError] = []  # out-of-space errors of megatron's checkpoint writers in this process


def _space_errno(err: BaseException) -> int | None:
    """The errno of an out-of-space OSError behind a failed save: in ``err``'s cause/context chain,
    or recorded by ``_record_write_errors`` (megatron's filesystem writer turns a writer's OSError
    into a RuntimeError that keeps only its type, so the errno is taken where it is raised)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
            return e.errno
        todo += [e.__cause__, e.__context__]
    return _WRITE_ERRORS[-1].errno if _WRITE_ERRORS else None


def _record_write_errors() -> None:
    """Wrap megatron's ``FileSystemWriterAsync.write_preloaded_data`` (which returns a write error
    as ``(worker, exception)`` instead of raising it) to remember out-of-space errors."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data

    def recording_write(*args, **kwargs):
        try:
            out = write(*args, **kwargs)
        except OSError as err:
            if err.errno in SPACE_ERRNOS:
                _WRITE_ERRORS.append(err)
            raise
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], OSError) and out[1].errno in SPACE_ERRNOS:
            _WRITE_ERRORS.append(out[1])
        return out

    FileSystemWriterAsync.write_preloaded_data = staticmethod(recording_write)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def diagnose_space(err: BaseException, root: Path, partial: Path, needed: int | None) -> str | None:
    """Why a failed save ran out of space, or None when it did not: an out-of-space errno of the
    failed writes, or less free space on the filesystem than the save needs (``needed``: the previous
    checkpoint's size)."""
    code = _space_errno(err)
    if code is not None:
        return SPACE_ERRNOS[code]
    free = shutil.disk_usage(root).free
    if free < (needed if needed else NEARLY_FULL):
        return "no space left on the filesystem"
    return None


def install_disk_full_exit(run_dir: Path) -> None:
    """End the run cleanly when a checkpoint save runs out of space (see the module docstring). The
    message is also left in ``run_dir/exit_reason.txt`` (a few hundred bytes; if even those do not fit,
    only the log has it) for the launcher, since torchrun reports every failed worker as exit 1."""
    from megatron.training import get_args, training

    from acmoe_megatron.core.exit_codes import EXIT_DISK_FULL, EXIT_REASON_FILE

    _record_write_errors()
    save = training.save_checkpoint

    def save_or_exit(iteration, *args, **kwargs):
        _WRITE_ERRORS.clear()
        try:
            return save(iteration, *args, **kwargs)
        except BaseException as err:  # DCP's CheckpointException is a BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            root = Path(get_args().save)
            partial = root / f"iter_{iteration:07d}"
            tracker = root / "latest_checkpointed_iteration.txt"
            latest = tracker.read_text().strip() if tracker.is_file() else None
            previous = root / f"iter_{int(latest):07d}" if latest and latest.isdigit() else None
            needed = _dir_bytes(previous) if previous is not None else None
            reason = diagnose_space(err, root, partial, needed)
            if reason is None:
                raise
            written = _dir_bytes(partial)
            if torch.distributed.get_rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)  # never recorded as latest: give its space back
            free = shutil.disk_usage(root).free
            need = (f"about {needed / 2**20:.1f} MiB (the size of {previous.name})" if needed
                    else "an unknown amount (no earlier checkpoint to measure)")
            print(f"[acmoe] checkpoint save of iteration {iteration} into {partial} failed: {reason}. "
                  f"The save needs {need}; {written / 2**20:.1f} MiB had been written (removed again), "
                  f"{free / 2**30:.2f} GiB are free on the filesystem of {root}. The latest complete checkpoint is "
                  f"still iteration {latest or 'none'}. Free space (or raise the quota / file-size limit) and run "
                  f"the same command again to resume. (error: {err!s:.300})", file=sys.stderr, flush=True)
            sys.stdout.flush()
            if torch.distributed.get_rank() == 0:
                try:
                    (run_dir / EXIT_REASON_FILE).write_text(f"{EXIT_DISK_FULL}\n{reason}: {partial}\n")
                except OSError:
                    pass
            raise SystemExit(EXIT_DISK_FULL) from None  # train.main re-raises it: a clean exit, children reaped

    training.save_checkpoint = save_or_exit


def install_file_size_fault() -> None:
    """Test hook: ``ACMOE_FAULT_FSIZE_AT_ITER=k`` limits this process's file size (RLIMIT_FSIZE) to
    ``ACMOE_FAULT_FSIZE_BYTES`` (default 64 KiB) during the checkpoint save of iteration k, with
    SIGXFSZ ignored: the writes then fail with EFBIG exactly as the kernel fails them."""
    at = os.environ.get("ACMOE_FAULT_FSIZE_AT_ITER")
    if not at:
        return
    import resource
    import signal

    import megatron.core.dist_checkpointing as dist_checkpointing

    limit = int(os.environ.get("ACMOE_FAULT_FSIZE_BYTES", str(64 * 1024)))
    save = dist_checkpointing.save

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

    dist_checkpointing.save = limited_save


def maybe_inject_nan(output: torch.Tensor) -> torch.Tensor:
    """Test hook: ``ACMOE_FAULT_NAN_AT_ITER=k`` makes the loss of training iteration k NaN."""
    at = os.environ.get("ACMOE_FAULT_NAN_AT_ITER")
    if not at or not torch.is_grad_enabled():
        return output
    from megatron.training import get_args

    if get_args().curr_iteration + 1 == int(at):
        return output * float("nan")
    return output
