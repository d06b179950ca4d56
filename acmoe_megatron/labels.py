"""Previous-MoE-layer expert labels, handed from router to router inside one model chunk.

The AC router of MoE layer ℓ clusters its tokens by their top-1 expert at the previous MoE layer
(spec §2.2). megatron passes only hidden states between layers, so the labels travel beside them
through a ``LabelCarrier``: one object per model chunk (attached to the ``GPTModel`` as
``model.acmoe_labels``; no module-level state). Every router of the chunk holds a reference to it:
label *sources* ``put`` their top-1 labels, AC routers ``get`` those of the previous MoE layer.

Ordering guarantees this relies on (no pipeline parallelism, see ``spec.check_label_sources``):
each micro-batch runs its MoE layers in order before any later micro-batch starts, and megatron's
recompute replays (selective "moe" or full) re-read the labels of the same micro-batch, because
the non-pipelined schedule runs backward(mb) right after forward(mb). ``reset()`` is called at the
start of every micro-batch so a stale label can never be read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerLabels:
    """Top-1 expert per token ``[T]`` and the largest expert index any top-k column used."""

    top1_T: torch.Tensor
    max_label: torch.Tensor  # 0-d long tensor (kept on device: no host sync)


class LabelCarrier:
    """Holds the latest labels of every MoE layer of one model chunk, keyed by layer number."""

    def __init__(self, moe_layer_numbers: list[int]):
        self.moe_layer_numbers = sorted(moe_layer_numbers)
        self._labels: dict[int, LayerLabels] = {}

    def previous_moe_layer(self, layer_number: int) -> int | None:
        """Global number of the MoE layer before ``layer_number`` (dense layers in between skip)."""
        earlier = [n for n in self.moe_layer_numbers if n < layer_number]
        return earlier[-1] if earlier else None

    def put(self, layer_number: int, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor) -> None:
        """Record a router's decision: top-1 = the selected expert with the largest gate value."""
        with torch.no_grad():
            masked = torch.where(routing_map_TE, probs_TE.detach(), torch.full_like(probs_TE, -1.0))
            top1_T = masked.argmax(dim=-1)
            used_E = routing_map_TE.any(dim=0)
            ids_E = torch.arange(routing_map_TE.shape[1], device=routing_map_TE.device)
            max_label = torch.where(used_E, ids_E, torch.zeros_like(ids_E)).amax()
        self._labels[layer_number] = LayerLabels(top1_T, max_label)

    def get(self, layer_number: int, num_tokens: int) -> LayerLabels:
        """Labels from the MoE layer before ``layer_number``; clear error when they are missing."""
        prev = self.previous_moe_layer(layer_number)
        if prev is None:
            raise RuntimeError(
                f"AC router at layer {layer_number} has no earlier MoE layer in this model chunk; "
                "set acmoe.first_ac_layer to a later MoE layer (the first MoE layer must use a "
                "standard router)."
            )
        labels = self._labels.get(prev)
        if labels is None:
            raise RuntimeError(
                f"AC router at layer {layer_number}: MoE layer {prev} has not routed this "
                "micro-batch yet (its labels are missing). This happens when the previous MoE "
                "layer lives on another pipeline stage, which this version does not support."
            )
        if labels.top1_T.shape[0] != num_tokens:
            raise RuntimeError(
                f"AC router at layer {layer_number}: {num_tokens} tokens but MoE layer {prev} "
                f"labelled {labels.top1_T.shape[0]}; token layouts of consecutive MoE layers differ."
            )
        return labels

    def reset(self) -> None:
        """Forget all labels (called at the start of every micro-batch)."""
        self._labels.clear()


def find_carriers(model) -> list[LabelCarrier]:
    """The label carriers of a (possibly wrapped) model or list of model chunks."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    found = []
    for chunk in chunks:
        for module in chunk.modules():
            carrier = getattr(module, "acmoe_labels", None)
            if isinstance(carrier, LabelCarrier) and carrier not in found:
                found.append(carrier)
    return found


def reset_labels(model) -> None:
    """Reset every label carrier of ``model`` (call before each micro-batch's forward)."""
    for carrier in find_carriers(model):
        carrier.reset()
