"""The plugin API (plugin.py) and the router registry, in one process: flags <-> settings, the spec
patch on specs the caller built, attach and the failure without it. The launched parity of a plain
Megatron script against our launcher is in test_ac_parallel_layouts.py."""

import argparse
import dataclasses
import subprocess
import sys

import pytest
import torch

from acmoe_megatron import plugin
from acmoe_megatron.core import registry
from acmoe_megatron.core.settings import ACSettings, EllipticalSettings, router_class

# -- flags and settings (no model) ---------------------------------------------------------------


def _parse(argv):
    return plugin.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_flags_map_to_the_settings_the_recipes_use():
    args = _parse(["--acmoe-router", "cosine", "--acmoe-first-ac-layer", "2", "--acmoe-expert-norm", "1.5",
                   "--acmoe-eps", "none", "--acmoe-compile", "--acmoe-elliptical-enabled",
                   "--acmoe-elliptical-source", "prefix"])
    acmoe, elliptical = plugin.settings_from_args(args)
    assert acmoe == ACSettings(router="cosine", first_ac_layer=2, expert_norm=1.5, compile=True)
    assert elliptical == EllipticalSettings(enabled=True, source="prefix")
    assert plugin.settings_from_args(_parse([])) == (ACSettings(), EllipticalSettings())  # defaults


def test_every_setting_has_a_flag_and_round_trips():
    """settings_argv -> flags -> settings is the identity, for a value of every key off its default."""
    acmoe = ACSettings(router="cosine", first_ac_layer=2, lead_router="cosine", preset="swin", eps=0.5, clip=3.0,
                       norm="global_post", mode="clean", min_cluster_size=3, scope="local", source="ema", ema_decay=0.9,
                       compile=True, expert_norm=1.5, xmoe_dim=4, usmoe_rate=0.25, etr_trainable_affinity=True,
                       stablemoe_stage1_fraction=0.2, stablemoe_distill_dim=8, stablemoe_distill_coeff=0.1)
    elliptical = EllipticalSettings(enabled=True, first_layer=3, source="prefix", scale="none")
    defaults = [f.name for f in dataclasses.fields(ACSettings) if getattr(acmoe, f.name) == f.default]
    assert defaults == [], defaults  # the test really moves every key
    argv = plugin.settings_argv(acmoe, elliptical)
    assert plugin.settings_from_args(_parse(argv)) == (acmoe, elliptical)
    assert plugin.settings_argv(ACSettings(), EllipticalSettings()) == []


@pytest.mark.parametrize("argv, match", [
    (["--acmoe-first-ac-layer", "0"], r"--acmoe-first-ac-layer=0: must be an integer >= 1"),
    (["--acmoe-router", "linear"], r"--acmoe-router='linear': choose one of"),
    (["--acmoe-elliptical-first-layer", "1"], r"--acmoe-elliptical-first-layer=1: must be an integer >= 2"),
])
def test_bad_flags_name_the_flag(argv, match):
    with pytest.raises(ValueError, match=match):
        plugin.settings_from_args(_parse(argv))


def test_megatron_parser_takes_the_flags():
    """add_arguments as megatron's extra_args_provider: megatron's own parser accepts --acmoe-*."""
    from megatron.training.arguments import add_megatron_arguments

    parser = plugin.add_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(["--num-layers", "4", "--acmoe-router", "xmoe", "--acmoe-xmoe-dim", "8"])
    assert args.num_layers == 4 and plugin.settings_from_args(args)[0] == ACSettings(router="xmoe", xmoe_dim=8)


def test_router_registry_is_the_one_table():
    from acmoe_megatron.model.routers import LabelSourceRouter

    for name in registry.names():
        cls = router_class(name)
        assert issubclass(cls, LabelSourceRouter) and registry.name_of(cls) == name  # one name per class
    assert router_class("stablemoe").reported_losses == ("stablemoe_distill_loss",)
    assert [n for n in registry.names() if registry.entry(n).from_first_ac_layer] == ["ac", "cosine"]
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        router_class("nope")


