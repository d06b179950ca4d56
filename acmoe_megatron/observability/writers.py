"""Extra scalars for Megatron's training loop: MoE/AC routing metrics, tokens/s, MFU, memory, bits
per token — written at Megatron's own log interval through Megatron's own writers: TensorBoard,
and Weights & Biases when ``megatron.wandb_project`` is set (``MetricWriter``: one call site feeds both).

``runtime/hooks.install_training_metrics`` wraps functions of ``megatron.training.training``
(through the hooks table): ``training_log`` — after Megatron's own logging, at every ``log_interval``, every rank takes
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
``install_training_metrics(..., extra_moe_losses=...)`` adds them to that report, so they reach TensorBoard (and the
console line) exactly like megatron's load-balancing loss, reduced the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from acmoe_megatron.observability.router_loss_tracker import RouterLossTracker

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's data sheets, (BF16, FP8); SXM parts.
PEAK_TFLOPS = {
    "H100": (989.4, 1978.9),
    "H200": (989.4, 1978.9),
    "B200": (2250.0, 4500.0),
    "A100": (312.0, None),  # no FP8 on Ampere
}


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


def memory_gib() -> float:
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

    moe_logging.set_moe_metrics_tracker(RouterLossTracker(names))


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
