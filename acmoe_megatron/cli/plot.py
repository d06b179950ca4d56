"""``acmoe-plot``: PNG figures from a run's TensorBoard event files.

Usage::

    acmoe-plot RUN_DIR [RUN_DIR ...] [--out DIR] [--label NAME ...]

Each RUN_DIR is a run directory (``<run_dir>/tensorboard/`` holds the event files; a directory that
holds event files itself is accepted too). Figures written to ``--out`` (default
``<first RUN_DIR>/plots``):

``loss.png``
    train ``lm loss`` (solid) and ``lm loss validation`` (dashed, markers) against the training
    iteration, every run overlaid; the legend is ``--label`` or the run's ``summary.json``
    ``name (router)`` or the directory name.
``expert_load.png``
    first run: heatmap of the expert-load fractions (rows = MoE layers, columns = experts) at the
    last logged step (``moe/layerLL/load_fraction/expertJJ``); a uniform router is 1/E everywhere.
``expert_load_over_time.png``
    first run: one small heatmap per MoE layer, experts x logged steps.
``routing.png``
    first run, only when logged: router instability (``moe/layerLL/instability``, 1 - Rand index
    against the previous MoE layer) per layer, and the AC cluster separation ratios
    (``ac/layerLL/separation_raw`` solid, ``separation_ac`` dashed) over time.

Figure sizes are fixed (``FIGURE_SIZES`` at ``DPI``) so the PNGs always have the same pixel size.
Matplotlib is used through ``matplotlib.figure.Figure`` with the Agg canvas: no display, no pyplot
global state. Exit code 2 (and a message on stderr) when a run has no event files or scalars.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from acmoe_megatron.observability.summary import read_scalars

DPI = 100
# name -> (width, height) in inches; at DPI the PNG is exactly width*DPI x height*DPI pixels.
FIGURE_SIZES: dict[str, tuple[float, float]] = {
    "loss": (8.0, 5.0),  # 800 x 500 px
    "expert_load": (8.0, 5.0),  # 800 x 500 px
    "expert_load_over_time": (12.0, 8.0),  # 1200 x 800 px
    "routing": (12.0, 5.0),  # 1200 x 500 px
}

TRAIN_LOSS = "lm loss"
VALID_LOSS = "lm loss validation"
_LOAD_RE = re.compile(r"^moe/layer(\d+)/load_fraction/expert(\d+)$")
_INSTABILITY_RE = re.compile(r"^moe/layer(\d+)/instability$")
_SEPARATION_RE = re.compile(r"^ac/layer(\d+)/separation_(raw|ac)$")

Series = dict[str, list[tuple[int, float]]]


class PlotError(Exception):
    """A user-facing problem (missing events, bad arguments): printed, exit code 2."""


@dataclass
class Run:
    dir: Path
    label: str
    scalars: Series


def figure_pixels(name: str) -> tuple[int, int]:
    """The (width, height) in pixels of figure ``name`` (``loss``, ``expert_load``, ...)."""
    w, h = FIGURE_SIZES[name]
    return int(round(w * DPI)), int(round(h * DPI))


# ----------------------------------------------------------------------------------------- reading
def event_dir(run_dir: Path) -> Path:
    """``<run_dir>/tensorboard`` or, if ``run_dir`` holds event files itself, ``run_dir``."""
    tb = run_dir / "tensorboard"
    if tb.is_dir():
        return tb
    if any(run_dir.glob("events.out.tfevents*")):
        return run_dir
    return tb


def _has_event_files(tb_dir: Path) -> bool:
    return tb_dir.is_dir() and any(tb_dir.rglob("events.out.tfevents*"))


def run_label(run_dir: Path) -> str:
    """``name (router)`` from ``summary.json`` where present, else the directory name."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    name, router = summary.get("name"), summary.get("router")
    if name and router:
        return f"{name} ({router})"
    return str(name or router or run_dir.resolve().name)


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Read every scalar series of ``run_dir``; PlotError when there is nothing to read."""

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"run directory {run_dir} does not exist")
    tb = event_dir(run_dir)
    if not _has_event_files(tb):
        raise PlotError(
            f"no TensorBoard event files in {tb} (run directory {run_dir}): "
            "run training first (acmoe-train / acmoe-pretrain CONFIG), then plot its run directory"
        )
    scalars = read_scalars(tb)
    if not scalars:
        raise PlotError(
            f"the event files in {tb} hold no scalars yet (run directory {run_dir}): "
            "run training first, at least up to its first log interval"
        )
    return Run(run_dir, label or run_label(run_dir), scalars)


def _dedupe_labels(runs: list[Run]) -> None:
    """Two runs with the same label get their directory name appended."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} [{r.dir.resolve().name}]"


