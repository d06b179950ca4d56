"""Figures of the routing metrics, drawn once for both consumers: the expert-load heatmap (MoE layers
x experts) and the AC weight distribution per AC layer. ``metrics.flush`` writes them into
TensorBoard as images every ``run.image_interval`` steps; ``acmoe-plot`` saves the heatmap as a PNG.
matplotlib's object API only (no pyplot state), so drawing in the training process is safe.
"""

from __future__ import annotations

import math

import numpy as np

DPI = 100


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def expert_load_figure(rows, layers: list[int], step: int, label: str | None = None,
                       size: tuple[float, float] = (9.0, 4.0)):
    """Heatmap of the load fraction of each expert (columns) in each MoE layer (rows)."""
    rows = np.asarray(rows, dtype=float)
    n_experts = rows.shape[1]
    fig = _figure(size)
    ax = fig.add_subplot()
    finite = rows[np.isfinite(rows)]
    vmax = max(float(finite.max()) if finite.size else 0.0, 1.0 / n_experts)
    im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    if rows.size <= 256:
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 * vmax else "black")
    if n_experts <= 32:
        ax.set_xticks(range(n_experts))
    ax.set_yticks(range(len(layers)), [f"layer {L:02d}" for L in layers])
    ax.set_xlabel("expert")
    prefix = f"{label}: " if label else ""
    ax.set_title(f"{prefix}expert load fraction at iteration {step} (uniform = 1/{n_experts})")
    fig.colorbar(im, ax=ax, label="fraction of routed token slots")
    return fig


def ac_weight_figure(counts_by_layer: dict[int, np.ndarray], edges, step: int,
                     size: tuple[float, float] = (7.0, 4.0)):
    """Per AC layer, the share of AC weights (clusters in use x features) in each log-spaced bin."""
    edges = np.asarray(edges, dtype=float)
    centers = np.sqrt(edges[:-1] * edges[1:])
    fig = _figure(size)
    ax = fig.add_subplot()
    for layer, counts in sorted(counts_by_layer.items()):
        counts = np.asarray(counts, dtype=float)
        ax.plot(centers, counts / max(counts.sum(), 1.0), marker="o", ms=3, label=f"layer {layer:02d}")
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("AC weight m (1 = identity; log scale)")
    ax.set_ylabel("share of weights")
    ax.set_title(f"AC weight distribution over the log interval ending at iteration {step}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig
