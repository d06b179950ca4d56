"""Elliptical attention across a pipeline boundary: stage 1's first elliptical layer (3) reads
exactly the values stage 0's last layer (2) stored, per micro-batch (label_transport)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "dist" / "elliptical_handoff.py"


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage1_first_elliptical_layer_uses_stage0_last_values(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_port()), str(WORKER), "--dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sent = [torch.load(tmp_path / f"stage0_mb{mb}.pt")["values"] for mb in (0, 1)]
    for mb in (0, 1):
        used = torch.load(tmp_path / f"stage1_mb{mb}.pt")
        assert used["applies"]
        assert used["values"].shape == sent[mb].shape == (16, 2, 4, 16)  # [s, b, heads, head dim]
        assert torch.equal(used["values"], sent[mb].float())
    assert not torch.equal(sent[0], sent[1])  # the two micro-batches differ, so a mix-up would show
