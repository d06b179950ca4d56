"""Adaptive Clustering statistics as pure tensor functions (ACMoE, ICLR 2025, Definition 1).

For the tokens x_i of the current MoE layer, grouped into clusters by their top-1 expert c_i at the
*previous* MoE layer, the AC transform is a diagonal matrix per cluster k,

    M_k = diag(m_1k .. m_dk),   m_qk ∝ 1 / (MAD_qk + eps),
    MAD_qk = 1/N_k Σ_{i∈C_k} |x_iq − μ_qk|,   μ_qk = 1/N_k Σ_{i∈C_k} x_iq,

clipped at ``clip`` × mean(m) and normalised (spec §3.1 steps 3–7 for the language-model release;
§3.4 for the Swin and Soft-MoE constants). The router then scores

    s_j(x_i) = e_j^T M_{c_i} x_i / ||e_j||                                  (Definition 2)

Everything here runs under ``no_grad`` in fp32 (spec §4.5) and without a host sync (no
``.item()``, no data-dependent shapes), so the AC path is CUDA-graph and sync-debug safe.

Distributed statistics: ``cluster_stats`` takes an optional in-place ``all_reduce`` (sum) and then
reduces the sufficient statistics — counts and per-cluster sums, then the absolute-deviation sums
around the *global* means — so every rank of the group gets exactly the statistics of the union
of their tokens (two all-reduces of a K×D table per AC layer).

Weight modes (which clusters enter the clip and normalisation means):
  * ``"release"``: rows 0..K−1 with K = 1 + the largest expert index the previous layer used
    (any of its top-k columns), exactly as the official code; empty rows keep MAD = 0 and so get
    the maximal weight 1/eps, which is then clipped (spec §4.1);
  * ``"clean"``: only clusters with ≥ ``min_cluster_size`` tokens enter the means; smaller
    clusters get the identity transform (m = 1). Not in the paper; robust for tiny micro-batches.

Normalisations: ``"feature"`` (LM: each feature's weights average 1 over the clusters, after the
clip), ``"global_pre"`` (Swin: divide by the pre-clip global mean), ``"global_post"`` (Soft-MoE:
divide by the global mean of the clipped table).

Shape suffixes: T tokens, D hidden, K clusters (= number of experts), E experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from acmoe_megatron.core.settings import MODES, NORMS  # noqa: F401  (defined with the settings)

AllReduce = Callable[[torch.Tensor], None]  # in-place sum over a process group


def _onehot(labels_T: torch.Tensor, num_clusters: int, dtype: torch.dtype) -> torch.Tensor:
    """``[T, K]`` one-hot cluster membership (scatter: no bounds check, so no host sync)."""
    onehot_TK = torch.zeros(labels_T.shape[0], num_clusters, dtype=dtype, device=labels_T.device)
    return onehot_TK.scatter_(1, labels_T.unsqueeze(1), 1.0)


# The per-cluster sums are one-hot matmuls rather than ``index_add_``: with few clusters (E = 8..64)
# and thousands of tokens, scatter-add atomics on a K×D table serialise on the GPU, a GEMM does not.


@torch.no_grad()
def cluster_counts(labels_T: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Tokens per cluster as fp32 ``[K]``."""
    return _onehot(labels_T, num_clusters, torch.float32).sum(0)


@torch.no_grad()
def cluster_means(x_TD: torch.Tensor, labels_T: torch.Tensor, counts_K: torch.Tensor) -> torch.Tensor:
    """Per-cluster mean ``[K, D]``; an empty cluster keeps mean 0 (as ``index_reduce`` does)."""
    sums_KD = _onehot(labels_T, counts_K.shape[0], x_TD.dtype).t() @ x_TD
    return sums_KD / counts_K.clamp_min(1.0).unsqueeze(1)


