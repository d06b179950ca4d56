"""Put our routers (and elliptical core attention) into a megatron decoder block spec.

``patch_block_spec(spec, settings, config)`` takes a spec the caller already built — megatron's
``get_gpt_decoder_block_spec`` with Transformer Engine or local modules, any options (``qk_l2_norm``,
``moe_layer_freq`` patterns, pipeline/virtual-pipeline slicing), or a customised one — and replaces
only ``MoESubmodules.router`` of each MoE layer built on this stage; everything else stays the
caller's:

  MoE layer ordinal (1-based among MoE layers)   router (core/registry.py)
  < first_ac_layer, for ac / cosine               the ``lead_router``: LabelSourceRouter (megatron's
                                                  linear top-k, default) or CosineRouter
  otherwise                                       the class registered under ``settings.router``

A router whose registry entry is ``from_first_ac_layer`` (ac, cosine) starts at ``first_ac_layer``;
the baselines route every MoE layer, as in their papers. The layer arithmetic is
``core.layers.layer_routers`` on the config's ``num_layers`` / ``moe_layer_freq`` (the HF export
reads the same). ``LabelSourceRouter`` is megatron's
``TopKRouter`` unchanged plus label/metric recording, so every router gets the same routing
metrics. megatron shares one MoE layer spec object across layers, so each patched layer gets its
own shallow copy (``dataclasses.replace``). ``acmoe_block_spec`` = megatron's own GPT decoder block
spec, patched. The per-micro-batch state the routers share is attached to the built model by
``plugin.attach``.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    _get_block_submodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from acmoe_megatron.core import layers, registry
from acmoe_megatron.core.settings import ACSettings, EllipticalSettings
from acmoe_megatron.model.elliptical import elliptical_layer_specs


def decoder_layers(config, hybrid_pattern: str | None = None) -> tuple[int, int | list[int]]:
    """(number of decoder layers, MoE pattern): a GPTModel's ``num_layers`` and ``moe_layer_freq``,
    or those of a HybridModel's layer pattern (``core.layers.hybrid_layers``)."""
    if hybrid_pattern:
        return layers.hybrid_layers(hybrid_pattern)
    return config.num_layers, config.moe_layer_freq


def moe_layer_numbers(config, hybrid_pattern: str | None = None) -> list[int]:
    """Global 1-based layer numbers of all MoE layers (none without ``num_moe_experts``)."""
    if not config.num_moe_experts:
        return []
    return layers.moe_layers(*decoder_layers(config, hybrid_pattern))


def layer_router_names(config, settings: ACSettings, hybrid_pattern: str | None = None) -> list[str | None]:
    """The registry name of each global layer's router (None: dense), ``layers.layer_routers``."""
    num_layers, freq = decoder_layers(config, hybrid_pattern)
    if not config.num_moe_experts:
        return [None] * num_layers
    return layers.layer_routers(num_layers, freq, settings.router, settings.first_ac_layer, settings.lead_router)


def router_builder(name: str, settings: ACSettings, vocab_size: int | None = None):
    """megatron's ``MoESubmodules.router`` for our router ``name``: its class with its settings."""
    cls = registry.router_class(name)
    return functools.partial(cls, **cls.spec_kwargs(settings, vocab_size=vocab_size))


def local_layer_numbers(config, vp_stage=None, pp_rank=None) -> list[int]:
    """Global 1-based numbers of the decoder layers built on this (virtual) pipeline stage."""
    layout = config.pipeline_model_parallel_layout
    if config.pipeline_model_parallel_size > 1 and layout is not None:
        from megatron.core.transformer.enums import LayerType

        ids = layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)
        return [i + 1 for i in ids]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset + 1, offset + n + 1))


def with_router(layer_spec, builder):
    """Copy of a MoE layer spec whose ``MoESubmodules.router`` is ``builder`` (the MLP given
    as megatron's ``functools.partial(MoELayer, submodules=...)`` or as a ``ModuleSpec``)."""
    mlp = layer_spec.submodules.mlp
    if isinstance(mlp, functools.partial):
        moe_submodules = dataclasses.replace(mlp.keywords["submodules"], router=builder)
        new_mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": moe_submodules})
    else:
        new_mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, router=builder))
    return dataclasses.replace(
        layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=new_mlp)
    )


def _moe_class(mlp) -> type | None:
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(mlp, functools.partial):
        cls = mlp.func
    elif isinstance(mlp, ModuleSpec):
        cls = mlp.module
    else:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, MoELayer) else None


def is_moe_layer_spec(layer_spec) -> bool:
    submodules = layer_spec.submodules if hasattr(layer_spec, "submodules") else None
    return submodules is not None and hasattr(submodules, "mlp") and _moe_class(submodules.mlp) is not None


def patch_block_spec(
    spec,
    settings: ACSettings,
    config,
    *,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    vocab_size: int | None = None,
    elliptical: EllipticalSettings | None = None,
) -> TransformerBlockSubmodules:
    """``spec`` (a block spec, or one layer spec for all layers) with our routers in its MoE layers.

    ``vp_stage`` / ``pp_rank`` as given to megatron when ``spec`` was built (the global layer
    numbers of its layers follow from them). ``vocab_size`` (the padded vocabulary) is needed by
    ``stablemoe`` only (its distilled router embeds token ids). ``elliptical``: Elliptical
    Attention in the core attention of the layers from ``first_layer - 1`` on."""
    block = _get_block_submodules(config, spec, vp_stage=vp_stage, pp_rank=pp_rank)
    numbers = local_layer_numbers(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if len(numbers) != len(block.layer_specs):
        raise ValueError(
            f"the spec has {len(block.layer_specs)} layer specs but this stage builds layers {numbers}: "
            "pass the vp_stage / pp_rank the spec was built for"
        )
    routers = layer_router_names(config, settings)
    layer_specs = []
    for n, layer_spec in zip(numbers, block.layer_specs):
        if (name := routers[n - 1]) is not None:
            if not is_moe_layer_spec(layer_spec):
                raise ValueError(
                    f"layer {n} is an MoE layer by moe_layer_freq={config.moe_layer_freq!r}, but its spec "
                    f"has no megatron MoELayer MLP ({layer_spec!r}); build the spec with num_experts set"
                )
            layer_spec = with_router(layer_spec, router_builder(name, settings, vocab_size))
        layer_specs.append(layer_spec)
    layer_specs = elliptical_layer_specs(config, elliptical, numbers, layer_specs)
    return dataclasses.replace(block, layer_specs=layer_specs)


def acmoe_block_spec(
    config,
    settings: ACSettings,
    use_transformer_engine: bool,
    normalization: str | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    vocab_size: int | None = None,
    elliptical: EllipticalSettings | None = None,
    qk_l2_norm: bool = False,
) -> TransformerBlockSubmodules:
    """Megatron's own GPT decoder block spec (``get_gpt_decoder_block_spec``, with the options
    megatron's ``pretrain_gpt`` passes it), patched."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_transformer_engine, normalization=normalization,
        qk_l2_norm=qk_l2_norm, vp_stage=vp_stage, pp_rank=pp_rank,
    )
    return patch_block_spec(block, settings, config, vp_stage=vp_stage, pp_rank=pp_rank,
                            vocab_size=vocab_size, elliptical=elliptical)
