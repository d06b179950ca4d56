"""Running the router-quality benchmark: one (row, seed) trained through ``acmoe-pretrain`` in its
own run directory and its final checkpoint evaluated on the word-swap-corrupted validation split
(``run_one``, which builds that split once with ``ensure_corrupt_data``); what a run produced is
extracted from its TensorBoard scalars, summary and ``acmoe-eval``'s eval.json (``extract_run``,
``ac_internals``) into the per-run JSON cache ``<results>/runs/<row>/seed<k>.json``
(``result_path``, ``_write_json``, ``load_results``; ``reextract`` refreshes the TensorBoard-derived
fields of stored results).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from .rows import ROOT, ROWS, Plan, Row, _rel, run_overrides

CORRUPTION = "word-swap:0.025"  # the paper's attacked WikiText-103: ~2.5 % of the words -> "AAA"
STATS_WINDOW = 0.2  # instability / imbalance: mean over the log points of the last 20 % of steps
AC_INTERNALS = ("weight_mean", "weight_max", "clip_rate", "separation_raw", "separation_ac")  # ac/layerLL/<name> (metrics.py)


# ---------------------------------------------------------------------------------------------
# extraction from a finished run


_LAYER_TAG = re.compile(r"^moe/layer(\d+)/(instability|load_max_over_mean|load_cv)$")


def window_mean(points, first_step: float) -> float | None:
    vals = [v for s, v in points if s >= first_step and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def extract_run(scalars: dict, train_iters: int) -> dict:
    """From a run's TensorBoard scalars: the validation/train curves and the routing statistics
    (per MoE layer: mean over the log points of the last ``STATS_WINDOW`` of training; the row
    value is the mean over the layers that log the metric)."""
    first = (1.0 - STATS_WINDOW) * train_iters
    per_layer: dict[str, dict[int, float]] = {"instability": {}, "load_max_over_mean": {}, "load_cv": {}}
    for tag, points in scalars.items():
        m = _LAYER_TAG.match(tag)
        if m:
            v = window_mean(points, first)
            if v is not None:
                per_layer[m.group(2)][int(m.group(1))] = v
    out = {
        "valid_curve": [[int(s), float(v)] for s, v in scalars.get("lm loss validation", [])],
        "train_curve": [[int(s), float(v)] for s, v in scalars.get("lm loss", [])],
        "per_layer": {k: {str(layer): round(v, 6) for layer, v in sorted(d.items())} for k, d in per_layer.items()},
    }
    for key, d in per_layer.items():
        out[key] = statistics.fmean(d.values()) if d else None
    out["ac_internals"] = ac_internals(scalars, train_iters)
    return out


_AC_TAG = re.compile(r"^ac/layer(\d+)/(" + "|".join(AC_INTERNALS) + r")$")


def ac_internals(scalars: dict, train_iters: int) -> dict | None:
    """The AC layers' logged internals, early (first ``STATS_WINDOW`` of the steps) and late (last
    ``STATS_WINDOW``), each the mean over the log points in the window and then over the AC layers:
    do the clusters the AC weights are computed from tighten in the transformed space
    (separation_ac vs separation_raw), how spread are the weights, how often is the clip hit."""
    per: dict[str, dict[str, list[float]]] = {}
    early_end, late_start = STATS_WINDOW * train_iters, (1.0 - STATS_WINDOW) * train_iters
    for tag, points in scalars.items():
        m = _AC_TAG.match(tag)
        if not m:
            continue
        early = [v for st, v in points if st <= early_end and math.isfinite(v)]
        late = window_mean(points, late_start)
        slot = per.setdefault(m.group(2), {"early": [], "late": []})
        if early:
            slot["early"].append(statistics.fmean(early))
        if late is not None:
            slot["late"].append(late)
    if not per:
        return None
    return {name: {w: (round(statistics.fmean(v), 6) if v else None) for w, v in d.items()} for name, d in per.items()}


# ---------------------------------------------------------------------------------------------
# data, launches, the per-run JSON cache


def corrupt_path(plan: Plan, data_path: str) -> Path:
    """Where the word-swap copy of ``data_path`` is: ``--corrupt-data``, else ``<data.path>_wordswap0.025``."""
    return plan.corrupt_data or Path(f"{data_path.rstrip('/')}_wordswap{CORRUPTION.split(':')[1]}")


def ensure_corrupt_data(plan: Plan, data_path: str) -> Path:
    """The word-swap copy of the validation split (built once: ``acmoe-data prepare ... --corrupt``;
    the train split in it stays byte-identical to the clean one, only valid/test are corrupted)."""
    from acmoe_megatron.data.shards.manifest import read_manifest

    clean = read_manifest(data_path)
    target = corrupt_path(plan, data_path)
    if not (target / "manifest.json").is_file():
        src = clean.source
        if src.get("kind") != "stdlib":
            raise SystemExit(
                f"quality.py: no corrupted copy of {data_path} at {target}; build it once with the same source "
                f"and options as the clean shards plus `--corrupt {CORRUPTION}`, e.g.\n  acmoe-data prepare "
                f"--source <source> --out {target} --seq-length {clean.seq_length} --corrupt {CORRUPTION}\n"
                "and pass --corrupt-data DIR (or --skip-corrupt)")
        from acmoe_megatron.cli.data import main as data_main

        cmd = ["prepare", "--source", "stdlib", "--out", str(target), "--seq-length", str(clean.seq_length),
               "--corrupt", CORRUPTION, "--no-progress"]
        for flag, key in (("--max-bytes", "max_bytes"), ("--valid-fraction", "valid_fraction"),
                          ("--test-fraction", "test_fraction")):
            if src.get(key) is not None:
                cmd += [flag, str(src[key])]
        print(f"[quality] building the corrupted validation data: acmoe-data {shlex.join(cmd)}", flush=True)
        if data_main(cmd):
            raise SystemExit(f"quality.py: building {target} failed (see above)")
    bad = read_manifest(target)
    problems = []
    if bad.corruption is None:
        problems.append("its manifest records no corruption")
    if bad.seq_length != clean.seq_length or bad.tokenizer.get("hash") != clean.tokenizer.get("hash"):
        problems.append("sequence length or tokenizer differ from the clean shards")
    if bad.splits["valid"].num_documents != clean.splits["valid"].num_documents:
        problems.append("its validation split holds other documents than the clean one")
    if problems:
        raise SystemExit(f"quality.py: corrupted data {target} does not match {data_path}: {'; '.join(problems)}")
    return target


def corrupt_info(path: Path | None) -> dict | None:
    if path is None:
        return None
    from acmoe_megatron.data.shards.manifest import read_manifest

    m = read_manifest(path)
    return {"path": str(_rel(path)), **(m.corruption or {})}


def result_path(results_dir: Path, row: str, seed: int) -> Path:
    return results_dir / "runs" / row / f"seed{seed}.json"


def _launch(overrides: list[str], config: str, nproc: int, threads: int, log: Path) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", config, "--nproc", str(nproc), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    return rc, wall, log.read_text(errors="replace")


def _launch_module(args: list[str], threads: int, log: Path) -> tuple[int, float, str]:
    cmd = [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    return rc, time.perf_counter() - t0, log.read_text(errors="replace")


def _tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-600:]


def run_one(plan: Plan, row: Row, seed: int, bhash: str, rerun: bool, corrupt_dir: Path | None,
            lock: threading.Lock) -> dict:
    """Train (row, seed), evaluate its final checkpoint on the corrupted split, write its JSON."""
    from acmoe_megatron.core.errors import ConfigError
    from acmoe_megatron.runtime.recipe import load_recipe

    overrides = run_overrides(plan, row, seed)
    out = result_path(plan.results_dir, row.name, seed)
    try:
        recipe = load_recipe(plan.config, overrides)
    except ConfigError as err:
        return {"row": row.name, "seed": seed, "status": "unavailable", "error": str(err)}
    chash = recipe.hash()
    if out.is_file() and not rerun:
        cached = json.loads(out.read_text())
        if cached.get("config_hash") == chash and cached.get("status") in ("ok", "nonfinite"):
            return cached
    run_dir = Path(recipe.run.dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    with lock:
        print(f"[quality] {row.name} seed {seed}: training in {_rel(run_dir)}", flush=True)
    rc, wall_train, log = _launch(overrides, plan.config, plan.nproc, plan.threads, run_dir / "train.log")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    result = run_record(plan, row, seed, bhash, recipe, summary, wall_train)
    if rc != 0 or not summary or summary.get("stopped_early"):
        status = "nonfinite" if summary.get("stopped_on_nonfinite") else "failed"
        result.update(status=status, error=f"acmoe-pretrain exit {rc}: {_tail(log)}")
        with lock:
            print(f"[quality] {row.name} seed {seed}: {status} (exit {rc}); log {_rel(run_dir / 'train.log')}",
                  flush=True)
        if status == "nonfinite":  # a diverged run is a result: keep it
            _write_json(out, result)
        return result
    return finish_run(plan, recipe, result, corrupt_dir, lock)


def run_record(plan: Plan, row: Row, seed: int, bhash: str, recipe, summary: dict, wall_train: float | None) -> dict:
    """The identity part of a run's JSON (what was run, by whom, how long)."""
    return {
        "row": row.name, "seed": seed, "overrides": run_overrides(plan, row, seed),
        "row_overrides": list(row.overrides),
        "config": plan.config, "nproc": plan.nproc, "threads": plan.threads, "command": plan.command,
        "config_hash": recipe.hash(), "base_hash": bhash, "summary_config_hash": summary.get("config_hash"),
        "git_sha": summary.get("git_sha"), "finished_at": summary.get("finished_at"),
        "train_iters": recipe.megatron.get("train_iters"),
        "wall_train_s": round(wall_train if wall_train is not None else summary.get("wall_time_s") or 0.0, 1),
        "wall_trainer_s": summary.get("wall_time_s"), "tokens_per_s": summary.get("tokens_per_s"),
    }


def finish_run(plan: Plan, recipe, result: dict, corrupt_dir: Path | None, lock: threading.Lock | None = None) -> dict:
    """A finished run's results (TensorBoard, summary) and its final checkpoint evaluated on the
    corrupted validation split (``acmoe-eval``), written to its JSON. Run after a local training
    launch (``run_one``) and, on a cluster, by the SLURM job itself once training ended
    (``quality.py --finish-run``, cluster.py)."""
    from acmoe_megatron.observability.summary import read_scalars

    run_dir = Path(recipe.run.dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    result.update(extract_run(read_scalars(run_dir / "tensorboard"), int(result["train_iters"])))
    result["final_valid_loss"] = summary.get("final_valid_loss")
    result["final_train_loss"] = summary.get("final_train_loss")
    result["corrupt_valid_loss"], result["wall_corrupt_eval_s"] = None, 0.0
    if corrupt_dir is not None:
        # acmoe-eval: the final checkpoint scores the first eval_iters x global batch samples of the
        # corrupted valid split, the same samples and statistics as the clean validation loss (auto:
        # a batch-trained AC model's batch statistics, an ema model's running statistics)
        samples = int(recipe.megatron["eval_iters"]) * int(recipe.megatron["global_batch_size"])
        eval_json = run_dir / "eval_corrupt.json"
        cmd = ["-m", "acmoe_megatron.cli.eval", str(run_dir), "--data", str(corrupt_dir), "--split", "valid",
               "--max-samples", str(samples), "--nproc", str(plan.nproc), "--out", str(eval_json)]
        rc, wall_eval, elog = _launch_module(cmd, plan.threads, run_dir / "eval_corrupt.log")
        result["wall_corrupt_eval_s"] = round(wall_eval, 1)
        if rc != 0 or not eval_json.is_file():
            result.update(status="failed", error=f"corrupted-text evaluation exit {rc}: {_tail(elog)}")
            print(f"[quality] {result['row']} seed {result['seed']}: {result['error']}", flush=True)
            return result
        result["corrupt_valid_loss"] = json.loads(eval_json.read_text())["results"]["valid"]["loss"]
    result["wall_total_s"] = round(result["wall_train_s"] + result["wall_corrupt_eval_s"], 1)
    result["status"] = "ok"
    _write_json(result_path(plan.results_dir, result["row"], result["seed"]), result)
    with lock or threading.Lock():
        print(f"[quality] {result['row']} seed {result['seed']}: valid {result['final_valid_loss']:.4f}"
              + (f", corrupted {result['corrupt_valid_loss']:.4f}" if result["corrupt_valid_loss"] is not None else "")
              + f"; train {result['wall_train_s']:.0f} s + corrupted eval {result['wall_corrupt_eval_s']:.0f} s",
              flush=True)
    return result


def _write_json(path: Path, data: dict) -> None:
    """One key per line, each value compact (curves stay on one line): small, diffable files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v, separators=(', ', ': '))}" for k, v in data.items())
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text("{\n" + body + "\n}\n")
    tmp.replace(path)


def stored_runs(results_dir: Path, seeds: list[int]):
    """(row, seed, path, result) of every stored run JSON under ``results_dir`` for ``seeds``, in ROWS order."""
    for row in ROWS:
        for seed in seeds:
            p = result_path(results_dir, row.name, seed)
            if p.is_file():
                yield row, seed, p, json.loads(p.read_text())


def load_results(results_dir: Path, seeds: list[int], bhash: str) -> tuple[dict[str, list[dict]], list[str]]:
    """Stored results of the table's base (same base hash) for ``seeds``, by row, in ROWS order."""
    found: dict[str, list[dict]] = {}
    other: list[str] = []
    for row, seed, _, r in stored_runs(results_dir, seeds):
        if r.get("base_hash") != bhash:
            other.append(f"{row.name}/seed{seed}")
            continue
        found.setdefault(row.name, []).append(r)
    return found, other


def load_references(plan: Plan, reference_out: str | Path, seeds: list[int], steps: int) -> dict[str, list[dict]]:
    """Every row of another table (``reference_out``: its results file) at this table's length
    ``steps``, read from the validation curves of its longer runs: {row: results with
    ``final_valid_loss`` = the run's validation loss at step ``steps``}.

    A run's first ``steps`` steps equal a ``steps``-step run's only when nothing before that step
    depends on the run length: the learning rate must be constant after warm-up (measured: a 500-step
    run's final validation loss equals the 2000-step run's loss at step 500 bit for bit, 1 thread),
    and both tables must share everything else (checked: the other table's runs carry the base hash
    of this table's base recipe with their own length)."""
    import dataclasses

    from acmoe_megatron.runtime.recipe import load_recipe

    from .rows import base_hash, merge_overrides

    recipe = load_recipe(plan.config, plan.base)
    if recipe.megatron.get("lr_decay_style") != "constant":
        raise SystemExit(f"quality.py: --references needs a constant learning rate after warm-up (the base recipe "
                         f"has lr_decay_style={recipe.megatron.get('lr_decay_style')!r}): a longer run's first "
                         f"{steps} steps would not be a {steps}-step run")
    ref_dir = Path(reference_out).with_suffix("")
    found: dict[str, list[dict]] = {}
    hashes: dict[int, str] = {}
    for row, seed, p, r in stored_runs(ref_dir, seeds):
        length = int(r["train_iters"])
        if length not in hashes:
            longer = merge_overrides([*plan.base, f"megatron.train_iters={length}", f"megatron.save_interval={length}"])
            hashes[length] = base_hash(dataclasses.replace(plan, base=longer))
        curve = dict(r.get("valid_curve") or [])
        if r.get("status") != "ok" or r.get("base_hash") != hashes[length] or steps not in curve:
            continue
        found.setdefault(row.name, []).append({
            "row": row.name, "seed": seed, "status": "ok", "final_valid_loss": curve[steps],
            "reference": f"{_rel(p)} at step {steps} of {length}"})
    return found


def reextract(plan: Plan, rows: list[Row], seeds: list[int]) -> int:
    """Refresh the TensorBoard-derived fields of stored results from their run directories (after
    the extraction gained a field); training and losses are untouched. Returns how many."""
    from acmoe_megatron.observability.summary import read_scalars

    n = 0
    for row in rows:
        for seed in seeds:
            path = result_path(plan.results_dir, row.name, seed)
            tb = plan.runs_root / row.name / f"seed{seed}" / "tensorboard"
            if not path.is_file() or not tb.is_dir():
                continue
            result = json.loads(path.read_text())
            if result.get("status") != "ok":
                continue
            result.update(extract_run(read_scalars(tb), int(result["train_iters"])))
            _write_json(path, result)
            n += 1
    return n
