"""megatron-core's HybridModel through our trainer: ``megatron.hybrid_layer_pattern`` with a pipeline
stage boundary, on 2 gloo processes (PP=2).

The pattern ``*E*E|*E*E`` puts MoE layers 2, 4 on stage 0 and 6, 8 on stage 1; with
``first_ac_layer=3`` the AC routers are layers 6 and 8, so layer 6 routes with the labels of layer 4,
handed over between the stages (the AC router refuses to route without them). The run trains, logs
the AC scalars of layers 6 and 8, and megatron's "GPTModel IS DEPRECATED" warning is not printed.
The same-weights parity with a GPTModel is tests/unit/model/test_hybrid_model.py. About 25 s.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from acmoe_megatron.observability.summary import read_scalars

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_hybrid_pattern_with_a_stage_boundary_trains(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
           "--nproc", "2", "megatron.hybrid_layer_pattern='*E*E|*E*E'", "megatron.pipeline_model_parallel_size=2",
           "megatron.expert_model_parallel_size=1", "megatron.train_iters=8", "megatron.lr_warmup_iters=2",
           "megatron.eval_interval=8", "megatron.eval_iters=2", "megatron.save_interval=8", "megatron.log_interval=1",
           f"run.dir={run}", f"data.path={ROOT / 'data' / 'stdlib_s256'}"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=280)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "GPTModel IS DEPRECATED" not in log
    scalars = read_scalars(run / "tensorboard")
    losses = [v for _, v in scalars["lm loss"]]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    for layer in (6, 8):  # the AC layers, on the second stage
        assert f"ac/layer{layer:02d}/weight_mean" in scalars, sorted(k for k in scalars if k.startswith("ac/"))
    assert not any(k.startswith(("ac/layer02", "ac/layer04")) for k in scalars)  # the lead layers are top-k
