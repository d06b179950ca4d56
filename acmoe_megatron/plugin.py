"""The public plugin API: the AC router (and our baselines, elliptical attention) in any Megatron script.

A facade: each call is the function of the module that owns it (or a thin adapter over it), so a
script imports one module and the package keeps its layers (the facade sits above them all):

* ``patch_block_spec(spec, settings, config, vp_stage=...)`` (``model/spec.py``) — takes the block spec the
  script already built (Transformer Engine or local, any options, or customised) and swaps only the
  routers of the intended MoE layers (and, with ``elliptical``, the core attention).
* ``patch_hybrid_stack_spec(stack_spec, settings, config, pattern)`` (``model/hybrid_spec.py``) — the same
  for megatron-core's ``HybridModel``: the MoE layers (``E``) of its layer pattern get our routers,
  ``first_ac_layer`` counting the pattern's MoE layers; ``local_hybrid_stack_spec(config)`` is a
  stack of megatron's local modules (megatron's stock ``hybrid_stack_spec`` is Transformer Engine only).
* ``attach(model_chunks)`` (``runtime/attach.py``) — gives every built model chunk its ``chunk_state.ChunkState`` (labels,
  elliptical values, token ids, metrics, the pipeline hand-off) and registers the two forward hooks
  that run the per-micro-batch protocol, so megatron's stock forward step, pipeline schedules
  (PP, VPP) and full/selective recompute work unchanged. A model that is not attached fails at its
  first forward with an error naming this call.
* ``add_arguments(parser)`` for Megatron's ``extra_args_provider``: ``--acmoe-router ac
  --acmoe-first-ac-layer 3 ...`` (one flag per ``settings.ACSettings`` key, ``--acmoe-elliptical-*``
  for ``settings.EllipticalSettings``); ``settings_from_args(args)`` maps them to the same typed
  settings the YAML recipes use, and ``validate_args(args)`` runs our checks on Megatron's parsed
  arguments before any model is built (``model/checks.py``).
* ``install_expert_norm()`` (``runtime/hooks.py``) — with ``--acmoe-expert-norm`` (the release's rows held at a fixed norm):
  the optimizer that megatron.training builds rescales them after every step (other trainers:
  ``expert_norm.install(optimizer, model_chunks)``).
* ``bridge_layer_spec(settings)`` — a callable for Megatron-Bridge's
  ``GPTModelProvider.transformer_layer_spec`` and megatron's ``GPTModelConfig.transformer_layer_spec``
  (called as ``spec(model_config, vp_stage=...)``); ``pre_wrap_hook()`` attaches the chunks
  (``provider.register_pre_wrap_hook`` or ``GPTModelConfig.pre_wrap_hooks``). Example:
  ``examples/bridge_pretrain_acmoe.py`` (Bridge's own recipe and ``pretrain``). ``register_autobridge_routers()``
  lets Bridge's ``AutoBridge`` load a Hugging Face MoE checkpoint into a model with our routers.

A minimal Megatron-style pretraining script that uses only these calls is
``examples/pretrain_gpt_acmoe.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from acmoe_megatron.core import registry
from acmoe_megatron.core.settings import ACSettings, EllipticalSettings
from acmoe_megatron.model.checks import check_expert_bias, check_expert_bias_config, check_settings
from acmoe_megatron.model.hybrid_spec import local_hybrid_stack_spec, patch_hybrid_stack_spec
from acmoe_megatron.model.spec import patch_block_spec
from acmoe_megatron.runtime.attach import attach
from acmoe_megatron.runtime.hooks import install_expert_norm

__all__ = ["patch_block_spec", "attach", "add_arguments", "settings_from_args", "validate_args",
           "install_expert_norm", "bridge_layer_spec", "pre_wrap_hook", "settings_argv", "patch_hybrid_stack_spec",
           "local_hybrid_stack_spec", "register_autobridge_routers"]


def pre_wrap_hook(progress=None) -> Callable[[list], list]:
    """For Megatron-Bridge: attaches the chunks before DDP wraps them. Register it with
    ``provider.register_pre_wrap_hook(pre_wrap_hook())`` (Bridge's ``GPTModelProvider``) or
    ``model_config.pre_wrap_hooks.append(pre_wrap_hook())`` (megatron's ``GPTModelConfig``)."""

    def hook(chunks: list) -> list:
        attach(chunks, progress=progress)
        return chunks

    return hook


def bridge_layer_spec(settings: ACSettings, elliptical: EllipticalSettings | None = None, *,
                      base: Callable | None = None, use_transformer_engine: bool | None = None) -> Callable:
    """A ``transformer_layer_spec`` callable for Megatron-Bridge's ``GPTModelProvider`` and for
    megatron's ``GPTModelConfig`` (both call it as ``spec(model_config, vp_stage=...)``): ``base(model_config,
    vp_stage=...)`` (default: megatron's ``get_gpt_decoder_block_spec``, Transformer Engine modules when
    the config's ``transformer_impl`` says so), patched. Expert biases megatron-core cannot train are
    refused here, before the model is built. Tested with Megatron-Bridge 0.6.2
    (``examples/bridge_pretrain_acmoe.py``, tests/integration/test_bridge.py)."""

    def layer_spec(model_config, vp_stage: int | None = None):
        # GPTModelProvider is a TransformerConfig; GPTModelConfig holds one as ``.transformer``
        config = model_config if isinstance(model_config, TransformerConfig) else model_config.transformer
        check_expert_bias_config(config)
        if base is not None:
            block = base(model_config, vp_stage=vp_stage)
        else:
            te = config.transformer_impl == "transformer_engine" if use_transformer_engine is None \
                else use_transformer_engine
            block = get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization=config.normalization,
                                               qk_l2_norm=config.qk_l2_norm, vp_stage=vp_stage)
        return patch_block_spec(block, settings, config, vp_stage=vp_stage, vocab_size=model_config.vocab_size,
                                elliptical=elliptical)

    return layer_spec


def register_autobridge_routers() -> list[str]:
    """For Megatron-Bridge's ``AutoBridge`` (Hugging Face checkpoints into a Megatron model and back):
    Bridge decides how to shard a weight from its module's class name, and knows megatron's
    ``TopKRouter`` but not our subclasses. Each registered router class is declared "replicated" (its
    ``weight``, the expert embedding, is whole on every rank, as megatron's). Call once before
    ``AutoBridge`` loads weights into a model built with ``bridge_layer_spec``. Returns the class names."""
    from megatron.bridge.models.conversion.param_mapping import AutoMapping  # optional: Bridge is an extra

    classes = sorted({registry.router_class(name).__name__ for name in registry.names()})
    for name in classes:
        AutoMapping.register_module_type(name, "replicated")
    return classes


# -- command-line flags ----------------------------------------------------------------------------

_SECTIONS = {"acmoe": (ACSettings, "--acmoe-"), "elliptical": (EllipticalSettings, "--acmoe-elliptical-")}


def _flag(section: str, key: str) -> str:
    return _SECTIONS[section][1] + key.replace("_", "-")


def _dest(section: str, key: str) -> str:
    return _flag(section, key)[2:].replace("-", "_")


def _none_or(parse):
    def convert(text: str):
        return None if text.lower() in ("none", "null") else parse(text)

    convert.__name__ = parse.__name__
    return convert


def _add_flag(group, section: str, field: dataclasses.Field, hint) -> None:
    flag, dest = _flag(section, field.name), _dest(section, field.name)
    optional = type(None) in typing.get_args(hint)
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    default = field.default
    help_text = f"{section}.{field.name} of the YAML recipes (default: {default!r})"
    if base is bool:
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        return
    parse = {int: int, float: float, str: str}[base]
    group.add_argument(flag, dest=dest, type=_none_or(parse) if optional else parse, default=None,
                       metavar=base.__name__.upper() + ("|none" if optional else ""), help=help_text)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: one ``--acmoe-*`` flag per setting; returns the parser."""
    for section, (cls, _) in _SECTIONS.items():
        group = parser.add_argument_group(f"acmoe: {section} settings (acmoe_megatron.core.settings.{cls.__name__})")
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            _add_flag(group, section, field, hints[field.name])
    return parser


def settings_from_args(args) -> tuple[ACSettings, EllipticalSettings]:
    """The typed settings from parsed ``--acmoe-*`` flags (flags not given keep the defaults).
    Invalid values raise ``ValueError`` naming the flag and the fix."""
    out = []
    for section, (cls, _) in _SECTIONS.items():
        given = {}
        for field in dataclasses.fields(cls):
            value = vars(args).get(_dest(section, field.name))
            if value is not None:
                given[field.name] = value
        try:
            out.append(cls(**given))
        except ValueError as err:
            # the messages name recipe keys (acmoe.first_ac_layer): name the flags instead
            message = re.sub(rf"\b{section}\.(\w+)", lambda m: _flag(section, m.group(1)), str(err))
            raise ValueError(message) from None
    return out[0], out[1]


def settings_argv(acmoe: ACSettings, elliptical: EllipticalSettings | None = None) -> list[str]:
    """The flags that reproduce ``acmoe`` / ``elliptical`` (non-default keys only)."""
    argv = []
    for section, settings in (("acmoe", acmoe), ("elliptical", elliptical or EllipticalSettings())):
        defaults = type(settings)()
        for field in dataclasses.fields(settings):
            value = getattr(settings, field.name)
            if value == getattr(defaults, field.name):
                continue
            flag = _flag(section, field.name)
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            else:
                argv += [flag, "none" if value is None else str(value)]
    return argv


def validate_args(args) -> tuple[ACSettings, EllipticalSettings]:
    """Our checks on Megatron's parsed arguments (first AC layer within the MoE layers, options that
    defeat the router, elliptical attention's refusals, expert biases megatron cannot train); returns the
    settings."""
    acmoe, elliptical = settings_from_args(args)
    check_settings(args, acmoe, elliptical)
    check_expert_bias(args)
    return acmoe, elliptical
