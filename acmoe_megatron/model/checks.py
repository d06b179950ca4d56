"""The checks on a model's settings that megatron does not make, before any model is built: the AC
settings against megatron's parsed arguments (first AC layer within the MoE layers, options that
defeat the router, the expert norm against the precision-aware optimizer), elliptical attention's
refusals, and what the host must provide (FP8 support, Apex, the CPU/gloo settings without CUDA).
Used by the trainer's launch checks (``runtime/megatron_args.validate_args``) and by
``plugin.validate_args`` for any Megatron script.
"""

from __future__ import annotations

import torch

from acmoe_megatron.core import layers
from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.model.elliptical import check_supported
from acmoe_megatron.model.precision import check_fp8, have_nvidia_apex, have_transformer_engine


def check_settings(args, acmoe, elliptical=None, host_checks: bool = True) -> None:
    """``validate_args`` on the settings themselves (also used by ``plugin.validate_args``)."""
    if elliptical is not None and elliptical.enabled:
        _check_elliptical(args, elliptical)
    if not args.num_experts:
        if elliptical is not None and elliptical.enabled and acmoe.router == "topk":
            return _check_common(args, host_checks)  # a dense model with elliptical attention
        raise ConfigError("megatron.num_experts is not set: ACMoE needs an MoE model (a dense model "
                          "runs only with elliptical.enabled=true and acmoe.router=topk)")
    if args.moe_router_topk > args.num_experts:
        raise ConfigError(
            f"megatron.moe_router_topk={args.moe_router_topk} > num_experts={args.num_experts}"
        )
    if args.num_experts % args.expert_model_parallel_size:
        raise ConfigError(
            f"megatron.num_experts={args.num_experts} is not divisible by "
            f"expert_model_parallel_size={args.expert_model_parallel_size}"
        )

    pattern = args.hybrid_layer_pattern  # megatron's HybridModel: the MoE layers are the pattern's E
    n_moe = len(layers.moe_layers(*(layers.hybrid_layers(pattern) if pattern else (args.num_layers,
                                                                                      args.moe_layer_freq))))
    if pattern and elliptical is not None and elliptical.enabled:
        raise ConfigError("elliptical.enabled with megatron.hybrid_layer_pattern: elliptical attention is patched "
                          "into the GPT decoder spec only; use a GPTModel (no hybrid_layer_pattern)")
    if acmoe.router != "topk" and acmoe.first_ac_layer > n_moe:
        raise ConfigError(
            f"acmoe.first_ac_layer={acmoe.first_ac_layer} but the model has only {n_moe} MoE "
            f"layers; choose 1..{n_moe} (the paper uses 3 with 6 MoE layers)"
        )
    if acmoe.router != "topk" and getattr(args, "moe_router_force_load_balancing", False):
        raise ConfigError(
            "megatron.moe_router_force_load_balancing replaces router logits by random ones, which "
            f"makes acmoe.router={acmoe.router} meaningless; use acmoe.router=topk for that benchmark"
        )
    if acmoe.expert_norm is not None and getattr(args, "use_precision_aware_optimizer", False):
        raise ConfigError(
            "acmoe.expert_norm needs the fp32 main parameters, which megatron.use_precision_aware_optimizer "
            "keeps inside Transformer Engine's FusedAdam: set use_precision_aware_optimizer: false, or "
            "acmoe.expert_norm: null (free norm)"
        )
    _check_common(args, host_checks)


def _check_elliptical(args, elliptical) -> None:
    """Elliptical attention: the build-time refusals (``elliptical.check_supported``), before the build."""

    try:
        check_supported(args, elliptical)  # megatron's args carry the same names as its config
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _check_common(args, host_checks: bool = True) -> None:
    """Checks for every model, MoE or dense."""

    decay = args.lr_decay_iters or args.train_iters
    if args.train_iters and args.lr_warmup_iters >= decay:
        raise ConfigError(
            f"megatron.lr_warmup_iters={args.lr_warmup_iters} must be smaller than the decay length "
            f"{decay} (lr_decay_iters, or train_iters when unset)"
        )
    if not host_checks:
        return

    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    try:
        check_fp8(args.fp8, args.fp8_recipe, have_transformer_engine(), capability)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if (
        torch.cuda.is_available()
        and args.transformer_impl == "local"
        and not args.no_persist_layer_norm
        and not have_nvidia_apex()
    ):
        raise ConfigError(
            "megatron's local layers use torch's LayerNorm here (no NVIDIA Apex), which cannot "
            "persist: set megatron.no_persist_layer_norm: true, or install Apex / use "
            "transformer_impl: transformer_engine"
        )
    if not torch.cuda.is_available():
        needs = {
            "distributed_backend": ("gloo", args.distributed_backend),
            "transformer_impl": ("local", args.transformer_impl),
            "use_cpu_initialization": (True, args.use_cpu_initialization),
            "bf16": (False, args.bf16),
            "fp16": (False, args.fp16),
            "fp8": (None, args.fp8),
        }
        wrong = {k: v for k, v in needs.items() if v[0] != v[1]}
        if wrong:
            fixes = ", ".join(f"megatron.{k}: {v[0]} (is {v[1]})" for k, v in wrong.items())
            raise ConfigError(f"no CUDA GPU here, so this recipe cannot run; set {fixes}")


def check_expert_bias(args) -> None:
    """megatron-core 0.19's SequentialMLP experts with biases cannot train at expert-TP 1: MLP.forward
    adds the bias in place to the output of ``_ReduceFromModelParallelRegion``, which returns its
    input (a view) at TP 1, and autograd forbids that (RuntimeError at the first training forward;
    inference under no_grad works). Measured for megatron's own top-k router as for ours
    (tests/unit/runtime/test_validate_args.py keeps watching megatron's behaviour)."""
    _check_expert_bias(args.num_experts, args.add_bias_linear, args.moe_grouped_gemm,
                       args.expert_tensor_parallel_size or args.tensor_model_parallel_size,
                       "megatron.add_bias_linear=true", "add_bias_linear: false", "moe_grouped_gemm: true")


def check_expert_bias_config(config) -> None:
    """``check_expert_bias`` on a ``TransformerConfig`` (a Megatron-Bridge model provider or megatron's
    ``GPTModelConfig.transformer``), whose names differ from megatron's arguments."""
    _check_expert_bias(config.num_moe_experts, config.add_bias_linear, config.moe_grouped_gemm,
                       config.expert_tensor_parallel_size or config.tensor_model_parallel_size,
                       "model.add_bias_linear=True", "model.add_bias_linear=false", "model.moe_grouped_gemm=true")


def _check_expert_bias(num_experts, add_bias_linear, grouped_gemm, etp, setting, fix, alternative) -> None:
    if num_experts and add_bias_linear and not grouped_gemm and etp == 1:
        raise ConfigError(
            f"{setting} with megatron's SequentialMLP experts (moe_grouped_gemm false) at expert "
            "tensor parallel 1 fails inside megatron-core 0.19 (MLP.forward adds the expert bias in place to a view; "
            f"RuntimeError at the first training step): set {fix}, or use {alternative} "
            "(TEGroupedMLP on GPUs, not measured with biases here)")
