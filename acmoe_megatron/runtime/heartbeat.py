"""Each training process says what it is doing: the worker side of hang detection.

A ``Heartbeat`` owns this process's record — rank, node, pid, the step, the phase it is in (data,
forward, backward, gradient reduction, optimizer, between steps, checkpoint save/load, start-up)
and since when — and a daemon thread that writes it to ``<run.dir>/heartbeats/rank<R>.json``
(atomically: a temporary file, then a rename) whenever the phase changes, and at least every
``interval_s`` seconds. The phase changes come from the training loop's own call sites, wrapped
through the trainer hooks' table (``runtime/hooks.PATCHES``, the ``heartbeat_*`` entries) and from
our forward step (data, then forward). The main thread only updates a few fields under a lock;
the file system is touched by the thread alone, so a slow shared file system never slows a step.

Two things the watcher (``runtime/hang_watch.py``) reads from it: ``since`` (when the phase began:
progress) and ``beat`` (when the thread last wrote: the process is alive). A process that is
stopped or frozen (SIGSTOP, a kernel wait) stops both; one waiting in a collective for another
rank keeps beating but makes no progress.

Why our own: megatron-core's ``--enable-ft-package`` needs NVIDIA's resiliency package, whose
releases that megatron-core 0.19 accepts do not install on every machine (glibc >= 2.39); where it
does, ``acmoe-launch slurm --launcher ft`` uses it instead. torch's own watchdogs only time out a
collective (megatron's ``--distributed-timeout-minutes``), on the ranks that wait, not the one
that hangs.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HEARTBEAT_DIR = "heartbeats"  # under run.dir
INSTANCE_ENV = "ACMOE_RUN_INSTANCE"  # one start of a run (set by the launcher; the watcher reads only its beats)

# the phases of one training step, in order, then the others (hang_watch orders ranks by them)
STEP_PHASES = ("data", "forward", "backward", "gradient reduction", "optimizer", "between steps")
# run.hang_timeout_checkpoint_s: start-up, checkpoints, and the end of a run (the last checksums, the summary)
LONG_PHASES = ("start-up", "checkpoint save", "checkpoint load", "finishing")


def node_name() -> str:
    """The node as SLURM names it, else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def beat_interval(hang_timeout_s: float) -> float:
    """How often an unchanged record is rewritten: a tenth of the bound, between 0.5 and 10 s."""
    return min(10.0, max(0.5, hang_timeout_s / 10))


@dataclass
class BeatRecord:
    instance: str
    rank: int
    world_size: int
    host: str
    pid: int
    step: int  # the training step in progress (megatron's iteration + 1); 0 before the first
    phase: str
    context: str  # start-up (until the first step of this start ends) | training | evaluation
    since: float  # wall time the phase began
    beat: float  # wall time the record was written


class Heartbeat:
    def __init__(self, directory: Path, instance: str, rank: int, world_size: int, interval_s: float):
        self.path = Path(directory) / f"rank{rank}.json"
        self.interval_s = interval_s
        now = time.time()
        self._record = BeatRecord(instance, rank, world_size, node_name(), os.getpid(), 0, "start-up", "start-up",
                                  now, now)
        self._lock = threading.Lock()  # the record's fields (the main thread changes them)
        self._write_lock = threading.Lock()  # one write of the file at a time (see _write)
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="acmoe-heartbeat", daemon=True)
        self.on_mark = None  # a test's fault injection (runtime/faults.py): called with (step, phase)

    def start(self) -> Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()
        return self

    def mark(self, phase: str, step: int | None = None) -> None:
        """This process enters ``phase`` (of ``step``, or the current one)."""
        with self._lock:
            rec = self._record
            if step is not None:
                rec.step = step
            if phase != rec.phase:
                rec.phase, rec.since = phase, time.time()
        self._changed.set()
        if self.on_mark is not None:
            self.on_mark(rec.step, phase)

    def set_context(self, context: str) -> None:
        with self._lock:
            self._record.context = context
        self._changed.set()

    @property
    def record(self) -> BeatRecord:
        with self._lock:
            return BeatRecord(**asdict(self._record))

    def flush(self) -> None:
        """Write the record now (before something that may stop this process)."""
        self._write()

    def stop(self) -> None:
        """The run ended: stop writing and remove the record (nothing is left to watch)."""
        self._stop.set()
        self._changed.set()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._changed.wait(self.interval_s)
            self._changed.clear()
            if not self._stop.is_set():
                self._write()

    def _write(self) -> None:
        # one write at a time, the record taken inside it: the thread's and flush's writes share the
        # temporary file, and a record taken before another write must not replace a newer one
        with self._write_lock:
            with self._lock:
                self._record.beat = time.time()
                text = json.dumps(asdict(self._record))
            tmp = self.path.with_suffix(".tmp")
            try:
                tmp.write_text(text)
                os.replace(tmp, self.path)
            except OSError:  # a full or failing file system must not end training; the watcher sees the silence
                pass


def start_heartbeat(run_dir: Path, hang_timeout_s: float, rank: int, world_size: int) -> Heartbeat | None:
    """This process's heartbeat (None when hang detection is off: ``run.hang_timeout_s: 0``)."""
    if not hang_timeout_s:
        return None
    instance = os.environ.get(INSTANCE_ENV, "")
    return Heartbeat(Path(run_dir) / HEARTBEAT_DIR, instance, rank, world_size, beat_interval(hang_timeout_s)).start()


def install_heartbeat_marks(beat: Heartbeat) -> None:
    """Phase changes at megatron's call sites (the ``heartbeat_*`` rows of ``hooks.PATCHES``): a
    training step (its number; start-up ends with the first), the backward pass, the gradient
    reduction and the optimizer (``finalize_model_grads`` precedes the optimizer step), checkpoint
    saves and loads, evaluation. Data and forward are marked by our forward step."""
    from megatron.training import get_args

    from acmoe_megatron.runtime.hooks import wrap

    def around(before, after=None):
        def make(original):
            def marked(*args, **kwargs):
                before()
                try:
                    return original(*args, **kwargs)
                finally:
                    if after is not None:
                        after()

            return marked

        return make

    def step_done():
        beat.mark("between steps")
        beat.set_context("training")

    wrap("heartbeat_train_step", around(lambda: beat.mark("data", get_args().curr_iteration + 1), step_done))
    wrap("heartbeat_backward", around(lambda: beat.mark("backward")))
    wrap("heartbeat_finalize_grads", around(lambda: beat.mark("gradient reduction"), lambda: beat.mark("optimizer")))
    wrap("heartbeat_save", around(lambda: beat.mark("checkpoint save"), lambda: beat.mark("between steps")))
    wrap("heartbeat_load", around(lambda: beat.mark("checkpoint load"), lambda: beat.mark("start-up")))

    def evaluation_ends():
        beat.set_context("training" if beat.record.step else "start-up")
        beat.mark("between steps")

    wrap("heartbeat_evaluate", around(lambda: beat.set_context("evaluation"), evaluation_ends))
