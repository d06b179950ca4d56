"""Figures of the router-quality benchmark: the seed-mean validation curves of every row from the
per-run JSONs (``valid_loss.png``), plus ``acmoe-plot`` of the first seed's run directories when
they still exist (``make_figures``).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from .rows import ROWS, Plan


def make_figures(plan: Plan, results: dict[str, list[dict]], aggs: dict[str, dict], fig_dir: Path):
    """valid_loss.png: seed-mean validation curves (± std band) of every row, from the JSONs;
    plus ``acmoe-plot`` of the first seed's run directories (when they exist) into seed<k>/."""
    from acmoe_megatron.cli import plot
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
