"""What observability/writers.py writes (and runtime/hooks.install_training_metrics times), in one process: one writer feeding TensorBoard and W&B, the tag
budget at 64 experts x 16 layers, MFU peaks, and throughput that leaves out evaluation and
checkpoint time (the launched run's tags: tests/integration/test_observability.py)."""

import types

import pytest
import torch

from acmoe_megatron.observability import metrics
from acmoe_megatron.observability import writers as observability
from acmoe_megatron.runtime import hooks


class _Recorder:
    def __init__(self):
        self.scalars, self.histograms, self.logged = {}, {}, []

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_histogram(self, tag, values, step):
        self.histograms[tag] = step

    def add_figure(self, tag, figure, step, close=True):
        self.figures = {**getattr(self, "figures", {}), tag: (figure, step)}

    def flush(self):
        pass

    def log(self, values, step):  # the wandb module's API
        self.logged.append((step, dict(values)))


def _filled(num_experts, layers):
    m = metrics.RouterMetrics(num_experts, list(range(1, layers + 1)))
    g = torch.Generator().manual_seed(0)
    for layer in range(1, layers + 1):
        logits = torch.randn(128, num_experts, generator=g)
        rmap = torch.zeros_like(logits, dtype=torch.bool).scatter(1, logits.topk(2, -1).indices, True)
        m.record_routing(layer, logits, rmap, logits.argmax(-1), None, topk=2)
    return m


def test_tag_budget_at_64_experts_x_16_layers():
    tb = _Recorder()
    scalars = metrics.flush([_filled(64, 16)], observability.MetricWriter(tb, None), 10)
    assert not any("/expert" in tag for tag in scalars)  # no per-expert scalars beyond the budget
    assert len(tb.scalars) <= 16 * 8 and len(tb.histograms) == 16  # a handful per layer + one histogram each
    small = _Recorder()
    metrics.flush([_filled(8, 2)], observability.MetricWriter(small, None), 10)  # within the budget
    assert sum("/expert" in tag for tag in small.scalars) == 16
    budget0 = _Recorder()
    metrics.flush([_filled(8, 2)], observability.MetricWriter(budget0, None), 10, per_expert_max=0)
    assert not any("/expert" in tag for tag in budget0.scalars) and len(budget0.histograms) == 2


def test_one_writer_feeds_tensorboard_and_wandb():
    tb, wb = _Recorder(), _Recorder()
    writer = observability.MetricWriter(tb, wb)
    metrics.flush([_filled(4, 2)], writer, 20)
    writer.add_scalar("throughput/tokens_per_s", 123.0, 20)
    writer.commit()
    assert len(wb.logged) == 1 and wb.logged[0][0] == 20  # one W&B log call per step
    assert set(wb.logged[0][1]) == set(tb.scalars)  # the same tags reach both
    assert wb.logged[0][1]["throughput/tokens_per_s"] == 123.0
    only_wb = observability.MetricWriter(None, wb)
    only_wb.add_scalar("x", 1.0, 30)
    only_wb.add_histogram("h", torch.ones(3), 30)  # TensorBoard only: no error without it
    only_wb.commit()
    assert wb.logged[-1] == (30, {"x": 1.0})


@pytest.mark.parametrize("name, fp8, override, expected", [
    ("NVIDIA H100 80GB HBM3", False, None, 989.4e12),
    ("NVIDIA H200", True, None, 1978.9e12),
    ("NVIDIA B200", False, None, 2250e12),
    ("NVIDIA A100-SXM4-80GB", False, None, 312e12),
    ("NVIDIA A100-SXM4-80GB", True, None, None),  # no FP8 on Ampere: no MFU rather than a wrong one
    ("NVIDIA L40S", False, None, None),
    ("NVIDIA L40S", False, 362.0, 362e12),  # run.peak_tflops for any other device
    (None, False, 1.5, 1.5e12),  # even a CPU run, when the user gives its peak
])
def test_peak_flops_table(name, fp8, override, expected):
    assert observability.peak_flops(name, fp8, override) == expected


def test_throughput_counts_training_time_only():
    margs = types.SimpleNamespace(seq_length=256, fp8=None)
    fake_training = types.SimpleNamespace(num_floating_point_operations=lambda args, samples: 1e12 * samples)
    out = observability.throughput(margs, samples=100, train_s=2.0, peak_tflops=100.0, training=fake_training)
    assert out["throughput/tokens_per_s"] == 100 * 256 / 2.0
    assert out["throughput/mfu"] == pytest.approx(1e14 / 2.0 / 1e14)
    assert observability.throughput(margs, samples=0, train_s=2.0, peak_tflops=None) == {}


