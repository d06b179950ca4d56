"""Router quality benchmark: every router trained on the same data, seeds, steps and model through
the real product path (``acmoe-pretrain`` → megatron's trainer), compared on validation loss,
speed of convergence, robustness to corrupted text, router instability and load imbalance; writes
``benchmarks/results/quality.md`` with PNG curves under ``benchmarks/results/quality/``.

    python benchmarks/quality.py                           # all default rows x 3 seeds, 2-core CPU model
    python benchmarks/quality.py --rows topk,cosine,ac --seeds 5
    python benchmarks/quality.py --rows ac-clean,ac-first2 # investigation rows, added to the same table
    python benchmarks/quality.py --report-only             # regenerate the table from the stored JSONs
    python benchmarks/quality.py --config configs/switch_m_wt103.yaml --nproc 4 --jobs 1 --steps 20000 \\
        --set data.path=data/wikitext103 --corrupt-data data/wikitext103_wordswap0.025   # GPUs
    # on a SLURM cluster: one job per (row, seed); --dry-run first prints the jobs and the GPU-hours
    python benchmarks/quality.py --config configs/release_switch_m_wt103.yaml --rows topk,ac --seeds 5 \\
        --corrupt-data data/wikitext103_wordswap0.025 --slurm --launch "--nodes 1 --gpus-per-node 4" --dry-run
    python benchmarks/quality.py ... --slurm --launch "..."   # submit; later: the same with --report-only

A row is a name plus recipe overrides on one shared base recipe (``ROWS`` in benchmarks/quality_bench/rows.py; add a row there). Each
(row, seed) trains in its own run directory ``runs/quality/<row>/seed<k>`` with ``megatron.seed``
= ``data.seed`` = k; its final checkpoint is then evaluated on a word-swap-corrupted copy of the
validation split (``acmoe-eval``: the same samples as the clean validation loss).
What a run produced is extracted into ``benchmarks/results/quality/runs/<row>/seed<k>.json``
(validation curve, corrupted loss, instability, imbalance, wall time, config hash): a run whose
JSON exists with the same config hash is not run again (``--rerun`` forces), and ``--report-only``
rebuilds the results file from those JSONs alone. ``--slurm`` runs every (row, seed) as its own
SLURM job instead (``quality_bench/cluster.py``): the same runs, JSONs and report.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import shlex
import sys
import threading
import time
from pathlib import Path

logging.getLogger("tensorboard").setLevel(logging.WARNING)  # "No path found after ..." per event file
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/quality.py` from a checkout without install
    sys.path.insert(0, str(ROOT))
# The implementation is the package benchmarks/quality_bench/ (rows, statistics, runner, report,
# figures). `python benchmarks/quality.py` puts benchmarks/ first on sys.path by itself; loaded in
# another way (importlib, tests), the script puts it there.
BENCHMARKS = Path(__file__).resolve().parent
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from quality_bench.report import write_report  # noqa: E402
from quality_bench.rows import (  # noqa: E402
    CPU_DEFAULT_STEPS,
    DEFAULT_CONFIG,
    DEFAULT_ROWS,
    ROWS,
    _rel,
    base_hash,
    build_plan,
    parse_seeds,
    select_rows,
)
from quality_bench.runner import corrupt_info, corrupt_path, ensure_corrupt_data, reextract, run_one  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality.md"
DEFAULT_RUNS = ROOT / "runs" / "quality"


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--rows", default=None,
                   help=f"comma-separated rows (default: {','.join(DEFAULT_ROWS)}; 'all' adds the investigation rows "
                        f"{','.join(r.name for r in ROWS if not r.default)})")
    p.add_argument("--seeds", default="3", help="a count N (seeds 1..N) or a comma list such as 1,2,5 (a single seed k: 'k,'); default 3")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per run (default {CPU_DEFAULT_STEPS} for the CPU model, else the recipe's)")
    p.add_argument("--config", default=None,
                   help=f"base recipe, used as is (default: {DEFAULT_CONFIG} + the benchmark's small CPU model)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", default=[],
                   help="extra override for every row (repeatable), e.g. --set megatron.eval_iters=50")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (acmoe-pretrain --nproc; default 1)")
    p.add_argument("--jobs", type=int, default=2, help="runs at the same time (default 2: one per core on 2 cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/torch threads per process (default: cores / (jobs × nproc), at least 1)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="results file (default benchmarks/results/quality.md; figures and per-run JSONs go to the "
                        "directory of the same name without .md)")
    p.add_argument("--runs-dir", default=str(DEFAULT_RUNS), help="parent of the run directories (default runs/quality)")
    p.add_argument("--corrupt-data", default=None,
                   help="word-swap-corrupted copy of the validation data (default: <data.path>_wordswap0.025, built "
                        "automatically for the stdlib corpus)")
    p.add_argument("--skip-corrupt", action="store_true", help="no corrupted-text evaluation")
    p.add_argument("--references", default=None, metavar="RESULTS.md",
                   help="rows this table has not run (e.g. topk, cosine, ac of an ablation table at a shorter "
                        "--steps) are read from that table's longer runs of the same recipe, at this table's "
                        "length (needs a constant learning rate after warm-up; checked)")
    p.add_argument("--rerun", action="store_true", help="train again even where a stored result exists")
    p.add_argument("--report-only", action="store_true", help="only regenerate the results file from stored JSONs")
    p.add_argument("--slurm", action="store_true",
                   help="submit each (row, seed) as a SLURM job through acmoe-launch slurm (its checks for every job "
                        "before any is submitted); the job writes its own result; --report-only gathers them")
    p.add_argument("--launch", default="", metavar="OPTIONS",
                   help="with --slurm: acmoe-launch slurm options for every job, one string, e.g. \"--nodes 1 "
                        "--gpus-per-node 4 --partition batch --time 12:00:00\"")
    p.add_argument("--dry-run", action="store_true",
                   help="with --slurm: print the jobs, their overrides and the cost (GPU-hours); submit nothing")
    p.add_argument("--throughput-from", metavar="SUMMARY.json",
                   help="with --dry-run: the cost at this run's measured tokens/s per process (its summary.json) "
                        "instead of the assumed MFU")
    p.add_argument("--gpu", default="H100", help="with --dry-run: the GPU whose dense peak the assumed MFU is of")
    p.add_argument("--mfu", type=float, default=None,
                   help="with --dry-run: the assumed model-FLOP utilisation (default quality_bench/cluster.py "
                        "DEFAULT_MFU)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="with --dry-run, before the data is prepared: its tokenizer's vocabulary (WikiText-103 "
                        "word-level: 267735)")
    p.add_argument("--finish-run", metavar="ROW:SEED",
                   help="(run by a --slurm job after training) extract ROW:SEED's results and evaluate it on the "
                        "corrupted split, as the local runner does")
    p.add_argument("--reextract", action="store_true",
                   help="with --report-only: first refresh the stored JSONs' TensorBoard-derived fields from the "
                        "run directories that still exist (losses and training untouched)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.nproc < 1:
        p.error("--jobs and --nproc must be >= 1")
    if (args.dry_run or args.launch) and not args.slurm:
        p.error("--dry-run and --launch go with --slurm")
    given = argv if argv is not None else sys.argv[1:]
    args.command_line = shlex.join(["python", "benchmarks/quality.py", *given])
    return args


def plan_argv(args) -> list[str]:
    """The options that define the plan (base recipe, runs, results), absolute: a SLURM job's
    ``--finish-run`` rebuilds the same plan from them."""
    out = ["--config", args.config] if args.config else []
    if args.steps is not None:
        out += ["--steps", str(args.steps)]
    for item in args.set:
        out += ["--set", item]
    out += ["--nproc", str(args.nproc), "--jobs", "1", "--out", str(Path(args.out).absolute()),
            "--runs-dir", str(Path(args.runs_dir).absolute())]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.corrupt_data:
        out += ["--corrupt-data", str(Path(args.corrupt_data).absolute())]
    if args.skip_corrupt:
        out.append("--skip-corrupt")
    return out


def finish_one(args, plan, bhash) -> int:
    """``--finish-run ROW:SEED`` (a --slurm job, after training): the local runner's finishing step."""
    from quality_bench.rows import ROW_BY_NAME, run_overrides
    from quality_bench.runner import finish_run, run_record

    from acmoe_megatron.runtime.recipe import load_recipe

    name, _, seed = args.finish_run.rpartition(":")
    row, seed = ROW_BY_NAME[name], int(seed)
    recipe = load_recipe(plan.config, run_overrides(plan, row, seed))
    summary = json.loads((Path(recipe.run.dir) / "summary.json").read_text())
    corrupt_dir = None
    if not args.skip_corrupt:
        corrupt_dir = corrupt_path(plan, recipe.data.path)
    result = finish_run(plan, recipe, run_record(plan, row, seed, bhash, recipe, summary, None), corrupt_dir)
    return 0 if result.get("status") == "ok" else 1


