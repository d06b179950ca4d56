"""Baseline routers: each one's maths against a literal formula, and inside real megatron MoE layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter

from acmoe_megatron.core.settings import ACSettings, router_class
from acmoe_megatron.model import baseline_routers as br
from acmoe_megatron.model.chunk_state import state_of
from acmoe_megatron.model.routers import LabelSourceRouter
from acmoe_megatron.testing import build_gpt, capture_router_outputs, tiny_config

# -- maths (pure functions) -------------------------------------------------------------------


def test_xmoe_logits_project_then_score_against_unit_expert_embeddings():
    g = torch.Generator().manual_seed(0)
    x, proj, emb = torch.randn(10, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(6, 4, generator=g)
    expected = torch.stack([torch.stack([(proj @ x[t]) @ emb[j] / emb[j].norm() for j in range(6)]) for t in range(10)])
    torch.testing.assert_close(br.xmoe_logits(x, proj, emb), expected)
    # only the embeddings' directions matter
    torch.testing.assert_close(br.xmoe_logits(x, proj, emb * torch.rand(6, 1, generator=g) * 5), expected)


def test_usmoe_unified_score():
    logits = torch.randn(5, 8)
    torch.testing.assert_close(br.usmoe_scores(torch.zeros(3, 8), 0.5), torch.full((3, 8), 1 / 8))
    torch.testing.assert_close(br.usmoe_scores(logits, 0.0), logits.softmax(-1))
    torch.testing.assert_close(br.usmoe_scores(logits, 1.0), logits.sigmoid() * 2 / 8)
    torch.testing.assert_close(br.usmoe_scores(logits, 0.3),
                               0.7 * logits.softmax(-1) + 0.3 * logits.sigmoid() * 2 / 8)


def test_usmoe_selects_the_global_top_pairs_of_each_sequence():
    S, B, E, k = 12, 3, 4, 2
    scores = torch.rand(S, B, E, generator=torch.Generator().manual_seed(1))
    probs, rmap = br.usmoe_select(scores, k)
    assert probs.shape == rmap.shape == (S * B, E)
    per_seq = rmap.view(S, B, E)
    for b in range(B):
        chosen = per_seq[:, b].reshape(-1)
        assert chosen.sum() == S * k  # the budget is exactly S·k per sequence
        top = scores[:, b].reshape(-1).topk(S * k).indices
        assert chosen[top].all()  # exactly the S·k best pairs
    counts = rmap.sum(-1)
    assert counts.min() >= 0 and counts.max() <= E and (counts != k).any()  # variable experts per token
    torch.testing.assert_close(probs, scores.reshape(S * B, E) * rmap)  # gates = unified scores


def test_etr_affinity_is_cosine_with_the_grap_vectors():
    T, E, D = 7, 4, 16
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    w = torch.full((E, D // E), E / D)
    aff = br.etr_affinity(x, w)
    # the paper's simplification: sqrt(n/d) · (sum of the token over group i) / ||x||
    expected = math.sqrt(E / D) * x.view(T, E, D // E).sum(-1) / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(aff, expected, rtol=1e-5, atol=1e-6)
    assert aff.abs().max() <= 1.0
    # trainable entries: cosine with the explicit block-diagonal matrix W_aff
    w2 = torch.rand(E, D // E) + 0.1
    W = torch.zeros(E, D)
    for i in range(E):
        W[i, i * (D // E):(i + 1) * (D // E)] = w2[i]
    torch.testing.assert_close(br.etr_affinity(x, w2), F.cosine_similarity(x[:, None], W[None], dim=-1),
                               rtol=1e-5, atol=1e-6)


def test_expert_choice_keeps_each_experts_highest_affinity_candidates():
    T, E, C = 20, 4, 3
    g = torch.Generator().manual_seed(3)
    aff = torch.rand(T, E, generator=g)
    cand = torch.zeros(T, E, dtype=torch.bool).scatter_(1, aff.topk(2, dim=-1).indices, True)
    keep = br.expert_choice(aff, cand, C)
    assert (keep <= cand).all()
    for e in range(E):
        mine = cand[:, e].nonzero().flatten()
        best = mine[aff[mine, e].argsort(descending=True)[:C]]
        assert set(keep[:, e].nonzero().flatten().tolist()) == set(best.tolist())
    assert torch.equal(br.expert_choice(aff, cand, T), cand)


def test_stablemoe_distillation_targets_the_main_routers_argmax():
    main = torch.randn(9, 4)
    distilled = torch.randn(9, 4, requires_grad=True)
    loss = br.stablemoe_distill_loss(distilled, main)
    torch.testing.assert_close(loss, F.cross_entropy(distilled, main.argmax(-1)))
    loss.backward()
    assert distilled.grad.abs().sum() > 0


# -- inside megatron MoE layers --------------------------------------------------------------

VOCAB, SEQ, MBS = 128, 32, 2


class _Progress:
    """The trainer's (iteration, train_iters) as the routers read it (plugin.attach's ``progress``)."""

    def __init__(self):
        self.value = (0, 100)

    def set_progress(self, iteration, train_iters):
        self.value = (iteration, train_iters)

    def __call__(self):
        return self.value


_PROGRESS: dict[int, _Progress] = {}


def _model(router, **cfg):
    torch.manual_seed(0)
    if router == "etr":
        cfg.setdefault("moe_expert_capacity_factor", 1.0)
    progress = _Progress()
    model = build_gpt(tiny_config(**cfg), ACSettings(router=router), vocab_size=VOCAB, max_sequence_length=SEQ,
                      progress=progress)
    _PROGRESS[id(model)] = progress
    return model


def _forward(model, tokens):
    """One micro-batch; the model's hooks start it and record its token ids (plugin.attach)."""
    pos = torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], -1)
    return model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean()


