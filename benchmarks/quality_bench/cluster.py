"""The quality benchmark on a SLURM cluster: one job per (row, seed), through ``acmoe-launch slurm``.

Each (row, seed) is the same run as on the local machine (``rows.run_overrides``: its run directory
``<runs-dir>/<row>/seed<k>``, its seeds), rendered by ``acmoe-launch slurm``'s own ``prepare_job``
(the recipe's keys, megatron's argument checks at the job's world sizes, the data) with the
sweep's ``--launch`` options. Every job is planned before any is submitted: a bad row refuses the
whole sweep (exit 2, naming the row). The job trains, and when it reaches ``train_iters`` runs its
own ``benchmarks/quality.py --finish-run ROW:SEED`` (the batch script's ``AFTER_RUN``): the same
extraction and corrupted-text evaluation (``acmoe-eval``) as the local runner, writing the same
per-run JSON. A requeued (preempted) job resumes its run and writes its JSON once, at its end.

``sweep.json`` beside the per-run JSONs records the job of each (row, seed). ``--report-only`` reads
it: a (row, seed) without a result is a line with its job's state (squeue / scontrol) and log; a
job that finished training but has no JSON is extracted from its run directory (without the
corrupted-text loss, which only the job computes).

``--dry-run`` prints the jobs, their resolved overrides and the cost: tokens per run (train_iters x
global batch x sequence length), GPU-hours per run and in total at a throughput that is measured
(``--throughput-from`` a previous run's ``summary.json``: its tokens/s per process) or assumed
(``DEFAULT_MFU`` of the GPU's dense peak, with megatron's own FLOP count of the model), and the
number of tokens one AC statistic is computed over.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .rows import Plan, Row, _rel, run_overrides

SWEEP_FILE = "sweep.json"
# assumed model-FLOP utilisation when no measured throughput is given (stated in --dry-run): a conservative
# figure for small MoE models (their GEMMs are narrow and the dispatch is a large share of the step)
DEFAULT_MFU = 0.10


@dataclass
class SweepJob:
    row: Row
    seed: int
    args: object  # acmoe-launch's parsed arguments (after its usage checks)
    job: object  # acmoe_megatron.cli.launch.PreparedJob


class SweepRefused(Exception):
    pass


def finish_command(python: str, quality_argv: list[str], row: Row, seed: int) -> str:
    """The job's AFTER_RUN: this benchmark's own finishing step for (row, seed)."""
    return shlex.join([python, "benchmarks/quality.py", *quality_argv, "--finish-run", f"{row.name}:{seed}"])


def plan_sweep(plan: Plan, rows: list[Row], seeds: list[int], launch: list[str], quality_argv: list[str],
               dry_run: bool) -> list[SweepJob]:
    """Every job planned and rendered; SweepRefused listing each row whose job acmoe-launch refuses."""
    from acmoe_megatron.cli import launch as slurm_launch
    from acmoe_megatron.core.errors import ConfigError

    parser = slurm_launch.build_parser()
    python = "python" if "--container-image" in " ".join(launch) else sys.executable
    jobs, refused = [], []
    for seed in seeds:
        for row in rows:
            overrides = run_overrides(plan, row, seed)
            argv = ["slurm", "--config", plan.config, "--job-name", f"quality-{row.name}-s{seed}", *launch,
                    "--env", f"AFTER_RUN={finish_command(python, quality_argv, row, seed)}",
                    *(["--dry-run"] if dry_run else []), *overrides]
            args = parser.parse_args(argv)
            args.argv = argv[1:]
            problem = slurm_launch.usage_problem(args)
            if problem:
                raise SweepRefused(f"acmoe-launch slurm {' '.join(launch)}: {problem}")
            try:
                jobs.append(SweepJob(row, seed, args, slurm_launch.prepare_job(args)))
            except ConfigError as err:
                refused.append(f"row {row.name} (seed {seed}): {err}")
    if refused:
        raise SweepRefused("the sweep is refused, nothing was submitted:\n  " + "\n  ".join(refused))
    return jobs


def _tokens_per_s_per_process(summary_path: str | None) -> float | None:
    if not summary_path:
        return None
    summary = json.loads(Path(summary_path).read_text())
    rate, world = summary.get("tokens_per_s"), summary.get("world_size") or 1
    if not rate:
        raise SweepRefused(f"--throughput-from {summary_path}: the summary records no tokens_per_s")
    return rate / world


def cost_lines(jobs: list[SweepJob], throughput_from: str | None, gpu: str, mfu: float,
               vocab_size: int | None = None) -> list[str]:
    """The dry run's job list and cost; ``vocab_size``: plan a job whose data is not prepared yet as
    if its tokenizer had that vocabulary."""
    from megatron.training.training import num_floating_point_operations

    from acmoe_megatron.observability.writers import peak_flops
    from acmoe_megatron.runtime.recipe import load_recipe
    from acmoe_megatron.runtime.run_plan import build_plan

    measured = _tokens_per_s_per_process(throughput_from)
    lines, total_gpu_h, total_tokens = [], 0.0, 0
    for j in jobs:
        a = j.args
        plan_ = j.job.run_plan
        world = a.nodes * a.procs_per_node
        if plan_ is None and vocab_size:
            recipe = load_recipe(a.config, [*a.overrides, f"data.path={j.job.data}"])
            plan_ = build_plan(recipe, world, host_checks=False, vocab_standin=vocab_size)
        lines.append(f"# job quality-{j.row.name}-s{j.seed}: {j.job.summary.lstrip('# ')}")
        lines.append(f"  run dir {_rel(j.job.run_dir)}; overrides: {' '.join(run_overrides_of(j))}")
        if plan_ is None:
            lines.append("  cost: unknown (the data is not prepared: give --vocab-size, its tokenizer's vocabulary)")
            continue
        margs = plan_.args
        tokens = margs.train_iters * margs.global_batch_size * margs.seq_length
        if measured is not None:
            rate, how = measured, f"measured {measured:,.0f} tokens/s per process ({throughput_from})"
        else:
            import argparse

            from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

            counted = argparse.Namespace(**vars(margs))  # megatron pads the vocabulary when it builds the tokenizer
            if counted.padded_vocab_size is None:
                counted.padded_vocab_size = vocab_size_with_padding(margs.vocab_size, margs, logging_enabled=False)
            flops_per_token = num_floating_point_operations(counted, 1) / margs.seq_length
            peak = peak_flops(gpu, bool(margs.fp8), plan_.recipe.run.peak_tflops)
            precision = "fp8" if margs.fp8 else "bf16" if margs.bf16 else "fp16" if margs.fp16 else "fp32"
            if precision == "fp32" and plan_.recipe.run.peak_tflops is None:
                peak /= 2  # TF32 tensor cores: half the dense BF16 peak
            rate = mfu * peak / flops_per_token
            how = (f"assumed {rate:,.0f} tokens/s per GPU = {mfu:.0%} MFU of {gpu}'s {peak / 1e12:.0f} TFLOP/s "
                   f"({precision}{' as TF32' if precision == 'fp32' else ''}) at "
                   f"{flops_per_token / 1e6:.1f} MFLOP/token (megatron's count)")
        gpu_h = tokens / rate / 3600
        total_gpu_h += gpu_h
        total_tokens += tokens
        stat = ac_statistic_tokens(plan_)
        shape = f"{margs.train_iters} steps x {margs.global_batch_size} x {margs.seq_length}"
        lines.append(f"  {tokens:,} tokens ({shape});"
                     f" {gpu_h:,.1f} GPU-hours ({gpu_h / max(1, world):,.2f} h on its {world} processes); {how}; "
                     f"AC statistic over {stat}")
    lines.append(f"# total: {len(jobs)} jobs, {total_tokens:,} tokens, {total_gpu_h:,.1f} GPU-hours")
    return lines


def run_overrides_of(j: SweepJob) -> list[str]:
    return [o for o in j.args.overrides if not o.startswith("run.dir=")]


def ac_statistic_tokens(run_plan) -> str:
    """Tokens one AC statistic (per-expert MAD, spec §2) is computed over in this run, or why none."""
    recipe, margs, layout = run_plan.recipe, run_plan.args, run_plan.layout
    from acmoe_megatron.core.registry import router_class
    from acmoe_megatron.model.routers import ACRouter

    if not issubclass(router_class(recipe.acmoe.router), ACRouter):
        return f"— ({recipe.acmoe.router} routes without AC statistics)"
    tokens = margs.micro_batch_size * margs.seq_length
    scope = recipe.acmoe.scope
    if scope == "local" and margs.sequence_parallel:
        tokens //= layout["tp"]
    if scope == "dp":
        tokens *= layout["dp"]
    if recipe.acmoe.source == "ema":
        return f"a running average (decay {recipe.acmoe.ema_decay}) of {tokens:,}-token micro-batches ({scope} scope)"
    return f"{tokens:,} tokens ({scope} scope, each micro-batch)"


def submit(jobs: list[SweepJob], results_dir: Path) -> dict:
    """Submit every job; record each one's id, run directory and log in ``results_dir/sweep.json``."""
    from acmoe_megatron.cli.launch import submit_script

    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SweepRefused("sbatch not found: run the sweep on a SLURM login node (or use --dry-run)")
    path = results_dir / SWEEP_FILE
    sweep = json.loads(path.read_text()) if path.is_file() else {}
    for j in jobs:
        job_id, script = submit_script(sbatch, j.job.script, j.job.run_dir)
        log = j.args.output or str(j.job.run_dir / "slurm_logs" / f"{j.args.job_name}-{job_id}.out")
        sweep[f"{j.row.name}/seed{j.seed}"] = {"job_id": job_id, "run_dir": str(j.job.run_dir), "log": log,
                                               "script": str(script)}
        print(f"[quality] {j.row.name} seed {j.seed}: submitted job {job_id} (log {log})", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sweep, indent=1) + "\n")  # after every job: an interrupted sweep is recorded
    return sweep


