"""The full recipe's memory per GPU, from megatron's own theoretical-memory report, split into
parameters, gradients, optimizer state and activations, and compared with a GPU's memory.

megatron's ``compute_weight_and_optimizer_memory`` returns one number for the most loaded
pipeline stage (dense parameters sharded by TP, experts by EP x ETP, the distributed optimizer by
the data-parallel sizes) at its stated bytes per parameter (bf16 parameters, fp32 gradients, fp32
main parameters and Adam moments: 18 bytes, or 6 + 12 / DP with the distributed optimizer). Called
once as the recipe is and once without the distributed optimizer, it gives the parameter count of
that stage (the second result / 18) and so the split: parameters 2 bytes each (4 without bf16 /
fp16), gradients 4, and the optimizer the rest. Activations are megatron's
``compute_activation_memory`` (sequence parallel + selective recompute, the case its formula is
for) or ``compute_activation_memory_without_sp``, for the first pipeline stage with its in-flight
micro-batches. Nothing of megatron's parameter counting is restated here.
"""

from __future__ import annotations

import contextlib
import copy
import io

GIB = 1024**3
# what a process cannot use of the GPU's memory: CUDA context, NCCL buffers, allocator fragmentation
USABLE_FRACTION = 0.92


def estimate_memory(args) -> dict:
    """Bytes per GPU of the most loaded pipeline stage for megatron's validated ``args`` of the
    full recipe: parameters, gradients, optimizer, activations, total (+ the parameter count)."""
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    if args.hybrid_layer_pattern:
        raise ValueError("megatron's theoretical-memory report does not cover HybridModel (hybrid_layer_pattern)")
    from megatron.training import theoretical_memory_usage as tmu

    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        if args.padded_vocab_size is None:  # set when megatron builds its tokenizer; the same rule here
            args = copy.copy(args)
            args.padded_vocab_size = vocab_size_with_padding(args.vocab_size, args, logging_enabled=False)
        weight_and_optimizer = tmu.compute_weight_and_optimizer_memory(args)
        plain = copy.copy(args)
        plain.use_distributed_optimizer = False
        params = tmu.compute_weight_and_optimizer_memory(plain) / 18  # megatron's bytes per parameter
        micro_batches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
        if args.sequence_parallel and args.recompute_granularity == "selective":
            activations = tmu.compute_activation_memory(args, num_microbatches=micro_batches)
            formula = "megatron compute_activation_memory (sequence parallel, selective recompute)"
        else:
            activations = tmu.compute_activation_memory_without_sp(args, num_microbatches=micro_batches)
            formula = "megatron compute_activation_memory_without_sp"
    half = bool(args.bf16 or args.fp16)
    param_bytes = params * (2 if half else 4)
    grad_bytes = params * 4
    if half:
        optimizer_bytes = weight_and_optimizer - param_bytes - grad_bytes
    else:  # fp32 training: no separate main parameters, Adam's two moments (sharded by DP with the dist. optimizer)
        optimizer_bytes = params * 8 / (args.data_parallel_size if args.use_distributed_optimizer else 1)
    total = param_bytes + grad_bytes + optimizer_bytes + activations
    return {
        "parameters_on_stage": int(params),
        "parameters_bytes": int(param_bytes),
        "gradients_bytes": int(grad_bytes),
        "optimizer_bytes": int(optimizer_bytes),
        "activations_bytes": int(activations),
        "total_bytes": int(total),
        "micro_batches": int(micro_batches),
        "precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32"),
        "activation_formula": formula,
        "stage": "first pipeline stage (megatron's most loaded shard)",
    }


def memory_verdict(estimate: dict, capacity_bytes: int, where: str) -> tuple[str, str]:
    """("pass" | "fail", one line) for ``estimate`` against a GPU of ``capacity_bytes``."""
    usable = capacity_bytes * USABLE_FRACTION
    line = (f"estimated {size(estimate['total_bytes'])} per GPU (parameters {size(estimate['parameters_bytes'])}, "
            f"gradients {size(estimate['gradients_bytes'])}, optimizer {size(estimate['optimizer_bytes'])}, "
            f"activations {size(estimate['activations_bytes'])}) against {size(capacity_bytes)} ({where}; "
            f"{USABLE_FRACTION:.0%} usable)")
    if estimate["total_bytes"] > usable:
        return "fail", "will not fit: " + line
    return "pass", line


def size(n: float) -> str:
    """Bytes as MiB below 1 GiB, else GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def memory_fix() -> str:
    return ("more pipeline / expert / tensor parallelism, megatron.use_distributed_optimizer: true, "
            "megatron.recompute_granularity: selective (or full), or a smaller micro_batch_size")
