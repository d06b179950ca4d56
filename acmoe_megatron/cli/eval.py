"""``acmoe-eval RUN_DIR``: score a trained run's checkpoint on whole data splits, in one start-up.

    acmoe-eval runs/tiny_cpu                                   # its data's valid split, latest checkpoint
    acmoe-eval runs/tiny_cpu --split test --corrupt data/stdlib_s256_wordswap0.025
    acmoe-eval runs/tiny_cpu --nproc 1 megatron.expert_model_parallel_size=1   # another layout (resharded)
    acmoe-eval runs/tiny_cpu --iteration 200 --max-samples 512
    acmoe-eval runs/tiny_cpu --calibrate 64                    # batch-free AC statistics, stored and used
    acmoe-eval runs/tiny_cpu --report                          # + RUN_DIR/specialisation/specialisation.md

Reads the run's resolved recipe (``RUN_DIR/config.yaml``), checks everything it can before any
process starts (checkpoint present, each data directory has the split, its sequence length and
vocabulary match the model, the parallel layout fits ``--nproc``: megatron's own argument checks),
then runs ``acmoe_megatron.inference.evaluate`` under torchrun: one initialisation, the checkpoint loaded
once, every requested split scored in one pass. Results: ``RUN_DIR/eval.json`` (or ``--out``) and
TensorBoard scalars ``eval/<split>[_corrupt]/{loss,bits_per_token,perplexity}`` in the run, at the
checkpoint's iteration. Only the evaluated split is needed: a corrupted copy made with ``acmoe-data
prepare --splits valid test --corrupt ...`` (no train split) evaluates as is.

AC statistics (``--statistics``, labelled in eval.json): an ``acmoe.source: batch`` model scores with
each evaluation micro-batch's statistics (what the paper reports; the loss then depends on the
micro-batch size) until ``--calibrate N`` has stored a batch-independent table beside the checkpoint
(inference/calibration.py); from then on ``auto`` uses it. ``source: ema`` models use their running
statistics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from acmoe_megatron.cli.common import check_checkpoint, checkpoint_iteration, refuse_or_launch, run_worker
from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.data.shards.manifest import check_manifest_matches, read_manifest
from acmoe_megatron.runtime.checkpoint_check import stats_path
from acmoe_megatron.runtime.recipe import load_recipe
from acmoe_megatron.runtime.run_plan import megatron_args, parallel_layout


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acmoe-eval", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("run_dir", help="a run directory of acmoe-pretrain (config.yaml + checkpoints/)")
    p.add_argument("--data", default=None, help="shard directory to score (default: the run's data.path)")
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"), help="split (default: valid)")
    p.add_argument("--corrupt", default=None, help="also score the same split of this (corrupted) directory")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--max-samples", type=int, default=None, help="only the first N samples of each split")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes (default: the run's world size from summary.json, else GPUs or 1)")
    p.add_argument("--out", default=None, help="results file (default: RUN_DIR/eval.json)")
    p.add_argument("--statistics", default="auto", choices=("auto", "batch", "ema", "calibrated"),
                   help="the AC routers' cluster statistics: batch (each evaluation micro-batch's, as the paper "
                        "reports), ema (an acmoe.source=ema model's running statistics), calibrated (the table "
                        "--calibrate stored beside the checkpoint); auto (default): ema for ema models, else "
                        "calibrated where a calibration exists, else batch")
    p.add_argument("--report", action="store_true",
                   help="also write the expert-specialisation report (markdown, JSON, PNG heatmaps) of the split: "
                        "per MoE layer and expert the load, top tokens / byte n-grams / words, cluster tightness and "
                        "separation before/after the AC transform, agreement with the previous layer")
    p.add_argument("--report-dir", default=None, help="where --report writes (default: RUN_DIR/specialisation)")
    p.add_argument("--calibrate", type=int, default=None, metavar="N",
                   help="calibrate a batch-trained AC model first: per-cluster AC weights averaged over N training "
                        "micro-batches per data-parallel replica (the run's data and micro-batch size), stored "
                        "beside the checkpoint (iter_*/acmoe_inference_stats.pt), then used")
    p.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE recipe overrides, e.g. a parallel layout")
    return p


def _check_data(path: str, split: str, seq_length: int, vocab_size: int | None, what: str) -> None:

    try:
        manifest = read_manifest(path)
        check_manifest_matches(manifest, seq_length=seq_length, vocab_size=vocab_size, where=path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what} {path}: {err}") from None
    if split not in manifest.splits or manifest.splits[split].num_samples == 0:
        raise ConfigError(f"{what} {path} has no {split!r} split (it has {sorted(manifest.splits)}); prepare it "
                          f"with `acmoe-data prepare ... --splits {split}` or pick another --split")


def choose_statistics(cli, recipe, ckpt: Path, iteration: int) -> tuple[str, Path | None]:
    """(the worker's --statistics, the calibration file it reads or writes): checked before any process."""
    stats_file = stats_path(ckpt, iteration)
    if recipe.acmoe.router != "ac":
        if cli.calibrate is not None or cli.statistics not in ("auto", "batch"):
            raise ConfigError(f"--statistics/--calibrate: the run's router is {recipe.acmoe.router!r}, which has no "
                              "cluster statistics; drop the option")
        return "none", None
    if recipe.acmoe.source == "ema":
        if cli.calibrate is not None or cli.statistics not in ("auto", "ema"):
            raise ConfigError("the run was trained with acmoe.source=ema: its AC layers route with the running "
                              "statistics in the checkpoint; drop --calibrate / use --statistics ema (or auto)")
        return "ema", None
    if cli.calibrate is not None:
        if cli.calibrate < 1:
            raise ConfigError(f"--calibrate {cli.calibrate}: give a number of micro-batches >= 1")
        if cli.statistics not in ("auto", "calibrated"):
            raise ConfigError(f"--calibrate with --statistics {cli.statistics}: calibration is then used; "
                              "drop --statistics or use --statistics calibrated")
        return "calibrated", stats_file
    if cli.statistics == "ema":
        raise ConfigError("--statistics ema: the run was trained with acmoe.source=batch and has no running "
                          "statistics; use --calibrate N (or --statistics batch, what the paper reports)")
    if cli.statistics == "calibrated" and not stats_file.is_file():
        raise ConfigError(f"--statistics calibrated: {stats_file} does not exist; make it with --calibrate N")
    if cli.statistics == "auto":
        return ("calibrated", stats_file) if stats_file.is_file() else ("batch", None)
    return cli.statistics, stats_file if cli.statistics == "calibrated" else None


def plan(cli) -> tuple[object, int, list[str], Path]:
    """(recipe, nproc, worker arguments, out): every check that needs no process, or ConfigError."""
    from acmoe_megatron.runtime.megatron_args import build_argv, validate_args

    run_dir = Path(cli.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory of acmoe-pretrain (no config.yaml)")
    overrides = [f"run.dir={run_dir}", *cli.overrides]
    if cli.iteration is not None:
        overrides.append(f"megatron.ckpt_step={cli.iteration}")
    recipe = load_recipe(run_dir / "config.yaml", overrides)
    ckpt = Path(recipe.megatron.get("load") or run_dir / "checkpoints")
    check_checkpoint(ckpt, cli.iteration)
    statistics, stats_file = choose_statistics(cli, recipe, ckpt, checkpoint_iteration(ckpt, cli.iteration))
    data = cli.data or recipe.data.path
    nproc = cli.nproc
    if nproc is None:
        summary = run_dir / "summary.json"
        nproc = json.loads(summary.read_text()).get("world_size") if summary.is_file() else None
        if nproc is None:
            import torch

            nproc = torch.cuda.device_count() or 1
    parallel_layout(recipe.megatron, nproc)
    manifest = read_manifest(data) if (Path(data) / "manifest.json").is_file() else None
    if manifest is None:
        raise ConfigError(f"--data {data}: no manifest.json; give the shard directory to score")
    argv = build_argv(recipe, manifest)  # the model's seq_length/vocabulary against this data
    args = megatron_args(argv, nproc, ours=lambda a: validate_args(a, recipe, training=False))
    vocab = args.vocab_size if args.tokenizer_type == "NullTokenizer" else None
    worker = []
    for name, path in [(cli.split, data)] + ([(f"{cli.split}_corrupt", cli.corrupt)] if cli.corrupt else []):
        _check_data(path, cli.split, args.seq_length, vocab, "--corrupt" if name.endswith("_corrupt") else "--data")
        worker += ["--eval", f"{name}={path}:{cli.split}"]
    worker += ["--statistics", statistics]
    if stats_file is not None:
        worker += ["--stats-file", str(stats_file)]
    if cli.calibrate is not None:
        _check_data(recipe.data.path, "train", args.seq_length, vocab, "--calibrate: the run's data")
        worker += ["--calibrate", str(cli.calibrate), "--calibrate-data", str(recipe.data.path)]
    if cli.report_dir is not None and not cli.report:
        raise ConfigError("--report-dir without --report: add --report")
    if cli.report:
        worker += ["--report", cli.report_dir or str(run_dir / "specialisation")]
    return recipe, nproc, worker, Path(cli.out) if cli.out else run_dir / "eval.json"


def main(argv=None) -> int:
    cli = _parser().parse_intermixed_args(argv)

    def launch(planned) -> int:
        _, nproc, worker, out = planned
        args = ["--config", str(Path(cli.run_dir) / "config.yaml"), "--out", str(out), *worker]
        if cli.max_samples is not None:
            args += ["--max-samples", str(cli.max_samples)]
        args += [f"run.dir={cli.run_dir}", *cli.overrides]
        if cli.iteration is not None:
            args.append(f"megatron.ckpt_step={cli.iteration}")
        return run_worker("acmoe_megatron.inference.evaluate", nproc, args, prog="acmoe-eval", what="evaluation",
                          echo=True)

    return refuse_or_launch("acmoe-eval", lambda: plan(cli), launch)


if __name__ == "__main__":
    raise SystemExit(main())
