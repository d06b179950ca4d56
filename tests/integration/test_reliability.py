"""Reliability with real processes: bit-exact resume, a rank lost mid-step (kill -9 of one of two
processes), a rank hung mid-step (SIGSTOP), kill -9 inside a checkpoint save, a save that runs out
of space (a real file-size limit), SIGTERM.

Each run is Megatron's trainer through ``acmoe-pretrain`` (2-core CPU, gloo). "Bit-exact" means the
per-step train losses in TensorBoard are equal as floats between an uninterrupted run of 2N steps
and a run stopped after N steps and resumed. The EP=2 runs use ``acmoe.source=ema`` (running
statistics in router buffers, which must survive the checkpoint), the EP=1 runs the paper's batch
statistics; the uninterrupted EP=1 run (one process) also checkpoints every step with
``run.keep_last_checkpoints=2`` and records its sample ids (``run.trace_samples``), so one launch
serves the resume references, the retention check and the reference of a resume on another
number of processes.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from acmoe_megatron.core.exit_codes import EXIT_DISK_FULL, EXIT_HUNG, EXIT_STOPPED_EARLY
from acmoe_megatron.observability.summary import read_scalars

ROOT = Path(__file__).resolve().parents[2]
N = 3
BASE = ["megatron.seq_length=64", "megatron.max_position_embeddings=64", "megatron.micro_batch_size=4",
        "megatron.global_batch_size=8", "megatron.lr_warmup_iters=1", "megatron.eval_iters=0",
        "megatron.eval_interval=1000", "megatron.log_interval=1", f"megatron.train_iters={2 * N}",
        f"megatron.save_interval={N}", "acmoe.first_ac_layer=2", "megatron.exit_signal_handler=true"]


def _cmd(run_dir, data, nproc, *extra):
    return [sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", "configs/tiny_cpu.yaml", "--nproc",
            str(nproc), *BASE, f"data.path={data}", f"run.dir={run_dir}", *extra]


def _run(run_dir, data, nproc, *extra, env=None):
    out = subprocess.run(_cmd(run_dir, data, nproc, *extra), cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    return out.returncode, out.stdout + out.stderr


def _losses(run_dir):
    return [v for _, v in sorted(read_scalars(Path(run_dir) / "tensorboard")["lm loss"])]


def _survivors(run_dir) -> list[str]:
    """Processes whose command line names ``run_dir`` (the run's launcher, torchrun, workers)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in cmdline:
            out.append(f"{pid}: {cmdline[:160]}")
    return out


def _started_by_a_launcher() -> set[int]:
    """Processes started under an acmoe-pretrain launcher (ACMOE_RUN_INSTANCE in their environment):
    torchrun, the workers and what they started (checkpoint workers, data loader workers), whose
    command lines need not name the run."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"ACMOE_RUN_INSTANCE=" in Path(f"/proc/{pid}/environ").read_bytes():
                out.add(int(pid))
        except OSError:
            continue
    return out


def _latest(run_dir):
    return (Path(run_dir) / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from acmoe_megatron.data import prepare

    out = tmp_path_factory.mktemp("rel") / "data"
    prepare(source="stdlib", out_dir=out, seq_length=64, max_bytes=200_000)
    return out


# EP=2 runs keep running AC statistics (acmoe.source=ema): a resume must restore those buffers too
LAYOUT = {1: ["megatron.expert_model_parallel_size=1"],
          2: ["megatron.expert_model_parallel_size=2", "acmoe.source=ema"]}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    runs = {}
    for ep in (1, 2):
        run = tmp_path_factory.mktemp(f"a_ep{ep}") / "run"
        # the EP=1 run also records its sample ids: the reference of the resume on another process count
        retention = ["megatron.save_interval=1", "run.keep_last_checkpoints=2", "run.trace_samples=true"] if ep == 1 \
            else []
        rc, log = _run(run, data, ep, *LAYOUT[ep], *retention)
        assert rc == 0, log[-3000:]
        runs[ep] = _losses(run)
        runs[f"dir{ep}"] = run
        assert len(runs[ep]) == 2 * N
    return runs


def test_stop_lose_a_rank_hang_a_rank_and_resume_is_bit_exact(data, uninterrupted, tmp_path):
    """EP=2 (EMA statistics): stopped after N steps, a rank lost in the next step, a rank hung
    (SIGSTOP) in the step after, resumed: the losses equal the uninterrupted run's as floats. (EP=1
    resumes bit-exactly in the kill -9 test.)"""
    run = tmp_path / "run"
    common = LAYOUT[2]
    rc, log = _run(run, data, 2, *common, f"megatron.exit_interval={N}")
    assert rc == EXIT_STOPPED_EARLY, log[-3000:]
    assert "Run the same command again to resume" in log and _latest(run) == str(N)
    _lose_a_rank_mid_step(run, data, common)
    _hang_a_rank_mid_step(run, data, common)
    rc, log = _run(run, data, 2, *common)
    assert rc == 0, log[-3000:]
    assert _losses(run) == uninterrupted[2]  # float equality, step by step


def test_sigterm_saves_stops_and_resumes_on_another_number_of_processes(data, uninterrupted, tmp_path):
    """SIGTERM to both processes of a DP=2 run (EP=1, global batch 8) mid-run: the step finishes, a
    checkpoint is saved, exit 75. The run then resumes on 1 process for one step, and on 2 again to
    the end. Every step consumes exactly the samples of the uninterrupted one-process run's step (the
    ids the processes record, merged in global order: nothing seen twice or skipped), and its loss
    equals that run's (the same micro-batches and AC statistics, another reduction order)."""
    from acmoe_megatron.observability.sample_trace import read_trace

    run = tmp_path / "run"
    common = ["megatron.expert_model_parallel_size=1", "run.trace_samples=true"]
    proc = subprocess.Popen(_cmd(run, data, 2, *common), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    worker_pids = []
    try:
        for line in proc.stdout:
            if " iteration        1/" in line:
                # the workers (python -u -m acmoe_megatron.runtime.train), not torchrun, whose command line
                # also names the module: Megatron's handler in each worker takes the signal
                out = subprocess.run(["pgrep", "-f", "--", f"-u -m acmoe_megatron.runtime.train --config {run}/config.yaml"],
                                     capture_output=True, text=True)
                worker_pids = [int(p) for p in out.stdout.split()]
                for pid in worker_pids:
                    os.kill(pid, signal.SIGTERM)
                break
        rest = proc.stdout.read()
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert len(worker_pids) == 2, "the two workers were not found"
    assert rc == EXIT_STOPPED_EARLY, rest[-3000:]
    stopped_at = int(_latest(run))
    assert 1 <= stopped_at < 2 * N - 1, rest[-3000:]
    rc, log = _run(run, data, 1, *common, f"megatron.exit_interval={stopped_at + 1}")  # one step, 1 process
    assert rc == EXIT_STOPPED_EARLY and "successfully loaded checkpoint" in log, log[-3000:]
    assert _latest(run) == str(stopped_at + 1)
    rc, log = _run(run, data, 2, *common)  # back to 2 processes, to the end
    assert rc == 0, log[-3000:]
    reference = read_trace(uninterrupted["dir1"])
    assert sorted(reference) == list(range(1, 2 * N + 1)) and len(reference[1]) == 8  # global batch 8
    assert read_trace(run) == reference
    assert _losses(run) == pytest.approx(uninterrupted[1], rel=1e-5)


def _lose_a_rank_mid_step(run, data, common):
    """kill -9 of one of the two processes after the first step past the checkpoint: the other one
    ends within seconds (torchrun's agent stops the group), the run exits non-zero and nothing new
    is recorded; the caller then resumes with the same command."""
    proc = subprocess.Popen(_cmd(run, data, 2, *common), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    victim = None
    try:
        for line in proc.stdout:
            if f" iteration        {N + 1}/" in line:
                out = subprocess.run(["pgrep", "-f", "--", f"-u -m acmoe_megatron.runtime.train --config {run}/config.yaml"],
                                     capture_output=True, text=True)
                pids = sorted(int(p) for p in out.stdout.split())
                assert len(pids) == 2, out.stdout
                victim = pids[-1]
                os.kill(victim, signal.SIGKILL)
                killed_at = time.time()
                break
        rest = proc.stdout.read()
        rc = proc.wait(timeout=120)
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert victim is not None, "the run never reached the step after the checkpoint"
    assert rc not in (0, EXIT_STOPPED_EARLY) and elapsed < 60, (rc, elapsed, rest[-3000:])
    assert "exitcode  : -9" in rest  # torchrun names the lost rank
    assert _latest(run) == str(N) and not (run / "checkpoints" / f"iter_{2 * N:07d}").exists()


HANG_S = 10  # run.hang_timeout_s of the hung run


def _hang_a_rank_mid_step(run, data, common):
    """Rank 1 stops itself (SIGSTOP) when it enters the backward pass of the second step after the
    checkpoint (the first step of a start has the longer start-up bound): rank 0 waits for it in a
    collective. The hang watch names rank 1, its node, the step and the phase, stops both processes
    and the run exits 124 within the bound (+ one poll and the kill), recording nothing new."""
    import socket

    step = N + 2
    env = {**os.environ, "ACMOE_FAULT_STOP_AT_ITER": str(step), "ACMOE_FAULT_STOP_RANK": "1",
           "ACMOE_FAULT_STOP_PHASE": "backward"}
    bounds = [f"run.hang_timeout_s={HANG_S}", "run.hang_timeout_checkpoint_s=60"]
    proc = subprocess.Popen(_cmd(run, data, 2, *common, *bounds),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    stopped_at = None
    before = _started_by_a_launcher()
    # without a working hang watch the run would wait for megatron's 10-minute collective timeout
    guard = threading.Timer(HANG_S + 150, lambda: os.killpg(proc.pid, signal.SIGKILL))
    guard.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "fault injection: rank 1 stops itself (SIGSTOP)" in line:
                stopped_at = time.time()
        rc = proc.wait(timeout=120)
        ended = time.time()
    finally:
        guard.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(lines)
    assert stopped_at is not None, log[-3000:]
    assert rc == EXIT_HUNG, log[-3000:]
    assert ended - stopped_at < HANG_S + 8, ended - stopped_at
    assert (f"acmoe-pretrain: rank 1 on node {socket.gethostname()} hung at step {step} in backward (process "
            f"stopped or frozen") in log, log[-3000:]
    assert "its process is stopped or frozen" in log and f"bound run.hang_timeout_s={HANG_S} s" in log
    assert _latest(run) == str(N) and not _survivors(run)
    deadline = time.time() + 10  # nothing the hung run started is left (SIGKILL takes the process trees)
    while (left := _started_by_a_launcher() - before) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left if Path(f"/proc/{p}").exists()]


def test_kill_9_inside_a_save_then_a_full_disk_keep_the_previous_checkpoint(data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, ACMOE_FAULT_SAVE_DELAY_S="60", ACMOE_FAULT_SAVE_ITER=str(2 * N))
    before = _started_by_a_launcher()
    proc = subprocess.Popen(_cmd(run, data, 1, *LAYOUT[1]), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    deadline = time.time() + 300
    try:
        for line in proc.stdout:
            if "fault injection: checkpoint shards written" in line:
                break
            assert time.time() < deadline, "the run never reached the slowed-down save"
        else:
            pytest.fail("the run ended without reaching the slowed-down save")
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's process group, mid-save
    finally:
        proc.wait(timeout=60)
    # torchrun starts its workers in sessions of their own: without runtime/lifetime.py the worker
    # outlived the kill, finished its slowed save a minute later and wrote into the runs below
    deadline = time.time() + 10
    while _survivors(run) and time.time() < deadline:
        time.sleep(0.2)
    assert not _survivors(run), f"processes of the killed run are still alive: {_survivors(run)}"
    # nor what the worker started: megatron's checkpoint writer (a multiprocessing spawn child, ~780 MB)
    # outlived it before runtime/train.py gave its __mp_main__ children the same death signal
    while (left := _started_by_a_launcher() - before) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left if Path(f"/proc/{p}").exists()]
    assert (run / "checkpoints" / f"iter_{2 * N:07d}").exists()  # half-finished save is on disk...
    assert _latest(run) == str(N)  # ...but not recorded: the previous checkpoint stays the latest
    # the resume runs out of space in its own save of 2N (a real RLIMIT_FSIZE: the writes fail with EFBIG)
    env = dict(os.environ, ACMOE_FAULT_FSIZE_AT_ITER=str(2 * N))
    rc, log = _run(run, data, 1, *LAYOUT[1], env=env)
    assert "successfully loaded checkpoint" in log
    assert rc == EXIT_DISK_FULL, log[-3000:]
    partial = run / "checkpoints" / f"iter_{2 * N:07d}"
    assert (f"checkpoint save of iteration {2 * N} into {partial} failed: a file exceeded the process's file-size "
            f"limit (ulimit -f). The save needs about") in log
    assert f"The latest complete checkpoint is still iteration {N}." in log
    assert not partial.exists() and _latest(run) == str(N)  # the partial save removed, N still the latest
    rc, log = _run(run, data, 1, *LAYOUT[1])
    assert rc == 0, log[-3000:]
    assert "successfully loaded checkpoint" in log and _latest(run) == str(2 * N)
    assert _losses(run) == uninterrupted[1]


def test_keep_last_checkpoints(uninterrupted):
    run = uninterrupted["dir1"]  # saved every step, run.keep_last_checkpoints=2
    kept = sorted(d.name for d in (run / "checkpoints").glob("iter_*"))
    assert kept == [f"iter_{2 * N - 1:07d}", f"iter_{2 * N:07d}"]
    assert _latest(run) == str(2 * N)


def test_every_save_has_checksums_from_every_process(uninterrupted):
    """The EP=2 run (2 processes): each saved iteration has both processes' parts, which together
    cover every file of the save, and verify against it."""
    from acmoe_megatron.runtime.checkpoint_digest import DIGEST_DIR, checkpoint_files, read_digest, verify

    ckpt = uninterrupted["dir2"] / "checkpoints"
    saves = sorted(ckpt.glob("iter_*"))
    assert [d.name for d in saves] == [f"iter_{N:07d}", f"iter_{2 * N:07d}"]
    for d in saves:
        assert sorted(p.name for p in (d / DIGEST_DIR).iterdir()) == ["rank_0.json", "rank_1.json"]
        files, world = read_digest(d)
        assert world == 2 and sorted(files) == checkpoint_files(d)
        assert verify(d, "full") == (None, None)


def test_nonfinite_loss_stops_with_the_last_good_checkpoint(data, tmp_path):
    """A NaN loss at iteration 5 (ACMOE_FAULT_NAN_AT_ITER): megatron re-runs the step, finds the NaN
    reproducible, saves the state of iteration 4 and stops; exit 16, TensorBoard marks the fault."""
    run = tmp_path / "run"
    env = dict(os.environ, ACMOE_FAULT_NAN_AT_ITER="5")
    rc, log = _run(run, data, 1, "megatron.expert_model_parallel_size=1", "megatron.train_iters=8",
                   "megatron.save_interval=3", "megatron.lr_decay_iters=8", env=env)
    assert rc == 16, log[-3000:]
    assert "non-finite loss or gradient at iteration 5" in log
    assert _latest(run) == "4"
    scalars = read_scalars(run / "tensorboard")
    assert scalars["faults/nonfinite_loss_or_grad"] == [(5, 1.0)]
    assert all(step <= 4 for step, _ in scalars["lm loss"])


def test_a_damaged_checkpoint_is_refused_before_any_process_and_resume_from_picks_a_complete_one(
        data, uninterrupted, tmp_path, monkeypatch, capsys):
    """On a copy of the uninterrupted EP=1 run (iterations 5 and 6 kept): a truncated shard file, a
    missing .metadata and a tracker naming a deleted iteration are each refused by acmoe-pretrain
    before torchrun starts, naming the file and `--resume-from 5`; with it, iteration 6 is set aside
    and the run starts from 5."""
    import shutil

    from acmoe_megatron.cli import pretrain as launcher
    from acmoe_megatron.core.exit_codes import EXIT_CONFIG

    started = []

    class Started:  # torchrun, as acmoe-pretrain starts it, recorded instead of run
        def __init__(self, cmd, **kw):
            started.append(cmd)

        def poll(self):
            return 0

        wait = poll

    monkeypatch.setattr(subprocess, "Popen", Started)
    retention = ["megatron.save_interval=1", "run.keep_last_checkpoints=2"]

    def acmoe_pretrain(run, *extra, overrides=()):
        argv = _cmd(run, data, 1, *LAYOUT[1], *retention)[3:]  # less "python -m acmoe_megatron.cli.pretrain"
        return launcher.main([*extra, *argv, *overrides])

    def fresh_copy(name):
        run = tmp_path / name
        shutil.copytree(uninterrupted["dir1"], run)
        return run, run / "checkpoints"

    run, ckpt = fresh_copy("truncated")
    shard = next((ckpt / f"iter_{2 * N:07d}").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    assert acmoe_pretrain(run) == EXIT_CONFIG and not started
    err = capsys.readouterr().err
    assert f"{shard} is truncated" in err and "Complete checkpoints: iterations [5]" in err
    assert "--resume-from 5" in err
    assert acmoe_pretrain(run, "--resume-from", "5") == 0 and len(started) == 1
    assert _latest(run) == "5" and (ckpt / f"iter_{2 * N:07d}.damaged").is_dir()
    assert not (ckpt / f"iter_{2 * N:07d}").exists()

    run, ckpt = fresh_copy("no_metadata")
    (ckpt / f"iter_{2 * N:07d}" / ".metadata").unlink()
    assert acmoe_pretrain(run) == EXIT_CONFIG
    assert "/.metadata is missing (the save did not finish)" in capsys.readouterr().err

    # a byte changed inside a shard of the right size: the checksums written at the save find it
    run, ckpt = fresh_copy("flipped_byte")
    shard = sorted((ckpt / f"iter_{2 * N:07d}").glob("*.distcp"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    assert acmoe_pretrain(run) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{shard} has the size it was saved with but not the same bytes" in err
    assert "Complete checkpoints: iterations [5]" in err and "--resume-from 5" in err
    assert acmoe_pretrain(run, overrides=["run.checkpoint_verify=sizes"]) == 0 and len(started) == 2  # sizes only

    run, ckpt = fresh_copy("stale_tracker")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("7")
    assert acmoe_pretrain(run) == EXIT_CONFIG
    assert "iter_0000007 does not exist" in capsys.readouterr().err
    assert len(started) == 2  # only the --resume-from start and the unverified one reached torchrun
