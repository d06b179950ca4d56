"""Elliptical Attention (elliptical.py): the estimator against the official code, the megatron
core-attention subclass, causal safety of ``source: prefix``, recompute replays, config and checks.

The pipeline hand-off is in test_elliptical_handoff.py; TP=2(+SP), PP=2 and recompute parity
through megatron's trainer are in test_ac_parallel_layouts.py.
"""

import argparse
import types

import pytest
import torch

from acmoe_megatron.model.chunk_state import VALUES, ChunkState
from acmoe_megatron.model.elliptical import (
    EllipticalSettings,
    check_supported,
    elliptical_core_attention,
    metric_weights,
    prefix_weights,
    scale_query,
    sequence_weights,
)

# ---------------------------------------------------------------------------------------------
# literal re-implementation of the official code (stefvk/Elliptical-Attention, ImageNet/models.py,
# MahalaAttention.W_over_layers and its forward), [B, H, N, D] layout


def official_w_over_layers(head_v, head_v_last, delta):
    with torch.no_grad():
        seqlen = head_v.size(2)
        difference_quotients = (head_v - head_v_last) / delta
        W = torch.norm(difference_quotients, p=1, dim=-2) / seqlen
        W = W / torch.max(W, dim=-1, keepdim=True)[0]
        W = torch.diag_embed(W)
    return W


def official_attention(head_q, head_k, head_v, W, scale):
    QW = head_q @ W
    attn_score = QW @ head_k.transpose(-2, -1) * scale
    n = attn_score.shape[-1]
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)  # megatron's GPT mask
    attn_score = attn_score.masked_fill(causal, float("-inf"))
    attn_prob = torch.softmax(attn_score, dim=-1)
    return attn_prob @ head_v


def _bhnd(x_SBGD, repeat=1):
    """megatron [S, B, G, D] -> official [B, H, N, D] (query groups expanded to heads)."""
    return x_SBGD.repeat_interleave(repeat, dim=2).permute(1, 2, 0, 3)


def test_sequence_weights_match_official_w_over_layers():
    g = torch.Generator().manual_seed(0)
    v, v_prev = torch.randn(2, 24, 3, 5, 16, generator=g)  # [S, B, G, D]
    W = official_w_over_layers(_bhnd(v), _bhnd(v_prev), delta=5.0)  # [B, G, D, D]
    ours = sequence_weights(v, v_prev)
    torch.testing.assert_close(ours, torch.diagonal(W, dim1=-2, dim2=-1), rtol=1e-6, atol=1e-7)
    assert torch.equal(ours.amax(-1), torch.ones(3, 5))  # every (sequence, head) has max weight 1


def test_prefix_weights_are_sequence_weights_of_each_prefix():
    g = torch.Generator().manual_seed(1)
    v, v_prev = torch.randn(2, 10, 2, 3, 8, generator=g)
    prefix = prefix_weights(v, v_prev)
    for t in range(10):
        torch.testing.assert_close(prefix[t], sequence_weights(v[: t + 1], v_prev[: t + 1]))
    torch.testing.assert_close(prefix[-1], metric_weights(v, v_prev, "sequence"))


def test_unchanged_values_keep_the_standard_metric():
    v = torch.randn(6, 2, 2, 4)
    assert torch.equal(sequence_weights(v, v), torch.ones(2, 2, 4))  # the official code divides by 0
    assert torch.equal(prefix_weights(v, v), torch.ones(6, 2, 2, 4))


