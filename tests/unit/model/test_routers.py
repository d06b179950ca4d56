"""ACRouter / CosineRouter / LabelSourceRouter inside real megatron MoE layers (world size 1)."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter
from reference_acmoe import official_scores

from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.model.chunk_state import ChunkState, state_of
from acmoe_megatron.model.routers import ACRouter, CosineRouter, LabelSourceRouter
from acmoe_megatron.testing import build_gpt, capture_router_outputs, tiny_config

pytestmark = pytest.mark.usefixtures("megatron_ws1")


def _model(settings, **cfg):
    torch.manual_seed(0)
    return build_gpt(tiny_config(**cfg), settings)


def test_spec_puts_the_right_router_on_each_layer():
    model = _model(ACSettings(first_ac_layer=3), num_layers=6, moe_layer_freq=[1, 1, 0, 1, 1, 1])
    kinds = {}
    for m in model.modules():
        if isinstance(m, TopKRouter):
            kinds[m.layer_number] = type(m).__name__
    # MoE layers are 1, 2, 4, 5, 6; ordinals 1-2 are label sources, 3.. are AC (layers 4, 5, 6)
    assert kinds == {1: "LabelSourceRouter", 2: "LabelSourceRouter", 4: "ACRouter", 5: "ACRouter", 6: "ACRouter"}
    assert state_of(model).previous_moe_layer(4) == 2  # the dense layer 3 is skipped


def test_topk_setting_keeps_megatrons_router():
    model = _model(ACSettings(router="topk"))
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert routers and all(type(r) is LabelSourceRouter for r in routers)  # TopKRouter + recording


def test_cosine_setting_uses_cosine_router_from_first_ac_layer():
    model = _model(ACSettings(router="cosine", first_ac_layer=2))
    kinds = [type(m) for m in model.modules() if isinstance(m, TopKRouter)]
    assert kinds == [LabelSourceRouter, CosineRouter, CosineRouter, CosineRouter]


def test_ac_router_routes_with_ac_scores_inside_moe_layer():
    model = _model(ACSettings(first_ac_layer=2))
    seen = capture_router_outputs(model)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    inputs = {}
    layer2 = model.decoder.layers[1]

    def keep_input(_module, args, _out):
        inputs.setdefault("x", args[0].detach())

    layer2.mlp.router.register_forward_hook(keep_input)
    model(tokens, pos, None, labels=tokens)
    probs1, map1 = seen[1]
    prev_idx = torch.where(map1, probs1, torch.full_like(probs1, -1.0)).topk(2, dim=-1).indices
    x = inputs["x"].reshape(-1, inputs["x"].shape[-1])
    expected = official_scores(x, prev_idx, layer2.mlp.router.weight.detach())
    probs2, map2 = seen[2]
    exp_map = torch.zeros_like(map2).scatter(1, expected.topk(2, dim=-1).indices, True)
    assert torch.equal(map2, exp_map)
    exp_probs = torch.zeros_like(probs2).scatter(1, expected.topk(2, dim=-1).indices,
                                                 expected.topk(2, dim=-1).values.softmax(-1))
    torch.testing.assert_close(probs2, exp_probs, rtol=1e-5, atol=1e-6)


def _router(cls, state=None, **kw):
    from megatron.core.process_groups_config import ProcessGroupCollection

    config = tiny_config(num_moe_experts=4, moe_router_topk=1, moe_router_pre_softmax=True,
                         hidden_size=8, num_attention_heads=2)
    r = cls(config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups(), **kw)
    if state is not None:
        r.bind_chunk_state(state)
    r.set_layer_number(2)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[0, 0] = 1.0  # expert 0 looks along feature 0
        r.weight[1, 1] = 1.0  # expert 1 along feature 1
        r.weight[2, :] = -1.0
        r.weight[3, :] = -1.0
    return r


def _crafted_tokens():
    """Cluster 0: tight on feature 0, spread on feature 1; cluster 1 the other way round."""
    g = torch.Generator().manual_seed(3)
    n = 64
    c0 = torch.zeros(n, 8)
    c0[:, 0] = 1.0 + 0.01 * torch.randn(n, generator=g)
    c0[:, 1] = 1.2 + torch.randn(n, generator=g).abs() * 0.1
    c1 = torch.zeros(n, 8)
    c1[:, 0] = 1.0 - torch.randn(n, generator=g).abs() * 0.1
    c1[:, 1] = 1.2 + 0.01 * torch.randn(n, generator=g)
    x = torch.cat([c0, c1])
    labels = torch.tensor([0] * n + [1] * n)
    return x, labels


def _state_with(labels, num_experts=4):
    state = ChunkState([1, 2], [1, 2])
    probs = F.one_hot(labels, num_experts).float()
    state.put_routing(1, probs, probs.bool())
    return state


def test_ac_differs_from_topk_and_cosine_on_crafted_input():
    x, labels = _crafted_tokens()
    state = _state_with(labels)
    ac = _router(ACRouter, state, settings=ACSettings())
    cos = _router(CosineRouter, state)
    lin = _router(TopKRouter)
    h = x.unsqueeze(1)  # [s, b=1, h]
    _, map_ac = ac(h)
    _, map_cos = cos(h)
    _, map_lin = lin(h)
    top_ac, top_cos, top_lin = (m.float().argmax(-1) for m in (map_ac, map_cos, map_lin))
    # without M every token prefers expert 1 (feature 1 is larger); AC sends the cluster that is
    # tight along feature 0 to expert 0
    assert (top_cos == 1).all() and (top_lin == 1).all()
    assert (top_ac[:64] == 0).all() and (top_ac[64:] == 1).all()


def test_ac_equals_cosine_when_all_weights_are_one():
    # both clusters have exactly the same spread on every feature -> every weight is 1
    base = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 1.0],
                         [1.5, 1.0, -2.0, 1.0, 0.5, 0.5, -0.25, 0.0],
                         [-0.5, 0.0, 1.0, 2.0, -1.5, 1.5, 0.75, -1.0],
                         [0.5, 2.0, -1.0, -1.0, 1.5, -1.5, -0.75, 2.0]])
    x = torch.cat([base, base + 4.0])
    labels = torch.tensor([0] * 4 + [1] * 4)
    state = _state_with(labels)
    ac = _router(ACRouter, state, settings=ACSettings())
    cos = _router(CosineRouter, state)
    with torch.no_grad():
        w = torch.randn(4, 8, generator=torch.Generator().manual_seed(9))
        ac.weight.copy_(w)
        cos.weight.copy_(w)
    p_ac, m_ac = ac(x.unsqueeze(1))
    p_cos, m_cos = cos(x.unsqueeze(1))
    assert torch.equal(m_ac, m_cos)
    torch.testing.assert_close(p_ac, p_cos, rtol=0, atol=0)


def test_labels_are_recorded_and_missing_labels_fail_clearly():
    state = ChunkState([1, 2], [1, 2])
    ac = _router(ACRouter, state, settings=ACSettings())
    with pytest.raises(RuntimeError, match="has not routed micro-batch 0"):
        ac(torch.randn(6, 1, 8))
    state.put_routing(1, torch.eye(4)[[0, 1, 2]], torch.eye(4, dtype=torch.bool)[[0, 1, 2]])
    with pytest.raises(RuntimeError, match="6 tokens but MoE layer 1 labelled 3"):
        ac(torch.randn(6, 1, 8))
    src = _router(LabelSourceRouter, state)
    src.set_layer_number(1)
    probs, _ = src(torch.randn(6, 1, 8))
    assert torch.equal(state.labels_for(2, 6).top1_T, probs.argmax(-1))


def test_router_gradients_flow_to_tokens_and_embeddings():
    x, labels = _crafted_tokens()
    x.requires_grad_(True)
    ac = _router(ACRouter, _state_with(labels), settings=ACSettings())
    probs, _ = ac(x.unsqueeze(1))
    (probs * torch.arange(4.0)).sum().backward()
    assert ac.weight.grad is not None and x.grad is not None


def test_settings_validation():
    with pytest.raises(ValueError, match="first_ac_layer"):
        ACSettings(first_ac_layer=0)
    with pytest.raises(ValueError, match="router"):
        ACSettings(router="xmoe-typo")
