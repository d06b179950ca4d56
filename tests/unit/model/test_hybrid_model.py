"""megatron-core's HybridModel with our routers: the pattern ``*E*E*E*E`` is the GPTModel of 4 MoE
layers (same weights -> same losses and router gradients, step by step), dense MLP layers between
MoE layers leave the AC placement on the MoE layers, and the spec is refused where it cannot work."""

import re

import pytest
import torch

from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.model.chunk_state import state_of
from acmoe_megatron.model.hybrid_spec import PerLayerMoETransformerLayer, acmoe_hybrid_stack_spec
from acmoe_megatron.model.routers import ACRouter, LabelSourceRouter
from acmoe_megatron.runtime.attach import attach
from acmoe_megatron.testing import build_gpt, tiny_config

pytestmark = pytest.mark.usefixtures("megatron_ws1")
SEQ, VOCAB = 32, 128


@pytest.fixture(autouse=True)
def _own_metrics_tracker(monkeypatch):
    """megatron's MoE metrics tracker is a process global sized by the first model's layer count:
    each model here gets its own (megatron's global restored after the test)."""
    from megatron.core.transformer.moe import moe_logging

    monkeypatch.setattr(moe_logging, "_MOE_METRICS_TRACKER", None)


def _hybrid(pattern, settings, **cfg):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    n = len(pattern.replace("|", ""))
    config = tiny_config(num_layers=n, **cfg)
    spec = acmoe_hybrid_stack_spec(config, settings, pattern, use_transformer_engine=False, vocab_size=VOCAB)
    model = HybridModel(config=config, hybrid_stack_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                        hybrid_layer_pattern=pattern, position_embedding_type="rope")
    attach(model)
    return model


def _gpt_to_hybrid(name: str) -> str:
    """A GPTModel parameter name -> the HybridModel's (attention and MLP halves of layer i are hybrid
    layers 2i and 2i+1; the final norm is final_norm)."""
    m = re.match(r"decoder\.layers\.(\d+)\.(input_layernorm|self_attention|pre_mlp_layernorm|mlp)\.(.*)", name)
    if m:
        i, part, rest = int(m.group(1)), m.group(2), m.group(3)
        j = 2 * i if part in ("input_layernorm", "self_attention") else 2 * i + 1
        return f"decoder.layers.{j}.{part}.{rest}"
    return name.replace("decoder.final_layernorm.", "decoder.final_norm.")


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    return tokens, torch.randint(0, VOCAB, (2, SEQ), generator=g)


def _train(model, steps=3):
    from megatron.core.transformer.moe import moe_logging

    moe_logging.destroy_moe_metrics_tracker()  # sized by this model's layers
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, grads = [], []
    pos = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
    for step in range(steps):
        tokens, labels = _batch(step)
        state_of(model).reset()
        loss = model(tokens, pos, None, labels=labels).mean()
        opt.zero_grad()
        loss.backward()
        routers = sorted((m.layer_number, m) for m in model.modules() if isinstance(m, LabelSourceRouter | ACRouter))
        grads.append([torch.cat([p.grad.reshape(-1) for p in r.parameters() if p.grad is not None]).norm().item()
                      for _, r in routers])
        opt.step()
        losses.append(loss.item())
    return losses, grads


@pytest.mark.parametrize("source", ["batch", "ema"])
def test_pattern_of_moe_layers_equals_the_gpt_model(source):
    settings = ACSettings(first_ac_layer=3, source=source)
    torch.manual_seed(0)
    gpt = build_gpt(tiny_config(num_layers=4), settings, vocab_size=VOCAB, max_sequence_length=SEQ)
    hybrid = _hybrid("*E*E*E*E", settings)
    mapped = {_gpt_to_hybrid(k): v for k, v in gpt.state_dict().items()}
    missing, unexpected = hybrid.load_state_dict(mapped, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected, (missing, unexpected)
    routers = {m.layer_number: type(m) for m in hybrid.modules() if isinstance(m, LabelSourceRouter | ACRouter)}
    assert routers == {2: LabelSourceRouter, 4: LabelSourceRouter, 6: ACRouter, 8: ACRouter}
    assert all(isinstance(hybrid.decoder.layers[i], PerLayerMoETransformerLayer) for i in (1, 3, 5, 7))
    gpt_losses, gpt_grads = _train(gpt)
    hybrid_losses, hybrid_grads = _train(hybrid)
    assert hybrid_losses == gpt_losses  # the same computation in the same order: bitwise equal on CPU
    assert hybrid_grads == gpt_grads


def test_dense_layers_between_moe_layers_route_ac_from_the_previous_moe_layer():
    hybrid = _hybrid("*-*E*E*E", ACSettings(first_ac_layer=2))
    routers = {m.layer_number: type(m) for m in hybrid.modules() if isinstance(m, LabelSourceRouter | ACRouter)}
    assert routers == {4: LabelSourceRouter, 6: ACRouter, 8: ACRouter}
    state = state_of(hybrid)
    assert state.moe_layer_numbers == [4, 6, 8] and state.previous_moe_layer(6) == 4
    losses, _ = _train(hybrid, steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_patterns_the_local_stack_cannot_build_are_refused():
    config = tiny_config(num_layers=4)
    with pytest.raises(ValueError, match=r"layers \['M'\] need Transformer Engine"):
        acmoe_hybrid_stack_spec(config, ACSettings(first_ac_layer=2), "M*EE", use_transformer_engine=False)


def test_first_ac_layer_counts_the_patterns_moe_layers():
    from acmoe_megatron.core.errors import ConfigError
    from acmoe_megatron.runtime.recipe import load_recipe
    from acmoe_megatron.runtime.run_plan import build_plan

    recipe = load_recipe("configs/tiny_cpu.yaml", ["megatron.hybrid_layer_pattern='*-*E*E'", "acmoe.first_ac_layer=3"])
    with pytest.raises(ConfigError, match="acmoe.first_ac_layer=3 but the model has only 2 MoE layers"):
        build_plan(recipe, 2, host_checks=False)
