"""Megatron's training functions that we wrap, as one table checked against megatron-core 0.19.x.

Megatron's flags do not offer what these hooks do; each wraps one function of megatron's trainer or
checkpointing, listed in ``PATCHES`` (name, the megatron call site as a dotted path, why). Every
wrap goes through ``wrap(name, make)``: before the first one, the installed megatron-core is
compared with ``cpu_runtime.SUPPORTED`` and every call site of the table is resolved, so a megatron
upgrade fails at start-up naming the version and the missing call sites instead of silently
skipping a hook; ``APPLIED`` lists what was wrapped, in order. Several hooks may wrap the same call
site (``save_checkpoint``: retention, the disk-full exit, the metrics' timing); each wraps what the
previous one left, in the order the trainer installs them (``runtime/train.py``).

* ``install_checkpoint_checksums``: ``run.checkpoint_checksums`` — after each save every process hashes
  its share of the completed iterations' files in a background thread (``checkpoint_digest.py``);
  ``finish_checkpoint_checksums`` waits for them at the end of the run.
* ``install_checkpoint_retention``: ``run.keep_last_checkpoints`` — after each completed save keep
  only the newest N ``iter_*`` directories.
* ``install_expert_norm``: ``acmoe.expert_norm`` — registers expert_norm.py's rescale on the
  optimizer megatron builds (after its checkpoint load, so a resume continues on the sphere).
* ``install_disk_full_exit``: a checkpoint save that fails for lack of space (ENOSPC, EDQUOT, or
  EFBIG from a file-size limit) ends the run with ``EXIT_DISK_FULL`` and a message naming the
  directory, the space the save needed and what is free; the half-written iteration is removed (it
  was never recorded as latest) so that its space comes back.
* ``install_training_metrics``: the routing metrics, throughput, MFU and memory scalars at
  megatron's log interval (``observability/writers.py`` says what is written and how it is timed).
* ``heartbeat.install_heartbeat_marks``: ``run.hang_timeout_s`` — each process records the phase
  it is in (``runtime/heartbeat.py``) for the hang watch (``runtime/hang_watch.py``).
* ``log_router_grad_norms``: ``run.log_router_grad_norms`` — per-step router gradient norms after
  megatron's gradient reduction (a model-config callback, not a function of the table).

Fault injection for the reliability tests lives apart, in ``runtime/faults.py``, and uses the same
table.
"""

from __future__ import annotations

import errno
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from acmoe_megatron.core.exit_codes import EXIT_DISK_FULL, EXIT_REASON_FILE
from acmoe_megatron.model import expert_norm
from acmoe_megatron.model.chunk_state import attached_metrics, unwrap_chunk
from acmoe_megatron.observability import metrics as router_metrics
from acmoe_megatron.observability.writers import MetricWriter, memory_gib, report_extra_moe_losses, throughput
from acmoe_megatron.runtime import cpu_runtime
from acmoe_megatron.runtime.checkpoint_digest import ChecksumWriter


@dataclass(frozen=True)
class TrainerPatch:
    name: str  # what wraps it (recorded in APPLIED)
    call_site: str  # the megatron attribute that is replaced by a wrapper of itself (dotted path)
    why: str


_TRAINING = "megatron.training.training"
PATCHES = {p.name: p for p in (
    TrainerPatch("checkpoint_retention", f"{_TRAINING}.save_checkpoint", "run.keep_last_checkpoints"),
    TrainerPatch("checkpoint_checksums", f"{_TRAINING}.save_checkpoint",
                 "run.checkpoint_checksums: the files of each completed save hashed in the background"),
    TrainerPatch("expert_norm", f"{_TRAINING}.setup_model_and_optimizer",
                 "acmoe.expert_norm: the optimizer megatron builds keeps the expert embeddings' row norm"),
    TrainerPatch("disk_full_exit", f"{_TRAINING}.save_checkpoint", "a save out of space ends the run cleanly"),
    TrainerPatch("disk_full_write_errors",
                 "megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync."
                 "write_preloaded_data", "the errno of a failed asynchronous write (it is returned, not raised)"),
    TrainerPatch("metrics_train", f"{_TRAINING}.train", "the throughput clock starts with training"),
    TrainerPatch("metrics_training_log", f"{_TRAINING}.training_log", "routing metrics, throughput, MFU, memory"),
    TrainerPatch("metrics_evaluate", f"{_TRAINING}.evaluate", "the validation loss in bits per token"),
    TrainerPatch("metrics_evaluate_and_print_results", f"{_TRAINING}.evaluate_and_print_results",
                 "evaluation time left out of the throughput"),
    TrainerPatch("metrics_save_checkpoint", f"{_TRAINING}.save_checkpoint",
                 "checkpoint time left out of the throughput"),
    TrainerPatch("heartbeat_train_step", f"{_TRAINING}.train_step", "hang detection: the step in progress"),
    TrainerPatch("heartbeat_backward", "megatron.core.pipeline_parallel.schedules.backward_step",
                 "hang detection: the backward pass"),
    TrainerPatch("heartbeat_finalize_grads", f"{_TRAINING}.finalize_model_grads",
                 "hang detection: gradient reduction, then the optimizer"),
    TrainerPatch("heartbeat_save", f"{_TRAINING}.save_checkpoint", "hang detection: a checkpoint save"),
    TrainerPatch("heartbeat_load", f"{_TRAINING}.load_checkpoint", "hang detection: a checkpoint load"),
    TrainerPatch("heartbeat_evaluate", f"{_TRAINING}.evaluate", "hang detection: evaluation"),
    TrainerPatch("fault_save_delay", "megatron.core.dist_checkpointing.save", "test hook: a slow save"),
    TrainerPatch("fault_file_size", "megatron.core.dist_checkpointing.save", "test hook: a file-size limit"),
)}
APPLIED: list[str] = []
_STATE = {"installed": False}  # install_training_metrics ran
_CHECKED = [False]


