"""Small builders shared by the tests, the benchmarks and the parity scripts (not used in training).

``init_single_process`` sets up a one-rank process group (gloo, or NCCL on one GPU) and megatron's
parallel state, as the tests' fixtures and the benchmarks need. ``tiny_config`` is a CPU-safe megatron ``TransformerConfig`` for a small MoE GPT; ``build_gpt``
builds megatron's ``GPTModel`` with our routers (spec.acmoe_block_spec; ``elliptical=``
``EllipticalSettings`` for elliptical attention) and attaches its chunk state (plugin.attach),
exactly as the training model provider does. ``cuda_type_names`` lets megatron's
mixed-precision and distributed optimizers be built and stepped on CPU tensors in tests.
``read_parity_run`` / ``assert_same_run`` read and compare the per-step losses and router gradient
norms of two training runs (the parity tests of tests/integration).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from acmoe_megatron.model.chunk_state import ChunkState
from acmoe_megatron.model.spec import acmoe_block_spec
from acmoe_megatron.observability.summary import read_scalars
from acmoe_megatron.plugin import attach
from acmoe_megatron.runtime import cpu_runtime


def init_single_process(backend: str = "gloo", seed: int = 1234) -> None:
    """One rank: torch.distributed on a free local port, megatron's model-parallel groups, the
    model-parallel RNG. Installs the CPU runtime first (a no-op where CUDA is present); each step
    is skipped when already done, so fixtures may call it repeatedly."""
    import os
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    cpu_runtime.install()
    if backend == "nccl":
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(backend, rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def cuda_type_names():
    """CPU tensors answer ``type()`` with CUDA names (``torch.cuda.FloatTensor``) inside the block.

    megatron's ``Float16OptimizerWithFloat16Params`` and ``DistributedOptimizer`` accept only
    parameters whose ``type()`` names CUDA; nothing else they do needs a GPU, so tests build and
    step them on CPU inside this block (tests/unit/model/test_expert_norm.py)."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if args or kwargs or name.startswith("torch.cuda."):
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def tiny_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    kw = dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=128,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, use_cpu_initialization=True, params_dtype=torch.float32,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        deallocate_pipeline_outputs=True,
    )
    if not on_gpu:
        kw["pipeline_dtype"] = torch.float32
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt(config, settings, vocab_size=128, max_sequence_length=64, use_te=False, elliptical=None,
              progress=None, **gpt_kw):
    from megatron.core.models.gpt import GPTModel

    spec = acmoe_block_spec(config, settings, use_transformer_engine=use_te, vocab_size=vocab_size,
                            elliptical=elliptical)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
        max_sequence_length=max_sequence_length, position_embedding_type="rope", **gpt_kw,
    )
    attach(model, progress=progress)
    return model


def standalone_state(*modules, moe_layer_numbers=(1, 2), metrics=None):
    """A ``ChunkState`` for routers / attention built outside a model (unit tests, benchmarks),
    bound to ``modules``; the caller drives the micro-batch protocol (``begin_forward``)."""

    numbers = list(moe_layer_numbers)
    state = ChunkState(numbers, numbers, metrics=metrics)
    for module in modules:
        module.bind_chunk_state(state)
    return state


def capture_router_outputs(model) -> dict:
    """{layer number: (probs, routing_map)} of every router's latest forward (forward hooks)."""
    from megatron.core.transformer.moe.router import TopKRouter

    seen = {}

    def hook(module, _inp, out):
        seen[module.layer_number] = (out[0].detach(), out[1].detach())

    for m in model.modules():
        if isinstance(m, TopKRouter):
            m.register_forward_hook(hook)
    return seen


def read_parity_run(run_dir: Path, steps: int) -> tuple[list[float], dict[int, dict[str, float]]]:
    """(per-step LM losses from ``run_dir/tensorboard``, {step: {layer: reduced router gradient norm}}
    from the ``router_grad_norms_rank*.jsonl`` that ``hooks.log_router_grad_norms`` writes there). Ranks
    holding the same router must report it within 1e-6; the run must have exactly ``steps`` steps."""
    losses = [v for _, v in read_scalars(run_dir / "tensorboard")["lm loss"]]
    norms: dict[int, dict[str, float]] = {}
    for path in run_dir.glob("router_grad_norms_rank*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            for layer, value in rec["norms"].items():
                seen = norms.setdefault(rec["step"], {})
                assert layer not in seen or math.isclose(seen[layer], value, rel_tol=1e-6), (layer, seen, value)
                seen[layer] = value
    assert len(losses) == steps and sorted(norms) == list(range(1, steps + 1)), (losses, norms)
    return losses, norms


def assert_same_run(got, ref, rel: float = 1e-5, what: str = "reference") -> None:
    """Two ``read_parity_run`` results agree step by step within ``rel`` (relative): the losses, and
    every router's gradient norm, over the same set of layers."""
    def close(a, b):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)

    (losses, norms), (ref_losses, ref_norms) = got, ref
    for step, (a, b) in enumerate(zip(losses, ref_losses), 1):
        assert close(a, b), f"step {step} loss {a} vs {what} {b}"
    for step in ref_norms:
        assert set(norms[step]) == set(ref_norms[step]), (norms[step], ref_norms[step])
        for layer, b in ref_norms[step].items():
            a = norms[step][layer]
            assert close(a, b), f"step {step} router {layer} grad norm {a} vs {what} {b}"
