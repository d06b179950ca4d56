"""The forward step of megatron's trainer: one micro-batch through the GPT and the masked LM loss in
megatron's per-token form (sum, tokens, report). Used for training (``runtime/train.py``) and for
scoring a trained run (``inference/evaluate.py``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from acmoe_megatron.observability.sample_trace import MegatronSampleTrace
from acmoe_megatron.runtime import faults
from acmoe_megatron.runtime import hooks as run_hooks
from acmoe_megatron.runtime.heartbeat import Heartbeat


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked token cross-entropy in Megatron's per-token form: (sum, #tokens, report)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.cat([loss.detach().clone().view(1), num_tokens.detach().clone().view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def make_forward_step(recipe, beat: Heartbeat | None = None):
    """megatron's forward_step_func for ``recipe``; ``beat``: this process's heartbeat, told when the
    micro-batch is being read and when the model runs (hang detection, runtime/heartbeat.py)."""
    trace = MegatronSampleTrace(recipe.run.dir) if recipe.run.trace_samples else None

    def step(data_iterator, model):
        if recipe.run.log_router_grad_norms:
            run_hooks.log_router_grad_norms(model, Path(recipe.run.dir))
        return forward_step(data_iterator, model, trace, beat)

    return step


def forward_step(data_iterator, model, trace=None, beat: Heartbeat | None = None):
    """One micro-batch: GPT forward on this rank's batch (every pipeline stage reads its own copy,
    so routers that route by token id find the ids on every stage). The per-micro-batch protocol
    of our cross-layer state runs in the model's hooks (plugin.attach). ``trace``: records the
    batch's sample ids (``run.trace_samples``, sample_trace.py); ``beat``: told "data" while the
    micro-batch is read, then "forward"."""
    if beat is not None:
        beat.mark("data")
    batch = next(data_iterator)
    if beat is not None:
        beat.mark("forward")
    sample_ids = batch.pop("sample_ids", None)
    if trace is not None:
        trace(model, sample_ids)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)
    output = faults.maybe_inject_nan(output)
    return output, partial(loss_func, loss_mask)
