"""``acmoe-launch``: submit ACMoE pretraining to SLURM, or run it on this machine.

Subcommands::

    acmoe-launch slurm --config C --nodes N --gpus-per-node G [--partition P] [--time T]
                       [--account A] [--dry-run] [--preflight [--then-submit]] [SECTION.KEY=VALUE ...]
        validate the recipe (strict keys, parallel sizes against N x G processes), render
        ``slurm/pretrain.sbatch`` with these directives and settings, write the rendered script to
        ``<run.dir>/slurm_logs/`` and ``sbatch`` it (``--dry-run``: print it, submit nothing).
        ``--preflight``: first submit the preflight (acmoe-preflight) on the same nodes, GPUs,
        container and launcher with a short time limit, wait for it and print its verdict;
        ``--then-submit``: submit the real job only if it passed (exit 3, nothing submitted, if not)
    acmoe-launch local --nproc P --config C [SECTION.KEY=VALUE ...]
        the same recipe on one machine: torchrun with P processes (``acmoe-pretrain``)
    acmoe-launch resolve ...
        used by the sbatch script on the head node: validate the recipe, build the embedded corpus
        if allowed, write ``<run.dir>/config.yaml``, ``git_sha.txt`` and ``run.env``

Examples::

    acmoe-launch slurm --config configs/switch_m_wt103.yaml --nodes 1 --gpus-per-node 4 \\
        --partition gpu --time 04:00:00 --dry-run
    acmoe-launch slurm --config configs/multinode_h100_fp8.yaml --nodes 2 --gpus-per-node 8 \\
        --account myproj --container-image nvcr.io#nvidia/pytorch:25.09-py3 megatron.train_iters=500
    acmoe-launch local --nproc 2 --config configs/tiny_cpu.yaml megatron.train_iters=50
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from acmoe_megatron.cli import pretrain as launcher
from acmoe_megatron.cli.common import ensure_data
from acmoe_megatron.cli.preflight import finish, prepare
from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.core.exit_codes import EXIT_CONFIG, EXIT_PREFLIGHT_FAILED
from acmoe_megatron.observability.summary import code_version
from acmoe_megatron.runtime.checkpoint_check import check_resume_checkpoint
from acmoe_megatron.runtime.dependencies import check_ft_launcher
from acmoe_megatron.runtime.preflight.plan import PLAN_FILE
from acmoe_megatron.runtime.recipe import load_recipe, write_resolved
from acmoe_megatron.runtime.resume import check_resume_compatible
from acmoe_megatron.runtime.run_plan import RunPlan, build_plan, parallel_layout

# The job's helper scripts ship inside the package (package data; the checkout's slurm/ links here),
# so an installed wheel finds them (ACMOE_SCRIPTS in the job). The project directory (ACMOE_ROOT,
# the job's working directory) is where acmoe-launch runs, or --project-dir.
PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATE = PACKAGE_DIR / "slurm" / "pretrain.sbatch"
DIRECTIVES_BEGIN, DIRECTIVES_END = "# >>> sbatch directives", "# <<< sbatch directives"
ENV_BEGIN, ENV_END = "# >>> environment", "# <<< environment"
LAUNCHERS = ("torchrun", "srun", "ft")
PER_NODE_LAUNCHERS = ("torchrun", "ft")  # one task per node starting the node's processes
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # minutes | [D-]HH[:MM[:SS]] | MM:SS


# ---------------------------------------------------------------------------------------------
# recipe checks shared by `slurm` (before submitting) and `resolve` (in the job)


def train_iters(megatron: dict) -> int | None:
    """The iteration count a finished run reaches (None when Megatron decides it at run time)."""
    if megatron.get("train_iters") is not None:
        return int(megatron["train_iters"])
    samples, gbs = megatron.get("train_samples"), megatron.get("global_batch_size")
    if samples is not None and gbs and not megatron.get("rampup_batch_size"):
        return int(samples) // int(gbs)
    return None


def checkpoint_dir(recipe) -> Path:
    """Where Megatron saves (train.py: ``megatron.save``, default ``<run.dir>/checkpoints``)."""
    save = recipe.megatron.get("save") or str(Path(recipe.run.dir) / "checkpoints")
    return Path(save).absolute()


# ---------------------------------------------------------------------------------------------
# acmoe-launch resolve (runs inside the job, on the head node)


def cmd_resolve(args) -> int:
    run_dir = Path(args.run_dir).absolute()
    resolved = run_dir / "config.yaml"
    try:
        if args.reuse and resolved.is_file():
            recipe = load_recipe(resolved)
            print(f"[acmoe-slurm] restart: re-using the resolved recipe {resolved}", flush=True)
        else:
            forced = [f"run.dir={run_dir}", f"data.path={Path(args.data).absolute()}"]
            if args.exit_signal:
                forced += ["megatron.exit_signal_handler=true", f"megatron.exit_signal={args.exit_signal}"]
            recipe = load_recipe(args.config, list(args.overrides) + forced)
            # a run directory with checkpoints of another configuration is not resumed silently
            check_resume_compatible(recipe, run_dir)
        layout = None
        ensure_data(recipe)

        # a requeued job: the checkpoint it resumes from is complete, before any training process starts
        check_resume_checkpoint(Path(recipe.megatron.get("load") or run_dir / "checkpoints"),
                                recipe.megatron.get("ckpt_step"), recipe.run.checkpoint_verify)
        if args.world_size:  # the whole run plan on the head node, before any training process starts

            layout = build_plan(recipe, args.world_size).layout
    except ConfigError as err:
        print(f"acmoe-launch resolve: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if not (args.reuse and resolved.is_file()):
        write_resolved(recipe, run_dir)
    sha = code_version(Path(args.root) if args.root else PACKAGE_DIR)
    (run_dir / "git_sha.txt").write_text(sha + "\n")
    iters = train_iters(recipe.megatron)
    env = {
        "RESOLVED": str(resolved),
        "TRAIN_ITERS": "" if iters is None else str(iters),
        "CHECKPOINT_DIR": str(checkpoint_dir(recipe)),
        "TENSORBOARD_DIR": str(Path(recipe.megatron.get("tensorboard_dir") or run_dir / "tensorboard").absolute()),
        "CONFIG_HASH": recipe.hash(),
        "HANG_TIMEOUT_S": f"{recipe.run.hang_timeout_s:g}",  # the ft launcher's section timeouts
        "HANG_TIMEOUT_CHECKPOINT_S": f"{recipe.run.hang_timeout_checkpoint_s:g}",
    }
    tmp = run_dir / "run.env.tmp"
    tmp.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    tmp.replace(run_dir / "run.env")
    if layout:
        print("[acmoe-slurm] parallel layout: " + ", ".join(f"{k} {v}" for k, v in layout.items()), flush=True)
    print(f"[acmoe-slurm] recipe hash {env['CONFIG_HASH']}, git {sha}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# acmoe-launch slurm


def _replace_block(text: str, begin: str, end: str, lines: list[str], what: str) -> str:
    out, inside, found = [], False, False
    for line in text.splitlines():
        if line.strip().startswith(begin):
            inside, found = True, True
            out.append(line)
            out.extend(lines)
            continue
        if inside and line.strip().startswith(end):
            inside = False
        if not inside:
            out.append(line)
    if not found or inside:
        raise ConfigError(f"the sbatch template has no '{begin}' ... '{end}' block ({what})")
    return "\n".join(out) + "\n"


def cpus_per_task(args) -> int:
    """CPUs of one SLURM task: torchrun (one task per node) needs cores for all its workers and their
    data loaders, srun one task per GPU; --cpus-per-task overrides. Default 8 per GPU process (a
    DGX H100 has 112 cores for 8 GPUs), 1 per process on CPU nodes (gloo runs one thread each)."""
    if args.cpus_per_task is not None:
        return args.cpus_per_task
    per_process = 8 if args.gpus_per_node else 1
    return per_process * (args.procs_per_node if args.launcher in PER_NODE_LAUNCHERS else 1)


def sbatch_directives(args, run_dir: Path) -> list[str]:
    procs = args.procs_per_node
    if args.min_nodes < args.nodes:
        # a node range: SLURM sizes the allocation by its task count, so --ntasks-per-node would give it
        # the minimum; without it SLURM gives as many nodes as are free (whole nodes: --exclusive), and
        # the job's steps ask for their tasks per node themselves
        d = [f"--job-name={args.job_name}", f"--nodes={args.min_nodes}-{args.nodes}"]
    else:
        d = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
             f"--ntasks-per-node={1 if args.launcher in PER_NODE_LAUNCHERS else procs}"]
    if args.gpus_per_node:
        d.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.exclusive:
        d.append("--exclusive")
    extra = " ".join(args.sbatch_arg)
    if args.mem.lower() != "none" and "--mem" not in extra:
        d.append(f"--mem={args.mem}")  # 0: all of the node's memory (the default of most GPU clusters' jobs)
    if "--cpus-per-task" not in extra:
        d.append(f"--cpus-per-task={cpus_per_task(args)}")
    for opt in ("partition", "account", "qos", "time"):
        value = getattr(args, opt)
        if value:
            d.append(f"--{opt}={value}")
    if args.signal_seconds:
        d.append(f"--signal={args.exit_signal}@{args.signal_seconds}")
    d.append("--requeue" if args.requeue else "--no-requeue")
    d.append("--open-mode=append")
    d.append(f"--output={args.output or run_dir / 'slurm_logs' / '%x-%j.out'}")
    d += list(args.sbatch_arg)
    # sbatch splits a directive at white space unless the value is in double quotes
    return ["#SBATCH " + (_dquote(x) if re.search(r"\s", x) else x) for x in d]


def _dquote(directive: str) -> str:
    opt, _, value = directive.partition("=")
    if '"' in value:
        raise ConfigError(f"sbatch directive {directive!r}: values cannot contain both spaces and quotes")
    return f'{opt}="{value}"'


def job_environment(args, config: Path, run_dir: Path, data: Path) -> list[str]:
    python = args.python or ("python" if args.container_image else sys.executable)
    env = {
        "CONFIG": str(config), "RUN_DIR": str(run_dir), "DATA": str(data),
        "ACMOE_ROOT": str(Path(args.project_dir or ".").absolute()),
        "ACMOE_SCRIPTS": str(PACKAGE_DIR / "slurm"), "ACMOE_PYTHON": python,
        "NPROC_PER_NODE": str(args.procs_per_node), "LAUNCHER": args.launcher,
        "EXIT_SIGNAL": args.exit_signal, "REQUEUE": "1" if args.requeue else "0",
    }
    if args.container_image:
        env["CONTAINER_IMAGE"] = args.container_image
    if args.container_name:
        env["CONTAINER_NAME"] = args.container_name
    if args.container_mounts:
        env["CONTAINER_MOUNTS"] = args.container_mounts
    if args.env_file:
        env["ENV_FILE"] = str(Path(args.env_file).absolute())
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append("unset OVERRIDES  # the overrides are the script's arguments:")
    lines.append("set -- " + " ".join(shlex.quote(o) for o in args.overrides) + ' "$@"' if args.overrides
                 else 'set -- "$@"')
    return lines


def render(args, config: Path, run_dir: Path, data: Path) -> str:
    template = Path(args.template)
    if not template.is_file():
        raise ConfigError(f"sbatch template {template} not found (pass --template)")
    text = template.read_text()
    stamp = (f"# rendered by acmoe-launch on {_dt.datetime.now().isoformat(timespec='seconds')}: "
             + " ".join(shlex.quote(a) for a in ["acmoe-launch", *args.argv]))
    text = _replace_block(text, DIRECTIVES_BEGIN, DIRECTIVES_END, sbatch_directives(args, run_dir), "directives")
    text = _replace_block(text, ENV_BEGIN, ENV_END, [stamp, *job_environment(args, config, run_dir, data)], "environment")
    return text


def usage_problem(args) -> str | None:
    """What is wrong with the command line of `acmoe-launch slurm` (None: nothing); fills in the
    defaults that depend on other options."""
    if args.nodes < 1:
        return "--nodes must be >= 1"
    if args.min_nodes is None:
        args.min_nodes = args.nodes
    if not 1 <= args.min_nodes <= args.nodes:
        return f"--min-nodes {args.min_nodes}: between 1 and --nodes {args.nodes}"
    if args.min_nodes < args.nodes and not args.exclusive:
        return ("--min-nodes needs whole nodes (a node range gets its CPUs per node only with --exclusive): "
                "drop --no-exclusive")
    if args.gpus_per_node < 0:
        return "--gpus-per-node must be >= 0 (0: CPU nodes)"
    if args.procs_per_node is None:
        args.procs_per_node = args.gpus_per_node or 1
    if args.procs_per_node < 1:
        return "--procs-per-node must be >= 1"
    if args.gpus_per_node and args.procs_per_node > args.gpus_per_node:
        return f"--procs-per-node {args.procs_per_node} > --gpus-per-node {args.gpus_per_node}"
    if args.time and not _TIME.match(args.time):
        return f"--time {args.time!r}: use minutes, HH:MM:SS or D-HH:MM:SS"
    if args.then_submit and not args.preflight:
        return "--then-submit needs --preflight"
    if args.preflight and not _TIME.match(args.preflight_time):
        return f"--preflight-time {args.preflight_time!r}: use minutes, HH:MM:SS or D-HH:MM:SS"
    if args.signal_seconds < 0:
        return "--signal-seconds must be >= 0 (0: no timed signal)"
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        return "--cpus-per-task must be >= 1"
    if args.mem.lower() != "none" and not re.fullmatch(r"\d+[KMGT]?", args.mem):
        return f"--mem {args.mem!r}: a size such as 0 (all), 500G or 480000M, or none"
    bad_env = [e for e in args.env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", e)]
    if bad_env:
        return f"--env {bad_env[0]!r}: write KEY=VALUE"
    if args.env_file and not Path(args.env_file).is_file():
        return f"--env-file {args.env_file}: no such file"
    args.exit_signal = args.exit_signal.upper().removeprefix("SIG")
    return None


@dataclass(frozen=True)
class PreparedJob:
    script: str  # the rendered sbatch script
    summary: str  # "# N node(s) x P process(es) = world size W: ..."
    run_dir: Path
    data: Path
    project: Path
    run_plan: RunPlan | None  # megatron's arguments at the job's world size (None: data not prepared, dry run)


def prepare_job(args) -> PreparedJob:
    """Every launch check of one job (the recipe, megatron's argument checks at the job's world sizes,
    the data) and its rendered script; ConfigError naming the problem. Used by ``cmd_slurm`` and by
    sweeps of many jobs (benchmarks/quality.py --slurm), which check every job before submitting any."""
    if args.launcher == "ft":  # NVRx's ft_launcher + megatron's FT package, refused where NVRx is absent/old
        check_ft_launcher()
        args.overrides = [*args.overrides, "megatron.enable_ft_package=true"]
    recipe = load_recipe(args.config, args.overrides)
    project = Path(args.project_dir or ".").absolute()  # relative paths of the recipe resolve here
    run_dir = project / (args.run_dir or recipe.run.dir)
    data = project / (args.data or recipe.data.path)
    layout = parallel_layout(recipe.megatron, args.nodes * args.procs_per_node)
    for n in range(args.min_nodes, args.nodes):  # a (re)start on fewer nodes: data parallel shrinks
        try:
            parallel_layout(recipe.megatron, n * args.procs_per_node)
        except ConfigError as err:
            raise ConfigError(f"--min-nodes {args.min_nodes}: on {n} node(s) x {args.procs_per_node} process(es): "
                              f"{err}") from None
    if not (data / "manifest.json").is_file() and not recipe.data.prepare_stdlib:
        msg = (f"no shard manifest at {data}/manifest.json and data.prepare_stdlib is false: "
               f"build it first (`acmoe-data prepare --source ... --out {data} --seq-length "
               f"{recipe.megatron.get('seq_length', '<seq_length>')}`) or pass --data")
        if not args.dry_run:
            raise ConfigError(msg)
        print(f"acmoe-launch: warning: {msg}; megatron's argument checks skipped", file=sys.stderr)
    run_plan = None
    if (data / "manifest.json").is_file() or recipe.data.prepare_stdlib:
        # megatron's own argument checks and ours at the job's world size, before sbatch
        planned = load_recipe(args.config, list(args.overrides) + [f"data.path={data}"])
        for n in sorted({args.min_nodes, args.nodes}):  # megatron's checks at the smallest and largest job
            try:
                run_plan = build_plan(planned, n * args.procs_per_node, host_checks=False)
            except ConfigError as err:
                raise ConfigError(f"on {n} node(s): {err}" if n != args.nodes else str(err)) from None
    args.job_name = re.sub(r"[^\w.+-]", "_", args.job_name or f"acmoe-{recipe.run.name or Path(args.config).stem}")
    script = render(args, Path(args.config).absolute(), run_dir, data)
    summary = (f"# {args.nodes} node(s) x {args.procs_per_node} process(es) = world size {layout['world']}: "
               + ", ".join(f"{k} {v}" for k, v in layout.items() if k != "world"))
    return PreparedJob(script, summary, run_dir, data, project, run_plan)


def submit_script(sbatch: str, script: str, run_dir: Path) -> tuple[str, Path]:
    """Write ``script`` into ``run_dir/slurm_logs`` and submit it (from the current directory); the job
    id and the script's path, or RuntimeError with sbatch's message."""
    logs = run_dir / "slurm_logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"pretrain-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    out = subprocess.run([sbatch, "--parsable", str(path)], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed (exit {out.returncode}): {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0], path


def cmd_slurm(args) -> int:
    problem = usage_problem(args)
    if problem:
        return _usage(problem)
    try:
        job = prepare_job(args)
    except ConfigError as err:
        print(f"acmoe-launch: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    script, summary, run_dir, data, project = job.script, job.summary, job.run_dir, job.data, job.project
    if args.dry_run and not args.preflight:
        print(script, end="")
        print(summary, file=sys.stderr)
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None and not args.dry_run:
        print("acmoe-launch: sbatch not found: run this on a SLURM login node (or use --dry-run)", file=sys.stderr)
        return EXIT_CONFIG
    if args.preflight:
        code = run_preflight(args, sbatch, Path(args.config).absolute(), run_dir, data, project)
        if code != 0:
            if args.then_submit and code == EXIT_PREFLIGHT_FAILED:
                print("acmoe-launch: the preflight failed: the real job was NOT submitted", file=sys.stderr)
            return code
        if args.dry_run:
            return 0
        if not args.then_submit:
            print("[acmoe-launch] preflight passed; submit the real job with the same command without --preflight "
                  "(or add --then-submit next time)")
            return 0
        print("[acmoe-launch] preflight passed: submitting the real job", flush=True)
    logs = run_dir / "slurm_logs"
    try:
        job_id, path = submit_script(sbatch, script, run_dir)
    except RuntimeError as err:
        print(f"acmoe-launch: {err}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}: {path}")
    print(summary.lstrip("# "))
    print(f"  log          : {args.output or logs / (args.job_name + '-' + job_id + '.out')}")
    print(f"  run dir      : {run_dir} (config.yaml, checkpoints/, tensorboard/, summary.json)")
    print(f"  follow       : squeue -j {job_id}; tail -f {logs}/train-{job_id}.log")
    return 0


# ---------------------------------------------------------------------------------------------
# acmoe-launch slurm --preflight

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def _job_state(job_id: str) -> str | None:
    """The job's state while SLURM lists it (squeue), else its final state (scontrol), else None."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False, capture_output=True, text=True)
    state = out.stdout.strip()
    if out.returncode == 0 and state:
        return state
    out = subprocess.run(["scontrol", "show", "job", job_id], check=False, capture_output=True, text=True)
    m = re.search(r"JobState=(\S+)", out.stdout)
    return m.group(1) if m else None


