"""Launch AC-router pretraining through NeMo-Run: Megatron-Bridge's example under NeMo-Run's executors.

NVIDIA's launcher for Megatron-Bridge is NeMo-Run: a task (here a ``run.Script``: the Bridge example,
``examples/bridge_pretrain_acmoe.py``, with its arguments) and an executor that says where and how to
start it. This script builds both and runs them as one NeMo-Run experiment:

  --executor local   ``run.LocalExecutor(ntasks_per_node=N, launcher="torchrun")``: torchrun on this machine
  --executor slurm   ``run.SlurmExecutor(...)``: an sbatch job (``srun`` + torchrun per node) through a
                     ``run.LocalTunnel`` (submit from this host) or ``run.SSHTunnel`` (--ssh-host)

Everything after ``--`` goes to the Bridge example unchanged (``--data-path``, ``--acmoe-*`` flags,
Bridge overrides). ``--dryrun`` prints what NeMo-Run would run (the sbatch script for SLURM) and
starts nothing.

Example (2 processes on this machine, expert parallel 2)::

    python examples/nemo_run_acmoe.py --executor local --nproc 2 -- \\
        --data-path data/stdlib_idx/train_text_document --split 100,0,0 --acmoe-router ac \\
        --acmoe-first-ac-layer 2 model.num_moe_experts=4 model.expert_model_parallel_size=2 ...

On a cluster::

    python examples/nemo_run_acmoe.py --executor slurm --nodes 2 --nproc 8 --account ACC --partition gpu \\
        --time 04:00:00 --job-dir /shared/nemo_run -- <the Bridge example's arguments>
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BRIDGE_EXAMPLE = ROOT / "examples" / "bridge_pretrain_acmoe.py"


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    task_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Arguments after -- go to the Bridge example (--script).")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--script", type=Path, default=BRIDGE_EXAMPLE,
                        help="the torchrun script to launch (default: the Bridge example)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--name", default="acmoe_bridge", help="NeMo-Run experiment name")
    parser.add_argument("--job-dir", type=Path, default=ROOT / "runs" / "nemorun",
                        help="where NeMo-Run keeps the experiment (a shared file system for SLURM)")
    parser.add_argument("--dryrun", action="store_true", help="print what would run; start nothing")
    parser.add_argument("--detach", action="store_true",
                        help="slurm: submit and return, printing the job id (NeMo-Run's own monitoring of a "
                             "SLURM job reads sacct, i.e. needs the cluster's accounting database)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the task (repeatable)")
    slurm = parser.add_argument_group("slurm (--executor slurm)")
    slurm.add_argument("--account")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", default="01:00:00")
    slurm.add_argument("--gpus-per-node", type=int, help="default: --nproc on a GPU cluster, none without CUDA")
    slurm.add_argument("--ssh-host", help="submit through run.SSHTunnel to this login node (default: this host)")
    slurm.add_argument("--ssh-user", default=os.environ.get("USER", ""))
    args = parser.parse_args(argv)
    if args.executor == "slurm" and not (args.account and args.partition):
        parser.error("--executor slurm needs --account and --partition")
    if args.detach and args.executor != "slurm":
        parser.error("--detach: only a SLURM job outlives this process (NeMo-Run's LocalExecutor cannot detach)")
    if not args.script.is_file():
        parser.error(f"--script {args.script}: no such file")
    if "/nemo_run" in str(args.job_dir.resolve()):
        parser.error(f"--job-dir {args.job_dir}: NeMo-Run 0.11 rewrites every '/nemo_run' in the SLURM script's paths "
                     "(its in-container run directory) to the job directory, so a path containing '/nemo_run' breaks; "
                     "choose another directory name")
    bad = [e for e in args.env if "=" not in e or not e.split("=", 1)[0]]
    if bad:
        parser.error(f"--env {bad[0]!r}: expected KEY=VALUE")
    return args, task_args


def executor(args):
    """The NeMo-Run executor the arguments describe. The task's PYTHONPATH is this checkout alone, so the
    script finds this checkout's package wherever NeMo-Run starts it, and nothing of the launcher's own
    path (NeMo-Run may sit in a separate --target directory: README, NeMo-Run) reaches the training."""
    import nemo_run as run

    env = {"PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc))),
           **dict(e.split("=", 1) for e in args.env)}
    # NeMo-Run's torchrun launcher starts ``torchrun`` from PATH: the one next to this interpreter (an sbatch
    # job inherits the submitting environment, so on a cluster this venv must be on the shared file system)
    os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    if args.executor == "local":
        return run.LocalExecutor(ntasks_per_node=args.nproc, nodes=1, launcher="torchrun", env_vars=env)
    tunnel = (run.SSHTunnel(host=args.ssh_host, user=args.ssh_user, job_dir=str(args.job_dir)) if args.ssh_host
              else run.LocalTunnel(job_dir=str(args.job_dir / "experiments")))  # where the Experiment writes
    gpus = args.gpus_per_node
    return run.SlurmExecutor(account=args.account, partition=args.partition, nodes=args.nodes,
                             ntasks_per_node=1, gpus_per_node=gpus, time=args.time, tunnel=tunnel,
                             launcher="torchrun", env_vars={**env, "NPROC_PER_NODE": str(args.nproc)},
                             torchrun_nproc_per_node=args.nproc, packager=run.Packager())


def main(argv=None) -> int:
    args, task_args = parse(argv)
    import nemo_run as run

    # entrypoint "python": torchrun runs the script with its own interpreter (anything else means --no-python)
    task = run.Script(path=str(args.script.resolve()), args=task_args, entrypoint="python")
    with run.Experiment(args.name, executor=executor(args), base_dir=str(args.job_dir), log_level="WARN") as exp:
        exp.add(task, name="pretrain")
        if args.dryrun:
            exp.dryrun()
            return 0
        exp.run(sequential=True, detach=args.detach, tail_logs=not args.detach)
    # a single job is waited for when the experiment's context closes, not in run()
    status = exp.status(return_dict=True) or {}
    if args.detach:
        jobs = {name: job["job_id"] for name, job in status.items()}
        print(f"[acmoe] NeMo-Run experiment {args.name}: submitted SLURM job(s) {jobs}; logs under {args.job_dir}",
              flush=True)
        return 0
    states = {name: str(job["status"]) for name, job in status.items()}
    print(f"[acmoe] NeMo-Run experiment {args.name}: {states}", flush=True)
    return 0 if states and all(s.startswith("SUCCEEDED") for s in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
