"""A real PP=2 run whose TensorBoard events (read with TensorBoard's own reader) hold every layer's
routing metrics — stage 0's too — and the throughput, memory and bits-per-token scalars. The
metrics' maths: tests/unit/observability/test_metrics.py."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from acmoe_megatron.observability.summary import read_scalars

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory):
    from acmoe_megatron.data import prepare

    tmp = tmp_path_factory.mktemp("obs")
    prepare(source="stdlib", out_dir=tmp / "data", seq_length=64, max_bytes=200_000)
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", "configs/tiny_cpu.yaml", "--nproc", "2",
           "megatron.pipeline_model_parallel_size=2", "megatron.expert_model_parallel_size=1",
           "megatron.train_iters=10", "megatron.lr_warmup_iters=1", "megatron.log_interval=5",
           "megatron.eval_interval=10", "megatron.eval_iters=1", "megatron.save=null",
           "megatron.seq_length=64", "megatron.max_position_embeddings=64", "megatron.micro_batch_size=4",
           "megatron.global_batch_size=8", "acmoe.first_ac_layer=2", f"data.path={tmp / 'data'}",
           f"run.dir={tmp / 'run'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return read_scalars(tmp / "run" / "tensorboard")


def test_every_layer_is_reported_with_plausible_values(pp2_run):
    s = pp2_run
    E = 8
    for layer in (1, 2, 3, 4):  # layers 1-2 live on pipeline stage 0, 3-4 on stage 1 (the writer)
        tag = f"moe/layer{layer:02d}"
        fractions = [s[f"{tag}/load_fraction/expert{j:02d}"] for j in range(E)]
        for step_values in zip(*fractions):
            assert math.isclose(sum(v for _, v in step_values), 1.0, rel_tol=1e-5)
        assert all(0 <= v <= math.log(E) + 1e-6 for _, v in s[f"{tag}/router_entropy"])
        assert all(v >= 1.0 - 1e-6 for _, v in s[f"{tag}/load_max_over_mean"])
        if layer > 1:
            assert all(0.0 <= v <= 1.0 for _, v in s[f"{tag}/instability"])
        else:
            assert f"{tag}/instability" not in s
    for layer in (2, 3, 4):  # the AC layers
        for name in ("weight_mean", "weight_max", "clip_rate", "cluster_mad_mean", "separation_raw", "separation_ac"):
            values = [v for _, v in s[f"ac/layer{layer:02d}/{name}"]]
            assert values and all(math.isfinite(v) for v in values), name
        assert all(0.0 <= v <= 1.0 for _, v in s[f"ac/layer{layer:02d}/clip_rate"])
    assert "ac/layer01/weight_mean" not in s
    assert [step for step, _ in s["moe/layer01/router_entropy"]] == [5, 10]


def test_throughput_memory_and_bits_are_logged(pp2_run):
    s = pp2_run
    assert all(v > 0 for _, v in s["throughput/tokens_per_s"])
    assert all(v > 0 for _, v in s["memory/max_gib"])
    loss = dict(s["lm loss"])
    for step, bits in s["lm loss bits-per-token"]:
        assert math.isclose(bits, loss[step] / math.log(2), rel_tol=1e-4)
    (step, vbits), = s["lm loss validation bits-per-token"][-1:]
    assert math.isclose(vbits, dict(s["lm loss validation"])[step] / math.log(2), rel_tol=1e-4)
