"""acmoe-preflight on this machine: configs/tiny_cpu.yaml on 2 gloo processes (EP=2), for real.

Every item runs except the GPU ones, which report "skipped: no GPU" (or that the recipe asks for no
FP8); the report's table and preflight.json agree. The failing case (an unwritable run.dir) and the
two-node layout run on the local SLURM cluster (test_slurm_cluster.py). About 25 s on 2 cores.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_tiny_recipe_preflight_passes(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.preflight", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
           "--nproc", "2", "--out", str(out), f"run.dir={tmp_path / 'run'}",
           f"data.path={ROOT / 'data' / 'stdlib_s256'}"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=280)
    text = proc.stdout + proc.stderr
    log = (out / "workers.log").read_text() if (out / "workers.log").is_file() else ""
    assert proc.returncode == 0, f"{text}\n{log[-6000:]}"
    report = json.loads((out / "preflight.json").read_text())
    assert report["verdict"] == "pass" and report["world_size"] == 2
    assert report["layout"]["ep"] == 2 and report["layout"]["dp"] == 2
    items = {x["item"]: x for x in report["items"]}
    assert {k: v["status"] for k, v in items.items()} == {
        "environment": "info", "fused paths": "pass", "fp8 gemm": "skipped", "memory": "skipped",
        "storage": "pass", "training": "pass", "pipeline labels": "skipped", "collectives": "pass",
        "checkpoint": "pass", "tensorboard": "pass"}
    assert items["memory"]["detail"].startswith("no GPU") and items["fp8 gemm"]["detail"] == "the recipe does not set megatron.fp8"
    assert "megatron_core 0.19" in items["environment"]["detail"]
    assert len(items["tensorboard"]["losses"]) == 4 and all(math.isfinite(v) for v in items["tensorboard"]["losses"])
    assert "loaded back" in items["checkpoint"]["detail"] and "identical" in items["checkpoint"]["detail"]
    assert [c["collective"] for c in report["collectives"]] == ["data-parallel all-reduce", "expert all-to-all"]
    assert all(c["busbw_gbps"] > 0 for c in report["collectives"])
    mem = report["memory"]
    assert mem["total_bytes"] == mem["parameters_bytes"] + mem["gradients_bytes"] + mem["optimizer_bytes"] + mem["activations_bytes"]
    # the table on stdout says the same
    assert "verdict: PASS (skipped: fp8 gemm, memory, pipeline labels)" in proc.stdout
    assert "memory of the full recipe per GPU" in proc.stdout
    # the shrunk run's checkpoint and events were removed; the run directory holds nothing of it
    assert not (tmp_path / "run" / "preflight").exists()
