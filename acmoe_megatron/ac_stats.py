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
import torch.nn.functional as F

MODES = ("release", "clean")
NORMS = ("feature", "global_pre", "global_post")

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
    x_TD = x_TD.detach().float()
    labels_T = labels_T.long()
    onehot_TK = _onehot(labels_T, num_clusters, torch.float32)
    first_KD1 = torch.cat([onehot_TK.t() @ x_TD, onehot_TK.sum(0).unsqueeze(1)], dim=1)  # [sums | n]
    if all_reduce is not None:
        all_reduce(first_KD1)
    counts_K = first_KD1[:, -1]
    denom_K1 = counts_K.clamp_min(1.0).unsqueeze(1)
    mean_KD = first_KD1[:, :-1] / denom_K1
    dev_TD = torch.sub(x_TD, torch.index_select(mean_KD, 0, labels_T)).abs_()
    dev_KD = onehot_TK.t() @ dev_TD
    if all_reduce is not None:
        all_reduce(dev_KD)
    return ClusterStats(counts_K, mean_KD, dev_KD / denom_K1)


@torch.no_grad()
def inverse_dispersion(mad_KD: torch.Tensor, eps: float) -> torch.Tensor:
    """w = 1 / (MAD + eps) (spec §3.1 step 5)."""
    return 1.0 / (mad_KD + eps)


def _masked_mean(w_KD: torch.Tensor, rows_K: torch.Tensor, dim=None) -> torch.Tensor:
    mask_KD = rows_K.to(w_KD.dtype).unsqueeze(1).expand_as(w_KD)
    if dim is None:
        return (w_KD * mask_KD).sum() / mask_KD.sum().clamp_min(1.0)
    return (w_KD * mask_KD).sum(dim, keepdim=True) / mask_KD.sum(dim, keepdim=True).clamp_min(1.0)


@torch.no_grad()
def clip_weights(w_KD: torch.Tensor, rows_K: torch.Tensor, clip: float) -> torch.Tensor:
    """w ← min(w, clip · mean(w)), the mean over the cluster rows in ``rows_K`` (pre-clip)."""
    return torch.minimum(w_KD, clip * _masked_mean(w_KD, rows_K))


@torch.no_grad()
def normalize_per_feature(w_KD: torch.Tensor, rows_K: torch.Tensor) -> torch.Tensor:
    """w[:, q] ← w[:, q] / mean_k w[k, q] over the rows in ``rows_K`` (spec §3.1 step 7)."""
    return w_KD / _masked_mean(w_KD, rows_K, dim=0)


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
    w_KD = inverse_dispersion(mad_KD.float(), eps)
    rows_K = cluster_rows(counts_K, mode, max_label, min_cluster_size)
    pre_clip_mean = _masked_mean(w_KD, rows_K)
    w_KD = torch.minimum(w_KD, clip * pre_clip_mean)
    if norm == "feature":
        w_KD = normalize_per_feature(w_KD, rows_K)
    elif norm == "global_pre":
        w_KD = w_KD / pre_clip_mean
    elif norm == "global_post":
        w_KD = w_KD / _masked_mean(w_KD, rows_K)
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
def token_weights(w_KD: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    """m_i = w[c_i]: each token's diagonal of M_{c_i}, ``[T, D]``."""
    return torch.index_select(w_KD, 0, labels_T.long())


def replace_nonfinite(scores_TE: torch.Tensor) -> torch.Tensor:
    """Replace non-finite scores by the minimum finite score (spec §4.5), without a host sync."""
    finite_TE = torch.isfinite(scores_TE)
    min_finite = torch.where(finite_TE, scores_TE, torch.full_like(scores_TE, float("inf"))).amin()
    return torch.where(finite_TE, scores_TE, min_finite.detach())


def ac_scores(
    x_TD: torch.Tensor,
    m_TD: torch.Tensor | None,
    expert_emb_ED: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """s_ij = (x_i ⊙ m_i) · e_j / ||e_j|| in ``dtype`` (fp32 or fp64); ``m_TD=None`` is M = I.

    Gradients flow into x and the expert embeddings; m is a constant (spec §2.2).
    """
    x_TD = x_TD.to(dtype)
    if m_TD is not None:
        x_TD = x_TD * m_TD.detach().to(dtype)
    scores_TE = x_TD @ F.normalize(expert_emb_ED.to(dtype), dim=1).t()
    return replace_nonfinite(scores_TE)
