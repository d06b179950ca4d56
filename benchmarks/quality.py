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

A row is a name plus recipe overrides on one shared base recipe (``ROWS``; add a row there). Each
(row, seed) trains in its own run directory ``runs/quality/<row>/seed<k>`` with ``megatron.seed``
= ``data.seed`` = k; its final checkpoint is then evaluated on a word-swap-corrupted copy of the
validation split (megatron ``skip_train`` + ``load``, the same number of validation samples).
What a run produced is extracted into ``benchmarks/results/quality/runs/<row>/seed<k>.json``
(validation curve, corrupted loss, instability, imbalance, wall time, config hash): a run whose
JSON exists with the same config hash is not run again (``--rerun`` forces), and ``--report-only``
rebuilds the results file from those JSONs alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logging.getLogger("tensorboard").setLevel(logging.WARNING)  # "No path found after ..." per event file
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/quality.py` from a checkout without install
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality.md"
DEFAULT_RUNS = ROOT / "runs" / "quality"
DEFAULT_CONFIG = "configs/tiny_cpu.yaml"
CORRUPTION = "word-swap:0.025"  # the paper's attacked WikiText-103: ~2.5 % of the words -> "AAA"
STEPS_GOAL = 0.8  # AC should reach topk's final validation loss in <= 80 % of topk's steps
STATS_WINDOW = 0.2  # instability / imbalance: mean over the log points of the last 20 % of steps
AC_INTERNALS = ("weight_mean", "weight_max", "clip_rate", "separation_raw", "separation_ac")  # ac/layerLL/<name> (metrics.py)


# ---------------------------------------------------------------------------------------------
# the rows: one name + overrides on the shared base recipe. Add rows here.


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]
    default: bool = True  # part of the default set (False: investigation / ablation rows)
    note: str = ""


ROWS: tuple[Row, ...] = (
    Row("topk", ("acmoe.router=topk",), note="megatron's linear top-k router on every MoE layer (SMoE baseline)"),
    Row("cosine", ("acmoe.router=cosine",), note="AC scoring with M = I (cosine router) from the first AC layer"),
    Row("ac", ("acmoe.router=ac",), note="Adaptive Clustering router from the first AC layer"),
    Row("xmoe", ("acmoe.router=xmoe",), note="XMoE (Chi et al. 2022)"),
    Row("stablemoe", ("acmoe.router=stablemoe",), note="StableMoE (Dai et al. 2022)"),
    Row("stablemoe-lite", ("acmoe.router=stablemoe-lite",), note="StableMoE, light variant"),
    Row("usmoe", ("acmoe.router=usmoe",), note="USMoE"),
    Row("etr", ("acmoe.router=etr", "megatron.moe_expert_capacity_factor=1.25"), note="ETR, capacity factor 1.25"),
    Row("elliptical", ("acmoe.router=topk", "elliptical.enabled=true"), note="top-k router + Elliptical attention"),
    Row("ac+elliptical", ("acmoe.router=ac", "elliptical.enabled=true"), note="AC router + Elliptical attention"),
    # investigation rows (not in the default set): what moves AC's result
    Row("ac-clean", ("acmoe.router=ac", "acmoe.mode=clean"), False,
        "AC, clean mode (clusters with < min_cluster_size tokens get M = I)"),
    Row("ac-first2", ("acmoe.router=ac", "acmoe.first_ac_layer=2"), False, "AC from MoE layer 2"),
    Row("ac-first4", ("acmoe.router=ac", "acmoe.first_ac_layer=4"), False, "AC on the last MoE layer only"),
    Row("ac-ema", ("acmoe.router=ac", "acmoe.source=ema"), False, "AC with running (EMA) statistics, causal-safe"),
    Row("ac-local", ("acmoe.router=ac", "acmoe.scope=local"), False,
        "AC statistics over this rank's tokens (= tp scope with 1 process)"),
    Row("ac-mb4", ("acmoe.router=ac", "megatron.micro_batch_size=4"), False,
        "AC statistics over micro-batches of 4 sequences (same global batch, 4 accumulation steps)"),
    Row("topk-mb4", ("acmoe.router=topk", "megatron.micro_batch_size=4"), False,
        "reference for ac-mb4 (aux loss per micro-batch of 4)"),
    Row("ac-mb32", ("acmoe.router=ac", "megatron.micro_batch_size=32", "megatron.global_batch_size=32"), False,
        "AC statistics over 32 sequences (4096 tokens): twice the batch, so twice the training tokens"),
    Row("topk-mb32", ("acmoe.router=topk", "megatron.micro_batch_size=32", "megatron.global_batch_size=32"), False,
        "reference for ac-mb32 (same doubled batch)"),
    # ablations of the release recipe (configs/release_cpu.yaml): one change, applied to AC and to
    # the references it affects, so that AC - topk and AC - cosine can be compared under it
    *(Row(f"{r}-balance", (f"acmoe.router={r}", "megatron.moe_router_load_balancing_type=aux_loss",
                           "megatron.moe_aux_loss_coeff=0.01"), False,
          f"{r} with megatron's aux load-balancing loss 0.01 on every MoE layer (our recipes' default)")
      for r in ("topk", "cosine", "ac")),
    *(Row(f"{r}-freenorm", (f"acmoe.router={r}", "acmoe.expert_norm=null"), False,
          f"{r} with megatron's N(0, init_method_std) expert embeddings and a free norm")
      for r in ("cosine", "ac")),
    *(Row(f"{r}-clip", (f"acmoe.router={r}", "megatron.clip_grad=1.0"), False,
          f"{r} with gradient clipping 1.0 (our recipes' default)") for r in ("topk", "cosine", "ac")),
    *(Row(f"{r}-e8", (f"acmoe.router={r}", "megatron.num_experts=8"), False, f"{r} with 8 experts instead of 16")
      for r in ("topk", "cosine", "ac")),
    *(Row(f"{r}-mb6", (f"acmoe.router={r}", "megatron.micro_batch_size=6"), False,
          f"{r}, micro-batches of 6 sequences (half the tokens per AC statistic, same global batch)")
      for r in ("topk", "ac")),
)
ROW_BY_NAME = {r.name: r for r in ROWS}
# The ablation table: one change each, (AC row, top-k reference, cosine reference) under that change
# (a reference the change does not touch is the base row itself; None: no such reference).
ABLATIONS: tuple[tuple[str, str, str | None, str | None], ...] = (
    ("none (the base recipe)", "ac", "topk", "cosine"),
    ("aux balance loss 0.01 on every MoE layer", "ac-balance", "topk-balance", "cosine-balance"),
    ("free expert norm, megatron's init", "ac-freenorm", "topk", "cosine-freenorm"),
    ("gradient clipping 1.0", "ac-clip", "topk-clip", "cosine-clip"),
    ("8 experts instead of 16", "ac-e8", "topk-e8", "cosine-e8"),
    ("half the tokens per AC statistic (micro-batch 6)", "ac-mb6", "topk-mb6", None),
    ("EMA statistics (acmoe.source=ema)", "ac-ema", "topk", "cosine"),
    ("clean mode (acmoe.mode=clean)", "ac-clean", "topk", "cosine"),
)
DEFAULT_ROWS = tuple(r.name for r in ROWS if r.default)

# The default model, calibrated for a 2-core CPU (see the results file): on top of
# configs/tiny_cpu.yaml (4 layers, all MoE, 8 experts top-2, AC from MoE layer 3 = layers 3-4,
# AdamW lr 2e-3 cosine, aux loss 0.01, z-loss 0.001), a narrower model on 128-byte sequences in
# one process (EP 1) so that two runs can share the two cores.
CPU_DEFAULT_STEPS = 300
CPU_DEFAULTS: tuple[str, ...] = (
    "data.path=data/stdlib_s128",
    "megatron.seq_length=128",
    "megatron.max_position_embeddings=128",
    "megatron.hidden_size=64",
    "megatron.num_attention_heads=4",
    "megatron.ffn_hidden_size=128",
    "megatron.moe_ffn_hidden_size=128",
    "megatron.expert_model_parallel_size=1",
    "megatron.micro_batch_size=16",
    "megatron.global_batch_size=16",
    "megatron.lr_warmup_iters=30",
    "megatron.eval_interval=25",
    "megatron.eval_iters=16",
    "megatron.log_interval=10",
)


def merge_overrides(overrides) -> list[str]:
    """``SECTION.KEY=VALUE`` list with one entry per key: the last value, at the key's first place."""
    last: dict[str, str] = {}
    for text in overrides:
        last[text.split("=", 1)[0]] = text
    return list(last.values())


def select_rows(spec: str | None) -> list[Row]:
    """``None``/"default" → the default rows; "all" → every row; else comma/space separated names."""
    if spec is None or spec.strip() in ("", "default"):
        return [ROW_BY_NAME[n] for n in DEFAULT_ROWS]
    if spec.strip() == "all":
        return list(ROWS)
    names = [n for n in re.split(r"[,\s]+", spec.strip()) if n]
    unknown = [n for n in names if n not in ROW_BY_NAME]
    if unknown:
        raise SystemExit(f"quality.py: unknown row(s) {unknown}; rows: {[r.name for r in ROWS]}")
    seen = set()
    return [ROW_BY_NAME[n] for n in names if not (n in seen or seen.add(n))]


def parse_seeds(spec: str) -> list[int]:
    """``"3"`` → seeds 1, 2, 3; ``"1,2,5"`` → those seeds."""
    spec = spec.strip()
    if "," not in spec and spec.isdigit():
        n = int(spec)
        if n < 1:
            raise SystemExit("quality.py: --seeds needs at least one seed")
        return list(range(1, n + 1))
    seeds = [int(s) for s in re.split(r"[,\s]+", spec) if s]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"quality.py: --seeds {spec!r}: give a count or distinct seeds (1,2,3)")
    return seeds


# ---------------------------------------------------------------------------------------------
# pure aggregation (unit-tested in tests/test_quality_benchmark.py)


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1); std is None for one value, both None for none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    if len(vals) == 1:
        return vals[0], None
    return statistics.fmean(vals), statistics.stdev(vals)


def steps_to_target(curve, target: float, tol: float = 1e-12) -> float | None:
    """First step at which the validation curve ``[(step, loss)]`` reaches ``loss <= target``,
    linearly interpolated between the evaluation before and the one that reaches it; the first
    evaluation's step if that one already does; None when the curve never gets there."""
    prev = None
    for step, loss in sorted(curve):
        if loss <= target + tol:
            if prev is None or prev[1] <= loss:
                return float(step)
            s0, l0 = prev
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        prev = (step, loss)
    return None


def mean_curve(curves) -> list[tuple[int, float]]:
    """Seed-mean of several validation curves over the evaluation steps all of them have."""
    curves = [dict(c) for c in curves if c]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(s, statistics.fmean(c[s] for c in curves)) for s in steps]


def _bits(loss):
    return None if loss is None else loss / math.log(2)


def _ppl(loss):
    return None if loss is None or loss > 50 else math.exp(loss)


def aggregate_row(results: list[dict], target: float | None) -> dict:
    """Mean ± std over the seeds of one row; ``target`` = topk's mean final validation loss."""
    ok = [r for r in results if r.get("status") == "ok"]
    final = [r["final_valid_loss"] for r in ok]
    corrupt = [r.get("corrupt_valid_loss") for r in ok]
    gaps = [c - f for c, f in zip(corrupt, final) if c is not None and f is not None]
    agg = {
        "seeds": sorted(r["seed"] for r in ok),
        "n": len(ok),
        "failed": sorted(r["seed"] for r in results if r.get("status") != "ok"),
        "loss": mean_std(final),
        "bits": mean_std([_bits(v) for v in final]),
        "ppl": mean_std([_ppl(v) for v in final]),
        "corrupt": mean_std(corrupt),
        "gap": mean_std(gaps),
        "instability": mean_std([r.get("instability") for r in ok]),
        "imbalance": mean_std([r.get("load_max_over_mean") for r in ok]),
        "cv": mean_std([r.get("load_cv") for r in ok]),
        "wall": mean_std([r.get("wall_total_s") for r in ok]),
        "steps": max((r.get("train_iters") or 0 for r in ok), default=None),
        "curve": mean_curve([r.get("valid_curve") for r in ok]),
        "steps_to_target": None,
        "seeds_reaching": None,
    }
    if target is not None and ok:
        agg["steps_to_target"] = steps_to_target(agg["curve"], target)
        agg["seeds_reaching"] = sum(steps_to_target(r.get("valid_curve") or [], target) is not None for r in ok)
    return agg


def paired_diff(results_a: list[dict], results_b: list[dict], key: str) -> tuple[float | None, float | None, int]:
    """Mean ± std over the seeds both rows have of (b − a) for ``key`` (same seed = same init/data)."""
    a = {r["seed"]: r.get(key) for r in results_a if r.get("status") == "ok"}
    b = {r["seed"]: r.get(key) for r in results_b if r.get("status") == "ok"}
    diffs = [b[s] - a[s] for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None]
    m, s = mean_std(diffs)
    return m, s, len(diffs)


_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086)  # Student t, 97.5 % quantile, 1..20 degrees of freedom


def ci95(mean: float | None, std: float | None, n: int) -> tuple[float, float] | None:
    """Two-sided 95 % confidence interval of a mean of ``n`` paired differences (Student t)."""
    if mean is None or std is None or n < 2:
        return None
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    half = t * std / math.sqrt(n)
    return mean - half, mean + half


def fmt_paired(m, s, n, nd: int = 4) -> str:
    """``m ± s (n seeds; 95 % CI [lo, hi])`` for paired differences."""
    if m is None:
        return "n/a"
    ci = ci95(m, s, n)
    sd = "" if s is None else f" ± {s:.{nd}f}"
    return f"{m:+.{nd}f}{sd} ({n} seed{'s' if n != 1 else ''}" + (
        "" if ci is None else f"; 95% CI [{ci[0]:+.{nd}f}, {ci[1]:+.{nd}f}]") + ")"


def compare(agg_ac: dict, agg_ref: dict, key: str = "loss") -> dict:
    """AC vs a reference row on ``key`` (lower is better): the difference ref − AC of the seed
    means, the seed spread (the larger of the two rows' standard deviations) and whether AC is
    lower by more than that spread."""
    (m_ac, s_ac), (m_ref, s_ref) = agg_ac[key], agg_ref[key]
    if m_ac is None or m_ref is None:
        return {"available": False}
    stds = [s for s in (s_ac, s_ref) if s is not None]
    spread = max(stds) if stds else None
    margin = m_ref - m_ac
    both = s_ac is not None and s_ref is not None
    return {"available": True, "margin": margin, "spread": spread, "lower": margin > 0,
            "beyond_spread": (margin > spread) if both else None}


def verdict(aggs: dict[str, dict], results: dict[str, list[dict]]) -> list[str]:
    """The goals of the benchmark (the paper's direction), stated from the numbers. Markdown lines."""
    lines = []
    ac, topk = aggs.get("ac"), aggs.get("topk")
    if not ac or not ac["n"]:
        return ["- no finished `ac` runs: nothing to judge."]

    def fmt(x, nd=4):
        return "n/a" if x is None else f"{x:.{nd}f}"

    # 1. clean validation loss vs topk and cosine
    for ref in ("topk", "cosine"):
        agg = aggs.get(ref)
        if not agg or not agg["n"]:
            lines.append(f"- **AC vs {ref}, validation loss**: no `{ref}` runs.")
            continue
        c = compare(ac, agg, "loss")
        pm, ps, pn = paired_diff(results.get(ref, []), results.get("ac", []), "final_valid_loss")
        if c["beyond_spread"] is None:
            state = "undetermined (fewer than 2 seeds in a row, no spread)"
        elif c["beyond_spread"]:
            state = "**met**: AC is lower by more than the seed spread"
        elif c["lower"]:
            state = "**not met**: AC is lower, but by less than the seed spread"
        else:
            state = "**not met**: AC is not lower"
        lines.append(
            f"- **AC vs {ref}, validation loss** (goal: AC lower by more than the seed spread): "
            f"{ref} {fmt(agg['loss'][0])} − AC {fmt(ac['loss'][0])} = {fmt(c['margin'])} nats; "
            f"seed spread (larger std of the two rows) {fmt(c['spread'])} → {state}. "
            f"Paired by seed (AC − {ref}, same init and data order): {fmt_paired(pm, ps, pn)}"
            + _ci_verdict(pm, ps, pn) + ".")
    # 2. convergence speed vs topk
    if topk and topk["n"]:
        steps_ac, steps_ref = ac["steps_to_target"], topk["steps_to_target"]
        if steps_ac is None:
            lines.append(f"- **steps to topk's final loss** (goal ≤ {STEPS_GOAL:.0%} of topk's): AC's seed-mean "
                         f"curve does not reach {fmt(topk['loss'][0])} within {ac['steps']} steps → **not met**.")
        else:
            ratio = steps_ac / steps_ref if steps_ref else None
            ok = ratio is not None and ratio <= STEPS_GOAL
            lines.append(
                f"- **steps to topk's final loss {fmt(topk['loss'][0])}** (goal ≤ {STEPS_GOAL:.0%} of topk's): AC "
                f"{steps_ac:.0f} vs topk {fmt(steps_ref, 0)} steps, ratio {fmt(ratio, 2)} → "
                f"{'**met**' if ok else '**not met**'} ({ac['seeds_reaching']}/{ac['n']} AC seeds reach it "
                "individually).")
    # 3. robustness: loss increase on corrupted text
    for ref in ("topk", "cosine"):
        agg = aggs.get(ref)
        if not agg or not agg["n"] or ac["gap"][0] is None or agg["gap"][0] is None:
            continue
        c = compare(ac, agg, "gap")
        pm, ps, pn = paired_diff(
            [dict(r, gap=_gap(r)) for r in results.get(ref, [])],
            [dict(r, gap=_gap(r)) for r in results.get("ac", [])], "gap")
        if c["lower"]:
            state = "**met**" + {True: " (by more than the seed spread)", False: " (but within the seed spread)",
                                 None: " (no seed spread: fewer than 2 seeds)"}[c["beyond_spread"]]
        else:
            state = "**not met**"
        lines.append(
            f"- **corrupted text vs {ref}** (goal: AC loses less): loss increase corrupted − clean "
            f"AC {fmt(ac['gap'][0])} vs {ref} {fmt(agg['gap'][0])} nats (spread {fmt(c['spread'])}) → {state}; "
            f"corrupted loss AC {fmt(ac['corrupt'][0])} vs {ref} {fmt(agg['corrupt'][0])}. "
            f"Paired gap difference (AC − {ref}): {fmt(pm)} ± {fmt(ps)} over {pn} seeds.")
    # investigation rows: each against ac and topk, paired by seed
    for name, agg in aggs.items():
        if name in DEFAULT_ROWS or not agg["n"]:
            continue
        parts = []
        for ref in ("ac", "topk"):
            if aggs.get(ref, {}).get("n"):
                pm, ps, pn = paired_diff(results[ref], results[name], "final_valid_loss")
                parts.append(f"{name} − {ref} = {fmt(pm)} ± {fmt(ps)} ({pn} seeds)")
        lines.append(f"- investigation row `{name}`: validation loss {fmt(agg['loss'][0])}; paired "
                     + "; ".join(parts) + ".")
    # best row
    ranked = sorted((a["loss"][0], name) for name, a in aggs.items() if a["n"] and a["loss"][0] is not None)
    if ranked:
        lines.append(f"- lowest mean validation loss: `{ranked[0][1]}` ({ranked[0][0]:.4f}); "
                     f"order: {', '.join(f'`{n}`' for _, n in ranked)}.")
    return lines


def _ci_verdict(m, s, n) -> str:
    ci = ci95(m, s, n)
    if ci is None:
        return ""
    if ci[1] < 0:
        return " → **AC lower, the 95% CI excludes 0**"
    if ci[0] > 0:
        return " → **AC higher, the 95% CI excludes 0**"
    return " → the 95% CI includes 0"


def _gap(r: dict):
    c, f = r.get("corrupt_valid_loss"), r.get("final_valid_loss")
    return None if c is None or f is None else c - f


# ---------------------------------------------------------------------------------------------
# extraction from a finished run


_VALID_LINE = re.compile(r"validation loss at iteration (\d+) on validation set \| lm loss value: ([-+0-9.eEnaif]+)")
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


def corrupt_loss_from_log(text: str) -> float | None:
    """Megatron's closing line ``validation loss at iteration N on validation set | lm loss value: X``."""
    found = _VALID_LINE.findall(text)
    return float(found[-1][1]) if found else None


# ---------------------------------------------------------------------------------------------
# recipes, data, launches


@dataclass
class Plan:
    config: str
    base: list[str]  # CPU defaults (if any) + --steps + --set
    nproc: int
    runs_root: Path
    results_dir: Path  # benchmarks/results/quality
    corrupt_data: Path | None
    threads: int
    cpu_defaults: bool
    command: str = ""  # the benchmark command line, stored with each run


def run_overrides(plan: Plan, row: Row, seed: int) -> list[str]:
    run_dir = plan.runs_root / row.name / f"seed{seed}"
    return [*plan.base, *row.overrides, f"megatron.seed={seed}", f"data.seed={seed}",
            f"run.dir={run_dir}", f"run.name=quality-{row.name}-seed{seed}"]


def base_hash(plan: Plan) -> str:
    """What every row of one table shares: the base recipe (rows, seeds and run dirs left out) and
    the process count."""
    from acmoe_megatron.config import load_recipe

    d = load_recipe(plan.config, plan.base).identity_dict()  # keys newer than stored results, at default: out
    d["run"] = {}
    d["megatron"].pop("seed", None)
    d["data"].pop("seed", None)
    blob = json.dumps({"recipe": d, "nproc": plan.nproc}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def ensure_corrupt_data(plan: Plan, data_path: str) -> Path:
    """The word-swap copy of the validation split (built once: ``acmoe-data prepare ... --corrupt``;
    the train split in it stays byte-identical to the clean one, only valid/test are corrupted)."""
    from acmoe_megatron.data.manifest import read_manifest

    clean = read_manifest(data_path)
    target = plan.corrupt_data or Path(f"{data_path.rstrip('/')}_wordswap{CORRUPTION.split(':')[1]}")
    if not (target / "manifest.json").is_file():
        src = clean.source
        if src.get("kind") != "stdlib":
            raise SystemExit(
                f"quality.py: no corrupted copy of {data_path} at {target}; build it once with the same source "
                f"and options as the clean shards plus `--corrupt {CORRUPTION}`, e.g.\n  acmoe-data prepare "
                f"--source <source> --out {target} --seq-length {clean.seq_length} --corrupt {CORRUPTION}\n"
                "and pass --corrupt-data DIR (or --skip-corrupt)")
        from acmoe_megatron.data.cli import main as data_main

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
    from acmoe_megatron.data.manifest import read_manifest

    m = read_manifest(path)
    return {"path": str(_rel(path)), **(m.corruption or {})}


def _rel(p: Path | str) -> Path:
    p = Path(p)
    try:
        return p.resolve().relative_to(ROOT)
    except ValueError:
        return p


def result_path(results_dir: Path, row: str, seed: int) -> Path:
    return results_dir / "runs" / row / f"seed{seed}.json"


def _launch(overrides: list[str], config: str, nproc: int, threads: int, log: Path) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "acmoe_megatron.launcher", "--config", config, "--nproc", str(nproc), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    return rc, wall, log.read_text(errors="replace")


def _tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-600:]


def run_one(plan: Plan, row: Row, seed: int, bhash: str, rerun: bool, corrupt_dir: Path | None,
            lock: threading.Lock) -> dict:
    """Train (row, seed), evaluate its final checkpoint on the corrupted split, write its JSON."""
    from acmoe_megatron.config import ConfigError, load_recipe
    from acmoe_megatron.slurm_launch import checkpoint_dir
    from acmoe_megatron.summary import read_scalars

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
    result = {
        "row": row.name, "seed": seed, "overrides": overrides, "row_overrides": list(row.overrides),
        "config": plan.config, "nproc": plan.nproc, "threads": plan.threads, "command": plan.command,
        "config_hash": chash, "base_hash": bhash, "summary_config_hash": summary.get("config_hash"),
        "git_sha": summary.get("git_sha"), "finished_at": summary.get("finished_at"),
        "train_iters": recipe.megatron.get("train_iters"), "wall_train_s": round(wall_train, 1),
        "wall_trainer_s": summary.get("wall_time_s"), "tokens_per_s": summary.get("tokens_per_s"),
    }
    if rc != 0 or not summary or summary.get("stopped_early"):
        status = "nonfinite" if summary.get("stopped_on_nonfinite") else "failed"
        result.update(status=status, error=f"acmoe-pretrain exit {rc}: {_tail(log)}")
        with lock:
            print(f"[quality] {row.name} seed {seed}: {status} (exit {rc}); log {_rel(run_dir / 'train.log')}",
                  flush=True)
        if status == "nonfinite":  # a diverged run is a result: keep it
            _write_json(out, result)
        return result
    result.update(extract_run(read_scalars(run_dir / "tensorboard"), int(result["train_iters"])))
    result["final_valid_loss"] = summary.get("final_valid_loss")
    result["final_train_loss"] = summary.get("final_train_loss")
    result["corrupt_valid_loss"], result["wall_corrupt_eval_s"] = None, 0.0
    if corrupt_dir is not None:
        eval_dir = run_dir / "eval_corrupt"
        eval_overrides = overrides + [f"data.path={corrupt_dir}", f"run.dir={eval_dir}",
                                      f"megatron.load={checkpoint_dir(recipe)}", "megatron.save=",
                                      "megatron.skip_train=true"]
        rc, wall_eval, elog = _launch(eval_overrides, plan.config, plan.nproc, plan.threads, eval_dir.with_suffix(".log"))
        result["wall_corrupt_eval_s"] = round(wall_eval, 1)
        loss = corrupt_loss_from_log(elog) if rc == 0 else None
        if loss is None and rc == 0:  # fall back on observability's bits-per-token scalar
            bpt = read_scalars(eval_dir / "tensorboard").get("lm loss validation bits-per-token")
            loss = bpt[-1][1] * math.log(2) if bpt else None
        if loss is None:
            result.update(status="failed", error=f"corrupted-text evaluation exit {rc}: {_tail(elog)}")
            return result
        result["corrupt_valid_loss"] = loss
    result["wall_total_s"] = round(result["wall_train_s"] + result["wall_corrupt_eval_s"], 1)
    result["status"] = "ok"
    _write_json(out, result)
    with lock:
        print(f"[quality] {row.name} seed {seed}: valid {result['final_valid_loss']:.4f}"
              + (f", corrupted {result['corrupt_valid_loss']:.4f}" if result["corrupt_valid_loss"] is not None else "")
              + f"; train {wall_train:.0f} s + corrupted eval {result['wall_corrupt_eval_s']:.0f} s", flush=True)
    return result


def _write_json(path: Path, data: dict) -> None:
    """One key per line, each value compact (curves stay on one line): small, diffable files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v, separators=(', ', ': '))}" for k, v in data.items())
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text("{\n" + body + "\n}\n")
    tmp.replace(path)


def load_results(results_dir: Path, seeds: list[int], bhash: str) -> tuple[dict[str, list[dict]], list[str]]:
    """Stored results of the table's base (same base hash) for ``seeds``, by row, in ROWS order."""
    found: dict[str, list[dict]] = {}
    other: list[str] = []
    for row in ROWS:
        for seed in seeds:
            p = result_path(results_dir, row.name, seed)
            if not p.is_file():
                continue
            r = json.loads(p.read_text())
            if r.get("base_hash") != bhash:
                other.append(f"{row.name}/seed{seed}")
                continue
            found.setdefault(row.name, []).append(r)
    return found, other


# ---------------------------------------------------------------------------------------------
# report


def _pm(ms, nd=3, scale=1.0):
    m, s = ms
    if m is None:
        return "–"
    return f"{m * scale:.{nd}f}" + ("" if s is None else f" ± {s * scale:.{nd}f}")


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"; GPU {torch.cuda.device_count()} × {torch.cuda.get_device_name()}"
    except Exception:  # pragma: no cover
        pass
    return f"{cpu}, {os.cpu_count()} cores{gpu}; {platform.system()} {platform.release()}"


def versions_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"Python {platform.python_version()}"]
    for pkg in ("torch", "megatron-core", "numpy"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    from acmoe_megatron.slurm_launch import _git_sha

    return ", ".join(parts) + f"; acmoe-megatron git {_git_sha(ROOT)}"


def settings_lines(plan: Plan, steps: int | None, corrupt: dict | None, threads: list[int]) -> list[str]:
    from acmoe_megatron.config import load_recipe
    from acmoe_megatron.spec import ac_layer_numbers, moe_layer_numbers

    r = load_recipe(plan.config, plan.base)
    mg = r.megatron
    shape = type("Shape", (), dict(num_layers=mg["num_layers"], moe_layer_freq=mg.get("moe_layer_freq", 1),
                                   num_moe_experts=mg["num_experts"]))
    moe = moe_layer_numbers(shape)
    ac = ac_layer_numbers(shape, dataclasses.replace(r.acmoe, router="ac"))
    g = lambda k, d="–": mg.get(k, d)  # noqa: E731
    tokens = int(g("global_batch_size", 0)) * int(g("seq_length", 0))
    lines = [
        f"- base recipe: `{plan.config}`" + (" + the benchmark's CPU model (`CPU_DEFAULTS` in benchmarks/quality.py)"
                                             if plan.cpu_defaults else "")
        + f"; overrides shared by every row: `{' '.join(plan.base)}`",
        f"- model: {g('num_layers')} layers ({len(moe)} MoE: layers {moe}), hidden {g('hidden_size')}, "
        f"{g('num_attention_heads')} heads, {g('num_experts')} experts (FFN {g('moe_ffn_hidden_size')}) top-"
        f"{g('moe_router_topk')}, {g('position_embedding_type', 'learned')} positions, {g('normalization', 'LayerNorm')}; "
        f"AC rows route with AC on MoE layers {ac} (acmoe.first_ac_layer={r.acmoe.first_ac_layer}; the paper: from "
        "the 3rd MoE layer), megatron's top-k router before",
        f"- data: `{r.data.path}`, sequences of {g('seq_length')} tokens; training seed = megatron.seed = data.seed",
        f"- training: {steps} steps × {g('global_batch_size')} sequences (micro-batch {g('micro_batch_size')}) = "
        f"{tokens} tokens/step; {g('optimizer', 'adam')} lr {g('lr')} (min {g('min_lr', 0)}), warm-up "
        f"{g('lr_warmup_iters', 0)}, {g('lr_decay_style', 'linear')} decay, weight decay {g('weight_decay', 0.01)}, "
        f"clip {g('clip_grad', 1.0)}; {g('moe_router_load_balancing_type', 'aux_loss')} coefficient "
        f"{g('moe_aux_loss_coeff', 0)}, z-loss {g('moe_z_loss_coeff', 0)}; dropout {g('hidden_dropout', 0.1)}",
        f"- parallelism: {plan.nproc} process(es), EP {g('expert_model_parallel_size', 1)}, TP "
        f"{g('tensor_model_parallel_size', 1)}, PP {g('pipeline_model_parallel_size', 1)}; "
        f"{'/'.join(map(str, threads)) or plan.threads} torch thread(s) per process (OMP_NUM_THREADS; the "
        "thread count changes the floating-point reduction order: a run with another count differs slightly)",
        f"- evaluation: every {g('eval_interval')} steps on the same first {g('eval_iters')} × "
        f"{g('global_batch_size')} validation sequences (megatron's periodic evaluation, "
        "`RepeatingValidation`); final = the evaluation after the last step",
    ]
    if corrupt:
        applied = corrupt.get("applied_to", {}).get("valid", {})
        lines.append(
            f"- corrupted text: `{corrupt['path']}` (`acmoe-data prepare --corrupt {corrupt.get('spec')}`, marker "
            f"{corrupt.get('marker')!r}, seed {corrupt.get('seed')}): {applied.get('replaced', '?')} of "
            f"{applied.get('units', '?')} whitespace-delimited words of the validation split replaced (on source "
            "code a \"word\" is any run of non-whitespace bytes: identifiers, operators, `foo(x):`; stop words are "
            "not exempt); the final checkpoint is evaluated on it with megatron `skip_train` + `load` over the "
            "same number of sequences as the clean validation loss")
    lines.append(
        f"- router instability: per MoE layer the logged `moe/layerLL/instability` (1 − Rand index of the top-1 "
        f"partitions of consecutive MoE layers, spec §6.4, over training micro-batches), averaged over the log "
        f"points of the last {STATS_WINDOW:.0%} of the steps, then over the MoE layers that have a predecessor. "
        "Load imbalance: the same averaging of `moe/layerLL/load_max_over_mean` (max/mean expert load, 1 = "
        "uniform) and `load_cv` (coefficient of variation)")
    return lines


def write_report(args, plan: Plan, rows: list[Row], seeds: list[int], bhash: str, failures: dict[str, str],
                 corrupt: dict | None) -> Path:
    out = Path(args.out)
    results, other = load_results(plan.results_dir, seeds, bhash)
    aggs: dict[str, dict] = {}
    topk_target = None
    if results.get("topk"):
        topk_target = aggregate_row(results["topk"], None)["loss"][0]
    for name, res in results.items():
        aggs[name] = aggregate_row(res, topk_target)
    steps = next((a["steps"] for a in aggs.values() if a["steps"]), None)
    byte_level = True
    try:
        from acmoe_megatron.config import load_recipe
        from acmoe_megatron.data.manifest import read_manifest

        byte_level = read_manifest(load_recipe(plan.config, plan.base).data.path).tokenizer.get("name") == "bytes"
    except Exception:
        pass
    unit = "byte" if byte_level else "token"
    topk_steps = aggs.get("topk", {}).get("steps_to_target")
    header = [
        f"| row | seeds | valid loss (nats/{unit}) | bits/{unit} | perplexity | steps to topk's final loss | "
        f"ratio to topk | corrupted loss | corrupted − clean | instability | load max/mean | load CV | "
        "wall per run (s) |",
        "|---" * 13 + "|",
    ]
    table = []
    shown = [r for r in ROWS if r.name in aggs or r.name in failures or r in rows]
    for row in shown:
        a = aggs.get(row.name)
        if not a or not a["n"]:
            why = failures.get(row.name, "no results")
            table.append(f"| `{row.name}` | 0 | {why[:160]} |" + " |" * 11)
            continue
        s2t = a["steps_to_target"]
        s2t_txt = "–" if topk_target is None else (
            "not reached" if s2t is None else f"{s2t:.0f} ({a['seeds_reaching']}/{a['n']} seeds)")
        ratio = "–" if s2t is None or not topk_steps else f"{s2t / topk_steps:.2f}"
        n_txt = f"{a['n']}" + (f" ({len(a['failed'])} diverged)" if a["failed"] else "")
        table.append(
            f"| `{row.name}` | {n_txt} | {_pm(a['loss'], 4)} | {_pm(a['bits'], 4)} | {_pm(a['ppl'], 3)} | {s2t_txt} | "
            f"{ratio} | {_pm(a['corrupt'], 4)} | {_pm(a['gap'], 4)} | {_pm(a['instability'], 3)} | "
            f"{_pm(a['imbalance'], 3)} | {_pm(a['cv'], 3)} | {_pm(a['wall'], 0)} |")
    all_seeds = sorted({r["seed"] for res in results.values() for r in res})
    per_seed = ["| row | " + " | ".join(f"seed {k}" for k in all_seeds) + " |", "|---" * (len(all_seeds) + 1) + "|"]
    for name, res in results.items():
        by_seed = {r["seed"]: r for r in res}
        cells = []
        for k in all_seeds:
            r = by_seed.get(k)
            if r is None:
                cells.append("–")
            elif r.get("status") != "ok":
                cells.append(r.get("status", "?"))
            else:
                c = r.get("corrupt_valid_loss")
                cells.append(f"{r['final_valid_loss']:.4f}" + ("" if c is None else f" / {c:.4f}"))
        per_seed.append(f"| `{name}` | " + " | ".join(cells) + " |")
    run_cmds = sorted({r["command"] for res in results.values() for r in res if r.get("command")})
    shas = sorted({(r.get("git_sha") or "?")[:10] for res in results.values() for r in res})
    row_lines = ["| row | overrides | in default set | note |", "|---|---|---|---|"]
    for row in shown:
        row_lines.append(f"| `{row.name}` | `{' '.join(row.overrides)}` | {'yes' if row.default else 'no'} | {row.note} |")
    figures = make_figures(plan, results, aggs, out.with_suffix(""))
    notes = _keep_notes(out)
    total_wall = sum(r.get("wall_total_s") or 0 for res in results.values() for r in res)
    lines = [
        "# Router quality: every router on the same model, data, seeds and steps",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {machine_line()}",
        f"- software: {versions_line()}",
        f"- command: `{args.command_line}`",
        *(["- the runs were made by: " + "; ".join(f"`{c}`" for c in run_cmds)]
          if run_cmds and run_cmds != [args.command_line] else []),
        f"- runs: {sum(len(v) for v in results.values())} (rows × seeds {seeds}), sum of per-run wall times "
        f"{total_wall / 60:.1f} min" + (f", this invocation {args.elapsed / 60:.1f} min wall with --jobs {args.jobs}"
                                          if getattr(args, "elapsed", None) else ""),
        f"- code of the runs: git {', '.join(shas) or '–'} (`git_sha` of each run's summary; a cached run is not "
        "re-run when only the code changed: use `--rerun`)",
        f"- per-run results (curves, corrupted loss, routing statistics, config hash): "
        f"`{_rel(plan.results_dir / 'runs')}/<row>/seed<k>.json`; regenerate this file from them with "
        "`python benchmarks/quality.py --report-only` (same arguments otherwise)",
        "",
        "## Settings (identical for every row)",
        "",
        *settings_lines(plan, steps, corrupt, sorted({r.get("threads") for v in results.values() for r in v
                                                      if r.get("threads")})),
        "",
        "## Rows",
        "",
        *row_lines,
        "",
        "## Results (mean ± sample std over seeds)",
        "",
        *header,
        *table,
        "",
        f"Steps to topk's final loss: first step where the seed-mean validation curve reaches topk's mean final "
        f"validation loss ({'–' if topk_target is None else f'{topk_target:.4f}'}), linearly interpolated between "
        "evaluations; in brackets how many seeds reach it on their own curve. Wall per run: training launch + "
        "corrupted-text evaluation launch (process start-up included).",
        "",
        f"Per seed: final validation loss / corrupted-text loss (nats/{unit}).",
        "",
        *per_seed,
    ]
    lines += ablation_lines(results) + ac_internal_lines(results)
    if other:
        lines += ["", f"Ignored stored results made with other base settings: {', '.join(other)}."]
    lines += ["", "## Verdict (computed from the table)", "", *verdict(aggs, results), ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{cap}]({os.path.relpath(p, out.parent)})" for cap, p in figures] + [""]
    lines += ["## Investigation notes", "", "<!-- notes:begin (kept when the file is regenerated) -->",
              notes or "_(none yet)_", "<!-- notes:end -->", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out


def ablation_lines(results: dict[str, list[dict]]) -> list[str]:
    """Markdown table: AC − topk and AC − cosine (paired by seed, 95% CI) under each change of
    ``ABLATIONS`` whose AC row has results, and what the change does to AC itself."""
    def paired(a, b):
        if not results.get(a) or not b or not results.get(b):
            return "–"
        return fmt_paired(*paired_diff(results[b], results[a], "final_valid_loss"))

    rows = [abl for abl in ABLATIONS if results.get(abl[1])]
    if len(rows) < 2:
        return []
    lines = ["", "## Ablations (paired by seed: same init and data order; nats per token)", "",
             "| change | AC row | AC − topk | AC − cosine | AC with the change − AC without |", "|---|---|---|---|---|"]
    for change, ac_row, topk_row, cos_row in rows:
        lines.append(f"| {change} | `{ac_row}` | {paired(ac_row, topk_row)} | {paired(ac_row, cos_row)} | "
                     f"{'–' if ac_row == 'ac' else paired(ac_row, 'ac')} |")
    return lines


def ac_internal_lines(results: dict[str, list[dict]]) -> list[str]:
    """Markdown table of the AC layers' internals (``ac_internals``), seed means, early → late."""
    def cell(res, name, nd=3):
        vals = {w: [r["ac_internals"][name][w] for r in res if (r.get("ac_internals") or {}).get(name)
                    and r["ac_internals"][name][w] is not None] for w in ("early", "late")}
        if not vals["late"]:
            return "–"
        early = f"{statistics.fmean(vals['early']):.{nd}f} → " if vals["early"] else ""
        return early + f"{statistics.fmean(vals['late']):.{nd}f}"

    rows = [(name, [r for r in res if r.get("status") == "ok"]) for name, res in results.items()]
    rows = [(name, res) for name, res in rows if any(r.get("ac_internals") for r in res)]
    if not rows:
        return []
    lines = ["", f"## Inside the AC layers (seed means; first {STATS_WINDOW:.0%} of the steps → last {STATS_WINDOW:.0%})",
             "", "Separation = mean between-centroid L1 distance per feature / mean within-cluster MAD of the "
             "previous layer's top-1 clusters, in the raw and in the AC-transformed space (metrics.py): M "
             "tightens the clusters it is computed from when separation_ac > separation_raw.", "",
             "Weight mean = the per-token mean of the AC weights m (1 when M only reshapes; far below 1 the "
             "transformed token, and with it the router's logits, shrink: the softmax over the two selected "
             "scores then gives both experts about the same gate).", "",
             "| row | weight mean | weight max | clip rate | separation raw | separation AC |", "|---|---|---|---|---|---|"]
    for name, res in rows:
        lines.append(f"| `{name}` | {cell(res, 'weight_mean', 4)} | {cell(res, 'weight_max', 2)} | "
                     f"{cell(res, 'clip_rate', 4)} | {cell(res, 'separation_raw')} | {cell(res, 'separation_ac')} |")
    return lines


def reextract(plan: Plan, rows: list[Row], seeds: list[int]) -> int:
    """Refresh the TensorBoard-derived fields of stored results from their run directories (after
    the extraction gained a field); training and losses are untouched. Returns how many."""
    from acmoe_megatron.summary import read_scalars

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


def _keep_notes(out: Path) -> str:
    if not out.is_file():
        return ""
    m = re.search(r"<!-- notes:begin[^>]*-->\n(.*?)\n<!-- notes:end -->", out.read_text(), re.S)
    text = m.group(1).strip() if m else ""
    return "" if text == "_(none yet)_" else text


def make_figures(plan: Plan, results: dict[str, list[dict]], aggs: dict[str, dict], fig_dir: Path):
    """valid_loss.png: seed-mean validation curves (± std band) of every row, from the JSONs;
    plus ``acmoe-plot`` of the first seed's run directories (when they exist) into seed<k>/."""
    from acmoe_megatron import plot

    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    from matplotlib.figure import Figure

    fig = Figure(figsize=plot.FIGURE_SIZES["routing"], dpi=plot.DPI, layout="constrained")  # 1200 x 500 px
    ax_all, ax_end = fig.subplots(1, 2)
    target = aggs.get("topk", {}).get("loss", (None,))[0]
    last_step = max((a["steps"] or 0 for a in aggs.values()), default=0)
    zoom_vals = []
    for i, (name, res) in enumerate(results.items()):
        curves = [dict(map(tuple, r["valid_curve"])) for r in res if r.get("status") == "ok" and r.get("valid_curve")]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [statistics.fmean(c[s] for c in curves) for s in steps]
        std = [statistics.stdev(c[s] for c in curves) if len(curves) > 1 else 0.0 for s in steps]
        zoom_vals += [m + d for s, m, d in zip(steps, mean, std) if s >= last_step / 2]
        zoom_vals += [m - d for s, m, d in zip(steps, mean, std) if s >= last_step / 2]
        for ax in (ax_all, ax_end):
            ax.plot(steps, mean, color=f"C{i % 10}", lw=1.5, marker="o", ms=3, label=f"{name} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                                color=f"C{i % 10}", alpha=0.15, lw=0)
    for ax, title in ((ax_all, "validation loss, mean ± std over seeds"),
                      (ax_end, "second half of training")):
        if target is not None:
            ax.axhline(target, color="k", lw=0.8, ls=":", label="topk final (mean)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation loss (nats / token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_all.legend(fontsize="small", ncols=2)
    if zoom_vals and last_step:
        lo, hi = min(zoom_vals), max(zoom_vals)
        pad = 0.05 * (hi - lo) + 1e-3
        ax_end.set_xlim(last_step / 2 - last_step / 40, last_step + last_step / 40)
        ax_end.set_ylim(lo - pad, hi + pad)
    path = fig_dir / "valid_loss.png"
    fig.savefig(path, dpi=plot.DPI, format="png")
    written.append(("validation loss, mean over seeds", path))
    # acmoe-plot on the first seed's runs: loss overlay + the AC run's expert load and routing health
    seed = min((r["seed"] for res in results.values() for r in res), default=None)
    names = sorted(results, key=lambda n: (n != "ac", [r.name for r in ROWS].index(n)))
    dirs = [(n, plan.runs_root / n / f"seed{seed}") for n in names]
    dirs = [(n, d) for n, d in dirs if (d / "tensorboard").is_dir()]
    if dirs:
        sub = fig_dir / f"seed{seed}"
        try:
            plot.make_plots([plot.load_run(d, n) for n, d in dirs], sub)
            (sub / "expert_load_over_time.png").unlink(missing_ok=True)  # not shown: keep the results small
        except plot.PlotError as err:
            print(f"[quality] acmoe-plot: {err}", file=sys.stderr)
        else:
            for name, cap in (("loss", f"train and validation loss, seed {seed}, every row (acmoe-plot)"),
                              ("routing", f"router instability and AC separation, {dirs[0][0]} seed {seed}"),
                              ("expert_load", f"expert load at the end, {dirs[0][0]} seed {seed}")):
                if (sub / f"{name}.png").is_file():
                    written.append((cap, sub / f"{name}.png"))
    elif (fig_dir / "seed1" / "loss.png").is_file():  # --report-only without run dirs: keep the old ones
        written += [(f"{n} (seed 1, acmoe-plot)", fig_dir / "seed1" / f"{n}.png") for n in ("loss", "routing", "expert_load")
                    if (fig_dir / "seed1" / f"{n}.png").is_file()]
    return written


# ---------------------------------------------------------------------------------------------
# CLI


def build_plan(args) -> Plan:
    cpu_defaults = args.config is None
    config = args.config or DEFAULT_CONFIG
    base: list[str] = list(CPU_DEFAULTS) if cpu_defaults else []
    steps = args.steps if args.steps is not None else (CPU_DEFAULT_STEPS if cpu_defaults else None)
    if steps is not None:
        base.append(f"megatron.train_iters={steps}")
        base.append(f"megatron.save_interval={steps}")  # one checkpoint: the final one
    base = merge_overrides(base + list(args.set or []))
    if args.threads:
        threads = args.threads
    else:
        threads = max(1, (os.cpu_count() or 1) // (args.jobs * args.nproc))
    results_dir = Path(args.out).with_suffix("")
    return Plan(config=config, base=base, nproc=args.nproc, runs_root=Path(args.runs_dir), results_dir=results_dir,
                corrupt_data=Path(args.corrupt_data) if args.corrupt_data else None, threads=threads,
                cpu_defaults=cpu_defaults, command=getattr(args, "command_line", ""))


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
    p.add_argument("--rerun", action="store_true", help="train again even where a stored result exists")
    p.add_argument("--report-only", action="store_true", help="only regenerate the results file from stored JSONs")
    p.add_argument("--reextract", action="store_true",
                   help="with --report-only: first refresh the stored JSONs' TensorBoard-derived fields from the "
                        "run directories that still exist (losses and training untouched)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.nproc < 1:
        p.error("--jobs and --nproc must be >= 1")
    given = argv if argv is not None else sys.argv[1:]
    args.command_line = shlex.join(["python", "benchmarks/quality.py", *given])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows, seeds = select_rows(args.rows), parse_seeds(args.seeds)
    plan = build_plan(args)
    from acmoe_megatron.config import ConfigError, load_recipe

    try:
        base_recipe = load_recipe(plan.config, plan.base)
        bhash = base_hash(plan)
    except ConfigError as err:
        print(f"quality.py: config error: {err}", file=sys.stderr)
        return 2
    corrupt_dir = None
    failures: dict[str, str] = {}
    if not args.report_only:
        if not (Path(base_recipe.data.path) / "manifest.json").is_file():
            from acmoe_megatron.launcher import ensure_data

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
        corrupt_dir = plan.corrupt_data or Path(f"{base_recipe.data.path.rstrip('/')}_wordswap{CORRUPTION.split(':')[1]}")
        if args.skip_corrupt or not (corrupt_dir / "manifest.json").is_file():
            corrupt_dir = None
    args.elapsed = None if args.report_only else time.perf_counter() - t0
    out = write_report(args, plan, rows, seeds, bhash, failures, corrupt_info(corrupt_dir))
    print(f"[quality] wrote {_rel(out)}" + (f" ({args.elapsed / 60:.1f} min)" if args.elapsed else ""), flush=True)
    print(out.read_text().split("## Verdict", 1)[-1].split("## Figures")[0].strip(), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