def test_validating_a_recipe_imports_no_model_code():
    code = ("import sys; from acmoe_megatron.runtime.recipe import load_recipe; "
            "load_recipe('configs/tiny_cpu.yaml', ['acmoe.router=xmoe', 'elliptical.enabled=true']); "
            "bad = [m for m in sys.modules if m.startswith('acmoe_megatron.') and m.split('.')[1] in "
            "('routers', 'baseline_routers', 'elliptical', 'spec', 'chunk_state', 'ac_stats', 'plugin')]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


# -- the spec patch and attach (world size 1) ----------------------------------------------------


def _routers(model):
    from megatron.core.transformer.moe.router import TopKRouter

    return {m.layer_number: type(m).__name__ for m in model.modules() if isinstance(m, TopKRouter)}


@pytest.mark.usefixtures("megatron_ws1")
def test_patch_keeps_the_callers_spec_and_takes_a_single_layer_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer.torch_norm import L2Norm

    from acmoe_megatron.testing import tiny_config

    config = tiny_config()
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, qk_l2_norm=True)
    patched = plugin.patch_block_spec(block, ACSettings(first_ac_layer=2), config)
    for layer in patched.layer_specs:  # the caller's qk_l2_norm survives the patch
        assert layer.submodules.self_attention.submodules.q_layernorm is L2Norm
    routers = [layer.submodules.mlp.keywords["submodules"].router.func.__name__ for layer in patched.layer_specs]
    assert routers == ["LabelSourceRouter", "ACRouter", "ACRouter", "ACRouter"]
    assert block.layer_specs[1].submodules.mlp.keywords["submodules"].router.__name__ == "TopKRouter"  # untouched
    one = get_gpt_layer_local_spec(num_experts=4, qk_l2_norm=True)  # one ModuleSpec for every layer
    patched_one = plugin.patch_block_spec(one, ACSettings(first_ac_layer=3), config)
    assert [s.submodules.mlp.keywords["submodules"].router.func.__name__ for s in patched_one.layer_specs] == [
        "LabelSourceRouter", "LabelSourceRouter", "ACRouter", "ACRouter"]
    with pytest.raises(ValueError, match="pass the vp_stage / pp_rank"):
        plugin.patch_block_spec(block, ACSettings(), tiny_config(num_layers=6))
    # acmoe.lead_router: the MoE layers before first_ac_layer get the cosine router instead
    lead_cosine = plugin.patch_block_spec(block, ACSettings(first_ac_layer=3, lead_router="cosine"), config)
    assert [s.submodules.mlp.keywords["submodules"].router.func.__name__ for s in lead_cosine.layer_specs] == [
        "CosineRouter", "CosineRouter", "ACRouter", "ACRouter"]


@pytest.mark.usefixtures("megatron_ws1")
def test_stock_forward_without_attach_fails_loudly():
    """Our routers in a model nobody attached: the first forward raises and names the fix, for the
    layer that would otherwise route without labels or without recording them."""
    from megatron.core.models.gpt import GPTModel

    from acmoe_megatron.model.chunk_state import state_of
    from acmoe_megatron.model.spec import acmoe_block_spec
    from acmoe_megatron.testing import tiny_config

    config = tiny_config()
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    for router in ("ac", "topk", "stablemoe"):
        spec = acmoe_block_spec(config, ACSettings(router=router, first_ac_layer=2), use_transformer_engine=False,
                                vocab_size=128)
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=64,
                         position_embedding_type="rope")
        assert state_of(model) is None
        with pytest.raises(RuntimeError, match=r"not attached\. Call acmoe_megatron\.plugin\.attach\(model\)"):
            model(tokens, pos, None, labels=tokens)
        (state,) = plugin.attach(model, progress=lambda: (0, 100))
        assert state_of(model) is state and _routers(model)[1] in ("LabelSourceRouter", "StableMoERouter")
        loss = model(tokens, pos, None, labels=tokens)  # attached: the same call works
        loss.float().mean().backward()
        with pytest.raises(RuntimeError, match="already attached"):
            plugin.attach(model)


@pytest.mark.usefixtures("megatron_ws1")
def test_hooks_run_the_micro_batch_protocol():
    """Each forward is a new micro-batch holding its token ids; evaluation keeps only the current one;
    a backward announces its micro-batch (what recompute replays rely on)."""
    from acmoe_megatron.model.chunk_state import LABELS, TOKENS, state_of
    from acmoe_megatron.testing import build_gpt, tiny_config

    model = build_gpt(tiny_config(), ACSettings(first_ac_layer=2))
    state = state_of(model)
    pos = torch.arange(16).expand(2, 16)
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    losses = [model(t, pos, None, labels=t) for t in batches]
    assert state.current_mb == 1
    assert torch.equal(state.get_state(TOKENS, 0, mb=0), batches[0])
    assert state.get_state(LABELS, 1, mb=0) is not None and state.get_state(LABELS, 1, mb=1) is not None
    losses[0].float().mean().backward()  # 1F1B: micro-batch 0's backward after micro-batch 1's forward
    assert state.current_mb == 0
    losses[1].float().mean().backward()
    assert state.current_mb == 1 and state.get_state(LABELS, 1, mb=0) is None  # done micro-batches dropped
    with torch.no_grad():
        model(batches[0], pos, None, labels=batches[0])
    assert {key[1] for key in state._state} == {2}  # evaluation: only the current micro-batch


