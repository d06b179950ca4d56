"""The one owner of a model chunk's cross-layer, per-micro-batch state, and its micro-batch protocol.

megatron passes only hidden states from layer to layer, but our layers need more (spec §2.2, the
Elliptical Attention paper's Eq. 10): the AC router of MoE layer ℓ clusters tokens by their top-1
expert at the previous MoE layer; elliptical attention weighs query features by how much the values
changed since the previous attention layer; StableMoE's distilled router routes by token id. A
``ChunkState`` (one per model chunk; attached by ``plugin.attach``) holds all of it:

  kind       key (micro-batch, layer)   written by                    read by
  LABELS     MoE layer                  every router of ours          the next AC / cosine router
  VALUES     attention layer            elliptical core attention     the next elliptical layer
  TOKENS     0                          the chunk's forward pre-hook  StableMoE's routers

plus the chunk's routing ``metrics`` (metrics.RouterMetrics), the pipeline hand-off plan of
elliptical values (``value_handoff``) and the stage-to-stage ``transport`` (label_transport.py).

**The micro-batch protocol** runs in two module hooks on megatron's ``GPTModel`` that
``plugin.attach`` registers, so any forward step that calls the model works unchanged:

* forward pre-hook: a new micro-batch id (evaluation, i.e. no grad: older state is dropped), the
  token ids, and — on a later pipeline stage — the previous stage's labels/values received;
* forward hook: the latest labels/values sent to the next stage, and the output wrapped in an
  identity autograd node whose backward runs first in this micro-batch's backward and announces
  it (``begin_backward``). Activation recompute replays routers and attention during backward, in
  reverse layer order and, under 1F1B, after later micro-batches' forwards; the announcement makes
  the replays read the state of the micro-batch they replay, and frees older micro-batches.

Modules that use the state subclass ``UsesChunkState``; ``attach`` binds them. A module that is
used before it is attached fails with an error naming the fix, never silently.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from acmoe_megatron.core.labels import LayerLabels, labels_from_routing

LABELS = "labels"  # LayerLabels of an MoE layer
VALUES = "values"  # detached attention values [s, b, heads, d] (elliptical attention)
TOKENS = "tokens"  # [B, S] token ids of the micro-batch (layer key 0)

NOT_ATTACHED = (
    "{what} has no chunk state: the model was not attached. Call acmoe_megatron.plugin.attach(model) "
    "on every model chunk after building it (in the model provider); a stock Megatron forward step "
    "then works unchanged"
)


class ChunkState:
    """Cross-layer state of one model chunk, keyed by (kind, micro-batch id, layer number)."""

    def __init__(self, moe_layer_numbers: list[int], local_layer_numbers: list[int],
                 vp_stage: int | None = None, *, metrics=None, value_handoff=None, transport=None,
                 progress: Callable[[], tuple[int, int | None]] | None = None, sequence_parallel_tp: int = 1):
        self.moe_layer_numbers = sorted(moe_layer_numbers)  # global: all MoE layers of the model
        self.local_layer_numbers = sorted(local_layer_numbers)  # the decoder layers of this chunk
        self.vp_stage = vp_stage or 0
        self.metrics = metrics  # metrics.RouterMetrics of this chunk's routers, or None
        self.value_handoff = value_handoff  # elliptical.ValueHandoff, or None
        self.transport = transport  # label_transport.LabelTransport, or None (no pipeline)
        self._progress = progress
        self._sp_tp = sequence_parallel_tp  # router tokens = b·s / this (TP size under SP)
        self._state: dict[tuple[str, int, int], object] = {}
        self._next_mb = 0
        self.current_mb = 0
        self._router_tokens, self._device = 0, None  # of the current forward (pipeline transport)

    # -- micro-batch bookkeeping --------------------------------------------------------------

    def begin_forward(self, training: bool) -> int:
        """A new micro-batch enters this chunk's forward; returns its id."""
        if not training:  # evaluation: nothing is replayed, keep nothing older
            self._state.clear()
        self.current_mb = self._next_mb
        self._next_mb += 1
        return self.current_mb

    def begin_backward(self, mb: int) -> None:
        """Micro-batch ``mb``'s backward starts: replays read its state; older ones are done."""
        self.current_mb = mb
        for key in [k for k in self._state if k[1] < mb]:
            del self._state[key]

    def reset(self) -> None:
        self._state.clear()

    # -- any kind of state --------------------------------------------------------------------

    def put_state(self, kind: str, layer_number: int, value, mb: int | None = None) -> None:
        self._state[(kind, self.current_mb if mb is None else mb, layer_number)] = value

    def get_state(self, kind: str, layer_number: int, mb: int | None = None):
        """The ``kind`` state of ``layer_number`` for micro-batch ``mb`` (default: current), or None."""
        return self._state.get((kind, self.current_mb if mb is None else mb, layer_number))

    def latest_state(self, kind: str, mb: int | None = None) -> tuple[int, object] | None:
        """(layer, state) of the highest layer with ``kind`` state for micro-batch ``mb``."""
        mb = self.current_mb if mb is None else mb
        layers = [layer for (k, m, layer) in self._state if k == kind and m == mb]
        if not layers:
            return None
        top = max(layers)
        return top, self._state[(kind, mb, top)]

    # -- labels (routers) ---------------------------------------------------------------------

    def previous_moe_layer(self, layer_number: int) -> int | None:
        """Global number of the MoE layer before ``layer_number`` (dense layers in between skip)."""
        earlier = [n for n in self.moe_layer_numbers if n < layer_number]
        return earlier[-1] if earlier else None

    def put_routing(self, layer_number: int, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor) -> None:
        """Record a router's decision for the current micro-batch (top-1 = largest selected gate)."""
        self.put_labels(layer_number, labels_from_routing(probs_TE, routing_map_TE))

    def put_labels(self, layer_number: int, labels: LayerLabels, mb: int | None = None) -> None:
        self.put_state(LABELS, layer_number, labels, mb)

    def latest_labels(self, mb: int | None = None) -> tuple[int, LayerLabels] | None:
        """(layer, labels) of the highest MoE layer with labels for micro-batch ``mb``."""
        return self.latest_state(LABELS, mb)

    def previous_labels(self, layer_number: int) -> LayerLabels | None:
        """The previous MoE layer's labels for the current micro-batch, or None (no error)."""
        prev = self.previous_moe_layer(layer_number)
        return None if prev is None else self.get_state(LABELS, prev)

    def labels_for(self, layer_number: int, num_tokens: int) -> LayerLabels:
        """Labels from the MoE layer before ``layer_number``; clear error when they are missing."""
        prev = self.previous_moe_layer(layer_number)
        if prev is None:
            raise RuntimeError(
                f"AC router at layer {layer_number} has no earlier MoE layer; set "
                "acmoe.first_ac_layer to a later MoE layer (the first MoE layer must use a "
                "standard router)."
            )
        labels = self.get_state(LABELS, prev)
        if labels is None:
            raise RuntimeError(
                f"AC router at layer {layer_number}: MoE layer {prev} has not routed micro-batch "
                f"{self.current_mb} (its labels are missing). Was the model called directly on a "
                f"submodule, or is MoE layer {prev} on another pipeline stage without the stage "
                "transport? Attach every chunk with acmoe_megatron.plugin.attach and call the model."
            )
        if labels.top1_T.shape[0] != num_tokens:
            raise RuntimeError(
                f"AC router at layer {layer_number}: {num_tokens} tokens but MoE layer {prev} "
                f"labelled {labels.top1_T.shape[0]}; token layouts of consecutive MoE layers differ."
            )
        return labels

    # -- token ids and training progress (StableMoE) --------------------------------------------

    def put_tokens(self, tokens_BS: torch.Tensor) -> None:
        self.put_state(TOKENS, 0, tokens_BS)

    def tokens(self) -> torch.Tensor:
        tokens = self.get_state(TOKENS, 0)
        if tokens is None:
            raise RuntimeError(
                f"token ids of micro-batch {self.current_mb} are not available on this model chunk: "
                "this router routes by token id, so the model must be called with input_ids on every "
                "pipeline stage (megatron's pretrain_gpt passes None on middle stages; pass the "
                "micro-batch's tokens there, as acmoe_megatron.runtime.forward_step.forward_step does)"
            )
        return tokens

    def progress(self) -> tuple[int, int | None]:
        """(iteration, train_iters) of the trainer: the ``progress`` callable given to ``attach``,
        else megatron.training's global arguments."""
        if self._progress is not None:
            return self._progress()
        found = megatron_training_progress()
        if found is None:
            raise RuntimeError(
                "this router needs the training progress (iteration, train_iters), and megatron.training's "
                "arguments are not initialised here: pass progress=lambda: (iteration, train_iters) to "
                "acmoe_megatron.plugin.attach"
            )
        return found

    # -- the module hooks (registered by plugin.attach on megatron's GPTModel) ------------------

    def pre_forward(self, gpt, args, kwargs) -> None:
        """Before the chunk's forward: new micro-batch, token ids, labels/values from the previous stage."""
        input_ids = args[0] if args else kwargs.get("input_ids")
        self.begin_forward(training=torch.is_grad_enabled())
        if input_ids is not None:
            self.put_tokens(input_ids)
        if self.transport is None:
            return
        if gpt.pre_process:
            self._router_tokens = input_ids.numel() // self._sp_tp
            self._device = input_ids.device
        else:  # megatron's schedule has set this stage's input (hidden states [s_local, b, h])
            hidden = gpt.decoder.input_tensor
            self._router_tokens, self._device = hidden.shape[0] * hidden.shape[1], hidden.device
        self.transport.receive(self, self.vp_stage, self._router_tokens, self._device)

    def post_forward(self, gpt, args, kwargs, output):
        """After the chunk's forward: labels/values to the next stage; mark the backward."""
        if self.transport is not None:
            self.transport.send(self, self.vp_stage, self._router_tokens, self._device)
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
            return mark_backward(output, self, self.current_mb)
        return output


