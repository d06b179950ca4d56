"""The hang watch's decision (runtime/hang_watch.py: ``diagnose``, a pure function of the heartbeat
records and the clock), the records the workers write (runtime/heartbeat.py) and what the watch
does once it decided (the exit reason, SIGKILL of this node's training processes only)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from acmoe_megatron.core.exit_codes import EXIT_HUNG, EXIT_REASON_FILE
from acmoe_megatron.runtime.hang_watch import Bounds, WatchThread, diagnose, read_beats, stop_run, watch
from acmoe_megatron.runtime.heartbeat import HEARTBEAT_DIR, BeatRecord, Heartbeat

NOW = 1000.0
BOUNDS = Bounds(step_s=10, long_s=60)  # silent after 3 x 1 s + 1 s


def beat(rank, step=5, phase="forward", since=NOW - 30, last=NOW - 0.5, context="training", host="n1", world=2):
    return BeatRecord("i1", rank, world, host, 100 + rank, step, phase, context, since, last)


def beats(*records):
    return {r.rank: r for r in records}


def test_progress_within_the_bound_is_no_hang():
    assert diagnose(beats(beat(0, since=NOW - 9), beat(1, since=NOW - 30)), NOW, BOUNDS) is None
    assert diagnose(beats(beat(0), beat(1)), NOW, Bounds(0, 0)) is None  # run.hang_timeout_s: 0


def test_the_rank_whose_process_stopped_is_named_not_the_ones_waiting_for_it():
    """rank 1 entered its phase after rank 0 (which waits for it in a collective) and was then
    stopped: the silent heartbeat names it, though rank 0's phase began earlier."""
    hang = diagnose(beats(beat(0, phase="forward", since=NOW - 30),
                          beat(1, phase="backward", since=NOW - 20, last=NOW - 19, host="n2")), NOW, BOUNDS)
    assert (hang.rank, hang.host, hang.pid, hang.step, hang.phase) == (1, "n2", 101, 5, "backward")
    assert "rank 1 on node n2 hung at step 5 in backward (process stopped or frozen for 20 s" in hang.why
    assert "stopped or frozen (no heartbeat for 19 s)" in hang.report
    assert "rank 0 on n1 (pid 100): step 5, forward for 30 s" in hang.report


def test_of_two_silent_ranks_the_first_to_go_silent_is_named():
    hang = diagnose(beats(beat(0, last=NOW - 15), beat(1, last=NOW - 25), beat(2, world=3)), NOW, BOUNDS)
    assert hang.rank == 1


def test_a_rank_stuck_in_its_data_loader_is_named_when_every_process_is_alive():
    hang = diagnose(beats(beat(0, phase="forward", since=NOW - 40), beat(1, phase="data", since=NOW - 35),
                          beat(2, phase="forward", since=NOW - 30, world=3)), NOW, BOUNDS)
    assert (hang.rank, hang.phase) == (1, "data") and "the other ranks wait for it" in hang.report


def test_the_rank_a_step_behind_is_named():
    hang = diagnose(beats(beat(0, step=7, phase="data"), beat(1, step=6, phase="optimizer")), NOW, BOUNDS)
    assert (hang.rank, hang.step) == (1, 6)


def test_every_rank_in_the_same_collective_names_the_last_to_enter():
    hang = diagnose(beats(beat(0, since=NOW - 40), beat(1, since=NOW - 31)), NOW, BOUNDS)
    assert hang.rank == 1 and "a collective that never completed" in hang.report


@pytest.mark.parametrize("phase, context", [("checkpoint save", "training"), ("checkpoint load", "start-up"),
                                            ("forward", "start-up"), ("finishing", "training")])
def test_checkpoints_start_up_and_the_end_have_the_longer_bound(phase, context):
    records = beats(beat(0, phase=phase, context=context, since=NOW - 50), beat(1, since=NOW - 50))
    assert diagnose(records, NOW, BOUNDS) is None
    hang = diagnose(records, NOW + 11, BOUNDS)
    assert hang is not None and "bound run.hang_timeout_checkpoint_s=60 s" in hang.report


def test_a_rank_that_never_reported_is_named():
    hang = diagnose(beats(beat(0, world=2)), NOW, BOUNDS)
    assert hang.rank is None and "rank(s) 1 never reported" in hang.why


def test_the_records_are_written_by_the_heartbeat_thread_and_read_per_start(tmp_path):
    directory = tmp_path / HEARTBEAT_DIR
    beat_ = Heartbeat(directory, "start-a", rank=1, world_size=2, interval_s=0.05).start()
    old = BeatRecord("start-0", 0, 2, "n1", 1, 3, "forward", "training", 0.0, 0.0)  # an earlier start's record
    (directory / "rank0.json").write_text(json.dumps(asdict(old)))
    try:
        beat_.mark("data", step=4)
        beat_.mark("forward")
        deadline = time.time() + 5
        while (rec := read_beats(tmp_path, "start-a").get(1)) is None or rec.phase != "forward":
            assert time.time() < deadline, rec
            time.sleep(0.02)
        assert (rec.step, rec.phase, rec.context, rec.pid) == (4, "forward", "start-up", os.getpid())
        time.sleep(0.3)
        again = read_beats(tmp_path, "start-a")
        assert again[1].beat > rec.beat and again[1].since == rec.since  # rewritten while nothing changes: alive
        assert list(again) == [1]  # the earlier start's record is not this start's
        assert list(read_beats(tmp_path, "start-0")) == [0]
    finally:
        beat_.stop()
    assert not (directory / "rank1.json").exists()