def run_preflight(args, sbatch: str | None, config: Path, run_dir: Path, data: Path, project: Path) -> int:
    """Submit the preflight on the real job's allocation shape, wait for it, print its table; 0 when
    it passed, EXIT_PREFLIGHT_FAILED when an item failed or the job ended without passing."""
    import copy

    world = args.nodes * args.procs_per_node
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.preflight_dir or project / "preflight" / f"{args.job_name}-{stamp}").absolute()
    overrides = list(args.overrides) + [f"run.dir={run_dir}", f"data.path={data}"]
    try:
        ensure_data(load_recipe(config, overrides))
        plan = prepare(str(config), overrides, world, out, remote=True, gpu_memory_gib=args.gpu_memory_gib)
    except ConfigError as err:
        print(f"acmoe-launch: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    pf = copy.copy(args)
    pf.job_name = f"{args.job_name}-preflight"
    pf.time, pf.requeue, pf.signal_seconds = args.preflight_time, False, 0
    pf.output = str(out / "slurm-%j.out")
    pf.env = list(args.env) + [f"PREFLIGHT_PLAN={out / PLAN_FILE}",
                               f"PREFLIGHT_TIMEOUT={max(60, _minutes(args.preflight_time) * 60 - 60)}"]
    script = render(pf, config, run_dir, data)
    path = out / "preflight.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    if args.dry_run:
        print(script, end="")
        print(f"# preflight plan {out / PLAN_FILE} (shrunk recipe {plan.shrunk})", file=sys.stderr)
        return 0
    sub = subprocess.run([sbatch, "--parsable", str(path)], check=False, capture_output=True, text=True)
    if sub.returncode != 0:
        print(f"acmoe-launch: sbatch of the preflight failed (exit {sub.returncode}): {sub.stderr.strip()}",
              file=sys.stderr)
        return sub.returncode
    job_id = sub.stdout.strip().split(";")[0]
    log = out / f"slurm-{job_id}.out"
    print(f"[acmoe-launch] preflight job {job_id} submitted ({args.nodes} node(s) x {args.procs_per_node} "
          f"process(es), time limit {args.preflight_time}); waiting for it. Log {log}; if you stop waiting: "
          f"`acmoe-preflight --report {out}` once it ended", flush=True)
    state, last = None, None
    while True:
        state = _job_state(job_id)
        if state and state != last:
            print(f"[acmoe-launch] preflight job {job_id}: {state}", flush=True)
            last = state
        if state is None or state in FINAL:
            break
        time.sleep(args.poll_seconds)
    code, text = finish(out, log=str(log))
    print(text)
    if state not in (None, "COMPLETED") and code == 0:
        code = EXIT_PREFLIGHT_FAILED  # a passing report from a job that did not complete is not a pass
        print(f"acmoe-launch: the preflight job ended {state}; see {log}", file=sys.stderr)
    return code


def _minutes(limit: str) -> int:
    """SLURM's time formats (minutes | MM:SS | HH:MM:SS | D-HH[:MM[:SS]]) in whole minutes (rounded up)."""
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m = (parts + [0, 0])[:2]
        return int(days) * 1440 + h * 60 + m
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] + (1 if parts[1] else 0)
    return parts[0] * 60 + parts[1] + (1 if parts[2] else 0)