# -------------------------------------------------------------------------------------- extracting
def _steps_values(points):
    return [p[0] for p in points], [p[1] for p in points]


def load_fractions(scalars: Series) -> dict[int, dict[int, list[tuple[int, float]]]]:
    """layer -> expert -> [(step, fraction)] from ``moe/layerLL/load_fraction/expertJJ``."""
    out: dict[int, dict[int, list[tuple[int, float]]]] = {}
    for tag, points in scalars.items():
        m = _LOAD_RE.match(tag)
        if m:
            out.setdefault(int(m.group(1)), {})[int(m.group(2))] = points
    return out


def _per_layer(scalars: Series, pattern: re.Pattern) -> dict:
    """Tags matching ``pattern`` keyed by its groups (layer, or (layer, kind))."""
    out = {}
    for tag, points in scalars.items():
        m = pattern.match(tag)
        if m:
            groups = tuple(int(g) if g.isdigit() else g for g in m.groups())
            out[groups[0] if len(groups) == 1 else groups] = points
    return out


def last_load_matrix(loads) -> tuple[list[int], int, list[list[float]], int]:
    """(layers, n_experts, rows, step): each layer's fractions at its last logged step."""
    layers = sorted(loads)
    n_experts = max(max(per_expert) for per_expert in loads.values()) + 1
    rows, last_step = [], 0
    for layer in layers:
        row = [math.nan] * n_experts
        for j, points in loads[layer].items():
            if points:
                row[j] = points[-1][1]
                last_step = max(last_step, points[-1][0])
        rows.append(row)
    return layers, n_experts, rows, last_step


def load_over_time(per_expert: dict[int, list[tuple[int, float]]], n_experts: int):
    """(steps, matrix experts x steps) for one layer; NaN where an expert missed a step."""
    steps = sorted({s for points in per_expert.values() for s, _ in points})
    col = {s: i for i, s in enumerate(steps)}
    matrix = [[math.nan] * len(steps) for _ in range(n_experts)]
    for j, points in per_expert.items():
        for s, v in points:
            matrix[j][col[s]] = v
    return steps, matrix


# ---------------------------------------------------------------------------------------- figures
def _figure(name: str):
    from matplotlib.figure import Figure

    return Figure(figsize=FIGURE_SIZES[name], dpi=DPI, layout="constrained")


def _save(fig, out_dir: Path, name: str) -> Path:
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": the pixel size stays fixed
    return path


def plot_loss(runs: list[Run], out_dir: Path) -> Path | None:
    """Train and validation loss of every run, overlaid; None when no run logged a loss."""
    if not any(TRAIN_LOSS in r.scalars or VALID_LOSS in r.scalars for r in runs):
        return None
    fig = _figure("loss")
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        if TRAIN_LOSS in run.scalars:
            ax.plot(*_steps_values(run.scalars[TRAIN_LOSS]), color=color, lw=1.5,
                    label=f"{run.label} train")
        if VALID_LOSS in run.scalars:
            ax.plot(*_steps_values(run.scalars[VALID_LOSS]), color=color, lw=1.5, ls="--",
                    marker="o", ms=4, label=f"{run.label} validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("LM loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out_dir, "loss")


def plot_expert_load(run: Run, out_dir: Path) -> Path | None:
    """Layer x expert heatmap of the load fractions at the last logged step."""
    loads = load_fractions(run.scalars)
    if not loads:
        return None
    layers, n_experts, rows, step = last_load_matrix(loads)
    from acmoe_megatron.observability.figures import expert_load_figure

    fig = expert_load_figure(rows, layers, step, label=run.label, size=FIGURE_SIZES["expert_load"])
    return _save(fig, out_dir, "expert_load")