def run_on_slurm(args, plan, rows, seeds, base_recipe) -> int:
    """``--slurm``: plan every job (refused as a whole: exit 2), then print the cost (--dry-run) or submit."""
    from quality_bench import cluster

    try:
        jobs = cluster.plan_sweep(plan, rows, seeds, shlex.split(args.launch), plan_argv(args), args.dry_run)
        if args.dry_run:
            for line in cluster.cost_lines(jobs, args.throughput_from, args.gpu, args.mfu or cluster.DEFAULT_MFU,
                                           args.vocab_size):
                print(line)
            return 0
        if not args.skip_corrupt:
            ensure_corrupt_data(plan, base_recipe.data.path)  # the jobs evaluate on it: built before any starts
        cluster.submit(jobs, plan.results_dir)
    except cluster.SweepRefused as err:
        print(f"quality.py: {err}", file=sys.stderr)
        return 2
    print(f"[quality] {len(jobs)} jobs submitted; when they are done (or to see where they are): the same command "
          "with --report-only instead of --slurm", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows, seeds = select_rows(args.rows), parse_seeds(args.seeds)
    plan = build_plan(args)
    from acmoe_megatron.core.errors import ConfigError
    from acmoe_megatron.runtime.recipe import load_recipe

    try:
        base_recipe = load_recipe(plan.config, plan.base)
        bhash = base_hash(plan)
    except ConfigError as err:
        print(f"quality.py: config error: {err}", file=sys.stderr)
        return 2
    if args.finish_run:
        return finish_one(args, plan, bhash)
    if args.slurm and not args.report_only:
        return run_on_slurm(args, plan, rows, seeds, base_recipe)
    corrupt_dir = None
    failures: dict[str, str] = {}
    missing: list[str] = []
    if not args.report_only:
        if not (Path(base_recipe.data.path) / "manifest.json").is_file():
            from acmoe_megatron.cli.common import ensure_data

            ensure_data(base_recipe)
        if not args.skip_corrupt:
            corrupt_dir = ensure_corrupt_data(plan, base_recipe.data.path)
        tasks = [(row, seed) for seed in seeds for row in rows]  # every row's first seed first
        print(f"[quality] {len(tasks)} runs ({len(rows)} rows × seeds {seeds}), {args.jobs} at a time, "
              f"{plan.threads} thread(s) each; base {bhash}", flush=True)
        lock = threading.Lock()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_one, plan, row, seed, bhash, args.rerun, corrupt_dir, lock): (row, seed)
                       for row, seed in tasks}
            for fut in concurrent.futures.as_completed(futures):
                row, seed = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # a bug in one run must not lose the others
                    res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                if res.get("status") not in ("ok", "nonfinite"):
                    failures.setdefault(row.name, f"{res.get('status')}: {res.get('error', '')}")
                    print(f"[quality] {row.name} seed {seed}: {res.get('status')}: {res.get('error', '')[:400]}",
                          file=sys.stderr, flush=True)
    else:
        if args.reextract:
            print(f"[quality] re-extracted {reextract(plan, rows, seeds)} stored run(s)", flush=True)
        corrupt_dir = corrupt_path(plan, base_recipe.data.path)
        if args.skip_corrupt or not (corrupt_dir / "manifest.json").is_file():
            corrupt_dir = None
        from quality_bench.cluster import sweep_status

        missing = sweep_status(plan, rows, seeds, bhash, corrupt_dir)  # a --slurm sweep's runs without a result
    args.elapsed = None if args.report_only else time.perf_counter() - t0
    out = write_report(args, plan, rows, seeds, bhash, failures, corrupt_info(corrupt_dir), missing)
    print(f"[quality] wrote {_rel(out)}" + (f" ({args.elapsed / 60:.1f} min)" if args.elapsed else ""), flush=True)
    print(out.read_text().split("## Verdict", 1)[-1].split("## Figures")[0].strip(), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