# ---------------------------------------------------------------------------------------------
# acmoe-launch local


def cmd_local(args) -> int:
    return launcher.main(["--config", args.config, "--nproc", str(args.nproc), *args.overrides])


# ---------------------------------------------------------------------------------------------


def _usage(msg: str) -> int:
    print(f"acmoe-launch: error: {msg}", file=sys.stderr)
    return EXIT_CONFIG


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acmoe-launch", description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("slurm", help="render slurm/pretrain.sbatch and submit it (sbatch)")
    s.add_argument("--config", required=True, help="YAML recipe, e.g. configs/multinode_h100_fp8.yaml")
    s.add_argument("--nodes", type=int, required=True, help="number of nodes")
    s.add_argument("--min-nodes", type=int, default=None,
                   help="start (or, after a requeue, continue) on as few as this many nodes when no more are free "
                        "or a node does not come back (sbatch --nodes=MIN-MAX): data parallel shrinks, the "
                        "tensor/pipeline/expert sizes and the global batch stay (more gradient accumulation); "
                        "every node count in between is checked now (default: --nodes)")
    s.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: CPU nodes, no GPU request)")
    s.add_argument("--procs-per-node", type=int, default=None,
                   help="training processes per node (default: --gpus-per-node, or 1 on CPU nodes)")
    s.add_argument("--partition", help="SLURM partition")
    s.add_argument("--time", help="time limit (HH:MM:SS, D-HH:MM:SS or minutes; default: the partition's)")
    s.add_argument("--account", help="SLURM account to charge")
    s.add_argument("--qos", help="SLURM quality of service")
    s.add_argument("--job-name", help="job name (default: acmoe-<run.name>)")
    s.add_argument("--run-dir", help="run directory (default: the recipe's run.dir), on a shared file system")
    s.add_argument("--data", help="shard directory (default: the recipe's data.path), on a shared file system")
    s.add_argument("--project-dir", help="the job's working directory, where relative paths of the recipe "
                   "resolve (default: the current directory)")
    s.add_argument("--launcher", choices=LAUNCHERS, default="torchrun",
                   help="torchrun: one task per node running torchrun (default); srun: one task per GPU; ft: one "
                   "task per node running NVIDIA's ft_launcher with megatron's --enable-ft-package (needs "
                   "nvidia-resiliency-ext >= 0.6: pip install -e '.[ft]'); the other two use our hang watch")
    s.add_argument("--python", help="python on the compute nodes with acmoe-megatron installed "
                   "(default: this interpreter; `python` inside a container)")
    s.add_argument("--container-image", help="pyxis/enroot image for the training steps")
    s.add_argument("--container-name", help="pyxis container name: the image is imported once per job and "
                   "shared by its steps (default: acmoe-<job id>)")
    s.add_argument("--container-mounts", help="extra pyxis mounts src:dst[,...]")
    s.add_argument("--mem", default="0", help="memory per node for --mem (default 0: all of it; 'none': no directive)")
    s.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per task (default: 8 per GPU process, 1 per process on CPU nodes; x processes per "
                   "node with the torchrun launcher)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable of the job, e.g. --env NCCL_IB_HCA=mlx5 (repeatable; overrides "
                   "the defaults of acmoe_megatron/cli/slurm/env_defaults.sh)")
    s.add_argument("--env-file", help="shell file sourced by the job after env_defaults.sh (the cluster's NCCL / "
                   "fabric settings), on a shared file system")
    s.add_argument("--exit-signal", default="USR1", help="signal that makes Megatron save and exit (default USR1)")
    s.add_argument("--signal-seconds", type=int, default=300,
                   help="send the exit signal this many seconds before the time limit (default 300; 0: never)")
    s.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="do not requeue when the run stopped before train_iters")
    s.add_argument("--no-exclusive", dest="exclusive", action="store_false", help="do not ask for whole nodes")
    s.add_argument("--output", help="SLURM log file pattern (default: <run dir>/slurm_logs/%%x-%%j.out)")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="extra sbatch directive, e.g. --sbatch-arg=--mem=0 (repeatable)")
    s.add_argument("--template", default=str(TEMPLATE),
                   help="sbatch template (default: the package's acmoe_megatron/cli/slurm/pretrain.sbatch)")
    s.add_argument("--dry-run", action="store_true", help="print the rendered script, submit nothing")
    s.add_argument("--preflight", action="store_true",
                   help="first run acmoe-preflight on the same nodes, GPUs, container and launcher (a short job), "
                        "wait for it and print its verdict (exit 3 when it failed)")
    s.add_argument("--then-submit", action="store_true",
                   help="with --preflight: submit the real job only if the preflight passed")
    s.add_argument("--preflight-time", default="00:15:00", help="time limit of the preflight job (default 00:15:00)")
    s.add_argument("--preflight-dir", default=None,
                   help="the preflight's plan, log and preflight.json (default: <project>/preflight/<job>-<time>, "
                        "outside the run directory, whose file system is one of the checks)")
    s.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="with --preflight: compare the memory estimate with a GPU of this size (else the nodes' own)")
    s.add_argument("--poll-seconds", type=float, default=10, help=argparse.SUPPRESS)
    s.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides")
    s.set_defaults(func=cmd_slurm)

    loc = sub.add_parser("local", help="run the recipe on this machine (torchrun, acmoe-pretrain)")
    loc.add_argument("--config", required=True, help="YAML recipe")
    loc.add_argument("--nproc", type=int, required=True, help="processes on this machine")
    loc.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides")
    loc.set_defaults(func=cmd_local)

    r = sub.add_parser("resolve", help="(used by slurm/pretrain.sbatch) validate and write the run's config")
    r.add_argument("--config", required=True)
    r.add_argument("--run-dir", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--world-size", type=int, default=0, help="check the parallel sizes against it")
    r.add_argument("--exit-signal", default="", help="e.g. SIGUSR1: adds megatron's --exit-signal-handler")
    r.add_argument("--root", default="", help="checkout whose git SHA is recorded")
    r.add_argument("--reuse", action="store_true", help="re-use <run dir>/config.yaml when it exists (restarts)")
    r.add_argument("overrides", nargs="*")
    r.set_defaults(func=cmd_resolve)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
