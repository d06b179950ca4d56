"""Extra scalars for Megatron's training loop: MoE/AC routing metrics, tokens/s, MFU, memory, bits
per token — written at Megatron's own log interval through Megatron's own writers: TensorBoard,
and Weights & Biases when ``megatron.wandb_project`` is set (``MetricWriter``: one call site feeds both).

``install()`` wraps functions of ``megatron.training.training`` (looked up by name in the training
loop): ``training_log`` — after Megatron's own logging, at every ``log_interval``, every rank takes
part in one all-reduce of the routing accumulators (metrics.flush) and one MAX reduce of memory,
and the writer rank (Megatron's: the last one) writes ``throughput/tokens_per_s``,
``throughput/tokens_per_s_per_device``, ``throughput/mfu``, ``memory/max_gib`` (peak allocated on
GPU, peak resident set on CPU) and ``lm loss bits-per-token`` (= bits per byte for byte-level
data); ``evaluate_and_print_results`` (with ``evaluate``) adds ``lm loss validation
bits-per-token`` at the same step as Megatron's ``lm loss validation``. Nothing here syncs per
layer or per step.

**Throughput is training only.** Time spent in evaluation (``evaluate_and_print_results``) and
in checkpoint saves (``save_checkpoint``) inside a log interval is measured and subtracted, and
reported on its own (``throughput/eval_s``, ``throughput/checkpoint_s``); the clock starts when
``train`` starts, so the first interval after a resume has a value too.

**MFU** = megatron's FLOP count / (time × processes × peak): the peak is ``run.peak_tflops`` when
set (any device), else the dense per-GPU peak of ``PEAK_TFLOPS`` for the GPU's name in BF16, or in
FP8 when ``megatron.fp8`` is set; no MFU without a known peak.

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

from acmoe_megatron.model.chunk_state import attached_metrics
from acmoe_megatron.observability import metrics as router_metrics

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's data sheets, (BF16, FP8); SXM parts.
PEAK_TFLOPS = {
    "H100": (989.4, 1978.9),
    "H200": (989.4, 1978.9),
    "B200": (2250.0, 4500.0),
    "A100": (312.0, None),  # no FP8 on Ampere
}
_STATE = {"installed": False}


def peak_flops(device_name: str | None, fp8: bool, peak_tflops: float | None = None) -> float | None:
    """FLOP/s of one device for MFU: ``peak_tflops`` (run.peak_tflops) if given, else the table's."""
    if peak_tflops:
        return float(peak_tflops) * 1e12
    if not device_name:
        return None
    for key, (bf16, fp8_peak) in PEAK_TFLOPS.items():
        if key in device_name:
            value = fp8_peak if fp8 else bf16
            return None if value is None else value * 1e12
    return None


class MetricWriter:
    """Megatron's TensorBoard writer and its W&B writer (``wandb`` after ``wandb.init``) behind one
    ``add_scalar``; each step's W&B values go out in one ``log`` call (``commit``)."""

    def __init__(self, tensorboard, wandb):
        self.tensorboard, self.wandb = tensorboard, wandb
        self._pending: dict[int, dict[str, float]] = {}

    @classmethod
    def from_megatron(cls) -> MetricWriter | None:
        from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

        tensorboard, wandb = get_tensorboard_writer(), get_wandb_writer()
        return None if tensorboard is None and wandb is None else cls(tensorboard, wandb)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self._pending.setdefault(step, {})[tag] = value

    def add_histogram(self, tag: str, values, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_histogram(tag, values, step)

    def add_figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib figure as a TensorBoard image (and a W&B image)."""
        if self.tensorboard is not None:
            self.tensorboard.add_figure(tag, figure, step, close=False)
        if self.wandb is not None:
            self._pending.setdefault(step, {})[tag] = self.wandb.Image(figure)

    def commit(self) -> None:
        if self.wandb is not None:
            for step, values in sorted(self._pending.items()):
                self.wandb.log(values, step=step)
        self._pending.clear()
        if self.tensorboard is not None:
            self.tensorboard.flush()


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def report_extra_moe_losses(names: tuple[str, ...]) -> None:
    """Make megatron's per-step MoE report include ``names`` (recorded with the tracker's
    ``record``, e.g. by ``attach_and_log_load_balancing_loss``). Every rank must pass the same names:
    the report all-reduces each name's per-layer values. Installs a ``router_loss_tracker.RouterLossTracker`` as
    megatron's global MoE metrics tracker (``set_moe_metrics_tracker``), before anything is recorded."""
    if not names:
        return
    from megatron.core.transformer.moe import moe_logging

    from acmoe_megatron.observability.router_loss_tracker import RouterLossTracker

    moe_logging.set_moe_metrics_tracker(RouterLossTracker(names))