def test_a_flush_while_the_thread_writes_never_leaves_a_damaged_record(tmp_path):
    """``flush`` (the main thread, e.g. before a fault stops the process) and the heartbeat thread
    write the same record: each write must be whole. Seen on SLURM: the two wrote one temporary
    file at once, the record ended in ``}}``, and the watch named the stopped rank as one that
    never reported."""
    directory = tmp_path / HEARTBEAT_DIR
    beat_ = Heartbeat(directory, "start-a", rank=0, world_size=1, interval_s=0.0005).start()
    damaged = []
    try:
        for i in range(3000):
            beat_.mark("forward" if i % 2 else "backward", step=10 ** (i % 7))  # records of different lengths
            beat_.flush()
            try:
                json.loads((directory / "rank0.json").read_text())
            except ValueError as e:
                damaged.append(str(e))
    finally:
        beat_.stop()
    assert not damaged, damaged[:3]


def test_a_record_that_cannot_be_read_keeps_its_last_readable_version(tmp_path):
    directory = tmp_path / HEARTBEAT_DIR
    directory.mkdir()
    rec = BeatRecord("start-a", 1, 2, "n2", 7, 6, "backward", "training", 5.0, 5.0)
    (directory / "rank1.json").write_text(json.dumps(asdict(rec)))
    first = read_beats(tmp_path, "start-a")
    assert first == {1: rec}
    (directory / "rank1.json").write_text(json.dumps(asdict(rec)) + "}")  # torn or damaged
    assert read_beats(tmp_path, "start-a") == {}
    assert read_beats(tmp_path, "start-a", previous=first) == {1: rec}
    (directory / "rank1.json").unlink()  # removed (the rank ended): gone
    assert read_beats(tmp_path, "start-a", previous=first) == {}


class _Running:
    def poll(self):
        return None  # a launcher's child that still runs


def test_the_watch_ends_with_the_run_not_a_poll_later(tmp_path):
    """The default bound (180 s) reads the records every 10 s; a launcher whose training ended must
    not wait for the next read (measured before: every acmoe-pretrain run ended ~10 s late)."""
    thread = WatchThread(tmp_path, "start-a", Bounds(180, 540), _Running()).start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert thread.stop() is None
    assert time.monotonic() - t0 < 2
    done = []
    t0 = time.monotonic()
    watch(tmp_path, "start-a", Bounds(180, 540), lambda: not done and (time.monotonic() - t0 < 0.3 or done.append(1)))
    assert time.monotonic() - t0 < 2  # the SLURM watch (--while-pid) too


_WITH_A_CHILD = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
                 "start_new_session=True); print('child started', flush=True); time.sleep(60)")


def test_stopping_kills_this_nodes_training_processes_only_and_the_first_cause_stays(tmp_path):
    """A training process is SIGKILLed with the processes it started (megatron's checkpoint worker, data
    loader workers: left alive they would hold the job step's output open), not other processes."""
    ours = subprocess.Popen([sys.executable, "-c", _WITH_A_CHILD, "acmoe_megatron"], stdout=subprocess.PIPE, text=True)
    assert ours.stdout.readline().strip() == "child started"
    from acmoe_megatron.runtime.hang_watch import _descendants

    (child,) = _descendants(ours.pid)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a reused pid
    other_node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "acmoe_megatron"])
    try:
        os.kill(ours.pid, signal.SIGSTOP)  # SIGKILL ends a stopped process too
        records = beats(BeatRecord("i", 0, 3, "n1", ours.pid, 5, "backward", "training", NOW, NOW),
                        BeatRecord("i", 1, 3, "n1", stranger.pid, 5, "backward", "training", NOW, NOW),
                        BeatRecord("i", 2, 3, "n2", other_node.pid, 5, "backward", "training", NOW, NOW))
        hang = diagnose(records, NOW + 100, BOUNDS)
        assert stop_run(tmp_path, hang, records, host="n1") == [ours.pid]
        assert ours.wait(timeout=10) == -signal.SIGKILL
        deadline = time.time() + 10
        while os.path.exists(f"/proc/{child}") and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
            assert time.time() < deadline, "the training process's child survived"
            time.sleep(0.05)
        assert stranger.poll() is None and other_node.poll() is None
        assert (tmp_path / EXIT_REASON_FILE).read_text() == f"{EXIT_HUNG}\n{hang.why}\n"
        later = diagnose(records, NOW + 200, BOUNDS)
        stop_run(tmp_path, later, records, host="n2")  # another node's watcher, later: the first cause stays
        assert (tmp_path / EXIT_REASON_FILE).read_text() == f"{EXIT_HUNG}\n{hang.why}\n"
    finally:
        for p in (ours, stranger, other_node):
            p.kill()
            p.wait()
