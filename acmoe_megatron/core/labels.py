"""A router's decision as the next AC layer needs it: each token's top-1 expert (spec §2.2).

The AC router of MoE layer ℓ clusters its tokens by their top-1 expert at the previous MoE layer
(the release's ``MoE_gate_pre``). ``labels_from_routing`` derives that cluster label from megatron's
``(probs, routing_map)``; the labels travel between layers in the chunk's ``chunk_state.ChunkState``
and between pipeline stages through ``label_transport``.
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