def megatron_training_progress() -> tuple[int, int | None] | None:
    """(iteration, train_iters) from megatron.training's arguments, or None outside its trainer."""
    try:
        from megatron.training import get_args

        args = get_args()
    except (ImportError, AssertionError):
        return None
    if args is None:
        return None
    iteration = args.curr_iteration if hasattr(args, "curr_iteration") else args.iteration
    return int(iteration), args.train_iters


class UsesChunkState:
    """Mixin of our modules that read or write the chunk state; ``attach`` binds the state."""

    _chunk_state: ChunkState | None = None

    def bind_chunk_state(self, state: ChunkState) -> None:
        self._chunk_state = state

    @property
    def chunk_state(self) -> ChunkState:
        if self._chunk_state is None:
            raise RuntimeError(NOT_ATTACHED.format(what=f"{type(self).__name__} at layer {self.layer_number}"))
        return self._chunk_state


class _BackwardMarker(torch.autograd.Function):
    """Identity on the chunk output; its backward announces the micro-batch to the state."""

    @staticmethod
    def forward(ctx, output, state, mb):
        ctx.state, ctx.mb = state, mb
        return output.clone()  # a fresh tensor: megatron frees pipeline outputs in place

    @staticmethod
    def backward(ctx, grad):
        ctx.state.begin_backward(ctx.mb)
        return grad, None, None


