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


class ReleaseGate(torch.nn.Module):
    """The release's ACMoE gate as it trains (spec §4.10), literally: expert embeddings initialised
    ``orthogonal_(gain=0.32)`` (passed in), rescaled in place to row norm 1.5 under ``no_grad`` at
    the start of every forward, AC weights from the previous layer's top-1 (``official_weights``),
    cosine scores, top-2, softmax over the two. A bias-free token projection in front gives the
    scores' input a gradient as well. ``forward`` returns (probs scattered to [T, E], logits)."""

    def __init__(self, emb_ED, proj_DD):
        super().__init__()
        self.expert_embeddings = torch.nn.Parameter(emb_ED.clone())
        self.proj = torch.nn.Linear(proj_DD.shape[1], proj_DD.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(proj_DD)

    def forward(self, x, prev_top1):
        with torch.no_grad():
            self.expert_embeddings.mul_(1.5 / torch.norm(self.expert_embeddings, p=2.0, dim=1, keepdim=True))
        h = self.proj(x)
        logits = official_scores(h, prev_top1.unsqueeze(1), self.expert_embeddings)
        top_v, top_i = logits.topk(2, dim=-1, sorted=False)
        gates = torch.softmax(top_v, dim=-1)
        return torch.zeros_like(logits).scatter(1, top_i, gates), logits

    @torch.no_grad()
    def embeddings_for_next_forward(self):
        """What the next forward will route with (the rescale happens at its start)."""
        e = self.expert_embeddings
        return e * (1.5 / torch.norm(e, p=2.0, dim=1, keepdim=True))
