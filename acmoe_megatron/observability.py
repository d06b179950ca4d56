"""Extra TensorBoard scalars for Megatron's training loop: MoE/AC routing metrics, tokens/s,
memory, bits per token — written at Megatron's own log interval, by Megatron's own writer.

``install()`` wraps two functions of ``megatron.training.training`` (looked up by name in
the training loop): ``training_log`` — after Megatron's own logging, at every ``log_interval``,
every rank takes part in one all-reduce of the routing accumulators (metrics.flush) and one MAX
reduce of memory, and the writer rank (Megatron's: the last one) writes
``throughput/tokens_per_s``, ``throughput/tokens_per_s_per_device``, ``throughput/mfu`` (GPUs with a
known peak: H100/H200 989 TFLOP/s dense BF16), ``memory/max_gib`` (peak allocated on GPU, peak
resident set on CPU) and ``lm loss bits-per-token`` (= bits per byte for byte-level data); and
``evaluate_and_print_results`` (with ``evaluate``) — adds ``lm loss validation bits-per-token`` at
the same step as Megatron's ``lm loss validation``. Nothing here syncs per layer or per step.

Router losses of our own that a router records through megatron's MoE metrics tracker (StableMoE's
distillation loss) are not in the fixed list of names megatron's ``training_log`` reports:
``install(..., extra_moe_losses=...)`` adds them to that report, so they reach TensorBoard (and the
console line) exactly like megatron's load-balancing loss, reduced the same way.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from acmoe_megatron import metrics as router_metrics
from acmoe_megatron.chunk_state import attached_metrics

PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "B200": 2250e12}
_STATE = {"installed": False}


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def report_extra_moe_losses(names: tuple[str, ...]) -> None:
    """Make megatron's per-step MoE report include ``names`` (recorded with the tracker's
    ``record``, e.g. by ``attach_and_log_load_balancing_loss``). Every rank must pass the same names:
    the report all-reduces each name's per-layer values."""
    if not names:
        return
    import megatron.training.training as training

    get_tracker = training.get_moe_metrics_tracker

    def get_tracker_reporting_ours():
        tracker = get_tracker()
        if getattr(tracker, "_acmoe_extra_names", None) != names:
            report = type(tracker).report.__get__(tracker)

            def report_with_ours(*args, track_names=None, **kwargs):
                if track_names is not None:
                    track_names = list(track_names) + [n for n in names if n not in track_names]
                return report(*args, track_names=track_names, **kwargs)

            tracker.report = report_with_ours
            tracker._acmoe_extra_names = names
        return tracker

    training.get_moe_metrics_tracker = get_tracker_reporting_ours


def install(extra_moe_losses: tuple[str, ...] = ()) -> None:
    """Wrap megatron's training_log/evaluate once; the routing metrics are those of every attached
    model chunk (``chunk_state.attached_metrics``); ``extra_moe_losses``: our routers' loss names for
    megatron's MoE report."""
    if _STATE["installed"]:
        return
    report_extra_moe_losses(extra_moe_losses)
    import megatron.training.training as training
    from megatron.training import get_args
    from megatron.training.global_vars import get_tensorboard_writer

    orig_log, orig_eval = training.training_log, training.evaluate
    orig_eval_print = training.evaluate_and_print_results
    last = {"time": None, "samples": None}

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs):
        out = orig_log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs)
        margs = get_args()
        if iteration % margs.log_interval:
            return out
        writer = get_tensorboard_writer()
        router_metrics.flush(attached_metrics(), writer, iteration)
        mem = torch.tensor([_memory_gib()], device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        now, samples = time.perf_counter(), margs.consumed_train_samples
        if writer is None:
            last.update(time=now, samples=samples)
            return out
        writer.add_scalar("memory/max_gib", float(mem), iteration)
        loss = loss_dict.get("lm loss") if loss_dict else None
        if loss is not None:
            writer.add_scalar("lm loss bits-per-token", float(loss) / math.log(2), iteration)
        if last["time"] is not None and now > last["time"]:
            tokens = (samples - last["samples"]) * margs.seq_length
            rate = tokens / (now - last["time"])
            world = dist.get_world_size() if dist.is_initialized() else 1
            writer.add_scalar("throughput/tokens_per_s", rate, iteration)
            writer.add_scalar("throughput/tokens_per_s_per_device", rate / world, iteration)
            peak = _peak_flops()
            if peak is not None:
                try:
                    flops = training.num_floating_point_operations(margs, samples - last["samples"])
                    writer.add_scalar("throughput/mfu", flops / (now - last["time"]) / world / peak, iteration)
                except Exception:  # megatron's FLOP formula does not cover every model; skip MFU
                    pass
        last.update(time=now, samples=samples)
        return out

    latest_eval: dict = {}

    def evaluate(*args, **kwargs):
        result = orig_eval(*args, **kwargs)
        latest_eval["result"] = result
        return result

    def evaluate_and_print_results(prefix, forward_step_func, data_iterator, model, iteration, *args, **kwargs):
        latest_eval.clear()
        out = orig_eval_print(prefix, forward_step_func, data_iterator, model, iteration, *args, **kwargs)
        writer = get_tensorboard_writer()
        result = latest_eval.get("result")
        total = result[0] if isinstance(result, tuple) else None
        if writer is not None and isinstance(total, dict) and "lm loss" in total:
            writer.add_scalar("lm loss validation bits-per-token", float(total["lm loss"]) / math.log(2), iteration)
        return out

    training.training_log, training.evaluate = training_log, evaluate
    training.evaluate_and_print_results = evaluate_and_print_results
    _STATE["installed"] = True