def test_scale_query_broadcasts_over_query_groups():
    q = torch.randn(3, 2, 6, 4)  # 6 query heads, 2 groups -> heads 0-2 use group 0, 3-5 group 1
    m = torch.rand(2, 2, 4)
    out = scale_query(q, m, factor=2.0)
    for h in range(6):
        torch.testing.assert_close(out[:, :, h], q[:, :, h] * m[:, h // 3] * 2.0)
    with pytest.raises(ValueError, match="cannot take metric"):
        scale_query(q, torch.rand(2, 4, 4))


# ---------------------------------------------------------------------------------------------
# the megatron core-attention subclass


def _core(config, cls, state=None, settings=None, layer=2):
    from megatron.core.transformer.enums import AttnMaskType

    kw = dict(config=config, layer_number=layer, attn_mask_type=AttnMaskType.causal, attention_type="self",
              softmax_scale=None, cp_comm_type=None, pg_collection=None)
    if settings is not None:
        kw.update(elliptical=settings)
    core = cls(**kw)
    if state is not None:
        core.bind_chunk_state(state)
    return core


@pytest.mark.parametrize("heads, groups, scale", [(4, 4, "standard"), (4, 2, "standard"), (4, 4, "none")])
def test_core_attention_matches_official_elliptical_attention(megatron_ws1, heads, groups, scale):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from acmoe_megatron.testing import tiny_config

    config = tiny_config(num_attention_heads=heads, num_query_groups=groups)  # head dim 16
    settings = EllipticalSettings(enabled=True, scale=scale)
    state = ChunkState([], [])
    core = _core(config, elliptical_core_attention(DotProductAttention), state, settings, layer=2)
    assert isinstance(core, DotProductAttention)
    g = torch.Generator().manual_seed(2)
    S, B, D = 12, 2, 16
    q = torch.randn(S, B, heads, D, generator=g)
    k, v, v_prev = torch.randn(3, S, B, groups, D, generator=g)
    state.put_state(VALUES, 1, v_prev)
    out = core(q, k, v, None)  # [S, B, H*D]
    assert torch.equal(state.get_state(VALUES, 2), v)  # stored for layer 3

    r = heads // groups
    W = official_w_over_layers(_bhnd(v, r), _bhnd(v_prev, r), delta=1.0)
    ref = official_attention(_bhnd(q), _bhnd(k, r), _bhnd(v, r), W, 16 ** -0.5 if scale == "standard" else 1.0)
    torch.testing.assert_close(out, ref.permute(2, 0, 1, 3).reshape(S, B, heads * D), rtol=1e-5, atol=1e-6)


def test_equal_weights_give_standard_attention(megatron_ws1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from acmoe_megatron.testing import tiny_config

    config = tiny_config()
    state = ChunkState([], [])
    core = _core(config, elliptical_core_attention(DotProductAttention), state,
                 EllipticalSettings(enabled=True), layer=3)
    plain = _core(config, DotProductAttention, layer=3)
    q, k, v = torch.randn(3, 10, 2, 4, 16)
    shift = torch.where(torch.arange(16) % 2 == 0, 0.5, -0.5)  # |v - v_prev| = 0.5 in every feature
    state.put_state(VALUES, 2, v - shift)
    torch.testing.assert_close(core(q, k, v, None), plain(q, k, v, None), rtol=0, atol=1e-6)


def test_missing_previous_values_and_packed_sequences_are_clear_errors(megatron_ws1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from acmoe_megatron.testing import tiny_config

    state = ChunkState([], [])
    core = _core(tiny_config(), elliptical_core_attention(DotProductAttention), state,
                 EllipticalSettings(enabled=True), layer=3)
    q, k, v = torch.randn(3, 8, 1, 4, 16)
    with pytest.raises(RuntimeError, match="values of attention layer 2 for micro-batch 0 are missing"):
        core(q, k, v, None)
    with pytest.raises(RuntimeError, match="packed sequences"):
        core(q, k, v, None, packed_seq_params=object())


# ---------------------------------------------------------------------------------------------
# whole models


def _gpt(elliptical=None, router="ac", **cfg):
    from acmoe_megatron.core.settings import ACSettings
    from acmoe_megatron.testing import build_gpt, tiny_config

    torch.manual_seed(0)
    return build_gpt(tiny_config(**cfg), ACSettings(router=router, first_ac_layer=2), elliptical=elliptical)


def test_spec_patches_core_attention_from_the_layer_before_first_layer(megatron_ws1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from acmoe_megatron.model.elliptical import EllipticalAttentionMixin

    plain = _gpt(num_layers=4)
    model = _gpt(EllipticalSettings(enabled=True, first_layer=3), num_layers=4)
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert type(cores[0]) is DotProductAttention  # layer 1: standard, stores nothing
    assert [isinstance(c, EllipticalAttentionMixin) for c in cores] == [False, True, True, True]
    assert [getattr(c, "apply_metric", False) for c in cores] == [False, False, True, True]  # 2 only stores
    assert set(model.state_dict()) == set(plain.state_dict())  # checkpoints are interchangeable
    off = _gpt(EllipticalSettings(enabled=False), num_layers=4)
    assert all(type(layer.self_attention.core_attention) is DotProductAttention for layer in off.decoder.layers)


@pytest.mark.parametrize("source, causal", [("prefix", True), ("sequence", False)])
def test_prefix_source_is_causal_in_a_gpt(megatron_ws1, source, causal):
    """Dense GPT (no MoE layer) with elliptical attention: with ``prefix`` the logits at t <= 9 do
    not change when tokens after t change; with the paper's ``sequence`` mean they do."""
    model = _gpt(EllipticalSettings(enabled=True, source=source), router="topk", num_moe_experts=None,
                 moe_ffn_hidden_size=None)
    model.eval()
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    later = tokens.clone()
    later[:, 10:] = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(24).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        a, b = model(tokens, pos, None), model(later, pos, None)
    diff = (a[:, :10] - b[:, :10]).abs().max().item()
    if causal:
        assert diff <= 1e-6, diff
    else:
        assert diff > 1e-4, diff


@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
])
def test_recompute_replays_read_their_micro_batch(megatron_ws1, recompute):
    """Two micro-batches forward, then both backwards (the 1F1B order on a non-last stage): replays
    of micro-batch 0 run after micro-batch 1's forward and must read micro-batch 0's values."""
    settings = EllipticalSettings(enabled=True)
    grads = []
    for cfg in ({}, recompute):
        model = _gpt(settings, router="topk", **cfg)  # top-k: only the values depend on the micro-batch
        g = torch.Generator().manual_seed(6)
        pos = torch.arange(16).unsqueeze(0).expand(2, -1)
        # an explicit causal mask: megatron's default one is made with device="cuda" in the replay,
        # where the CPU runtime's device redirection (a torch-function mode) is not active
        mask = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1)[None, None]
        outs = []
        for _ in range(2):
            tokens = torch.randint(0, 128, (2, 16), generator=g)
            outs.append(model(tokens, pos, mask, labels=tokens))  # the hooks mark each micro-batch
        for out in outs:
            out.float().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------
# configuration and refusals


def test_recipe_section_and_overrides():
    from acmoe_megatron.core.errors import ConfigError
    from acmoe_megatron.runtime.recipe import load_recipe

    recipe = load_recipe("configs/tiny_cpu.yaml", ["elliptical.enabled=true", "elliptical.source=prefix"])
    assert recipe.elliptical == EllipticalSettings(enabled=True, first_layer=2, source="prefix", scale="standard")
    assert recipe.to_dict()["elliptical"]["enabled"] is True
    assert load_recipe("configs/tiny_cpu.yaml").elliptical.enabled is False
    with pytest.raises(ConfigError, match=r"unknown key elliptical.first_layers \(did you mean 'first_layer'"):
        load_recipe("configs/tiny_cpu.yaml", ["elliptical.first_layers=3"])
    with pytest.raises(ConfigError, match="elliptical.first_layer=1: must be an integer >= 2"):
        load_recipe("configs/tiny_cpu.yaml", ["elliptical.first_layer=1"])
    with pytest.raises(ConfigError, match="elliptical.source='causal'"):
        load_recipe("configs/tiny_cpu.yaml", ["elliptical.source=causal"])
    with pytest.raises(ConfigError, match="elliptical.scale='sqrt'"):
        load_recipe("configs/tiny_cpu.yaml", ["elliptical.scale=sqrt"])


def _validate(*overrides):
    from megatron.training.arguments import add_megatron_arguments

    from acmoe_megatron.runtime.megatron_args import validate_args
    from acmoe_megatron.runtime.recipe import load_recipe, megatron_argv

    recipe = load_recipe("configs/tiny_cpu.yaml", list(overrides))
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    validate_args(parser.parse_args(megatron_argv(recipe.megatron)), recipe)


def test_validate_args_refuses_context_parallelism_and_allows_dense_models():
    from acmoe_megatron.core.errors import ConfigError

    _validate("elliptical.enabled=true")
    with pytest.raises(ConfigError, match="context_parallel_size=2"):
        _validate("elliptical.enabled=true", "megatron.context_parallel_size=2")
    _validate("megatron.context_parallel_size=2")  # only elliptical attention needs whole sequences
    with pytest.raises(ConfigError, match="elliptical.first_layer=5 but the model has only 4 layers"):
        _validate("elliptical.enabled=true", "elliptical.first_layer=5")
    dense = ["megatron.num_experts=null", "megatron.moe_router_topk=null", "megatron.moe_ffn_hidden_size=null"]
    _validate(*dense, "elliptical.enabled=true", "acmoe.router=topk")
    with pytest.raises(ConfigError, match="num_experts is not set"):
        _validate(*dense, "elliptical.enabled=true")  # router=ac needs MoE layers


def test_build_refuses_what_the_estimator_cannot_do():
    base = dict(context_parallel_size=1, multi_latent_attention=False, cuda_graph_impl="none",
                fine_grained_activation_offloading=False, offload_modules=[], num_layers=4)
    settings = EllipticalSettings(enabled=True)
    check_supported(types.SimpleNamespace(**base), settings)
    for change, message in [
        (dict(context_parallel_size=2), "context_parallel_size=2"),
        (dict(multi_latent_attention=True), "multi-latent"),
        (dict(cuda_graph_impl="local"), "cuda_graph_impl='local'"),
        (dict(fine_grained_activation_offloading=True, offload_modules=["core_attn"]), "offload_modules"),
        (dict(num_layers=1), "first_layer=2 but the model has only 1 layers"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_supported(types.SimpleNamespace(**{**base, **change}), settings)
