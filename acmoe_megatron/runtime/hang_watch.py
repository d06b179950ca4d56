"""The hang watch: a run in which no rank makes progress within its bound is stopped, naming the rank.

It reads the heartbeat records of one start of a run (``runtime/heartbeat.py``:
``<run.dir>/heartbeats/rank<R>.json``, the records of ``instance`` only) and decides with
``diagnose`` (a pure function of the records and the clock):

* **stalled**: no rank has changed phase for longer than the bound — ``run.hang_timeout_s``, or
  ``run.hang_timeout_checkpoint_s`` while a rank saves or loads a checkpoint or the start's first
  step is not done (start-up, compilation, loading);
* **which rank**: a rank whose heartbeat thread went silent (the process is stopped or frozen: SIGSTOP,
  a kernel wait on a stalled file system) — the first to go silent; else a rank that never
  reported; else the rank furthest behind (lowest step, then earliest phase of the step: the one
  stuck in its data loader while the others wait for it in a collective); with every rank in the
  same phase of the same step (a collective that never completes), the last to enter it.

When it decides, it prints the diagnosis (rank, node, pid, step, phase, what the other ranks were
doing), leaves ``EXIT_HUNG`` and a one-line cause in ``<run.dir>/exit_reason.txt`` (first writer wins;
the launchers read it: torchrun reports every failed worker as exit 1) and SIGKILLs the training
processes of its own node (SIGKILL also ends a stopped process; SIGTERM would wait for SIGCONT).
The node's launcher then ends; on SLURM, ``srun --kill-on-bad-exit`` ends the other nodes, and the
batch script requeues the job, which resumes from the latest checkpoint.

One watcher per node: a thread of ``acmoe-pretrain`` (one machine), or ``python -m
acmoe_megatron.runtime.hang_watch`` started by the SLURM node task (``cli/slurm/torchrun_node.sh``,
``task_env.sh``) beside the training processes. Each reads every rank's record (the run directory
is shared), so every node names the same cause.

Why our own: see ``heartbeat.py``. megatron's ``--distributed-timeout-minutes`` stays the backstop
(``megatron_args.check_hang_bounds`` keeps both bounds below it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from acmoe_megatron.core.exit_codes import EXIT_HUNG, EXIT_REASON_FILE
from acmoe_megatron.runtime.heartbeat import (
    HEARTBEAT_DIR,
    LONG_PHASES,
    STEP_PHASES,
    BeatRecord,
    beat_interval,
    node_name,
)
from acmoe_megatron.runtime.recipe import load_recipe

LIVENESS_S = 0.5  # how often the watch asks whether the run it watches still runs


@dataclass(frozen=True)
class Bounds:
    step_s: float  # run.hang_timeout_s
    long_s: float  # run.hang_timeout_checkpoint_s

    @property
    def silent_s(self) -> float:
        """A process whose heartbeat thread has not written for this long is stopped or frozen."""
        return 3 * beat_interval(self.step_s) + 1.0


@dataclass(frozen=True)
class Hang:
    rank: int | None  # None: no single rank (never happens with at least one record)
    host: str
    pid: int | None
    step: int
    phase: str
    why: str  # one line: the cause
    report: str  # the full diagnosis, several lines


def read_beats(run_dir: Path, instance: str, previous: dict[int, BeatRecord] | None = None) -> dict[int, BeatRecord]:
    """The records of this start of the run, by rank (other starts' records left out). A record that
    cannot be read keeps its version in ``previous`` (the last poll's): a torn read on a network file
    system is not a rank that never reported."""
    beats = {}
    for path in (Path(run_dir) / HEARTBEAT_DIR).glob("rank*.json"):
        try:
            rec = BeatRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            rank = path.stem.removeprefix("rank")
            if previous and rank.isdigit() and int(rank) in previous:
                beats[int(rank)] = previous[int(rank)]
            continue  # being replaced, or another version's
        if rec.instance == instance:
            beats[rec.rank] = rec
    return beats


def _phase_order(rec: BeatRecord) -> int:
    return STEP_PHASES.index(rec.phase) if rec.phase in STEP_PHASES else -1


def _where(rec: BeatRecord) -> str:
    ctx = " (evaluation)" if rec.context == "evaluation" else ""
    return f"{f'step {rec.step}' if rec.step else 'start-up'}, {rec.phase}{ctx}"


def _doing(rec: BeatRecord, now: float) -> str:
    return f"{_where(rec)} for {now - rec.since:.0f} s"


def diagnose(beats: dict[int, BeatRecord], now: float, bounds: Bounds) -> Hang | None:
    """A ``Hang`` when no rank has made progress within its bound, else None (see the module docstring)."""
    if not beats or not bounds.step_s:
        return None
    long = any(b.phase in LONG_PHASES or b.context == "start-up" for b in beats.values())
    bound = bounds.long_s if long else bounds.step_s
    key = "run.hang_timeout_checkpoint_s" if long else "run.hang_timeout_s"
    stalled = now - max(b.since for b in beats.values())
    if stalled <= bound:
        return None
    world = max(b.world_size for b in beats.values())
    missing = sorted(set(range(world)) - set(beats))
    silent = sorted((b for b in beats.values() if now - b.beat > bounds.silent_s), key=lambda b: b.beat)
    if silent:
        c = silent[0]
        cause = (f"rank {c.rank} on node {c.host} (pid {c.pid}) stopped responding in {_where(c)}: its process "
                 f"is stopped or frozen (no heartbeat for {now - c.beat:.0f} s)")
        culprit = c
    elif missing:
        cause = (f"rank(s) {', '.join(map(str, missing))} never reported (a process that did not start or hung "
                 "before its first heartbeat)")
        culprit = None
    else:
        behind = min(beats.values(), key=lambda b: (b.step, _phase_order(b), -b.since))
        c = behind
        same = all((b.step, b.phase) == (c.step, c.phase) for b in beats.values())
        cause = (f"rank {c.rank} on node {c.host} (pid {c.pid}) is stuck at {_doing(c, now)}"
                 + ("; every rank is in the same phase (a collective that never completed: network, NCCL); "
                    "it entered last" if same and len(beats) > 1 else "; the other ranks wait for it"))
        culprit = c
    others = [f"  rank {b.rank} on {b.host} (pid {b.pid}): {_doing(b, now)}, last heartbeat {now - b.beat:.0f} s ago"
              for b in sorted(beats.values(), key=lambda b: b.rank)]
    report = (f"hang: no rank has made progress for {stalled:.0f} s (bound {key}={bound:g} s). Cause: {cause}.\n"
              "Every rank:\n" + "\n".join(others))
    if culprit is None:
        return Hang(None, "?", None, 0, "start-up", cause, report)
    state = "process stopped or frozen" if silent else "no progress"
    why = (f"rank {culprit.rank} on node {culprit.host} hung at "
           f"{f'step {culprit.step}' if culprit.step else 'start-up'} in {culprit.phase}"
           f" ({state} for {stalled:.0f} s, bound {key}={bound:g} s)")
    return Hang(culprit.rank, culprit.host, culprit.pid, culprit.step, culprit.phase, why, report)


def _is_training_process(pid: int) -> bool:
    """The pid still names one of our training processes (not a reused pid)."""
    try:
        return b"acmoe_megatron" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_run(run_dir: Path, hang: Hang, beats: dict[int, BeatRecord], host: str) -> list[int]:
    """Record the cause (first writer wins) and SIGKILL this node's training processes with every
    process they started (a SIGKILLed worker's checkpoint or data-loader processes would otherwise
    live on, orphaned, holding the job step's output open so that srun never returns); the
    training processes' pids."""
    try:
        fd = os.open(Path(run_dir) / EXIT_REASON_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(f"{EXIT_HUNG}\n{hang.why}\n")
    except OSError:
        pass  # another node's watcher wrote it, or the file system is the thing that hangs: the log has it
    killed = []
    for rec in beats.values():
        if rec.host == host and _is_training_process(rec.pid):
            tree = [rec.pid, *_descendants(rec.pid)]  # before the kill: orphans are re-parented
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed.append(rec.pid)
    return killed


def watch(run_dir: Path, instance: str, bounds: Bounds, running: Callable[[], bool],
          poll_s: float | None = None, host: str | None = None,
          wait: Callable[[float], object] = time.sleep) -> Hang | None:
    """Read the records every ``poll_s`` (the heartbeat interval) while ``running()`` (asked every
    ``LIVENESS_S`` at most: the watch ends with the run, not a poll later); on a hang: print the
    report, stop this node's processes (``stop_run``) and return it. ``wait(seconds)`` sleeps (a
    thread's stop event ends it early)."""
    poll = poll_s if poll_s is not None else beat_interval(bounds.step_s)
    host = host or node_name()
    beats: dict[int, BeatRecord] = {}
    next_read = 0.0
    while running():
        if time.monotonic() >= next_read:
            next_read = time.monotonic() + poll
            beats = read_beats(run_dir, instance, previous=beats)
            hang = diagnose(beats, time.time(), bounds)
            if hang is not None:
                print(f"[acmoe-hang-watch {host}] {hang.report}", file=sys.stderr, flush=True)
                killed = stop_run(run_dir, hang, beats, host)
                print(f"[acmoe-hang-watch {host}] stopped the training processes of this node (SIGKILL: pids "
                      f"{', '.join(map(str, killed)) or 'none left'}); exit {EXIT_HUNG}. The latest complete "
                      "checkpoint is unchanged: run the same command again to resume.", file=sys.stderr, flush=True)
                return hang
        wait(min(poll, LIVENESS_S))
    return None


class WatchThread:
    """``watch`` in a thread of a launcher (``acmoe-pretrain``), for as long as ``proc`` runs."""

    def __init__(self, run_dir: Path, instance: str, bounds: Bounds, proc):
        self._done = threading.Event()
        self.hang: Hang | None = None

        def run():
            self.hang = watch(run_dir, instance, bounds, lambda: proc.poll() is None and not self._done.is_set(),
                              wait=self._done.wait)

        self._thread = threading.Thread(target=run, name="acmoe-hang-watch", daemon=True)

    def start(self) -> WatchThread:
        self._thread.start()
        return self

    def stop(self) -> Hang | None:
        self._done.set()
        self._thread.join(timeout=30)
        return self.hang


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv=None) -> int:
    """``python -m acmoe_megatron.runtime.hang_watch --config RUN_DIR/config.yaml --instance ID
    --while-pid PID``: watch until PID ends; exit EXIT_HUNG after stopping a hung run, else 0."""
    parser = argparse.ArgumentParser(prog="python -m acmoe_megatron.runtime.hang_watch",
                                     description="stop a run whose ranks make no progress (runtime/hang_watch.py)")
    parser.add_argument("--config", required=True, help="the run's resolved recipe (run.dir, run.hang_timeout_*)")
    parser.add_argument("--instance", required=True, help="this start's ACMOE_RUN_INSTANCE")
    parser.add_argument("--while-pid", type=int, required=True, help="watch while this process runs")
    cli = parser.parse_args(argv)
    run = load_recipe(cli.config).run
    if not run.hang_timeout_s:
        return 0
    hang = watch(Path(run.dir), cli.instance, Bounds(run.hang_timeout_s, run.hang_timeout_checkpoint_s),
                 lambda: _alive(cli.while_pid))
    return EXIT_HUNG if hang is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
