"""Put our routers into megatron's own GPT decoder block spec (no fork of megatron code).

``acmoe_block_spec`` calls megatron's ``get_gpt_decoder_block_spec`` (local or Transformer Engine
modules, ``moe_layer_freq`` patterns, pipeline/virtual-pipeline slicing all stay megatron's) and
then replaces ``MoESubmodules.router`` of each MoE layer built on this stage:

  MoE layer ordinal (1-based among MoE layers)   router
  < first_ac_layer (or router=topk)               LabelSourceRouter (megatron's linear top-k)
  >= first_ac_layer                               ACRouter (router=ac) / CosineRouter (router=cosine)

The baselines (``xmoe``, ``stablemoe``, ``stablemoe-lite``, ``usmoe``, ``etr``; baseline_routers.py)
route every MoE layer, as in their papers. With ``router=topk`` every MoE layer gets ``LabelSourceRouter`` — megatron's ``TopKRouter``
unchanged plus label/metric recording, so baselines get the same routing metrics. megatron shares one MoE layer spec object
across layers, so each patched layer gets its own shallow copy (``dataclasses.replace``). The chunk's
``LabelCarrier`` knows all MoE layers of the model (global numbers), so an AC layer whose
predecessor lives on an earlier pipeline stage finds the labels ``label_transport`` delivered.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from acmoe_megatron.elliptical import EllipticalSettings, elliptical_layer_specs
from acmoe_megatron.labels import LabelCarrier
from acmoe_megatron.metrics import RouterMetrics
from acmoe_megatron.baseline_routers import BASELINE_CLASSES
from acmoe_megatron.routers import ACRouter, ACSettings, CosineRouter, LabelSourceRouter
from acmoe_megatron.step_inputs import StepInputs


def moe_layer_pattern(config) -> list[int]:
    """1 = MoE layer, 0 = dense, per global layer (megatron's reading of ``moe_layer_freq``)."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    if isinstance(freq, (list, tuple)) and len(freq) == config.num_layers:
        return [int(f) for f in freq]
    raise ValueError(
        f"moe_layer_freq={freq!r}: give an int N (an MoE layer every N layers) or a 0/1 list of "
        f"length num_layers={config.num_layers}"
    )


def moe_layer_numbers(config) -> list[int]:
    """Global 1-based layer numbers of all MoE layers."""
    if not config.num_moe_experts:
        return []
    return [i + 1 for i, p in enumerate(moe_layer_pattern(config)) if p == 1]


def ac_layer_numbers(config, settings: ACSettings) -> list[int]:
    """Global layer numbers whose router is AC (or cosine): MoE ordinals >= first_ac_layer."""
    if settings.router not in ("ac", "cosine"):
        return []
    return moe_layer_numbers(config)[settings.first_ac_layer - 1 :]


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


def _with_router(layer_spec, router_builder):
    """Copy of a MoE layer spec whose ``MoESubmodules.router`` is ``router_builder``."""
    mlp = layer_spec.submodules.mlp
    moe_submodules = dataclasses.replace(mlp.keywords["submodules"], router=router_builder)
    new_mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": moe_submodules})
    return dataclasses.replace(
        layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=new_mlp)
    )


def is_moe_layer_spec(layer_spec) -> bool:
    mlp = getattr(getattr(layer_spec, "submodules", None), "mlp", None)
    return isinstance(mlp, functools.partial) and isinstance(mlp.func, type) and issubclass(mlp.func, MoELayer)


def acmoe_block_spec(
    config,
    settings: ACSettings,
    use_transformer_engine: bool,
    normalization: str | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    vocab_size: int | None = None,
    elliptical: EllipticalSettings | None = None,
) -> tuple[TransformerBlockSubmodules, LabelCarrier | None]:
    """Megatron's GPT decoder block spec with our routers; also returns the chunk's label carrier.

    ``vocab_size`` (the padded vocabulary) is needed by ``stablemoe`` only (its distilled router
    embeds token ids)."""
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_transformer_engine, normalization=normalization,
        vp_stage=vp_stage, pp_rank=pp_rank,
    )
    numbers = local_layer_numbers(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if len(numbers) != len(block.layer_specs):
        raise AssertionError(f"layer numbering mismatch: {numbers} vs {len(block.layer_specs)} specs")
    moe_numbers = moe_layer_numbers(config)
    ac_numbers = set(ac_layer_numbers(config, settings))
    carrier = LabelCarrier(moe_numbers, local_layer_numbers=numbers, vp_stage=vp_stage)
    metrics = RouterMetrics(config.num_moe_experts, moe_numbers) if moe_numbers else None
    carrier.metrics = metrics
    carrier.step_inputs = StepInputs()  # token ids / progress for routers that need them
    scorer = ACRouter if settings.router == "ac" else CosineRouter
    baseline = BASELINE_CLASSES.get(settings.router)
    layer_specs = []
    for n, layer_spec in zip(numbers, block.layer_specs):
        if n in moe_numbers:
            if not is_moe_layer_spec(layer_spec):
                raise AssertionError(f"layer {n} should be an MoE layer but its spec is {layer_spec}")
            if baseline is not None:
                kw = {"vocab_size": vocab_size} if settings.router == "stablemoe" else {}
                builder = functools.partial(baseline, label_carrier=carrier, metrics=metrics, ac=settings, **kw)
            elif n in ac_numbers:
                kw = ({"ac": settings} if scorer is ACRouter
                      else {"compile_scores": settings.compile, "expert_norm": settings.expert_norm})
                builder = functools.partial(scorer, label_carrier=carrier, metrics=metrics, **kw)
            else:
                builder = functools.partial(LabelSourceRouter, label_carrier=carrier, metrics=metrics,
                                            ema_buffers=settings.router == "ac" and settings.source == "ema")
            layer_spec = _with_router(layer_spec, builder)
        layer_specs.append(layer_spec)
    # Elliptical attention (elliptical.py): core attention of the layers from first_layer − 1 on.
    layer_specs = elliptical_layer_specs(config, elliptical, numbers, layer_specs, carrier)
    return dataclasses.replace(block, layer_specs=layer_specs), carrier
