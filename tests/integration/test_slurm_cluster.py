"""slurm/pretrain.sbatch on a real SLURM cluster: two slurmd "nodes" on this machine.

The module fixture installs Debian's ``slurm-wlm`` and ``munge`` when they are missing (apt-get;
the tests are skipped, with the reason, only where that is impossible: not root, no apt-get, no
package mirror), writes a slurm.conf into a temporary directory and starts, as children of this
process and on loopback only: ``munged`` (its own key and socket), ``slurmctld`` and two ``slurmd``
(``-N n1``, ``-N n2``: NodeAddr 127.0.0.1, one port each). Every daemon is stopped by its pid when
the module ends, whatever happened (jobs still queued are cancelled first).

The jobs are CPU ACMoE runs of configs/tiny_cpu.yaml with small overrides (sequence 64, 4 x 2
samples per step) on a small stdlib corpus, expert parallel 2 over gloo, one torchrun per node with
one worker each (world size 2: one expert-parallel rank per node, so every MoE all-to-all crosses
the "nodes"):

1. submitted with ``acmoe-launch slurm --nodes 2``: log, final loss, TensorBoard events, run files;
2. submitted with plain ``sbatch --nodes=2 slurm/pretrain.sbatch`` and signalled mid-run with
   ``scancel --signal=USR1`` (what ``--signal=USR1@T`` does before the time limit): Megatron saves
   and exits, the script requeues the job, the second start resumes from the checkpoint and
   finishes with the full step count;
3. one task per process (``LAUNCHER=srun``) instead of torchrun;

and, on the same cluster, the preflight, a requeue on fewer nodes, and NeMo-Run's SlurmExecutor
submitting its own sbatch script for the Megatron-Bridge example (examples/nemo_run_acmoe.py).

About 3 minutes on 2 CPU cores (plus the package install on a fresh machine).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from acmoe_megatron.observability.summary import read_scalars

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "tiny_cpu.yaml"
PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def small_run(data: Path, train_iters: int, **extra) -> list[str]:
    """Overrides of configs/tiny_cpu.yaml for a short CPU run on the small corpus."""
    values = {
        "megatron.train_iters": train_iters, "megatron.lr_warmup_iters": 2,
        "megatron.eval_interval": train_iters // 2, "megatron.eval_iters": 2, "megatron.log_interval": 1,
        "megatron.seq_length": 64, "megatron.max_position_embeddings": 64,
        "megatron.micro_batch_size": 4, "megatron.global_batch_size": 8,
        "megatron.save_interval": 1000, "data.path": str(data),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


# ---------------------------------------------------------------------------------------------
# the cluster


def _find(binary: str) -> str | None:
    return shutil.which(binary) or next(
        (str(p) for p in (Path("/usr/sbin") / binary, Path("/usr/bin") / binary) if p.is_file()), None
    )


def _install_slurm() -> str | None:
    """None when SLURM and munge are there (installing them if needed), else why not."""
    if all(_find(b) for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and installing them needs root"
    if not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get (not Debian/Ubuntu)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [["apt-get", "update"],
             ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]]
    for cmd in steps:
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"`{' '.join(cmd)}` failed: {err}"
        if out.returncode != 0:
            return f"`{' '.join(cmd)}` failed (exit {out.returncode}): {(out.stdout + out.stderr)[-1500:]}"
    missing = [b for b in BINARIES if not _find(b)]
    return f"installed {PACKAGES} but {missing} are still missing" if missing else None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Cluster:
    """munged + slurmctld + slurmd n1 + slurmd n2 on this machine, all children of this process."""

    def __init__(self, base: Path):
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = base / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
                    and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        self.env.update(SLURM_CONF=str(self.conf), OMP_NUM_THREADS="1")

    # -- set-up ------------------------------------------------------------------------------

    def write_config(self) -> None:
        b = self.base
        for d in ("munge", "state", "log", "spool/n1", "spool/n2"):
            (b / d).mkdir(parents=True, exist_ok=True)
        (b / "munge").chmod(0o700)
        key = b / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        host = socket.gethostname().split(".")[0]
        ctld_port, n1_port, n2_port = _free_ports(3)
        self.conf.write_text(f"""\