def test_installed_loop_subtracts_evaluation_and_checkpoint_time(monkeypatch):
    """megatron's train / evaluate / save / training_log, replaced by stand-ins on a fake clock: the
    interval with a 30 s save and a 20 s evaluation reports 50 s of training, not 100 s; the first
    interval after (re)starting train() has a value."""
    import megatron.training as mtraining
    import megatron.training.training as training

    clock = [1000.0]
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: clock[0])
    args = types.SimpleNamespace(log_interval=10, consumed_train_samples=5000, seq_length=100, fp8=None)
    monkeypatch.setattr(mtraining, "get_args", lambda: args)
    for name in ("training_log", "evaluate", "evaluate_and_print_results", "save_checkpoint", "train"):
        monkeypatch.setattr(training, name, lambda *a, **k: None)

    def advance(seconds):
        return lambda *a, **k: clock.__setitem__(0, clock[0] + seconds)

    monkeypatch.setattr(training, "evaluate_and_print_results", advance(20.0))
    monkeypatch.setattr(training, "save_checkpoint", advance(30.0))
    tb = _Recorder()
    monkeypatch.setattr(hooks.MetricWriter, "from_megatron", classmethod(lambda cls: cls(tb, None)))
    monkeypatch.setattr(hooks, "attached_metrics", lambda: [])
    monkeypatch.setitem(hooks._STATE, "installed", False)
    hooks.install_training_metrics(peak_tflops=None)

    training.train()  # a resumed run: 5000 samples consumed before this start
    clock[0] += 40.0  # training
    training.evaluate_and_print_results("valid", None, None, None, 10)
    training.save_checkpoint()
    clock[0] += 10.0  # training
    args.consumed_train_samples = 5000 + 1000
    training.training_log({}, {}, 1e-3, 10)
    assert tb.scalars["throughput/eval_s"] == (20.0, 10) and tb.scalars["throughput/checkpoint_s"] == (30.0, 10)
    assert tb.scalars["throughput/tokens_per_s"] == (1000 * 100 / 50.0, 10)  # 50 s of training, not 100
    clock[0] += 25.0
    args.consumed_train_samples += 500
    training.training_log({}, {}, 1e-3, 20)  # next interval: nothing excluded any more
    assert tb.scalars["throughput/checkpoint_s"] == (0.0, 20)
    assert tb.scalars["throughput/tokens_per_s"] == (500 * 100 / 25.0, 20)


def test_weight_histogram_and_images():
    w_KD = torch.tensor([[0.5, 1.0, 2.0], [5000.0, 1e-6, 1.0], [1.0, 1.0, 1.0]])
    rows_K = torch.tensor([True, True, False])  # the third cluster is not in use
    counts = metrics.weight_histogram(w_KD, rows_K)
    edges = metrics.AC_WEIGHT_BINS
    assert counts.sum() == 6 and counts[0] == 1 and counts[-1] == 1  # out-of-range weights in the end bins
    for w in (0.5, 1.0, 2.0):
        assert counts[int(torch.searchsorted(edges, torch.tensor(w), right=True)) - 1] >= 1
    m = _filled(4, 2)
    m.record_ac(2, torch.tensor([3.0, 3.0, 0.0, 0.0]), torch.zeros(4, 3), torch.ones(4, 3), w_KD.repeat(2, 1)[:4],
                torch.tensor([True, True, False, False]), 1e-4, 10.0)
    plain = _Recorder()
    metrics.flush([m], observability.MetricWriter(plain, None), 10)
    assert not hasattr(plain, "figures")  # images only when asked (run.image_interval)
    m = _filled(4, 2)
    m.record_ac(2, torch.tensor([3.0, 3.0, 0.0, 0.0]), torch.zeros(4, 3), torch.ones(4, 3), w_KD.repeat(2, 1)[:4],
                torch.tensor([True, True, False, False]), 1e-4, 10.0)
    tb = _Recorder()
    metrics.flush([m], observability.MetricWriter(tb, None), 100, images=True)
    assert set(tb.figures) == {"images/expert_load", "images/ac_weights"}
    heatmap = tb.figures["images/expert_load"][0]
    assert heatmap.axes[0].images[0].get_array().shape == (2, 4)  # MoE layers x experts
