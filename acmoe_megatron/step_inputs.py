"""Per-micro-batch inputs that some routers need beyond the hidden states.

StableMoE's distilled router (``baseline_routers.StableMoERouter``) routes by token id and switches
stage at a fraction of training, but megatron hands a router only hidden states. ``forward_step``
therefore records the micro-batch's token ids (``[B, S]``, every pipeline stage reads its own copy
of the batch) and the trainer's iteration here; the object hangs off the chunk's ``LabelCarrier``
(``carrier.step_inputs``) so routers find it like the AC labels, keyed by the carrier's micro-batch
id — activation-recompute replays in backward read the ids of the micro-batch they replay.
"""

from __future__ import annotations

import torch


class StepInputs:
    """Token ids by micro-batch id, plus training progress (iteration / train_iters)."""

    def __init__(self):
        self._tokens: dict[int, torch.Tensor] = {}
        self.iteration = 0
        self.train_iters: int | None = None

    def put_tokens(self, mb: int, tokens_BS: torch.Tensor, keep: int) -> None:
        """Record ``mb``'s ids; keep only the newest ``keep`` micro-batches (those of this step:
        every micro-batch's backward, and so its recompute replays, finish within its step)."""
        self._tokens[mb] = tokens_BS
        for old in sorted(self._tokens)[:-max(keep, 1)]:
            del self._tokens[old]

    def tokens(self, mb: int) -> torch.Tensor:
        if mb not in self._tokens:
            raise RuntimeError(
                f"token ids of micro-batch {mb} are not recorded (have {sorted(self._tokens)}): train "
                "through acmoe_megatron.train.forward_step, or call put_tokens before the forward"
            )
        return self._tokens[mb]

    def set_progress(self, iteration: int, train_iters: int | None) -> None:
        self.iteration, self.train_iters = int(iteration), train_iters
