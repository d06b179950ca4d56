"""Cross-layer state handed from layer to layer, per micro-batch: AC labels and attention values.

The AC router of MoE layer ℓ clusters its tokens by their top-1 expert at the previous MoE layer
(spec §2.2); elliptical attention (elliptical.py) weighs query features by how much the values
changed since the previous attention layer. megatron passes only hidden states between layers, so
this state travels beside them:

* **Inside a model chunk** a ``LabelCarrier`` (one per chunk, attached as ``model.acmoe_labels``;
  no module-level state) holds the state of every layer keyed by (kind, micro-batch, layer); kind
  ``LABELS``: label *sources* ``put`` their top-1 labels, AC routers ``get`` those of the previous
  MoE layer; kind ``VALUES``: each elliptical attention layer stores its values (detached) and
  reads those of the previous attention layer (``put_state`` / ``get_state``).
* **Across pipeline stages** (and virtual stages) ``label_transport.LabelTransport`` sends the
  chunk's latest labels (and, with elliptical attention, its last layer's values) to the next
  stage after its forward and receives them before the next stage's forward, on a process group of
  its own (see that module for why).
* **Activation recompute** replays routers and attention during backward, in reverse layer order
  and, under 1F1B, after later micro-batches' forwards. ``mark_backward`` wraps the chunk's output
  in an identity autograd node whose backward runs first in that micro-batch's backward pass and
  tells the carrier which micro-batch is being replayed, so replays read that micro-batch's state.

Every micro-batch forward calls ``begin_forward`` (a fresh micro-batch id); the state of
micro-batches whose backward has started is dropped when a later micro-batch's backward starts,
and evaluation (no grad) keeps only the current micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerLabels:
    """Top-1 expert per token ``[T]`` and the largest expert index any top-k column used."""

    top1_T: torch.Tensor
    max_label: torch.Tensor  # 0-d long tensor (kept on device: no host sync)


def labels_from_routing(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor) -> LayerLabels:
    """Top-1 = the selected expert with the largest gate value; max over all selected experts."""
    with torch.no_grad():
        top1_T = probs_TE.detach().masked_fill(~routing_map_TE, -1.0).argmax(dim=-1)
        ids_E = torch.arange(routing_map_TE.shape[1], device=routing_map_TE.device)
        max_label = routing_map_TE.any(dim=0).mul(ids_E).amax()  # unused experts count as index 0
    return LayerLabels(top1_T, max_label)


LABELS = "labels"  # LayerLabels of an MoE layer (AC routers)
VALUES = "values"  # detached attention values [s, b, heads, d] (elliptical attention)


class LabelCarrier:
    """Cross-layer state of one model chunk, keyed by (kind, micro-batch id, layer number).

    The label methods (``put``, ``put_labels``, ``latest``, ``previous_labels``, ``get``) are the
    AC routers' view of kind ``LABELS``; ``put_state`` / ``get_state`` / ``latest_state`` serve any
    kind (elliptical attention's ``VALUES``). Micro-batch bookkeeping is shared by all kinds.
    """

    def __init__(self, moe_layer_numbers: list[int], local_layer_numbers: list[int] | None = None,
                 vp_stage: int | None = None):
        self.moe_layer_numbers = sorted(moe_layer_numbers)  # global: all MoE layers of the model
        self.local_layer_numbers = sorted(local_layer_numbers or moe_layer_numbers)  # this chunk's
        self.vp_stage = vp_stage or 0
        self.value_handoff = None  # elliptical.ValueHandoff when elliptical attention is on
        self._state: dict[tuple[str, int, int], object] = {}
        self._next_mb = 0
        self.current_mb = 0

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

    # -- labels -------------------------------------------------------------------------------

    def previous_moe_layer(self, layer_number: int) -> int | None:
        """Global number of the MoE layer before ``layer_number`` (dense layers in between skip)."""
        earlier = [n for n in self.moe_layer_numbers if n < layer_number]
        return earlier[-1] if earlier else None

    def put(self, layer_number: int, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor) -> None:
        """Record a router's decision for the current micro-batch."""
        self.put_labels(layer_number, labels_from_routing(probs_TE, routing_map_TE))

    def put_labels(self, layer_number: int, labels: LayerLabels, mb: int | None = None) -> None:
        self.put_state(LABELS, layer_number, labels, mb)

    def latest(self, mb: int | None = None) -> tuple[int, LayerLabels] | None:
        """(layer, labels) of the highest MoE layer with labels for micro-batch ``mb``."""
        return self.latest_state(LABELS, mb)

    def previous_labels(self, layer_number: int) -> LayerLabels | None:
        """The previous MoE layer's labels for the current micro-batch, or None (no error)."""
        prev = self.previous_moe_layer(layer_number)
        return None if prev is None else self.get_state(LABELS, prev)

    def get(self, layer_number: int, num_tokens: int) -> LayerLabels:
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
                f"{self.current_mb} (its labels are missing). If layer {prev} is on another "
                "pipeline stage, the label transport between stages is not active: train through "
                "acmoe_megatron.train's forward_step, or call LabelTransport yourself."
            )
        if labels.top1_T.shape[0] != num_tokens:
            raise RuntimeError(
                f"AC router at layer {layer_number}: {num_tokens} tokens but MoE layer {prev} "
                f"labelled {labels.top1_T.shape[0]}; token layouts of consecutive MoE layers differ."
            )
        return labels


class _BackwardMarker(torch.autograd.Function):
    """Identity on the chunk output; its backward announces the micro-batch to the carrier."""

    @staticmethod
    def forward(ctx, output, carrier, mb):
        ctx.carrier, ctx.mb = carrier, mb
        return output.clone()  # a fresh tensor: megatron frees pipeline outputs in place

    @staticmethod
    def backward(ctx, grad):
        ctx.carrier.begin_backward(ctx.mb)
        return grad, None, None


def mark_backward(output: torch.Tensor, carrier: LabelCarrier, mb: int) -> torch.Tensor:
    if not output.requires_grad:
        return output
    return _BackwardMarker.apply(output, carrier, mb)


def unwrap_chunk(model):
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def carrier_of(model) -> LabelCarrier | None:
    carrier = getattr(unwrap_chunk(model), "acmoe_labels", None)
    return carrier if isinstance(carrier, LabelCarrier) else None


def find_carriers(model) -> list[LabelCarrier]:
    """The label carriers of a (possibly wrapped) model or list of model chunks."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [c for c in (carrier_of(chunk) for chunk in chunks) if c is not None]


def reset_labels(model) -> None:
    """Forget all labels of ``model`` (tests and single forwards outside the trainer)."""
    for carrier in find_carriers(model):
        carrier.reset()