def install(extra_moe_losses: tuple[str, ...] = (), peak_tflops: float | None = None,
            per_expert_max: int = router_metrics.PER_EXPERT_MAX, image_interval: int = 0) -> None:
    """Wrap megatron's training loop functions once; the routing metrics are those of every attached
    model chunk (``chunk_state.attached_metrics``); ``extra_moe_losses``: our routers' loss names for
    megatron's MoE report; ``peak_tflops``: run.peak_tflops; ``per_expert_max``: the tag budget of
    metrics.flush (run.per_expert_scalars_max); ``image_interval``: images every that many steps
    (run.image_interval; 0: none)."""
    if _STATE["installed"]:
        return
    report_extra_moe_losses(extra_moe_losses)
    import megatron.training.training as training
    from megatron.training import get_args

    orig_log, orig_eval = training.training_log, training.evaluate
    orig_eval_print, orig_save, orig_train = training.evaluate_and_print_results, training.save_checkpoint, training.train
    last = {"time": None, "samples": None, "image": None}
    spent = {"eval": 0.0, "checkpoint": 0.0}  # inside the current log interval

    def train(*args, **kwargs):
        last.update(time=time.perf_counter(), samples=get_args().consumed_train_samples)  # also after a resume
        spent.update(eval=0.0, checkpoint=0.0)
        return orig_train(*args, **kwargs)

    def save_checkpoint(*args, **kwargs):
        start = time.perf_counter()
        try:
            return orig_save(*args, **kwargs)
        finally:
            spent["checkpoint"] += time.perf_counter() - start

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs):
        out = orig_log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs)
        margs = get_args()
        if iteration % margs.log_interval:
            return out
        writer = MetricWriter.from_megatron()
        images = bool(image_interval) and (last["image"] is None or iteration - last["image"] >= image_interval)
        if images:
            last["image"] = iteration
        router_metrics.flush(attached_metrics(), writer, iteration, per_expert_max=per_expert_max, images=images)
        mem = torch.tensor([_memory_gib()], device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        now, samples = time.perf_counter(), margs.consumed_train_samples
        if writer is not None:
            writer.add_scalar("memory/max_gib", float(mem), iteration)
            loss = loss_dict.get("lm loss") if loss_dict else None
            if loss is not None:
                writer.add_scalar("lm loss bits-per-token", float(loss) / math.log(2), iteration)
            if last["time"] is not None:
                train_s = now - last["time"] - spent["eval"] - spent["checkpoint"]
                writer.add_scalar("throughput/eval_s", spent["eval"], iteration)
                writer.add_scalar("throughput/checkpoint_s", spent["checkpoint"], iteration)
                for tag, value in throughput(margs, samples - last["samples"], train_s, peak_tflops, training).items():
                    writer.add_scalar(tag, value, iteration)
            writer.commit()
        last.update(time=now, samples=samples)
        spent.update(eval=0.0, checkpoint=0.0)
        return out

    latest_eval: dict = {}

    def evaluate(*args, **kwargs):
        result = orig_eval(*args, **kwargs)
        latest_eval["result"] = result
        return result

    def evaluate_and_print_results(prefix, forward_step_func, data_iterator, model, iteration, *args, **kwargs):
        start = time.perf_counter()
        latest_eval.clear()
        try:
            out = orig_eval_print(prefix, forward_step_func, data_iterator, model, iteration, *args, **kwargs)
        finally:
            spent["eval"] += time.perf_counter() - start
        writer = MetricWriter.from_megatron()
        result = latest_eval.get("result")
        total = result[0] if isinstance(result, tuple) else None
        if writer is not None and isinstance(total, dict) and "lm loss" in total:
            writer.add_scalar("lm loss validation bits-per-token", float(total["lm loss"]) / math.log(2), iteration)
            writer.commit()
        return out

    training.training_log, training.evaluate = training_log, evaluate
    training.evaluate_and_print_results = evaluate_and_print_results
    training.save_checkpoint, training.train = save_checkpoint, train
    _STATE["installed"] = True


def throughput(margs, samples: int, train_s: float, peak_tflops: float | None, training=None) -> dict[str, float]:
    """tokens/s (all and per device) and MFU of ``samples`` trained in ``train_s`` seconds."""
    if train_s <= 0 or samples <= 0:
        return {}
    world = dist.get_world_size() if dist.is_initialized() else 1
    rate = samples * margs.seq_length / train_s
    out = {"throughput/tokens_per_s": rate, "throughput/tokens_per_s_per_device": rate / world}
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    peak = peak_flops(name, bool(margs.fp8), peak_tflops)
    if peak is not None and training is not None:
        try:
            flops = training.num_floating_point_operations(margs, samples)
        except Exception:  # megatron's FLOP formula does not cover every model; no MFU then
            return out
        out["throughput/mfu"] = flops / train_s / world / peak
    return out
