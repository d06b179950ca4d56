"""Precision and fused-kernel checks: FP8 recipes vs GPU/Transformer Engine, and which fused paths run.

``check_fp8`` is a pure function of the requested settings and the machine facts, so the rules are
tested on CPU: FP8 needs Transformer Engine (``pip install -e '.[fp8]'`` on a CUDA machine, or the
NGC PyTorch container) and a GPU of compute capability ≥ 8.9; the ``blockwise`` recipe is
Hopper-only (9.x) and ``mxfp8`` Blackwell-only (≥ 10.0), as in Transformer Engine.

``fused_paths`` reports what megatron will actually use (Transformer Engine, NVIDIA Apex, or torch
fallbacks) for the run log and the run summary. PyPI's package named ``apex`` is an unrelated web
framework; only NVIDIA's Apex (it has ``apex.normalization``/``amp_C``) counts.
"""

from __future__ import annotations

import importlib.util

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


def have_transformer_engine() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # megatron without the extension module, or a broken TE install
        return False
    return bool(HAVE_TE)


def have_nvidia_apex() -> bool:
    if importlib.util.find_spec("apex") is None:
        return False
    return importlib.util.find_spec("amp_C") is not None or importlib.util.find_spec("apex.normalization") is not None


def check_fp8(
    fp8_format: str | None,
    fp8_recipe: str | None,
    have_te: bool,
    cuda_capability: tuple[int, int] | None,
) -> None:
    """Raise ValueError with the fix when the FP8 request cannot run here; no-op when fp8 is off."""
    if not fp8_format:
        return
    if fp8_format not in FP8_FORMATS:
        raise ValueError(f"megatron.fp8={fp8_format!r}: choose one of {FP8_FORMATS}")
    recipe = fp8_recipe or "delayed"
    if recipe not in FP8_RECIPES:
        raise ValueError(f"megatron.fp8_recipe={recipe!r}: choose one of {FP8_RECIPES}")
    if cuda_capability is None:
        raise ValueError("megatron.fp8 needs a CUDA GPU (compute capability >= 8.9); none is visible")
    if not have_te:
        raise ValueError(
            "megatron.fp8 needs NVIDIA Transformer Engine, which is not importable: use the NGC "
            "PyTorch container or `pip install -e '.[fp8]'` on the GPU machine (see README)"
        )
    if cuda_capability < (8, 9):
        raise ValueError(f"FP8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is {cuda_capability}")
    if recipe == "blockwise" and cuda_capability[0] != 9:
        raise ValueError(f"fp8_recipe=blockwise is Hopper-only (9.x); this GPU is {cuda_capability}")
    if recipe == "mxfp8" and cuda_capability < (10, 0):
        raise ValueError(f"fp8_recipe=mxfp8 needs Blackwell (>= 10.0); this GPU is {cuda_capability}: use delayed/tensorwise/blockwise")


def fused_paths(args=None) -> dict[str, str]:
    """Which implementation megatron uses for the fused pieces, for logs and summary.json."""
    te, apex = have_transformer_engine(), have_nvidia_apex()
    impl = getattr(args, "transformer_impl", None)
    out = {
        "transformer_engine": "available" if te else "absent",
        "nvidia_apex": "available" if apex else "absent",
        "layers": "transformer_engine" if impl == "transformer_engine" else "megatron local (torch)",
        "norm": "TENorm" if impl == "transformer_engine" else ("apex FusedLayerNorm" if apex else "torch"),
        "optimizer": "TE/apex FusedAdam" if (te or apex) else "torch Adam (foreach)",
        "grad_accumulation_fusion": str(bool(getattr(args, "gradient_accumulation_fusion", False))),
        "experts": (
            "TEGroupedMLP (grouped GEMM)"
            if impl == "transformer_engine" and getattr(args, "moe_grouped_gemm", False)
            else "SequentialMLP (one GEMM per expert)"
        ),
        "fp8": f"{getattr(args, 'fp8', None)} / {getattr(args, 'fp8_recipe', None)}" if getattr(args, "fp8", None) else "off",
    }
    return out


def requested_fused(args, have_te: bool, have_apex: bool, cuda_capability: tuple[int, int] | None) -> list[dict]:
    """The fused paths a recipe asks for and whether this machine has each: ``[{"path", "available",
    "fix"}]`` (the preflight's per-node check; ``fused_paths`` says what megatron then uses)."""
    gpu = cuda_capability is not None
    te_fix = "use the NGC PyTorch container or `pip install -e '.[fp8]'` on the GPU nodes (see docs/gpu.md)"
    out = []
    if getattr(args, "transformer_impl", None) == "transformer_engine":
        out.append({"path": "transformer_impl=transformer_engine", "available": have_te and gpu,
                    "fix": te_fix if gpu else "Transformer Engine layers need a CUDA GPU"})
    if getattr(args, "moe_grouped_gemm", False):
        ok = have_te and gpu and cuda_capability >= (8, 0)
        out.append({"path": "moe_grouped_gemm (TEGroupedMLP)", "available": ok,
                    "fix": te_fix if gpu else "grouped GEMM experts need a CUDA GPU of compute capability >= 8.0"})
    if getattr(args, "moe_permute_fusion", False):
        out.append({"path": "moe_permute_fusion", "available": have_te and gpu, "fix": te_fix})
    if getattr(args, "cross_entropy_loss_fusion", False):
        out.append({"path": "cross_entropy_loss_fusion", "available": gpu,
                    "fix": "the fused cross entropy runs on CUDA only: set megatron.cross_entropy_loss_fusion: false"})
    if getattr(args, "gradient_accumulation_fusion", False):
        out.append({"path": "gradient_accumulation_fusion", "available": gpu and (have_te or have_apex),
                    "fix": "needs a CUDA GPU and Transformer Engine or NVIDIA Apex, or megatron."
                           "gradient_accumulation_fusion: false"})
    if getattr(args, "fp8", None):
        try:
            check_fp8(args.fp8, getattr(args, "fp8_recipe", None), have_te, cuda_capability)
            out.append({"path": f"fp8 {args.fp8} / {getattr(args, 'fp8_recipe', None) or 'delayed'}",
                        "available": True, "fix": ""})
        except ValueError as err:
            out.append({"path": f"fp8 {args.fp8} / {getattr(args, 'fp8_recipe', None) or 'delayed'}",
                        "available": False, "fix": str(err)})
    return out
