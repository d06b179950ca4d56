"""Run summary (``<run.dir>/summary.json``) built from the run's own TensorBoard event files.

Reading the event files back (with TensorBoard's own reader) means the summary reports exactly
what the user sees in TensorBoard: final train/validation loss, perplexity and bits per byte for
byte-level data, tokens processed, throughput, wall time, the config hash and the git revision.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

from acmoe_megatron import __version__
from acmoe_megatron.model.precision import fused_paths


def read_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series under ``tb_dir``: tag → [(step, value)] sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for root, _dirs, files in os.walk(tb_dir):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        acc = EventAccumulator(root, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                series.setdefault(tag, {})[ev.step] = ev.value
    return {tag: sorted(points.items()) for tag, points in series.items()}


def git_sha(path: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        sha = out.stdout.strip()
        return sha if out.returncode == 0 and len(sha) == 40 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _last(series, tag):
    points = series.get(tag)
    return points[-1][1] if points else None


def write_summary(recipe, args, manifest, wall_time_s: float, runtime_shims=(), stopped_early: bool = False,
                  nonfinite: bool = False) -> Path:

    run_dir = Path(recipe.run.dir)
    tb_dir = Path(args.tensorboard_dir)
    series = read_scalars(tb_dir) if tb_dir.exists() else {}
    valid = _last(series, "lm loss validation")
    train = _last(series, "lm loss")
    tokens = int(args.consumed_train_samples) * int(args.seq_length)
    byte_level = manifest.tokenizer.get("name") == "bytes"
    summary = {
        "name": recipe.run.name,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "iterations": int(args.consumed_train_samples) // int(args.global_batch_size),
        "train_iters": args.train_iters,
        "stopped_early": stopped_early,
        "stopped_on_nonfinite": nonfinite,
        "final_train_loss": train,
        "final_valid_loss": valid,
        "final_valid_ppl": math.exp(valid) if valid is not None and valid < 50 else None,
        "final_valid_bits_per_token": valid / math.log(2) if valid is not None else None,
        "final_valid_bits_per_byte": valid / math.log(2) if valid is not None and byte_level else None,
        "uniform_baseline_loss": math.log(256) if byte_level else math.log(manifest.tokenizer["vocab_size"]),
        "train_tokens": tokens,
        "wall_time_s": round(wall_time_s, 2),
        "tokens_per_s": round(tokens / wall_time_s, 1) if wall_time_s > 0 else None,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "parallel": {
            "tp": args.tensor_model_parallel_size,
            "pp": args.pipeline_model_parallel_size,
            "ep": args.expert_model_parallel_size,
            "dp": args.data_parallel_size,
        },
        "router": recipe.acmoe.router,
        "config_hash": recipe.hash(),
        "git_sha": git_sha(Path(__file__).resolve().parent),
        "runtime_shims": list(runtime_shims),
        "fused_paths": fused_paths(args),
        "tensorboard_dir": str(tb_dir),
        "checkpoint_dir": args.save,
        "tensorboard_tags": sorted(series),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "summary.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out)
    return out


def code_version(root: Path) -> str:
    """The code actually running: the git commit of the checkout holding ``root`` (an editable
    install), else the installed package's version."""
    sha = git_sha(root)
    if sha is None:
        return f"acmoe-megatron {__version__} (installed package, not a git checkout)"
    try:
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return f"{sha} (with uncommitted changes)" if dirty else sha
