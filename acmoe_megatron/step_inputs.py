"""Per-micro-batch inputs that some routers need beyond the hidden states.

StableMoE's distilled router (``baseline_routers.StableMoERouter``) routes by token id and switches
stage at a fraction of training, but megatron hands a router only hidden states. ``forward_step``
therefore records the micro-batch's token ids (``[B, S]``; every pipeline stage reads its own copy
of the batch) in the chunk's ``LabelCarrier`` as state kind ``TOKENS`` — keyed by micro-batch like
the AC labels, so activation-recompute replays read the ids of the micro-batch they replay, and
dropped with them — and the trainer's progress in a ``StepInputs`` (``carrier.step_inputs``).
"""

from __future__ import annotations

import torch

TOKENS = "tokens"  # carrier state kind: [B, S] token ids of a micro-batch (layer key 0)


def put_tokens(carrier, tokens_BS: torch.Tensor) -> None:
    carrier.put_state(TOKENS, 0, tokens_BS)


def get_tokens(carrier) -> torch.Tensor:
    tokens = carrier.get_state(TOKENS, 0)
    if tokens is None:
        raise RuntimeError(
            f"token ids of micro-batch {carrier.current_mb} are not recorded: train through "
            "acmoe_megatron.train.forward_step, or call step_inputs.put_tokens(carrier, tokens) "
            "before the forward"
        )
    return tokens


class StepInputs:
    """Training progress (iteration / train_iters) seen by the routers of one model chunk."""

    def __init__(self):
        self.iteration = 0
        self.train_iters: int | None = None

    def set_progress(self, iteration: int, train_iters: int | None) -> None:
        self.iteration, self.train_iters = int(iteration), train_iters
