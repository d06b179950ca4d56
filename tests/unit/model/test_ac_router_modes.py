"""AC router behaviour beyond the defaults: no host syncs, batch vs EMA statistics (the causal
leak and its fix), presets, megatron router features on top of AC scores, label hand-off."""

import pytest
import torch

from acmoe_megatron.core.settings import PRESETS, ACSettings
from acmoe_megatron.model.chunk_state import state_of
from acmoe_megatron.model.routers import ACRouter
from acmoe_megatron.testing import build_gpt, tiny_config

pytestmark = pytest.mark.usefixtures("megatron_ws1")
SEQ, VOCAB = 32, 128


def _model(settings, **cfg):
    torch.manual_seed(0)
    return build_gpt(tiny_config(**cfg), settings, vocab_size=VOCAB, max_sequence_length=SEQ)


def _tokens(seed=1, b=2):
    return torch.randint(0, VOCAB, (b, SEQ), generator=torch.Generator().manual_seed(seed))


def _forward(model, tokens, labels=None):
    state_of(model).reset()
    pos = torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], -1)
    return model(tokens, pos, None, labels=labels)


@pytest.mark.parametrize("source", ["batch", "ema"])
@pytest.mark.parametrize("mode", ["release", "clean"])
def test_ac_forward_backward_make_no_host_sync(monkeypatch, source, mode):
    model = _model(ACSettings(first_ac_layer=2, source=source, mode=mode))
    model.train()
    tokens = _tokens()

    def refuse(*_a, **_k):
        raise AssertionError("host sync (.item()/.tolist()) on the AC path")

    # route through the AC layers only (the layer objects, not megatron's dispatcher, which
    # legitimately moves split sizes to the host)
    x = torch.randn(SEQ, 2, 64, requires_grad=True)
    src, ac = model.decoder.layers[0].mlp.router, model.decoder.layers[1].mlp.router
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    src(x)
    probs, _ = ac(x)
    probs.sum().backward()
    monkeypatch.undo()
    assert torch.isfinite(probs).all() and tokens.shape == (2, SEQ)


