"""MoE/AC routing metrics: the maths against brute force, no host syncs while recording, the load
histogram, our router losses in megatron's MoE report (in-process). The launched PP=2 run whose
TensorBoard events hold every layer's metrics is in tests/integration/test_observability.py."""

import itertools
import math

import pytest
import torch

from acmoe_megatron.observability.metrics import RouterMetrics, ac_summary, rand_disagreement, separation


def test_rand_disagreement_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 4, (30,), generator=g), torch.randint(0, 4, (30,), generator=g)
    pairs = list(itertools.permutations(range(30), 2))
    brute = sum((a[i] == a[j]) != (b[i] == b[j]) for i, j in pairs) / len(pairs)
    assert math.isclose(float(rand_disagreement(a, b)), float(brute), rel_tol=1e-6)
    assert float(rand_disagreement(a, a)) == 0.0
    perm = torch.tensor([2, 0, 3, 1])
    assert float(rand_disagreement(a, perm[a])) == 0.0  # label permutation invariant


def test_separation_by_hand():
    centers = torch.tensor([[0.0, 0.0], [4.0, 2.0], [9.0, 9.0]])
    mads = torch.tensor([[1.0, 1.0], [1.0, 3.0], [5.0, 5.0]])
    present = torch.tensor([True, True, False])  # the third cluster is empty: ignored
    # between = mean |c0 - c1| = (4 + 2) / 2 = 3; within = mean MAD of clusters 0,1 = 6/4 = 1.5
    assert math.isclose(float(separation(centers, mads, present)), 2.0, rel_tol=1e-6)


def test_ac_summary_fields():
    counts = torch.tensor([10.0, 30.0, 0.0])
    mean = torch.randn(3, 4)
    mad = torch.tensor([[0.1, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    w = torch.ones(3, 4) * torch.tensor([[2.0], [1.0], [9.0]])
    rows = torch.tensor([True, True, True])
    calls, w_mean, w_max, clip_rate, mad_mean, *_ = ac_summary(counts, mean, mad, w, rows, eps=1e-4, clip=2.0).tolist()
    assert calls == 1.0
    assert math.isclose(w_mean, (10 * 2 + 30 * 1) / 40, rel_tol=1e-6)  # token-weighted
    assert w_max == 2.0  # the empty cluster's 9 is not counted
    assert math.isclose(mad_mean, (0.1 + 7 * 1.0) / 8, rel_tol=1e-6)
    # 1/(mad+eps): the empty row's 1e4 lifts the (release) mean, so nothing present reaches 2x it
    assert clip_rate == 0.0
    # weights computed from other (running) MADs: the clip rate is theirs; 1/0.1 ≥ 1.5 × mean over the
    # first two rows, at one of the 8 present entries
    running = mad.clone()
    running[2] = 1.0
    rows = torch.tensor([True, True, False])
    batch = torch.ones(3, 4)  # this micro-batch's MADs: nothing to clip
    assert float(ac_summary(counts, mean, batch, w, rows, eps=1e-4, clip=1.5)[3]) == 0.0
    clip_rate = ac_summary(counts, mean, batch, w, rows, eps=1e-4, clip=1.5, weight_mad_KD=running)[3]
    assert math.isclose(float(clip_rate), 1 / 8, rel_tol=1e-6)


def test_recording_makes_no_host_sync(monkeypatch):
    m = RouterMetrics(4, [1, 2])
    logits = torch.randn(64, 4)
    rmap = torch.zeros(64, 4, dtype=torch.bool).scatter(1, logits.topk(2, -1).indices, True)

    def refuse(*_a, **_k):
        raise AssertionError("host sync while recording metrics")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    monkeypatch.setattr(torch.Tensor, "__float__", refuse)
    top1 = logits.argmax(-1)
    m.record_routing(2, logits, rmap, top1, top1.flip(0), topk=2)
    counts = torch.tensor([20.0, 44.0, 0.0, 0.0])
    m.record_ac(2, counts, torch.randn(4, 8), torch.rand(4, 8), torch.rand(4, 8), counts > 0, 1e-4, 10.0)
    monkeypatch.undo()
    packed = m.pack("cpu")
    assert packed.shape[0] == 2 and packed[0].abs().sum() == 0 and packed[1, 4] == 64


def test_load_histogram_is_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from acmoe_megatron.observability.metrics import flush

    m = RouterMetrics(4, [1])
    logits = torch.randn(32, 4)
    rmap = torch.zeros(32, 4, dtype=torch.bool).scatter(1, logits.topk(2, -1).indices, True)
    m.record_routing(1, logits, rmap, logits.argmax(-1), None, topk=2)
    writer = SummaryWriter(str(tmp_path))
    scalars = flush([m], writer, iteration=7)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    assert "moe/layer01/load_fraction" in acc.Tags()["histograms"]
    assert math.isclose(sum(scalars[f"moe/layer01/load_fraction/expert{j:02d}"] for j in range(4)), 1.0, rel_tol=1e-6)


def test_router_losses_reach_megatrons_moe_report(megatron_ws1, monkeypatch):
    """StableMoE's distillation loss is recorded through megatron's MoE metrics tracker, whose
    per-step report in training_log lists fixed names: the hook adds ours, so it is logged too."""
    import megatron.training.training as training
    from megatron.core.transformer.moe import moe_logging

    from acmoe_megatron.core.settings import router_class
    from acmoe_megatron.model.baseline_routers import STABLEMOE_DISTILL_LOSS
    from acmoe_megatron.observability import writers as observability

    monkeypatch.setattr(moe_logging, "_MOE_METRICS_TRACKER", None)  # megatron's global, restored after
    observability.report_extra_moe_losses(router_class("stablemoe").reported_losses)
    assert router_class("ac").reported_losses == () and router_class("stablemoe").reported_losses == (
        STABLEMOE_DISTILL_LOSS,)
    t = training.get_moe_metrics_tracker()  # what training_log calls
    assert t is moe_logging.get_moe_metrics_tracker()  # what the routers record into
    t.record("load_balancing_loss", torch.tensor(0.5), layer_number=1, num_layers=2)
    t.record(STABLEMOE_DISTILL_LOSS, torch.tensor(0.3), layer_number=1, num_layers=2)
    t.record(STABLEMOE_DISTILL_LOSS, torch.tensor(0.1), layer_number=2, num_layers=2)

    class Writer:
        scalars: dict = {}

        def add_scalar(self, tag, value, iteration):
            self.scalars[tag] = float(value)

    writer = Writer()
    t.report(loss_scale=1.0, iteration=1, writer=writer, track_names=["load_balancing_loss"],
             num_layers=2, force_initialize=True)
    assert writer.scalars.get("load_balancing_loss") == pytest.approx(0.25)
    assert writer.scalars.get(STABLEMOE_DISTILL_LOSS) == pytest.approx(0.2)