@torch.no_grad()
def cluster_mad(
    x_TD: torch.Tensor, labels_T: torch.Tensor, mean_KD: torch.Tensor, counts_K: torch.Tensor
) -> torch.Tensor:
    """Per-cluster, per-feature mean absolute deviation ``[K, D]`` around the cluster mean."""
    dev_TD = torch.sub(x_TD, torch.index_select(mean_KD, 0, labels_T)).abs_()
    mad_KD = _onehot(labels_T, mean_KD.shape[0], x_TD.dtype).t() @ dev_TD
    return mad_KD / counts_K.clamp_min(1.0).unsqueeze(1)


@dataclass
class ClusterStats:
    """Per-cluster token counts ``[K]``, means and MADs ``[K, D]`` (fp32)."""

    counts_K: torch.Tensor
    mean_KD: torch.Tensor
    mad_KD: torch.Tensor


@torch.no_grad()
def cluster_stats(
    x_TD: torch.Tensor, labels_T: torch.Tensor, num_clusters: int, all_reduce: AllReduce | None = None
) -> ClusterStats:
    """Counts, means and MADs of the clusters; with ``all_reduce``, of the union over the group."""
    x_TD = x_TD.float()  # no_grad: no detach needed
    labels_T = labels_T.long()
    onehot_KT = _onehot(labels_T, num_clusters, torch.float32).t()
    if all_reduce is None:
        sums_KD, counts_K = onehot_KT @ x_TD, onehot_KT.sum(1)
    else:  # one collective for sums and counts: [sums | n]
        first_KD1 = torch.cat([onehot_KT @ x_TD, onehot_KT.sum(1, keepdim=True)], dim=1)
        all_reduce(first_KD1)
        sums_KD, counts_K = first_KD1[:, :-1], first_KD1[:, -1]
    denom_K1 = counts_K.clamp_min(1.0).unsqueeze(1)
    mean_KD = sums_KD / denom_K1
    dev_TD = torch.sub(x_TD, torch.index_select(mean_KD, 0, labels_T)).abs_()
    dev_KD = onehot_KT @ dev_TD
    if all_reduce is not None:
        all_reduce(dev_KD)
    return ClusterStats(counts_K, mean_KD, dev_KD.div_(denom_K1))


@torch.no_grad()
def inverse_dispersion(mad_KD: torch.Tensor, eps: float) -> torch.Tensor:
    """w = 1 / (MAD + eps) (spec §3.1 step 5), fp32."""
    return torch.add(mad_KD.float(), eps).reciprocal_()


def _column_means(rows_K: torch.Tensor, dtype: torch.dtype):
    """A function giving the per-column mean ``[D]`` of a ``[K, D]`` table over the rows in
    ``rows_K``: one matrix-vector product over the row mask (one kernel, not mask-multiply-sum)."""
    rows_f_K = rows_K.to(dtype)
    n_rows = rows_f_K.sum().clamp_min(1.0)
    return lambda w_KD: torch.mv(w_KD.t(), rows_f_K).div_(n_rows)