def job_state(job_id: str) -> str:
    """The job's state while SLURM knows it (squeue, then scontrol), else "unknown to SLURM"."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], check=False, capture_output=True, text=True)
    for field in out.stdout.split():
        if field.startswith("JobState="):
            state = field.split("=", 1)[1]
            code = next((f.split("=", 1)[1] for f in out.stdout.split() if f.startswith("ExitCode=")), None)
            return f"{state} (exit {code})" if code and state != "COMPLETED" else state
    return "unknown to SLURM (finished long ago?)"


def sweep_status(plan: Plan, rows: list[Row], seeds: list[int], bhash: str, corrupt_dir) -> list[str]:
    """For ``--report-only``: one line per (row, seed) of the recorded sweep without a result; a job
    that trained to the end but wrote no JSON is extracted from its run directory first."""
    from acmoe_megatron.runtime.recipe import load_recipe

    from .runner import finish_run, result_path, run_record

    path = plan.results_dir / SWEEP_FILE
    if not path.is_file():
        return []
    sweep = json.loads(path.read_text())
    missing = []
    for row in rows:
        for seed in seeds:
            entry = sweep.get(f"{row.name}/seed{seed}")
            out = result_path(plan.results_dir, row.name, seed)
            if entry is None:
                continue
            if out.is_file() and json.loads(out.read_text()).get("status") in ("ok", "nonfinite"):
                continue
            state = job_state(entry["job_id"])
            run_dir = Path(entry["run_dir"])
            summary_path = run_dir / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
            finished = summary and not summary.get("stopped_early") and summary.get("iterations") == summary.get(
                "train_iters")
            if finished and state.split()[0] in ("RUNNING", "PENDING", "COMPLETING"):
                finished = False  # its own finishing step is still to come
            if finished:
                recipe = load_recipe(plan.config, run_overrides(plan, row, seed))
                result = run_record(plan, row, seed, bhash, recipe, summary, None)
                result["extracted_by"] = "quality.py --report-only (the job wrote no result: no corrupted-text loss)"
                finish_run(plan, recipe, result, None)
                continue
            missing.append(f"`{row.name}` seed {seed}: job {entry['job_id']} {state}; log {entry['log']}")
    return missing
