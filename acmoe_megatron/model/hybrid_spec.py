"""Our routers in megatron-core's ``HybridModel`` (the model megatron-core 0.19 develops; its
``GPTModel`` takes critical fixes only).

A HybridModel is described by a layer pattern (``*`` attention, ``-`` MLP, ``E`` MoE, ``M`` Mamba,
``|`` pipeline stage boundaries, ``/`` MTP depths) and a ``HybridStack`` spec whose ``moe_layer``
(a ``MoETransformerLayer`` with megatron's MoE module spec) is built for every ``E``, with only
its layer number. Our routers differ per MoE layer (the lead router before ``first_ac_layer``,
AC after), which one shared spec cannot say, so ``patch_hybrid_stack_spec`` replaces that spec's
module by ``PerLayerMoETransformerLayer``: megatron's ``MoETransformerLayer`` taking, as a spec
parameter, the submodules of each MoE layer by its global number (each with its router, from the
same layer arithmetic as the GPT spec: ``core.layers.hybrid_layers`` on the pattern) and building
the ones of its own number. Nothing else of the layer changes (parameter names, checkpoints,
recompute, CUDA-graph paths are megatron's).

``local_hybrid_stack_spec`` is the stack of megatron's local (non-Transformer-Engine) modules,
for CPUs and GPUs without TE: its attention, MLP and MoE layers are cut from megatron's own GPT
local layer spec (``get_gpt_layer_local_spec``) — the attention half, the MLP half — so a pattern
``*E*E`` is the same computation as a GPTModel of 2 MoE layers with the same weights (parameter
names map ``decoder.layers.{i}`` → ``decoder.layers.{2i}`` / ``{2i+1}``, ``final_layernorm`` →
``final_norm``). Megatron's stock ``hybrid_stack_spec`` is Transformer Engine only and is used
as is when TE is there. Mamba and gated-delta-net layers need CUDA kernels: the local stack has
none, and a pattern with them is refused before the build.
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import MoETransformerLayer

from acmoe_megatron.core import layers
from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.model.spec import is_moe_layer_spec, router_builder, with_router

LOCAL_SYMBOLS = frozenset("*-E")  # what the local stack builds (no Mamba / GDN / MLA / DSA kernels on CPU)


class PerLayerMoETransformerLayer(MoETransformerLayer):
    """megatron's MoETransformerLayer built from the submodules of its own layer number
    (``layer_submodules``: global layer number → ``TransformerLayerSubmodules``)."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, layer_submodules=None, **kwargs):
        if layer_submodules is not None:
            submodules = layer_submodules.get(layer_number, submodules)
        super().__init__(config, submodules, layer_number, *args, **kwargs)


def patch_hybrid_stack_spec(spec: ModuleSpec, settings: ACSettings, config, pattern: str, *,
                            vocab_size: int | None = None) -> ModuleSpec:
    """``spec`` (a ``HybridStack`` ModuleSpec) whose MoE layers route with our routers, placed by
    ``settings`` over the MoE layers of ``pattern`` as in a GPTModel (``first_ac_layer`` counts the
    pattern's ``E`` layers)."""
    moe_spec = spec.submodules.moe_layer
    if not (isinstance(moe_spec, ModuleSpec) and isinstance(moe_spec.module, type)
            and issubclass(moe_spec.module, MoETransformerLayer) and is_moe_layer_spec(moe_spec)):
        raise ValueError(f"the hybrid stack spec's moe_layer is not a megatron MoETransformerLayer with an MoE MLP "
                         f"({moe_spec!r}); build it with megatron's MoE module spec")
    num_layers, freq = layers.hybrid_layers(pattern)
    names = layers.layer_routers(num_layers, freq, settings.router, settings.first_ac_layer, settings.lead_router)
    table = {n: with_router(moe_spec, router_builder(name, settings, vocab_size)).submodules
             for n, name in enumerate(names, start=1) if name is not None}
    patched = ModuleSpec(module=PerLayerMoETransformerLayer, params={**moe_spec.params, "layer_submodules": table},
                         submodules=moe_spec.submodules)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, moe_layer=patched))


def local_hybrid_stack_spec(config, normalization: str | None = None, qk_l2_norm: bool = False) -> ModuleSpec:
    """A HybridStack of megatron's local modules: attention (``*``), MLP (``-``) and MoE (``E``)
    layers, cut from megatron's GPT local layer spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    def local(num_experts):  # the arguments megatron's get_gpt_decoder_layer_specs gives it
        return get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm if num_experts else False,
            qk_layernorm=config.qk_layernorm, multi_latent_attention=config.multi_latent_attention,
            normalization=normalization, qk_l2_norm=qk_l2_norm, use_kitchen=config.use_kitchen,
            use_kitchen_attention=config.use_kitchen_attention,
            kitchen_attention_backend=config.kitchen_attention_backend).submodules

    dense, moe = local(None), local(config.num_moe_experts)

    def attention_half(s):
        return TransformerLayerSubmodules(input_layernorm=s.input_layernorm, self_attention=s.self_attention,
                                          self_attn_bda=s.self_attn_bda,
                                          sharded_state_dict_keys_map=s.sharded_state_dict_keys_map)

    def mlp_half(s):
        return TransformerLayerSubmodules(pre_mlp_layernorm=s.pre_mlp_layernorm, mlp=s.mlp, mlp_bda=s.mlp_bda,
                                          sharded_state_dict_keys_map=s.sharded_state_dict_keys_map)

    return ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=attention_half(dense)),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=mlp_half(dense)),
        moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=mlp_half(moe)),
    ))


def acmoe_hybrid_stack_spec(config, settings: ACSettings, pattern: str, use_transformer_engine: bool,
                            normalization: str | None = None, vocab_size: int | None = None,
                            qk_l2_norm: bool = False) -> ModuleSpec:
    """megatron's own TE hybrid stack spec, or the local one, patched (what the trainer builds)."""
    if use_transformer_engine:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

        spec = hybrid_stack_spec
    else:
        unknown = sorted(set(pattern.split(layers.HYBRID_MTP)[0].replace(layers.HYBRID_PIPE, "")) - LOCAL_SYMBOLS)
        if unknown:
            raise ValueError(f"hybrid layer pattern {pattern!r}: layers {unknown} need Transformer Engine / CUDA "
                             "kernels (megatron's hybrid_stack_spec); with transformer_impl=local use only "
                             "* (attention), - (MLP) and E (MoE)")
        spec = local_hybrid_stack_spec(config, normalization=normalization, qk_l2_norm=qk_l2_norm)
    return patch_hybrid_stack_spec(spec, settings, config, pattern, vocab_size=vocab_size)