@pytest.mark.usefixtures("megatron_ws1")
def test_bridge_layer_spec_is_called_the_way_megatron_bridge_calls_it():
    """Megatron-Bridge calls ``provider.transformer_layer_spec(provider, vp_stage=...)`` when the
    callable has a ``vp_stage`` parameter, with the provider being a TransformerConfig that also
    carries ``vocab_size`` and ``normalization`` (a TransformerConfig subclass stands in for its
    GPTModelProvider here; Bridge's own pretrain with it: tests/integration/test_bridge.py)."""
    import inspect

    from megatron.core.transformer.transformer_config import TransformerConfig

    from acmoe_megatron.testing import tiny_config

    @dataclasses.dataclass
    class Provider(TransformerConfig):
        vocab_size: int = 128
        normalization: str = "LayerNorm"

    base = dataclasses.asdict(tiny_config())
    provider = Provider(**{f.name: base[f.name] for f in dataclasses.fields(TransformerConfig) if f.init})
    spec_fn = plugin.bridge_layer_spec(ACSettings(router="stablemoe"), use_transformer_engine=False)
    assert "vp_stage" in inspect.signature(spec_fn).parameters
    spec = spec_fn(provider, vp_stage=None)
    builders = [layer.submodules.mlp.keywords["submodules"].router for layer in spec.layer_specs]
    assert all(b.func.__name__ == "StableMoERouter" and b.keywords["vocab_size"] == 128 for b in builders)
    from megatron.core.models.gpt import GPTModel

    from acmoe_megatron.model.chunk_state import state_of

    model = GPTModel(config=provider, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=64)
    chunks = [model]
    assert plugin.pre_wrap_hook(progress=lambda: (0, 10))(chunks) is chunks  # Bridge's pre-wrap hook contract
    assert state_of(model) is not None and state_of(model).progress() == (0, 10)


@pytest.mark.usefixtures("megatron_ws1")
def test_bridge_layer_spec_refuses_expert_biases_megatron_cannot_train():
    """add_bias_linear with SequentialMLP experts at expert-TP 1 fails at the first training forward
    inside megatron-core 0.19 (tests/unit/runtime/test_validate_args.py); the Bridge path refuses it
    when the spec is built, in Bridge's own words (``model.add_bias_linear``), for both model APIs."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from acmoe_megatron.core.errors import ConfigError
    from acmoe_megatron.testing import tiny_config

    @dataclasses.dataclass
    class Provider(TransformerConfig):
        vocab_size: int = 128
        normalization: str = "LayerNorm"

    base = {**dataclasses.asdict(tiny_config()), "add_bias_linear": True}
    provider = Provider(**{f.name: base[f.name] for f in dataclasses.fields(TransformerConfig) if f.init})
    assert provider.num_moe_experts and not provider.moe_grouped_gemm
    spec_fn = plugin.bridge_layer_spec(ACSettings(router="ac"))
    with pytest.raises(ConfigError, match="model.add_bias_linear=True .*set model.add_bias_linear=false"):
        spec_fn(provider, vp_stage=None)

    @dataclasses.dataclass
    class ModelConfig:  # megatron's GPTModelConfig: a TransformerConfig in ``.transformer``
        transformer: TransformerConfig
        vocab_size: int = 128

    with pytest.raises(ConfigError, match="model.add_bias_linear=True"):
        spec_fn(ModelConfig(provider), vp_stage=None)
    provider.add_bias_linear, provider.transformer_impl = False, "local"  # local modules, as the config says
    spec = spec_fn(ModelConfig(provider), vp_stage=None)
    assert all(layer.submodules.mlp.keywords["submodules"].router.func.__name__ in ("LabelSourceRouter", "ACRouter")
               for layer in spec.layer_specs)