def test_batch_statistics_leak_future_tokens_and_ema_does_not():
    """Under `batch` the logits at position t depend on tokens after t (the paper's statistics
    include the whole micro-batch); under `ema` they do not."""
    t = SEQ // 2
    a = _tokens(seed=3, b=2)
    b = a.clone()
    b[:, t + 1:] = torch.randint(0, VOCAB, b[:, t + 1:].shape, generator=torch.Generator().manual_seed(9))

    leaky = _model(ACSettings(first_ac_layer=2, source="batch"))
    leaky.eval()
    with torch.no_grad():
        la, lb = _forward(leaky, a), _forward(leaky, b)
    assert not torch.allclose(la[:, : t + 1], lb[:, : t + 1]), "batch statistics should leak"

    causal = _model(ACSettings(first_ac_layer=2, source="ema"))
    causal.train()
    opt = torch.optim.SGD(causal.parameters(), lr=0.01)
    for step in range(3):  # fill the running statistics
        loss = _forward(causal, _tokens(seed=10 + step), labels=_tokens(seed=20 + step)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    routers = [m for m in causal.modules() if isinstance(m, ACRouter)]
    assert all((r.ac_ema_count > 0).any() for r in routers)
    causal.eval()
    with torch.no_grad():
        ca, cb = _forward(causal, a), _forward(causal, b)
    torch.testing.assert_close(ca[:, : t + 1], cb[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(ca[:, t + 1:], cb[:, t + 1:])


def test_ema_source_logs_the_ac_internals():
    """An ``acmoe.source=ema`` run's AC layers log weight spread, clip rate and separation like a
    batch-statistics run: this micro-batch's clusters under the running transform that routed them
    (before the micro-batch is blended in: M = I on the first step, the running weights after)."""
    from acmoe_megatron.observability.metrics import flush

    model = _model(ACSettings(first_ac_layer=2, source="ema"))
    model.train()
    state = state_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    means = []
    for step in range(2):
        loss = _forward(model, _tokens(seed=10 + step), labels=_tokens(seed=20 + step)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        scalars = flush([state.metrics], None, iteration=step + 1)
        ac_tags = sorted(t for t in scalars if t.startswith("ac/"))
        assert ac_tags == sorted(f"ac/layer{layer:02d}/{name}" for layer in (2, 3, 4) for name in (
            "weight_mean", "weight_max", "clip_rate", "cluster_mad_mean", "separation_raw", "separation_ac"))
        means.append([scalars[f"ac/layer{layer:02d}/weight_mean"] for layer in (2, 3, 4)])
        # the transform that routed this micro-batch: identity before any statistics were seen
        same = [abs(scalars[f"ac/layer{layer:02d}/separation_ac"] - scalars[f"ac/layer{layer:02d}/separation_raw"])
                < 1e-5 * scalars[f"ac/layer{layer:02d}/separation_raw"] for layer in (2, 3, 4)]
        assert all(same) == (step == 0)
    assert means[0] == pytest.approx([1.0] * 3) and means[1] != pytest.approx([1.0] * 3)


def test_ema_statistics_are_in_the_state_dict():
    model = _model(ACSettings(first_ac_layer=2, source="ema"))
    keys = [k for k in model.state_dict() if "ac_ema" in k]
    assert len(keys) == 2 * 4  # count and MAD on every MoE router (uniform keys for torch_dist)
    sharded = model.sharded_state_dict()
    assert any("ac_ema_mad" in k for k in sharded)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_set_the_code_bases_constants(preset):
    s = ACSettings(preset=preset)
    assert s.constants() == PRESETS[preset]
    assert ACSettings(preset=preset, clip=3.0).constants()["clip"] == 3.0


@pytest.mark.parametrize("cfg", [
    dict(moe_router_load_balancing_type="seq_aux_loss"),
    dict(moe_router_load_balancing_type="global_aux_loss"),
    dict(moe_router_load_balancing_type="none", moe_router_enable_expert_bias=True,
         moe_router_score_function="sigmoid", moe_aux_loss_coeff=0.0),
    dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"),
    dict(moe_router_dtype="fp64"),
    dict(moe_z_loss_coeff=1e-3),
    dict(num_moe_experts=8, moe_router_num_groups=2, moe_router_group_topk=1),
])
def test_megatron_router_features_work_on_ac_scores(cfg):
    model = _model(ACSettings(first_ac_layer=2), **cfg)
    model.train()
    loss = _forward(model, _tokens(), labels=_tokens(seed=2)).mean()
    loss.backward()
    ac = model.decoder.layers[1].mlp.router
    assert isinstance(ac, ACRouter) and ac.weight.grad is not None and torch.isfinite(loss)
    if cfg.get("moe_router_dtype") == "fp64":
        assert ac.gating(torch.randn(SEQ, 2, 64)).dtype == torch.float64


@pytest.mark.parametrize("router", ["ac", "cosine"])
def test_compile_changes_nothing_but_the_kernels(router):
    """acmoe.compile: the same model with compiled statistics/weights/scores gives the same loss and
    the same router and input gradients as eager (on CPU: inductor's C++ backend)."""
    import shutil

    if shutil.which("c++") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (none on PATH)")
    tokens = _tokens(seed=4)
    results = []
    for compile_ in (False, True):
        model = _model(ACSettings(router=router, first_ac_layer=2, compile=compile_))
        model.train()
        loss = _forward(model, tokens, labels=tokens).float().mean()
        loss.backward()
        grads = [p.grad.clone() for n, p in model.named_parameters() if "router" in n]
        results.append((loss.detach(), grads))
    (loss_e, grads_e), (loss_c, grads_c) = results
    from acmoe_megatron.core import ac_stats
    assert ac_stats.scores_forward in ac_stats._COMPILED  # the compiled path really ran
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    assert len(grads_e) == len(grads_c) > 0
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_is_refused_for_routers_it_does_not_apply_to():
    with pytest.raises(ValueError, match="acmoe.compile applies to the ac and cosine routers"):
        ACSettings(router="topk", compile=True)


def test_ac_logits_stay_fp32_under_autocast():
    """acmoe: statistics and scores in fp32 whatever the training precision — also inside a
    torch.autocast(bf16) region (the router's own guard, not the caller's)."""
    model = _model(ACSettings(first_ac_layer=2))
    src, ac = model.decoder.layers[0].mlp.router, model.decoder.layers[1].mlp.router
    x = torch.randn(SEQ, 2, 64, generator=torch.Generator().manual_seed(5))
    src(x)
    ref = ac.gating(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ac.gating(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