def mark_backward(output: torch.Tensor, state: ChunkState, mb: int) -> torch.Tensor:
    if not output.requires_grad:
        return output
    return _BackwardMarker.apply(output, state, mb)


# -- which chunks are attached (a registry of our own: nothing is set on megatron's modules) ------

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # GPTModel -> ChunkState
_ORDER: list[weakref.ref] = []  # attach order: every rank flushes metrics in the same order


def register(gpt, state: ChunkState) -> None:
    if gpt in _ATTACHED:
        raise RuntimeError("this model chunk is already attached; call acmoe_megatron.plugin.attach once per chunk")
    _ATTACHED[gpt] = state
    _ORDER.append(weakref.ref(state))


def unwrap_chunk(model):
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def state_of(model) -> ChunkState | None:
    """The state attached to a (possibly wrapped) model chunk, or None."""
    return _ATTACHED.get(unwrap_chunk(model))


def states_of(model) -> list[ChunkState]:
    """The states of a (possibly wrapped) model or list of model chunks."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [s for s in (state_of(chunk) for chunk in chunks) if s is not None]


def attached_metrics() -> list:
    """RouterMetrics of every live attached chunk of this process, in attach order."""
    _ORDER[:] = [ref for ref in _ORDER if ref() is not None]
    return [s.metrics for s in (ref() for ref in _ORDER) if s is not None and s.metrics is not None]


def reset_states(model) -> None:
    """Forget all state of ``model`` (tests and single forwards outside the trainer)."""
    for state in states_of(model):
        state.reset()