def _tokens(seed=1):
    return torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.usefixtures("megatron_ws1")
@pytest.mark.parametrize("router", ["xmoe", "stablemoe", "stablemoe-lite", "usmoe", "etr"])
def test_router_routes_every_moe_layer_and_trains(router):
    model = _model(router)
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == 4 and all(type(r) is router_class(router) for r in routers)
    assert all(isinstance(r, LabelSourceRouter) for r in routers)  # labels + metrics like AC
    seen = capture_router_outputs(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    tokens = _tokens()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = _forward(model, tokens)
        loss.backward()
        losses.append(loss.item())
        if not losses[1:]:
            r = routers[-1]
            trainable = [p for p in r.parameters() if p.requires_grad]
            assert bool(trainable) == (router != "etr")  # ETR's affinity is fixed (Eq. 3)
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
        opt.step()
    assert losses[-1] < losses[0] - 0.3, losses  # it learns the batch
    T = MBS * SEQ
    for probs, rmap in seen.values():
        assert probs.shape == (T, 4) and torch.isfinite(probs).all()
        if router == "usmoe":
            assert rmap.sum() == T * 2 and (rmap.sum(-1) != 2).any()
        elif router == "etr":
            assert (rmap.sum(0) <= math.ceil(T * 2 / 4 * 1.0)).all() and rmap.sum() <= T * 2
        else:
            assert (rmap.sum(-1) == 2).all()


@pytest.mark.usefixtures("megatron_ws1")
def test_xmoe_and_etr_router_parameters():
    x = _model("xmoe").decoder.layers[0].mlp.router
    assert x.weight.shape == (4, 2) and x.proj.shape == (2, 64) and x.bias is None  # xmoe_dim = E/2
    # orthogonal_(gain 0.32) of [E=4, P=2] (more rows than columns): orthonormal columns × 0.32
    torch.testing.assert_close(x.weight.t() @ x.weight, 0.32**2 * torch.eye(2), atol=1e-6, rtol=0)
    lite = _model("stablemoe-lite").decoder.layers[0].mlp.router  # [E=4, d=64]: orthogonal rows × 0.32
    torch.testing.assert_close(lite.weight @ lite.weight.t(), 0.32**2 * torch.eye(4), atol=1e-6, rtol=0)
    e = _model("etr").decoder.layers[0].mlp.router
    assert e.weight.shape == (4, 16) and not e.weight.requires_grad  # Eq. 3: fixed n/d entries
    with pytest.raises(ValueError, match="moe_expert_capacity_factor"):
        build_gpt(tiny_config(), ACSettings(router="etr"))
    with pytest.raises(ValueError, match="divisible by num_experts"):
        build_gpt(tiny_config(num_moe_experts=3, moe_expert_capacity_factor=1.0),
                  ACSettings(router="etr"))


@pytest.mark.usefixtures("megatron_ws1")
def test_stablemoe_freezes_the_distilled_router_at_the_stage_switch():
    model = _model("stablemoe", num_layers=2)
    router = model.decoder.layers[0].mlp.router
    inputs = _PROGRESS[id(model)]
    seen = capture_router_outputs(model)
    tokens = _tokens()
    inputs.set_progress(5, 100)  # stage 1 (switch at ceil(0.1 · 100) = 10)
    _forward(model, tokens).backward()
    assert not router.in_stage2() and router.distill_embedding.grad.abs().sum() > 0
    inputs.set_progress(10, 100)
    assert router.in_stage2()
    _forward(model, tokens).backward()
    assert router.frozen.item() == 1
    torch.testing.assert_close(router.frozen_embedding, router.distill_embedding.detach())
    ids = tokens[:, :-1].t().reshape(-1)
    expected = (router.frozen_embedding[ids] @ router.frozen_centroids.t()).topk(2, dim=-1).indices
    _, rmap = seen[1]
    assert torch.equal(rmap, torch.zeros_like(rmap).scatter(1, expected, True))  # routed by token id
    with torch.no_grad():  # later training of the distilled parameters does not move the routing
        router.distill_embedding.add_(torch.randn_like(router.distill_embedding))
    model.eval()
    with torch.no_grad():
        _forward(model, tokens)
    assert torch.equal(seen[1][1], rmap)
    # a resumed run stays in stage 2 whatever the progress says
    fresh = _model("stablemoe", num_layers=2)
    fresh.load_state_dict(model.state_dict())
    fresh_router = fresh.decoder.layers[0].mlp.router
    _PROGRESS[id(fresh)].set_progress(0, 100)
    assert fresh_router.in_stage2()


@pytest.mark.usefixtures("megatron_ws1")
def test_stablemoe_without_token_ids_fails_clearly():
    model = _model("stablemoe", num_layers=2)
    router = model.decoder.layers[0].mlp.router
    state_of(model).begin_forward(training=True)  # a micro-batch whose forward got no input_ids
    with pytest.raises(RuntimeError, match="token ids of micro-batch 0 are not available"):
        router.routing(torch.randn(SEQ - 1, MBS, 4))


def test_baseline_settings_validation():
    with pytest.raises(ValueError, match="usmoe_rate"):
        ACSettings(router="usmoe", usmoe_rate=1.5)
    with pytest.raises(ValueError, match="stablemoe_stage1_fraction"):
        ACSettings(router="stablemoe", stablemoe_stage1_fraction=-0.1)
