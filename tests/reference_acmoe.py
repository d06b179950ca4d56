"""Literal re-implementation of the official ACMoE LM gate (COSAGate_Balance, --use-var --mad),
following the release step by step (spec §3.1): used as the reference in tests."""

import torch
import torch.nn.functional as F


def official_weights(X, prev_idx):
    """Literal release steps 1-8 (spec §3.1)."""
    with torch.no_grad():
        X = X.detach().float()
        c = prev_idx[:, 0]
        K = int(prev_idx.max().item()) + 1
        d = X.shape[1]
        mu = torch.zeros(K, d).index_reduce(0, c, X, "mean", include_self=False)
        dev = (X - mu[c]).abs()
        A = torch.zeros(K, d).index_reduce(0, c, dev, "mean", include_self=False)
        W = 1.0 / (A + 1e-4)
        thr = 10 * W.mean()
        W = torch.where(W > thr, thr, W)
        W = W / W.mean(dim=0, keepdim=True)
        return W, W[c]


def official_scores(X, prev_idx, emb):
    _, m = official_weights(X, prev_idx)
    S = (X * m) @ F.normalize(emb, dim=1).t()
    return S
