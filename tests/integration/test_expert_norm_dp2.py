"""``acmoe.expert_norm`` under megatron's DistributedOptimizer with DP=2 (a launched torchrun
worker): a shard boundary inside an expert-embedding row (the maths and the other optimizers:
tests/unit/model/test_expert_norm.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_distributed_optimizer_shard_boundary_inside_a_row(tmp_path):
    """DP=2, megatron's DistributedOptimizer (fp32): the two ranks' shards of an expert embedding
    meet inside a row; after three steps every gathered row has norm 1.5 (the row norms are summed
    over both shards before the rescale)."""
    out = tmp_path / "dp2.json"
    worker = Path(__file__).parent / "dist" / "expert_norm_dp2.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    row_len = 56
    split = [(r0, r1) for r0, r1 in zip(ranks[0]["ranges"], ranks[1]["ranges"]) if r0 and r1]
    assert split and all(r0[1] == r1[0] and r0[1] % row_len for r0, r1 in split), ranks  # mid-row boundary
    for rank in ranks:
        for norms in rank["norms"]:
            assert norms == pytest.approx([1.5] * 5, abs=2e-6), rank