ClusterName=acmoetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={b}/munge/munge.socket
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd.%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=600
KillWait=10
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def start(self) -> None:
        self.write_config()
        b = self.base
        self._start("munged", [_find("munged"), "--foreground", "--force",
                               f"--socket={b}/munge/munge.socket", f"--key-file={b}/munge/munge.key",
                               f"--pid-file={b}/munge/munged.pid", f"--seed-file={b}/munge/seed",
                               f"--log-file={b}/log/munged.log"])
        self._wait(lambda: (b / "munge" / "munge.socket").exists(), 20, "munged's socket")
        self._start("slurmctld", [_find("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", check=False).returncode == 0, 30, "slurmctld")
        for node in ("n1", "n2"):
            self._start(f"slurmd-{node}", [_find("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait(lambda: self.node_states() == ["idle", "idle"], 60, "two idle nodes")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    # -- use ---------------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run([_find(cmd[0]) or cmd[0], *cmd[1:]], env=kw.pop("env", self.env),
                             capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def node_states(self) -> list[str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return [line.split()[1].rstrip("*") for line in sorted(out.stdout.splitlines()) if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: str, timeout: float, until=None) -> dict[str, str]:
        until = until or (lambda j: j["JobState"] in FINAL_STATES)
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {self.job(job_id)} after {timeout} s:\n{self.logs()}")

    def logs(self, tail: int = 2000) -> str:
        parts = []
        for path in sorted((self.base / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- tear-down ---------------------------------------------------------------------------

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            for job in jobs:
                self.run("scancel", job, check=False)
            deadline = time.time() + 30
            while jobs and time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd-n2", "slurmd-n1", "slurmctld", "munged"):  # reverse start order
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = _install_slurm()
    if why:
        print(f"\n[test_slurm_cluster] skipped: {why}", file=sys.stderr)
        pytest.skip(why)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from acmoe_megatron.data import prepare

    data = tmp_path_factory.mktemp("slurm_data") / "stdlib_s64"
    prepare(source="stdlib", out_dir=data, seq_length=64, max_bytes=200_000)
    return data


def sbatch(cluster: Cluster, run_dir: Path, overrides: list[str], *sbatch_args: str, **env) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    job_env = {**cluster.env, "CONFIG": str(RECIPE), "RUN_DIR": str(run_dir), "DATA": overrides_data(overrides),
               "ACMOE_PYTHON": sys.executable, **env}
    out = cluster.run("sbatch", "--parsable", "--nodes=2", "--time=30", f"--output={run_dir}/job-%j.out",
                      *sbatch_args, str(ROOT / "slurm" / "pretrain.sbatch"), *overrides, env=job_env, cwd=ROOT)
    return out.stdout.strip().split(";")[0]


def overrides_data(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("data.path="))


def iterations(log: str, total: int) -> list[int]:
    return [int(m) for m in re.findall(rf"\] iteration\s+(\d+)/\s*{total} \|", log)]


def assert_lm_loss_learned(run_dir: Path, total: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    scalars = read_scalars(run_dir / "tensorboard")
    steps = [s for s, _ in scalars["lm loss"]]
    assert steps == list(range(1, total + 1)), steps
    losses = [v for _, v in scalars["lm loss"]]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # byte-level loss starts near ln 257
    valid = summary["final_valid_loss"]
    assert valid is not None and math.isfinite(valid) and 0 < valid < math.log(256), summary
    assert valid == pytest.approx(scalars["lm loss validation"][-1][1])
    for tag in ("load_balancing_loss", "learning-rate", "lm loss validation"):
        assert tag in scalars, sorted(scalars)
    assert summary["iterations"] == total and summary["world_size"] == 2
    assert not summary.get("stopped_early")  # the final start ran to train_iters
    assert summary["parallel"] == {"tp": 1, "pp": 1, "ep": 2, "dp": 2}
    return summary


# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(420)
def test_two_node_run_submitted_by_acmoe_launch(cluster, corpus, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.launch", "slurm", "--config", str(RECIPE),
           "--nodes", "2", "--gpus-per-node", "0", "--time", "30", "--run-dir", str(run_dir),
           *small_run(corpus, 12)]
    out = subprocess.run(cmd, env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"submitted job (\d+)", out.stdout).group(1)
    job = cluster.wait_job(job_id, 300)
    log_path = run_dir / "slurm_logs" / f"acmoe-tiny_cpu-{job_id}.out"
    log = log_path.read_text() if log_path.is_file() else f"(no {log_path})"
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{log[-6000:]}\n{cluster.logs()}"
    assert job["NodeList"] == "n[1-2]" and job["NumNodes"] == "2" and job["Restarts"] == "0"

    # the log: the allocation, one torchrun per node, the rendezvous on the head node, training
    assert f"[acmoe-slurm] job {job_id} restart 0: 2 node(s) [n[1-2]] x 1 process(es) = world size 2, launcher torchrun" in log
    port = 61000 + int(job_id) % 4536
    assert f"head node n1 address 127.0.0.1 port {port}" in log  # n1's NodeAddr (n1 is not in DNS)
    assert "[acmoe-node n1] torchrun started" in log and "[acmoe-node n2] torchrun started" in log
    assert "parallel layout: world 2, tp 1, pp 1, cp 1, ep 2, etp 1, dp 2" in log
    assert iterations(log, 12) == list(range(1, 13))
    assert "validation loss at iteration 12" in log
    assert "[acmoe-slurm] run finished: iteration 12 of 12 (restarts: 0)" in log
    assert (run_dir / "slurm_logs" / f"train-{job_id}.log").is_file()

    # final loss and TensorBoard events
    assert_lm_loss_learned(run_dir, 12)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents*"))) == 1

    # the run directory: resolved recipe (+ preemption flags), git SHA, checkpoint, rendered script
    from acmoe_megatron.runtime.recipe import load_recipe

    recipe = load_recipe(run_dir / "config.yaml")
    assert recipe.run.dir == str(run_dir) and recipe.data.path == str(corpus)
    assert recipe.megatron["exit_signal_handler"] is True and recipe.megatron["exit_signal"] == "SIGUSR1"
    assert recipe.megatron["train_iters"] == 12
    assert re.match(r"^[0-9a-f]{40}|^unknown", (run_dir / "git_sha.txt").read_text())
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert len(list((run_dir / "slurm_logs").glob("pretrain-*.sbatch"))) == 1


@pytest.mark.timeout(420)
def test_signalled_job_saves_requeues_and_resumes(cluster, corpus, tmp_path):
    run_dir = tmp_path / "requeue"
    total = 40
    job_id = sbatch(cluster, run_dir, small_run(corpus, total))
    log_path = run_dir / f"job-{job_id}.out"

    # mid-run: after the third logged iteration, signal the job steps as --signal=USR1@T would
    deadline = time.time() + 240
    while time.time() < deadline:
        text = log_path.read_text() if log_path.is_file() else ""
        if re.search(rf"\] iteration\s+3/\s*{total} \|", text):
            break
        job = cluster.job(job_id)
        assert job["JobState"] not in FINAL_STATES, f"{job}\n{text[-5000:]}"
        time.sleep(0.3)
    else:
        raise AssertionError(f"no iteration 3 after 240 s:\n{log_path.read_text()[-5000:]}\n{cluster.logs()}")
    cluster.run("scancel", "--signal=USR1", job_id)

    # the batch script requeues the job; SLURM holds a requeued job back for ~2 minutes (its
    # BeginTime); wait until the first start is cleaned up on both nodes, then release it now
    cluster.wait_job(job_id, 180, until=lambda j: j["JobState"] in FINAL_STATES
                     or (j["JobState"] == "PENDING" and j["Restarts"] == "1"))
    job = cluster.job(job_id)
    assert job["JobState"] == "PENDING", f"{job}\n{log_path.read_text()[-6000:]}"
    deadline = time.time() + 60
    while cluster.node_states() != ["idle", "idle"] and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # a job restarted within the second its old credential was revoked is refused
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    job = cluster.wait_job(job_id, 300)
    log = log_path.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{log[-6000:]}\n{cluster.logs()}"
    assert job["Restarts"] == "1"

    first, second = log.split(f"[acmoe-slurm] job {job_id} restart 1:", 1)
    # first start: the signal reached the workers through the per-node wrapper, Megatron saved at
    # the iteration it was in and exited 0, the script saw an unfinished run and requeued it
    assert "[acmoe-node n1] SIGUSR1 received: forwarding to the workers" in first
    assert "[acmoe-node n2] SIGUSR1 received: forwarding to the workers" in first
    saved = int(re.search(r"saving checkpoint at iteration\s+(\d+)", first).group(1))
    assert 3 <= saved < total, saved
    assert "exiting program after receiving SIGTERM" in first  # megatron's message for any exit signal
    assert f"stopped early at iteration {saved} of {total} (checkpoint saved); requeueing job {job_id} (restart 1)" in first
    assert iterations(first, total) == list(range(1, saved + 1))
    # second start: same job id, the resolved recipe re-used, resumed from the checkpoint
    assert "restart: re-using the resolved recipe" in second
    assert f"checkpoint at iteration {saved} in {run_dir}/checkpoints" in second
    assert re.search(rf"loading distributed checkpoint from \S+/checkpoints at iteration {saved}\b", second)
    assert iterations(second, total) == list(range(saved + 1, total + 1))  # no step repeated or lost
    assert f"[acmoe-slurm] run finished: iteration {total} of {total} (restarts: 1)" in second

    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(total)
    assert sorted(p.name for p in ckpt.glob("iter_*")) == [f"iter_{saved:07d}", f"iter_{total:07d}"]
    # TensorBoard: both starts wrote into the run's directory; together every step 1..40 once
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents*"))) == 2
    assert_lm_loss_learned(run_dir, total)


@pytest.mark.timeout(300)
def test_one_task_per_process_launcher(cluster, corpus, tmp_path):
    run_dir = tmp_path / "per_task"
    job_id = sbatch(cluster, run_dir, small_run(corpus, 6), LAUNCHER="srun")
    job = cluster.wait_job(job_id, 240)
    log = (run_dir / f"job-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{log[-6000:]}\n{cluster.logs()}"
    assert "world size 2, launcher srun" in log and "torchrun started" not in log
    assert iterations(log, 6) == list(range(1, 7))
    assert "[acmoe-slurm] run finished: iteration 6 of 6 (restarts: 0)" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 6 and summary["world_size"] == 2
    assert summary["parallel"] == {"tp": 1, "pp": 1, "ep": 2, "dp": 2}


# ---------------------------------------------------------------------------------------------
# the preflight (acmoe-launch slurm --preflight) on the same cluster


def _launch(cluster: Cluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.launch", "slurm", "--config", str(RECIPE), "--gpus-per-node", "0",
           "--time", "30", "--poll-seconds", "1", *args]
    return subprocess.run(cmd, env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_preflight_then_submit_on_two_nodes(cluster, corpus, tmp_path):
    """EP=2 across the two nodes (srun, cyclic ranks: 0,2 on n1 and 1,3 on n2) and PP=2: the preflight
    passes on the allocation, then the real job is submitted and trains."""
    run_dir, pf_dir = tmp_path / "run", tmp_path / "preflight"
    out = _launch(cluster, "--nodes", "2", "--procs-per-node", "2", "--launcher", "srun",
                  "--sbatch-arg=--distribution=cyclic", "--run-dir", str(run_dir), "--preflight-dir", str(pf_dir),
                  "--preflight", "--then-submit", *small_run(corpus, 6, **{"megatron.pipeline_model_parallel_size": 2}))
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{text}\n{cluster.logs()}"
    assert "verdict: PASS" in text and "preflight passed: submitting the real job" in text, text
    report = json.loads((pf_dir / "preflight.json").read_text())
    assert report["verdict"] == "pass" and report["world_size"] == 4
    assert sorted(report["nodes"]) == ["n1", "n2"] and sorted(report["nodes"]["n1"]) == [0, 2], report["nodes"]
    status = {x["item"]: x["status"] for x in report["items"] if x["item"] != "environment"}
    assert status == {"fused paths": "pass", "fp8 gemm": "skipped", "memory": "skipped", "storage": "pass",
                      "training": "pass", "pipeline labels": "pass", "collectives": "pass", "checkpoint": "pass",
                      "tensorboard": "pass"}, report["items"]
    a2a = [c for c in report["collectives"] if c["collective"] == "expert all-to-all"]
    assert a2a and all(c["nodes"] == ["n1", "n2"] for c in a2a), report["collectives"]  # EP crosses the nodes
    assert {x["where"] for x in report["items"] if x["item"] == "environment"} == {"node n1 (ranks 0,2)",
                                                                                   "node n2 (ranks 1,3)"}
    assert not list(run_dir.glob("preflight/*")), "the preflight's scratch checkpoint was left in the run dir"
    # the real job, submitted only after the pass, trains the recipe's layout
    job_id = re.search(r"submitted job (\d+)", out.stdout).group(1)
    job = cluster.wait_job(job_id, 400)
    log = (run_dir / "slurm_logs" / f"acmoe-tiny_cpu-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", f"{job}\n{log[-5000:]}"
    assert "parallel layout: world 4, tp 1, pp 2, cp 1, ep 2, etp 1, dp 2" in log
    assert iterations(log, 6) == list(range(1, 7))


@pytest.mark.timeout(600)
def test_preflight_failure_stops_the_real_job(cluster, corpus, tmp_path):
    """An unwritable run.dir (a path under a regular file: refused even to root): the preflight fails
    on the storage and checkpoint items, names them, and the real job is never submitted."""
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the run directory should be\n")
    run_dir, pf_dir = blocker / "run", tmp_path / "preflight"
    before = set(cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split())
    out = _launch(cluster, "--nodes", "2", "--run-dir", str(run_dir), "--preflight-dir", str(pf_dir),
                  "--preflight", "--then-submit", *small_run(corpus, 6))
    text = out.stdout + out.stderr
    assert out.returncode == 3, text
    assert "the real job was NOT submitted" in text and "submitted job" not in text, text
    report = json.loads((pf_dir / "preflight.json").read_text())
    failed = {x["item"]: x for x in report["items"] if x["status"] == "fail"}
    assert set(failed) == {"storage", "checkpoint", "tensorboard"}, report["items"]
    assert "Not a directory" in failed["storage"]["detail"] and str(run_dir) in failed["storage"]["detail"]
    assert "writable shared file system" in failed["storage"]["fix"]
    assert failed["storage"]["where"] == "all 2 ranks"
    assert re.search(r"verdict: FAIL \(3 item\(s\)\): storage on all 2 ranks: checkpoint dir .*Not a directory", text)
    # only the preflight ran: no job of the real name, nothing queued now
    queued = set(cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()) - before
    assert not queued, queued


@pytest.mark.timeout(900)
def test_a_hung_rank_requeues_the_job_which_continues_on_fewer_nodes(cluster, corpus, tmp_path):
    """`acmoe-launch slurm --nodes 2 --min-nodes 1` (sbatch --nodes=1-2), EP=1, checkpoints every 4
    steps. Rank 1 stops itself (SIGSTOP) in the backward pass of step 6: the hang watch of each node
    (beside torchrun, in torchrun_node.sh) names it, its node, the step and the phase, stops the
    workers within run.hang_timeout_s (10 s), and the batch script requeues the job. The hung rank's
    node does not come back (drained), so the restart gets one node: data parallel 2 -> 1 at the same
    global batch (2 micro-batches accumulated), resumed from iteration 4. The sample sequence
    continues and the losses equal those of the same recipe on 2 processes without interruption
    within rel 1e-5 (the DP change reorders the gradient sums: all-reduce of 2 vs accumulation of 2)."""
    total = 16
    overrides = small_run(corpus, total, **{"megatron.expert_model_parallel_size": 1, "megatron.save_interval": 4,
                                            "run.hang_timeout_s": 10, "run.hang_timeout_checkpoint_s": 60})
    # the reference: the same recipe, 2 processes, uninterrupted (locally: the same maths as 2 nodes)
    ref = tmp_path / "reference"
    out = subprocess.run([sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", str(RECIPE), "--nproc", "2",
                          *overrides, f"run.dir={ref}"], check=False, env=cluster.env, cwd=ROOT, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    reference = [v for _, v in read_scalars(ref / "tensorboard")["lm loss"]]

    run_dir = tmp_path / "shrink"
    out = _launch(cluster, "--nodes", "2", "--min-nodes", "1", "--run-dir", str(run_dir),
                  "--env", "ACMOE_FAULT_STOP_AT_ITER=6", "--env", "ACMOE_FAULT_STOP_RANK=1", *overrides)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"submitted job (\d+)", out.stdout).group(1)
    log_path = run_dir / "slurm_logs" / f"acmoe-tiny_cpu-{job_id}.out"
    hung = None
    try:
        cluster.wait_job(job_id, 300, until=lambda j: j["JobState"] in FINAL_STATES
                         or (j["JobState"] == "PENDING" and j["Restarts"] == "1"))
        text = log_path.read_text() if log_path.is_file() else ""
        found = re.search(r"\[acmoe-slurm\] a rank hung: rank 1 on node (n[12]) hung at step 6 in backward", text)
        assert found, f"{cluster.job(job_id)}\n{text[-6000:]}\n{cluster.logs()}"
        hung = found.group(1)
        cluster.run("scontrol", "update", f"NodeName={hung}", "State=DRAIN", "Reason=did-not-come-back")
        other = "n1" if hung == "n2" else "n2"
        deadline = time.time() + 60
        while cluster.node_states()[int(other[1]) - 1] != "idle" and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)
        cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        job = cluster.wait_job(job_id, 400)
    finally:
        if hung:
            cluster.run("scontrol", "update", f"NodeName={hung}", "State=RESUME", check=False)
    log = log_path.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", f"{job}\n{log[-6000:]}"
    first, second = log.split(f"[acmoe-slurm] job {job_id} restart 1:", 1)
    assert "2 node(s) [n[1-2]] x 1 process(es) = world size 2" in first
    # the hang: named by the watch on both nodes (the run directory is shared), the workers stopped
    assert "fault injection: rank 1 stops itself (SIGSTOP) in backward of iteration 6" in first
    assert re.search(rf"\[acmoe-hang-watch n[12]\] hang: no rank has made progress for \d+ s \(bound "
                     rf"run.hang_timeout_s=10 s\)\. Cause: rank 1 on node {hung} \(pid \d+\) stopped responding in "
                     r"step 6, backward", first), first[-6000:]
    assert f"requeueing job {job_id} after the hang (restart 1 of at most 3); it resumes from iteration 4" in first
    assert second.lstrip().startswith(f"1 node(s) [{other}] x 1 process(es) = world size 1"), second[:300]
    assert "parallel layout: world 1, tp 1, pp 1, cp 1, ep 1, etp 1, dp 1, expert_dp 1, grad_accum 2" in second
    assert iterations(second, total) == list(range(5, total + 1))  # continues from the checkpoint: nothing lost
    losses = [v for _, v in read_scalars(run_dir / "tensorboard")["lm loss"]]
    assert losses == pytest.approx(reference, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# the router-quality benchmark as a sweep of SLURM jobs (benchmarks/quality.py --slurm)


@pytest.mark.timeout(900)
def test_quality_sweep_on_slurm_reports_every_job_including_a_failed_one(cluster, corpus, tmp_path):
    """2 rows x 2 seeds of the CPU recipe, one SLURM job each (1 node), each checked by acmoe-launch's
    planning before any is submitted (a refused row: tests/unit/benchmarks). Every job trains,
    then runs its own finishing step (extraction + acmoe-eval on the corrupted split) and writes its
    per-run JSON; one job's worker is killed mid-run. --report-only gives the same table as a local
    run, with the failed job as a line naming its state and log."""
    out_md, runs = tmp_path / "quality" / "quality.md", tmp_path / "runs"
    sweep = [sys.executable, "benchmarks/quality.py", "--config", str(RECIPE), "--rows", "topk,ac", "--seeds", "2",
             "--steps", "6", "--out", str(out_md), "--runs-dir", str(runs),
             *(a for o in small_run(corpus, 6, **{"megatron.expert_model_parallel_size": 1}) if "train_iters" not in o
               and "save_interval" not in o for a in ("--set", o))]
    launch = ["--slurm", "--launch", "--nodes 1 --gpus-per-node 0 --time 15"]

    out = subprocess.run([*sweep, *launch], env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = json.loads((out_md.with_suffix("") / "sweep.json").read_text())
    assert sorted(jobs) == ["ac/seed1", "ac/seed2", "topk/seed1", "topk/seed2"]
    # one job fails: its worker is killed mid-run (a crashed rank)
    victim = runs / "ac" / "seed2"
    deadline = time.time() + 400
    while time.time() < deadline:
        log = (victim / "slurm_logs" / f"quality-ac-s2-{jobs['ac/seed2']['job_id']}.out")
        if log.is_file() and re.search(r"\] iteration\s+2/", log.read_text()):
            pids = subprocess.run(["pgrep", "-f", f"acmoe_megatron.runtime.train --config {victim}/config.yaml"],
                                  capture_output=True, text=True).stdout.split()
            if pids:
                for pid in pids:
                    os.kill(int(pid), signal.SIGKILL)
                break
        time.sleep(0.3)
    else:
        raise AssertionError(f"ac seed 2 never reached iteration 2\n{cluster.logs()}")
    states = {key: cluster.wait_job(j["job_id"], 600)["JobState"] for key, j in jobs.items()}
    assert states == {"ac/seed1": "COMPLETED", "ac/seed2": "FAILED", "topk/seed1": "COMPLETED",
                      "topk/seed2": "COMPLETED"}, (states, cluster.logs())

    report = subprocess.run([*sweep, "--report-only"], env=cluster.env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stdout + report.stderr
    text = out_md.read_text()
    assert re.search(r"\| `topk` \| 2 \| \d\.\d{4} ± \d\.\d{4} \|", text), text
    assert re.search(r"\| `ac` \| 1 \| \d\.\d{4} \| ", text), text  # one seed: no spread
    failed_log = jobs["ac/seed2"]["log"]
    assert re.search(rf"- `ac` seed 2: job {jobs['ac/seed2']['job_id']} FAILED \(exit \d+:\d+\); log {re.escape(failed_log)}",
                     text), text
    assert Path(failed_log).is_file()
    for key in ("topk/seed1", "ac/seed1"):  # the jobs' own results, corrupted-text loss included
        result = json.loads((out_md.with_suffix("") / "runs" / f"{key}.json").read_text())
        assert result["status"] == "ok" and result["corrupt_valid_loss"] > 0 and result["train_iters"] == 6


# ---------------------------------------------------------------------------------------------
# NeMo-Run's SlurmExecutor (examples/nemo_run_acmoe.py) on the same cluster


BRIDGE_PYTHON = ROOT / ".venv-bridge" / "bin" / "python"  # make bridge (a venv layered on .venv: Makefile)


@pytest.mark.timeout(420)
@pytest.mark.skipif(not (ROOT / ".venv-nemo-run" / "nemo_run").is_dir(),
                    reason="NeMo-Run is not installed: make nemo-run")
@pytest.mark.skipif(not BRIDGE_PYTHON.exists(), reason="Megatron-Bridge is not installed: make bridge")
def test_nemo_run_slurm_executor_runs_the_bridge_example_on_two_nodes(cluster, tmp_path):
    """NeMo-Run renders its own sbatch script (srun + torchrun with a c10d rendezvous on the head node)
    and submits it through its LocalTunnel; the job trains Bridge's recipe with the AC router at EP=2
    across the two nodes. Submitted with --detach and waited for here: NeMo-Run's own monitoring of a
    SLURM job reads sacct, and this cluster has no accounting database (slurmdbd)."""
    job_dir = tmp_path / "jobs"
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join((str(ROOT / ".venv-nemo-run"), str(ROOT)))}
    cmd = [str(BRIDGE_PYTHON), "examples/nemo_run_acmoe.py", "--executor", "slurm", "--nodes", "2", "--nproc", "1",
           "--account", "acmoe", "--partition", "debug", "--time", "00:10:00", "--job-dir", str(job_dir),
           "--detach", "--", "--mock-data", "--acmoe-router", "ac", "--acmoe-first-ac-layer", "2",
           "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
           "model.num_moe_experts=4", "model.moe_router_topk=2", "model.expert_model_parallel_size=2",
           "model.add_bias_linear=false", "model.seq_length=32", "tokenizer.vocab_size=257", "train.train_iters=4",
           "train.global_batch_size=4", "train.micro_batch_size=2", "logger.log_interval=1",
           f"logger.tensorboard_dir={tmp_path / 'tensorboard'}", "checkpoint.save=null", "validation.eval_iters=0"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    job_id = re.search(r"submitted SLURM job\(s\) \{'pretrain': '(\d+)'\}", out.stdout).group(1)
    job = cluster.wait_job(job_id, 300)
    logs = list(job_dir.rglob(f"*pretrain_{job_id}_0.out"))
    log = logs[0].read_text() if logs else f"(no log for job {job_id} under {job_dir})"
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{log[-6000:]}\n{cluster.logs()}"
    assert job["NodeList"] == "n[1-2]" and job["NumNodes"] == "2"
    assert "torchrun --rdzv-backend c10d" in (next(job_dir.rglob("*_sbatch.sh")).read_text())
    assert iterations(log, 4) == list(range(1, 5)), log[-4000:]
    assert "B1_bridge_initialize_without_cuda" in log  # the Bridge example's shims, on the nodes
    summary = json.loads((tmp_path / "acmoe_summary.json").read_text())
    assert summary["model_api"] == "provider"
