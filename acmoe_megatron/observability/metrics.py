"""MoE and AC routing metrics: accumulated on the device per step, reduced once per log interval.

Routers call ``RouterMetrics.record_routing`` (every MoE layer) and ``record_ac`` (AC layers) in
their training forward; everything stays on the device (no host sync per layer per step). At each
log interval ``flush`` packs the accumulators of all MoE layers of the model into one tensor (zeros
for layers that live on other pipeline stages), all-reduces it once over the world, and the rank
that owns megatron's TensorBoard writer writes the scalars. That sidesteps both limits of megatron's
``MoEMetricsTracker`` path: its training loop reports only a fixed list of names, and with pipeline
parallelism only the last rank writes TensorBoard (stage 0's layers would be missing).

Per MoE layer L (tags ``moe/layerLL/...``): load fraction of each expert (routed slots), max/mean
load, coefficient of variation of the load, router entropy (of the softmax over all experts' logits,
≤ ln E), dropped-slot fraction (with a capacity factor), and router instability against the previous
MoE layer: 1 − Rand index of the two layers' top-1 partitions over the first ``sample`` tokens of the
micro-batch (spec §6.4), in [0, 1]. Per AC layer (``ac/layerLL/...``): mean and max of the AC
weights, the fraction of weights at the clip, the mean per-cluster MAD, and the cluster separation
ratio — mean between-centroid L1 distance per feature over the mean within-cluster MAD — in the raw
and in the AC-transformed space (x ↦ x ⊙ w_c, so centroids become μ_c ⊙ w_c and MADs MAD_c ⊙ w_c).
With running statistics (``acmoe.source=ema``) the clusters are the micro-batch's and w the running
weights that routed it; the clip rate is that of the running MADs.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from acmoe_megatron.core.ac_stats import inverse_dispersion, masked_mean
from acmoe_megatron.observability import figures

PER_EXPERT_MAX = 16  # run.per_expert_scalars_max: per-expert scalar tags only up to this many experts
ROUTING_FIELDS = 6  # tokens, entropy sum, dropped slots, instability sum, instability count, calls
AC_SUMMARY_FIELDS = 7  # calls, weight mean, weight max, clip rate, mad mean, separation raw, separation ac
AC_WEIGHT_BINS = torch.logspace(-3, 3, 25)  # edges of the AC weight histogram (log10 w in [-3, 3], 24 bins)
AC_FIELDS = AC_SUMMARY_FIELDS + len(AC_WEIGHT_BINS) - 1


class RouterMetrics:
    """Device-side accumulators for the MoE layers of one model chunk."""

    def __init__(self, num_experts: int, moe_layer_numbers: list[int], sample: int = 256):
        self.num_experts = num_experts
        self.moe_layer_numbers = sorted(moe_layer_numbers)
        self.sample = sample
        self._routing: dict[int, torch.Tensor] = {}  # layer -> [E + ROUTING_FIELDS]
        self._ac: dict[int, torch.Tensor] = {}  # layer -> [AC_FIELDS]

    def _slot(self, table, layer, size, like):
        if layer not in table:
            table[layer] = torch.zeros(size, dtype=torch.float32, device=like.device)
        return table[layer]

    @torch.no_grad()
    def record_routing(self, layer: int, logits_TE: torch.Tensor, routing_map_TE: torch.Tensor,
                       top1_T: torch.Tensor, prev_top1_T: torch.Tensor | None, topk: int) -> None:
        E = self.num_experts
        acc = self._slot(self._routing, layer, E + ROUTING_FIELDS, logits_TE)
        logp = torch.log_softmax(logits_TE.detach().float().reshape(-1, E), dim=-1)
        T = logp.shape[0]
        acc[:E] += routing_map_TE.sum(0).float()
        acc[E] += T
        acc[E + 1] += -(logp.exp() * logp).sum()
        acc[E + 2] += T * topk - routing_map_TE.sum().float()
        if prev_top1_T is not None and prev_top1_T.shape[0] == T:
            acc[E + 3] += rand_disagreement(prev_top1_T[: self.sample], top1_T[: self.sample])
            acc[E + 4] += 1
        acc[E + 5] += 1

    @torch.no_grad()
    def record_ac(self, layer: int, counts_K, mean_KD, mad_KD, w_KD, rows_K, eps: float, clip: float,
                  weight_mad_KD=None) -> None:
        """This micro-batch's clusters (counts, means, MADs) and the weights ``w_KD`` that route them;
        ``weight_mad_KD``: the MADs ``w_KD`` was computed from, when not this micro-batch's (running
        statistics), with ``rows_K`` the clusters of its clip mean."""
        acc = self._slot(self._ac, layer, AC_FIELDS, w_KD)
        acc[:AC_SUMMARY_FIELDS] += ac_summary(counts_K, mean_KD, mad_KD, w_KD, rows_K, eps, clip, weight_mad_KD)
        acc[AC_SUMMARY_FIELDS:] += weight_histogram(w_KD, rows_K)

    def reset(self) -> None:
        for table in (self._routing, self._ac):
            for value in table.values():
                value.zero_()

    def pack(self, device) -> torch.Tensor:
        """``[n_moe_layers, E + ROUTING_FIELDS + AC_FIELDS]``; zeros for layers not recorded here."""
        width = self.num_experts + ROUTING_FIELDS + AC_FIELDS
        out = torch.zeros(len(self.moe_layer_numbers), width, dtype=torch.float32, device=device)
        for i, layer in enumerate(self.moe_layer_numbers):
            if layer in self._routing:
                out[i, : self.num_experts + ROUTING_FIELDS] = self._routing[layer]
            if layer in self._ac:
                out[i, self.num_experts + ROUTING_FIELDS:] = self._ac[layer]
        return out


def weight_histogram(w_KD: torch.Tensor, rows_K: torch.Tensor) -> torch.Tensor:
    """Counts of the AC weights of the clusters in use over ``AC_WEIGHT_BINS`` (values outside the
    range go to the end bins); on the device, no sync."""
    edges = AC_WEIGHT_BINS.to(w_KD.device, torch.float32)
    w = w_KD.float().clamp(edges[0], edges[-1])
    idx = (torch.bucketize(w, edges[1:-1], right=True)).reshape(w.shape)
    counts = torch.zeros(len(edges) - 1, device=w_KD.device, dtype=torch.float32)
    weights = rows_K.float().unsqueeze(1).expand_as(w).reshape(-1)
    return counts.index_add_(0, idx.reshape(-1), weights)


def rand_disagreement(a_N: torch.Tensor, b_N: torch.Tensor) -> torch.Tensor:
    """1 − Rand index of two labelings: the fraction of token pairs that one groups and the other
    separates (spec §6.4)."""
    n = a_N.shape[0]
    same_a = a_N.unsqueeze(0) == a_N.unsqueeze(1)
    same_b = b_N.unsqueeze(0) == b_N.unsqueeze(1)
    return (same_a != same_b).float().sum() / max(n * (n - 1), 1)


def separation(center_KD: torch.Tensor, mad_KD: torch.Tensor, present_K: torch.Tensor) -> torch.Tensor:
    """Mean between-centroid L1 distance per feature over the mean within-cluster MAD."""
    diff_KK = (center_KD.unsqueeze(0) - center_KD.unsqueeze(1)).abs().mean(-1)
    pair_KK = present_K.unsqueeze(0) & present_K.unsqueeze(1)
    pair_KK = pair_KK & ~torch.eye(len(present_K), dtype=torch.bool, device=present_K.device)
    between = (diff_KK * pair_KK).sum() / pair_KK.sum().clamp_min(1)
    within = masked_mean(mad_KD, present_K)
    return between / within.clamp_min(1e-12)


@torch.no_grad()
def ac_summary(counts_K, mean_KD, mad_KD, w_KD, rows_K, eps: float, clip: float,
               weight_mad_KD=None) -> torch.Tensor:
    """[1, weight mean (per token), weight max, clip rate, MAD mean, separation raw, separation AC]
    over the clusters present in the micro-batch; the clip rate is that of the MADs the weights were
    computed from (``weight_mad_KD``, default this micro-batch's ``mad_KD``)."""
    present_K = counts_K > 0
    D = w_KD.shape[1]
    weight_mean = (counts_K.unsqueeze(1) * w_KD).sum() / (counts_K.sum() * D).clamp_min(1.0)
    weight_max = torch.where(present_K.unsqueeze(1), w_KD, torch.zeros_like(w_KD)).amax()
    w0_KD = inverse_dispersion(mad_KD if weight_mad_KD is None else weight_mad_KD, eps)
    threshold = clip * masked_mean(w0_KD, rows_K)
    clip_rate = ((w0_KD >= threshold) & present_K.unsqueeze(1)).float().sum() / (present_K.sum() * D).clamp_min(1)
    return torch.stack([
        torch.ones((), device=w_KD.device),
        weight_mean,
        weight_max,
        clip_rate,
        masked_mean(mad_KD, present_K),
        separation(mean_KD, mad_KD, present_K),
        separation(mean_KD * w_KD, mad_KD * w_KD, present_K),
    ]).float()


def flush(all_metrics: list[RouterMetrics], writer, iteration: int, per_expert_max: int = PER_EXPERT_MAX,
          images: bool = False) -> dict:
    """Reduce every rank's accumulators (one all-reduce over the world), write the scalars on the
    writer rank, reset. Collective: every rank must call it at the same iterations.

    Tag budget: one ``load_fraction/expertNN`` scalar per expert only while ``num_experts`` <=
    ``per_expert_max`` (TensorBoard slows down with thousands of tags: 16 layers x 64 experts would be
    1024); every layer's whole load distribution is always written as one histogram. ``images``:
    also the expert-load heatmap (MoE layers x experts) and the AC weight distribution per AC layer
    as TensorBoard images (``images/expert_load``, ``images/ac_weights``; metrics_figures.py)."""
    if not all_metrics:
        return {}
    ref = all_metrics[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed = sum(m.pack(device) for m in all_metrics)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
    for m in all_metrics:
        m.reset()
    values = packed.cpu()
    E = ref.num_experts
    scalars: dict[str, float] = {}
    for i, layer in enumerate(ref.moe_layer_numbers):
        row = values[i]
        slots, tokens = row[:E], float(row[E])
        if tokens == 0:
            continue
        tag = f"moe/layer{layer:02d}"
        total = float(slots.sum())
        frac = slots / max(total, 1.0)
        if E <= per_expert_max:
            for j in range(E):
                scalars[f"{tag}/load_fraction/expert{j:02d}"] = float(frac[j])
        mean = float(frac.mean())
        scalars[f"{tag}/load_max_over_mean"] = float(frac.max()) / mean if mean > 0 else 0.0
        scalars[f"{tag}/load_cv"] = float(frac.std(unbiased=False)) / mean if mean > 0 else 0.0
        scalars[f"{tag}/router_entropy"] = float(row[E + 1]) / tokens
        scalars[f"{tag}/dropped_fraction"] = float(row[E + 2]) / max(float(row[E + 2]) + total, 1.0)
        if float(row[E + 4]) > 0:
            scalars[f"{tag}/instability"] = float(row[E + 3]) / float(row[E + 4])
        ac = row[E + ROUTING_FIELDS:E + ROUTING_FIELDS + AC_SUMMARY_FIELDS]
        calls = float(ac[0])
        if calls > 0:  # an AC layer
            names = ["weight_mean", "weight_max", "clip_rate", "cluster_mad_mean", "separation_raw", "separation_ac"]
            for k, name in enumerate(names, 1):
                scalars[f"ac/layer{layer:02d}/{name}"] = float(ac[k]) / calls
    if writer is not None:
        for tag, value in scalars.items():
            if math.isfinite(value):
                writer.add_scalar(tag, value, iteration)
        for i, layer in enumerate(ref.moe_layer_numbers):  # the load distribution as a histogram
            slots = values[i, :E]
            if float(slots.sum()) > 0:
                writer.add_histogram(f"moe/layer{layer:02d}/load_fraction", slots / slots.sum(), iteration)
        if images:
            load_LE, weights = images_data(values, ref)
            if load_LE is not None:
                writer.add_figure("images/expert_load", figures.expert_load_figure(load_LE, ref.moe_layer_numbers,
                                                                                   iteration), iteration)
            if weights:
                writer.add_figure("images/ac_weights", figures.ac_weight_figure(weights, AC_WEIGHT_BINS, iteration),
                                  iteration)
    return scalars


def images_data(values: torch.Tensor, ref: RouterMetrics):
    """(load fraction per MoE layer x expert, or None; {AC layer: weight-histogram counts})."""
    E = ref.num_experts
    slots = values[:, :E]
    totals = slots.sum(1, keepdim=True)
    load_LE = (slots / totals.clamp_min(1.0)).numpy() if bool((totals > 0).any()) else None
    start = E + ROUTING_FIELDS + AC_SUMMARY_FIELDS
    weights = {layer: values[i, start:].numpy() for i, layer in enumerate(ref.moe_layer_numbers)
               if float(values[i, start:].sum()) > 0}
    return load_LE, weights