def check_patch_sites(patches=tuple(PATCHES.values())) -> None:
    """RuntimeError unless megatron-core is on ``cpu_runtime.SUPPORTED`` and every call site resolves."""
    version = cpu_runtime.megatron_version()
    sites = "\n".join(f"  {p.name}: {p.call_site}" for p in patches)
    if not cpu_runtime.on_supported_line(version):
        raise RuntimeError(
            f"acmoe_megatron.runtime.hooks: installed megatron-core {version} is not supported; the trainer "
            f"hooks wrap these call sites of megatron-core {cpu_runtime.SUPPORTED}.x (pin megatron-core "
            f"{cpu_runtime.SUPPORTED}.*, or review each one and update cpu_runtime.SUPPORTED):\n{sites}")
    missing = []
    for patch in patches:
        try:
            cpu_runtime.resolve(patch.call_site)
        except (ImportError, AttributeError) as err:
            missing.append(f"  {patch.name}: {patch.call_site} does not exist ({err})")
    if missing:
        raise RuntimeError(f"acmoe_megatron.runtime.hooks: megatron-core {version} lacks call sites the trainer "
                           "hooks wrap (nothing was wrapped):\n" + "\n".join(missing))


def wrap(name: str, make: Callable[[Any], Any]) -> None:
    """Replace the call site of ``PATCHES[name]`` by ``make(current)`` (checked once per process)."""
    if not _CHECKED[0]:
        check_patch_sites()
        _CHECKED[0] = True
    owner_path, attr = PATCHES[name].call_site.rsplit(".", 1)
    owner = cpu_runtime.resolve(owner_path)
    setattr(owner, attr, make(getattr(owner, attr)))
    APPLIED.append(name)


def install_checkpoint_retention(keep_last: int) -> None:
    """Keep only the newest ``keep_last`` checkpoints: after megatron's save_checkpoint returns (the
    tracker names the new one), rank 0 deletes older ``iter_*`` directories. A directory newer than
    the tracker (a save still in flight) and the tracked one are never touched."""
    if keep_last <= 0:
        return
    from megatron.training import get_args

    def make(save):
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

        return save_and_prune

    wrap("checkpoint_retention", make)


_CHECKSUMS: list[ChecksumWriter] = []  # this process's writer, once installed


def install_checkpoint_checksums() -> None:
    """After each of megatron's saves, hash (in the background) the iterations megatron has recorded
    as complete since this run loaded (``checkpoint_digest.ChecksumWriter``); an asynchronous save is
    recorded later, so it is picked up by the next save or by ``finish_checkpoint_checksums``."""
    from megatron.training import get_args

    def make(save):
        def save_and_hash(*args, **kwargs):
            out = save(*args, **kwargs)
            margs = get_args()
            if margs.save:
                if not _CHECKSUMS:
                    _CHECKSUMS.append(ChecksumWriter(dist.get_rank(), dist.get_world_size()))
                _CHECKSUMS[0].start(Path(margs.save), margs.iteration)
            return out

        return save_and_hash

    wrap("checkpoint_checksums", make)


def finish_checkpoint_checksums() -> list[dict]:
    """At the end of a run: hash what the last (asynchronous) save left and wait for every thread;
    what this process hashed (iteration, files, bytes, seconds)."""
    if not _CHECKSUMS:
        return []
    from megatron.training import get_args

    margs = get_args()
    return _CHECKSUMS[0].finish(Path(margs.save) if margs.save else None, margs.iteration)


def install_expert_norm() -> None:
    """Wrap megatron's ``setup_model_and_optimizer`` so that the optimizer it returns keeps the
    routers' expert embeddings at ``acmoe.expert_norm`` after every step (expert_norm.install);
    a no-op for models without such routers."""
    def make(setup):
        def setup_with_expert_norm(*args, **kwargs):
            model, optimizer, scheduler = setup(*args, **kwargs)
            held = expert_norm.install(optimizer, model)
            if held and torch.distributed.get_rank() == 0:
                print(f"[acmoe] expert embeddings of {held} router(s) held at their fixed row norm after every "
                      "optimizer step", flush=True)
            return model, optimizer, scheduler

        return setup_with_expert_norm

    wrap("expert_norm", make)


def install_training_metrics(extra_moe_losses: tuple[str, ...] = (), peak_tflops: float | None = None,
                             per_expert_max: int = router_metrics.PER_EXPERT_MAX, image_interval: int = 0) -> None:
    """Wrap megatron's training loop functions once; the routing metrics are those of every attached
    model chunk (``chunk_state.attached_metrics``); ``extra_moe_losses``: our routers' loss names for
    megatron's MoE report; ``peak_tflops``: run.peak_tflops; ``per_expert_max``: the tag budget of
    metrics.flush (run.per_expert_scalars_max); ``image_interval``: images every that many steps
    (run.image_interval; 0: none)."""
    if _STATE["installed"]:
        return
    report_extra_moe_losses(extra_moe_losses)
    import megatron.training.training as training
    from megatron.training import get_args

    wrapped: dict = {}  # the megatron originals, filled by wrap below
    last = {"time": None, "samples": None, "image": None}
    spent = {"eval": 0.0, "checkpoint": 0.0}  # inside the current log interval

    def train(*args, **kwargs):
        last.update(time=time.perf_counter(), samples=get_args().consumed_train_samples)  # also after a resume
        spent.update(eval=0.0, checkpoint=0.0)
        return wrapped["train"](*args, **kwargs)

    def save_checkpoint(*args, **kwargs):
        start = time.perf_counter()
        try:
            return wrapped["save_checkpoint"](*args, **kwargs)
        finally:
            spent["checkpoint"] += time.perf_counter() - start

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs):
        out = wrapped["training_log"](loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs)
        margs = get_args()
        if iteration % margs.log_interval:
            return out
        writer = MetricWriter.from_megatron()
        images = bool(image_interval) and (last["image"] is None or iteration - last["image"] >= image_interval)
        if images:
            last["image"] = iteration
        router_metrics.flush(attached_metrics(), writer, iteration, per_expert_max=per_expert_max, images=images)
        mem = torch.tensor([memory_gib()], device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        now, samples = time.perf_counter(), margs.consumed_train_samples
        if writer is not None:
            writer.add_scalar("memory/max_gib", float(mem), iteration)
            loss = loss_dict.get("lm loss") if loss_dict else None
            if loss is not None:
                writer.add_scalar("lm loss bits-per-token", float(loss) / math.log(2), iteration)
            if last["time"] is not None:
                train_s = now - last["time"] - spent["eval"] - spent["checkpoint"]
                writer.add_scalar("throughput/eval_s", spent["eval"], iteration)
                writer.add_scalar("throughput/checkpoint_s", spent["checkpoint"], iteration)
                for tag, value in throughput(margs, samples - last["samples"], train_s, peak_tflops, training).items():
                    writer.add_scalar(tag, value, iteration)
            writer.commit()
        last.update(time=now, samples=samples)
        spent.update(eval=0.0, checkpoint=0.0)
        return out

    latest_eval: dict = {}

    def evaluate(*args, **kwargs):
        result = wrapped["evaluate"](*args, **kwargs)
        latest_eval["result"] = result
        return result

    def evaluate_and_print_results(prefix, forward_step_func, data_iterator, model, iteration, *args, **kwargs):
        start = time.perf_counter()
        latest_eval.clear()
        try:
            out = wrapped["evaluate_and_print_results"](prefix, forward_step_func, data_iterator, model, iteration, *args, **kwargs)
        finally:
            spent["eval"] += time.perf_counter() - start
        writer = MetricWriter.from_megatron()
        result = latest_eval.get("result")
        total = result[0] if isinstance(result, tuple) else None
        if writer is not None and isinstance(total, dict) and "lm loss" in total:
            writer.add_scalar("lm loss validation bits-per-token", float(total["lm loss"]) / math.log(2), iteration)
            writer.commit()
        return out

    def keeping(name, wrapper):
        def make(original):
            wrapped[name] = original
            return wrapper

        return make

    for name, wrapper in (("train", train), ("training_log", training_log), ("evaluate", evaluate),
                          ("evaluate_and_print_results", evaluate_and_print_results),
                          ("save_checkpoint", save_checkpoint)):
        wrap(f"metrics_{name}", keeping(name, wrapper))
    _STATE["installed"] = True



def log_router_grad_norms(model, run_dir: Path) -> None:
    """Wrap megatron's finalize_model_grads (once) to append each step's reduced router gradient
    norms, by global layer number, to ``run_dir/router_grad_norms_rank<R>.jsonl`` (for parity
    checks across parallel layouts)."""
    import json

    from megatron.core.transformer.moe.router import TopKRouter

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
    def make(write):
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

        return staticmethod(recording_write)

    wrap("disk_full_write_errors", make)


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
    from megatron.training import get_args

    _record_write_errors()

    def make(save):
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

        return save_or_exit

    wrap("disk_full_exit", make)