def masked_mean(w_KD: torch.Tensor, rows_K: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``w_KD`` over the rows in ``rows_K`` (per column with ``dim=0``; all entries with None)."""
    colmean_D = _column_means(rows_K, w_KD.dtype)(w_KD)
    return colmean_D if dim == 0 else colmean_D.mean()


@torch.no_grad()
def clip_weights(w_KD: torch.Tensor, rows_K: torch.Tensor, clip: float) -> torch.Tensor:
    """w ← min(w, clip · mean(w)), the mean over the cluster rows in ``rows_K`` (pre-clip)."""
    return torch.minimum(w_KD, clip * masked_mean(w_KD, rows_K))


@torch.no_grad()
def normalize_per_feature(w_KD: torch.Tensor, rows_K: torch.Tensor) -> torch.Tensor:
    """w[:, q] ← w[:, q] / mean_k w[k, q] over the rows in ``rows_K`` (spec §3.1 step 7)."""
    return w_KD / masked_mean(w_KD, rows_K, dim=0)


@torch.no_grad()
def cluster_rows(
    counts_K: torch.Tensor,
    mode: str,
    max_label: torch.Tensor | None = None,
    min_cluster_size: int = 2,
) -> torch.Tensor:
    """Boolean ``[K]``: the clusters whose weights enter the clip and normalisation means.

    ``max_label`` (0-d tensor) is the largest expert index the previous layer selected in any of
    its top-k columns; the release uses rows ``0..max_label``.
    """
    K = counts_K.shape[0]
    if mode == "release":
        if max_label is None:
            return torch.ones(K, dtype=torch.bool, device=counts_K.device)
        return torch.arange(K, device=counts_K.device) <= max_label
    if mode == "clean":
        return counts_K >= float(min_cluster_size)
    raise ValueError(f"unknown AC weight mode {mode!r}; choose one of {MODES}")


@torch.no_grad()
def weights_from_stats(
    mad_KD: torch.Tensor,
    counts_K: torch.Tensor,
    eps: float = 1e-4,
    clip: float = 10.0,
    norm: str = "feature",
    mode: str = "release",
    max_label: torch.Tensor | None = None,
    min_cluster_size: int = 2,
) -> torch.Tensor:
    """``w_KD`` (row k = diagonal of M_k) from the clusters' MADs: invert, clip, normalise."""
    # At K×D this size every op is a kernel launch, and launches are what the AC statistics cost
    # on a GPU: hence the in-place ops and the matrix-vector masked means.
    w_KD = inverse_dispersion(mad_KD, eps)  # spec §3.1 step 5
    rows_K = cluster_rows(counts_K, mode, max_label, min_cluster_size)
    colmean = _column_means(rows_K, w_KD.dtype)
    pre_clip_mean = colmean(w_KD).mean()
    w_KD = torch.minimum(w_KD, pre_clip_mean * clip)  # step 6
    if norm == "feature":  # step 7
        w_KD = w_KD.div_(colmean(w_KD))
    elif norm == "global_pre":
        w_KD = w_KD.div_(pre_clip_mean)
    elif norm == "global_post":
        w_KD = w_KD.div_(colmean(w_KD).mean())
    else:
        raise ValueError(f"unknown AC normalisation {norm!r}; choose one of {NORMS}")
    if mode == "clean":
        w_KD = torch.where(rows_K.unsqueeze(1), w_KD, torch.ones_like(w_KD))
    return w_KD


@torch.no_grad()
def ac_weights(
    x_TD: torch.Tensor,
    labels_T: torch.Tensor,
    num_clusters: int,
    eps: float = 1e-4,
    clip: float = 10.0,
    mode: str = "release",
    max_label: torch.Tensor | None = None,
    min_cluster_size: int = 2,
    norm: str = "feature",
    all_reduce: AllReduce | None = None,
) -> torch.Tensor:
    """The per-cluster diagonal AC weights ``w_KD`` of a batch of tokens, fp32, no grad."""
    stats = cluster_stats(x_TD, labels_T, num_clusters, all_reduce)
    return weights_from_stats(stats.mad_KD, stats.counts_K, eps, clip, norm, mode, max_label,
                              min_cluster_size)


@torch.no_grad()
def local_weights(
    x_TD: torch.Tensor,
    labels_T: torch.Tensor,
    num_clusters: int,
    max_label: torch.Tensor | None,
    eps: float,
    clip: float,
    norm: str,
    mode: str,
    min_cluster_size: int,
) -> tuple[torch.Tensor, ClusterStats]:
    """(``w_KD``, the statistics) of this rank's tokens alone: one pure function, so that
    ``compiled(local_weights)`` can fuse the statistics and the weights (no collective inside)."""
    stats = cluster_stats(x_TD, labels_T, num_clusters)
    w_KD = weights_from_stats(stats.mad_KD, stats.counts_K, eps, clip, norm, mode, max_label, min_cluster_size)
    return w_KD, stats


class WeightAverage:
    """The token-weighted mean of the AC weights each cluster's tokens were routed with, over many
    micro-batches: the fixed inference transform of a ``batch``-trained model (inference/calibration.py).

    Row k averages the per-micro-batch rows ``w_KD[k]`` weighted by the tokens of cluster k in each
    micro-batch, i.e. the expected transform a token of cluster k met in training. The weights, not the
    MADs, are averaged: in ``release`` mode a micro-batch's empty and singleton clusters enter the
    clip and normalisation means (weights far below 1), which pooled MADs would not reproduce. A
    cluster no calibration token fell into gets the token-weighted mean row of all clusters.
    """

    def __init__(self, num_clusters: int, hidden: int, device):
        self.wsum_KD = torch.zeros(num_clusters, hidden, dtype=torch.float64, device=device)
        self.count_K = torch.zeros(num_clusters, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, w_KD: torch.Tensor, counts_K: torch.Tensor) -> None:
        self.wsum_KD.addcmul_(w_KD.double(), counts_K.double().unsqueeze(1))
        self.count_K.add_(counts_K.double())

    @torch.no_grad()
    def result(self, all_reduce: AllReduce | None = None, replicas: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(``w_KD`` fp32, tokens per cluster): summed over ``all_reduce``'s group, whose ranks hold
        the same statistics ``replicas`` times over (the statistics scope's group size)."""
        packed = torch.cat([self.wsum_KD, self.count_K.unsqueeze(1)], dim=1)
        if all_reduce is not None:
            all_reduce(packed)
        wsum_KD, count_K = packed[:, :-1], packed[:, -1]
        fallback_D = wsum_KD.sum(0) / count_K.sum().clamp_min(1.0)
        w_KD = torch.where((count_K > 0).unsqueeze(1), wsum_KD / count_K.clamp_min(1.0).unsqueeze(1), fallback_D)
        return w_KD.float(), count_K / replicas


_NORM_EPS = 1e-12  # F.normalize's default


def _replace_nonfinite(scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores with non-finite entries set to the minimum finite score, the mask of those entries)."""
    inf = float("inf")
    finite_or_inf_TE = torch.nan_to_num(scores_TE, nan=inf, posinf=inf, neginf=inf)
    bad_TE = finite_or_inf_TE == inf
    return torch.where(bad_TE, finite_or_inf_TE.amin(), finite_or_inf_TE), bad_TE


def scores_forward(x_TD, e_ED, w_KD, labels_T, dtype):
    """Forward of ``ac_scores``: (scores, non-finite mask, ê, ||e||) — the last three for backward."""
    e_ED = e_ED.to(dtype)
    norm_E1 = torch.linalg.vector_norm(e_ED, dim=1, keepdim=True)
    ehat_ED = e_ED / norm_E1.clamp_min(_NORM_EPS)
    if w_KD is None:  # M = I
        xm_TD = x_TD.to(dtype)
    else:
        xm_TD = torch.index_select(w_KD.to(dtype), 0, labels_T).mul_(x_TD)  # fp32 (fp64) product
    scores_TE, bad_TE = _replace_nonfinite(xm_TD @ ehat_ED.t())
    return scores_TE, bad_TE, ehat_ED, norm_E1


def scores_backward(g_TE, x_TD, w_KD, labels_T, ehat_ED, norm_E1, bad_TE, need_x: bool, need_e: bool):
    """Backward of ``ac_scores``: (dL/dx in fp32/fp64 or None, dL/dê-through-normalize or None)."""
    g_TE = g_TE.to(ehat_ED.dtype).masked_fill(bad_TE, 0.0)  # replaced scores are constants
    m_TD = None if w_KD is None else torch.index_select(w_KD.to(ehat_ED.dtype), 0, labels_T)
    dx_TD = de_ED = None
    if need_x:
        dx_TD = g_TE @ ehat_ED
        if m_TD is not None:
            dx_TD = dx_TD.mul_(m_TD)
    if need_e:
        xm_TD = x_TD.to(ehat_ED.dtype) if m_TD is None else m_TD.mul_(x_TD)  # recomputed, not saved
        dehat_ED = g_TE.t() @ xm_TD
        # d(e/max(|e|, eps)) = (g − ê⟨ê, g⟩ [|e| > eps]) / max(|e|, eps)
        radial_E1 = (dehat_ED * ehat_ED).sum(1, keepdim=True).mul_(norm_E1 > _NORM_EPS)
        de_ED = dehat_ED.sub_(ehat_ED * radial_E1).div_(norm_E1.clamp_min(_NORM_EPS))
    return dx_TD, de_ED


_COMPILED: dict = {}


def no_autocast(device: torch.device):
    """The AC maths stays in fp32 (fp64) under any ``torch.autocast`` region around the model."""
    return torch.autocast(device_type=device.type, enabled=False)


def compiled(fn, enabled: bool = True):
    """``torch.compile`` of one of this module's pure functions (static shapes, whole graph), made
    once per process; ``fn`` itself when not ``enabled``. Fuses the small elementwise ops into a
    few kernels: on a GPU, fewer launches (acmoe.compile)."""
    if not enabled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn]


class _ACScores(torch.autograd.Function):
    """s = (x ⊙ w[c]) · ê^T, ê = e / ||e||, non-finite scores replaced (spec §3.1 step 9, §4.5).

    One autograd node with a hand-written backward instead of the eight autograd ops of the
    literal formula: fewer kernel launches (what the router costs at these sizes), and nothing of
    size T×D is saved for backward — only the input x in its own dtype (which megatron's router
    saves too), the labels and the small K×D / E×D tables; x ⊙ m is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x_TD, e_ED, w_KD, labels_T, dtype, compile_):
        ctx.e_dtype, ctx.compile = e_ED.dtype, compile_
        with no_autocast(x_TD.device):
            scores_TE, bad_TE, ehat_ED, norm_E1 = compiled(scores_forward, compile_)(x_TD, e_ED, w_KD, labels_T, dtype)
        ctx.save_for_backward(x_TD, w_KD, labels_T, ehat_ED, norm_E1, bad_TE)
        return scores_TE

    @staticmethod
    def backward(ctx, g_TE):
        x_TD, w_KD, labels_T, ehat_ED, norm_E1, bad_TE = ctx.saved_tensors
        with no_autocast(x_TD.device):
            dx_TD, de_ED = compiled(scores_backward, ctx.compile)(g_TE, x_TD, w_KD, labels_T, ehat_ED, norm_E1,
                                                                  bad_TE, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        dx_TD = None if dx_TD is None else dx_TD.to(x_TD.dtype)
        de_ED = None if de_ED is None else de_ED.to(ctx.e_dtype)
        return dx_TD, de_ED, None, None, None, None


def ac_scores(
    x_TD: torch.Tensor,
    expert_emb_ED: torch.Tensor,
    w_KD: torch.Tensor | None = None,
    labels_T: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> torch.Tensor:
    """s_ij = (x_i ⊙ m_i) · e_j / ||e_j||, m_i = w[c_i], in ``dtype`` (fp32 or fp64); ``w_KD=None``
    is M = I (the cosine router). ``compile``: run forward and backward through ``torch.compile``.

    Gradients flow into x and the expert embeddings; the weights are constants (spec §2.2).
    """
    if w_KD is not None:
        if labels_T is None:
            raise ValueError("ac_scores: w_KD needs the labels_T that pick each token's row")
        w_KD, labels_T = w_KD.detach(), labels_T.long()
    return _ACScores.apply(x_TD, expert_emb_ED, w_KD, labels_T, dtype, compile)
