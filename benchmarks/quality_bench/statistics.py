"""Pure statistics of the router-quality benchmark (no I/O; unit-tested in
tests/unit/benchmarks/test_quality_benchmark.py): mean and sample std over seeds (``mean_std``), the seed-mean
validation curve and the step at which it reaches a target loss (``mean_curve``,
``steps_to_target``), one row's aggregate (``aggregate_row``), differences paired by seed with
their Student-t 95 % confidence interval (``paired_diff``, ``ci95``, ``fmt_paired``), and the
verdict lines that state the benchmark's goals from the numbers (``compare``, ``verdict``).
"""

from __future__ import annotations

import math
import statistics  # the standard library's (absolute import), not this module

from .rows import DEFAULT_ROWS

STEPS_GOAL = 0.8  # AC should reach topk's final validation loss in <= 80 % of topk's steps


# ---------------------------------------------------------------------------------------------
# pure aggregation (unit-tested in tests/unit/benchmarks/test_quality_benchmark.py)


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
    # every other row (baselines and investigation rows): against ac and topk, paired by seed
    for name, agg in aggs.items():
        if name in ("ac", "topk") or not agg["n"]:
            continue
        parts = []
        for ref in ("ac", "topk"):
            if aggs.get(ref, {}).get("n"):
                diff = fmt_paired(*paired_diff(results[ref], results[name], "final_valid_loss"))
                parts.append(f"{name} − {ref} = {diff}")
        kind = "baseline row" if name in DEFAULT_ROWS else "investigation row"
        lines.append(f"- {kind} `{name}`: validation loss {fmt(agg['loss'][0])}; paired "
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