def plot_expert_load_over_time(run: Run, out_dir: Path) -> Path | None:
    """One heatmap per MoE layer: experts x logged steps, one shared colour scale."""
    loads = load_fractions(run.scalars)
    if not loads:
        return None
    layers = sorted(loads)
    n_experts = max(max(per_expert) for per_expert in loads.values()) + 1
    data = {L: load_over_time(loads[L], n_experts) for L in layers}
    values = [v for _, m in data.values() for row in m for v in row if not math.isnan(v)]
    vmax = max(values + [1.0 / n_experts])
    ncols = min(4, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig = _figure("expert_load_over_time")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    for k, L in enumerate(layers):
        ax = axes[k // ncols][k % ncols]
        steps, matrix = data[L]
        im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                       interpolation="nearest", origin="lower",
                       extent=_extent(steps, n_experts))
        ax.set_title(f"layer {L:02d}", fontsize="medium")
        ax.set_xlabel("iteration", fontsize="small")
        ax.set_ylabel("expert", fontsize="small")
        ax.tick_params(labelsize="small")
    for k in range(len(layers), nrows * ncols):
        axes[k // ncols][k % ncols].set_axis_off()
    fig.suptitle(f"{run.label}: expert load fraction over time (uniform = 1/{n_experts})")
    fig.colorbar(im, ax=axes, label="fraction of routed token slots")
    return _save(fig, out_dir, "expert_load_over_time")


def _extent(steps: list[int], n_experts: int) -> tuple[float, float, float, float]:
    """imshow extent putting each logged step at its iteration on the x axis."""
    if len(steps) == 1:
        half = 0.5
    else:
        half = (steps[-1] - steps[0]) / (len(steps) - 1) / 2
    return steps[0] - half, steps[-1] + half, -0.5, n_experts - 0.5


def plot_routing(run: Run, out_dir: Path) -> Path | None:
    """Instability per layer and AC separation ratios over time; None when neither is logged."""
    instability = _per_layer(run.scalars, _INSTABILITY_RE)
    separation = _per_layer(run.scalars, _SEPARATION_RE)
    if not instability and not separation:
        return None
    fig = _figure("routing")
    ax_inst, ax_sep = fig.subplots(1, 2)
    for i, L in enumerate(sorted(instability)):
        ax_inst.plot(*_steps_values(instability[L]), color=f"C{i % 10}", label=f"layer {L:02d}")
    ax_inst.set_ylim(-0.02, 1.02)
    ax_inst.set_title("router instability (1 - Rand index vs previous MoE layer)")
    _finish_axis(ax_inst, "instability", bool(instability), "no moe/*/instability logged")
    layers = sorted({L for L, _ in separation})
    for i, L in enumerate(layers):
        color = f"C{i % 10}"
        if (L, "raw") in separation:
            ax_sep.plot(*_steps_values(separation[(L, "raw")]), color=color, label=f"layer {L:02d} raw")
        if (L, "ac") in separation:
            ax_sep.plot(*_steps_values(separation[(L, "ac")]), color=color, ls="--",
                        label=f"layer {L:02d} AC")
    ax_sep.set_title("cluster separation (between-centroid dist / within-cluster MAD)")
    _finish_axis(ax_sep, "separation ratio", bool(separation), "no ac/*/separation_* logged")
    fig.suptitle(f"{run.label}: routing health")
    return _save(fig, out_dir, "routing")


def _finish_axis(ax, ylabel: str, has_data: bool, empty_text: str) -> None:
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if has_data:
        ax.legend(fontsize="x-small", ncols=2)
    else:
        ax.text(0.5, 0.5, empty_text, ha="center", va="center", transform=ax.transAxes)


# ------------------------------------------------------------------------------------------- CLI
def make_plots(runs: list[Run], out_dir: Path) -> list[Path]:
    """Write every figure the runs have data for; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    first = runs[0]
    written = [
        plot_loss(runs, out_dir),
        plot_expert_load(first, out_dir),
        plot_expert_load_over_time(first, out_dir),
        plot_routing(first, out_dir),
    ]
    return [p for p in written if p is not None]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="acmoe-plot",
        description="PNG figures (loss curves, expert-load heatmaps, routing health) from the "
        "TensorBoard event files of one or more run directories.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directory (with tensorboard/ inside); several are overlaid in loss.png")
    p.add_argument("--out", metavar="DIR", help="output directory (default: <first RUN_DIR>/plots)")
    p.add_argument("--label", nargs="+", metavar="NAME",
                   help="legend names, one per RUN_DIR (default: summary.json name (router))")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.label is not None and len(args.label) != len(args.run_dirs):
            raise PlotError(f"--label got {len(args.label)} names for {len(args.run_dirs)} run directories")
        labels = args.label or [None] * len(args.run_dirs)
        runs = [load_run(d, lab) for d, lab in zip(args.run_dirs, labels)]
    except PlotError as e:
        print(f"acmoe-plot: error: {e}", file=sys.stderr)
        return 2
    if args.label is None:
        _dedupe_labels(runs)
    out_dir = Path(args.out) if args.out else Path(args.run_dirs[0]) / "plots"
    written = make_plots(runs, out_dir)
    if not any(load_fractions(runs[0].scalars)):
        print(f"acmoe-plot: note: {runs[0].dir} logged no moe/*/load_fraction/* tags; "
              "no expert-load figures", file=sys.stderr)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
