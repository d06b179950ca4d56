"""``attach``: a built model chunk gets its ``ChunkState`` (the one owner of the per-micro-batch
cross-layer state: AC labels, elliptical values, token ids, routing metrics, the pipeline hand-off)
and the two forward hooks that run the micro-batch protocol, so megatron's stock forward step,
pipeline schedules (PP, VPP) and recompute work unchanged.

It wires the model (``model/``: chunk state, label transport, elliptical attention) to the routing
metrics (``observability/metrics.py``), so it sits in the runtime layer; the trainer's model
provider calls it, and ``plugin.attach`` is the same function for any Megatron script.
"""

from __future__ import annotations

from collections.abc import Callable

from acmoe_megatron.model.chunk_state import ChunkState, UsesChunkState, register, unwrap_chunk
from acmoe_megatron.model.elliptical import EllipticalAttentionMixin, value_handoff
from acmoe_megatron.model.label_transport import LabelTransport
from acmoe_megatron.model.spec import moe_layer_numbers
from acmoe_megatron.observability.metrics import RouterMetrics

_TRANSPORTS: dict = {}  # one pipeline transport per process and virtual-pipeline size


def _transport(vp_size: int | None):
    """Collective on first use (every rank attaches its chunks at the same point of start-up)."""
    if vp_size not in _TRANSPORTS:
        _TRANSPORTS[vp_size] = LabelTransport.create(vp_size)
    return _TRANSPORTS[vp_size]


def hybrid_pattern(chunk) -> str | None:
    """The layer pattern of a megatron HybridModel chunk (None for a GPTModel)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    return chunk.hybrid_layer_pattern if isinstance(chunk, HybridModel) else None


def attach(model, *, progress: Callable[[], tuple[int, int | None]] | None = None) -> list:
    """Give every model chunk (a GPTModel or HybridModel, possibly wrapped by megatron's
    DDP/Float16Module, or a list of them) its cross-layer state and micro-batch hooks; returns the states, in chunk order.

    Call it once per chunk on every rank, after the chunk is built (in the model provider, or on
    the list of chunks). ``progress``: where routers that change with training progress (StableMoE)
    read (iteration, train_iters); default: megatron.training's arguments.
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    states = []
    for chunk in chunks:
        gpt = unwrap_chunk(chunk)
        config = gpt.config
        users = [m for m in gpt.modules() if isinstance(m, UsesChunkState)]
        elliptical = [m.elliptical for m in users if isinstance(m, EllipticalAttentionMixin)]
        moe_numbers = moe_layer_numbers(config, hybrid_pattern(gpt))
        state = ChunkState(
            moe_numbers, [layer.layer_number for layer in gpt.decoder.layers], gpt.vp_stage,
            metrics=RouterMetrics(config.num_moe_experts, moe_numbers) if moe_numbers else None,
            value_handoff=value_handoff(config, elliptical[0]) if elliptical else None,
            transport=_transport(config.virtual_pipeline_model_parallel_size),
            progress=progress,
            sequence_parallel_tp=config.tensor_model_parallel_size if config.sequence_parallel else 1,
        )
        register(gpt, state)
        for module in users:
            module.bind_chunk_state(state)
        gpt.register_forward_pre_hook(state.pre_forward, with_kwargs=True)
        gpt.register_forward_hook(state.post_forward, with_kwargs=True)
        states.append(state)
    return states
