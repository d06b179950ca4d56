"""Installed packages that break megatron-core are refused by name before megatron is imported
(runtime/dependencies.py): nvidia-resiliency-ext below 0.6, what pip picks on glibc < 2.39."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from acmoe_megatron.runtime.dependencies import NVRX_MIN, nvrx_problem

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("version", [None, "0.6.0", "0.7.1", "1.0.0rc2"])
def test_absent_or_new_enough_nvrx_passes(version):
    assert nvrx_problem(version) is None


@pytest.mark.parametrize("version", ["0.4.1", "0.5.9", "0.6.0rc1", "not-a-version"])
def test_old_nvrx_is_named_with_the_fix(version):
    problem = nvrx_problem(version)
    assert f"nvidia-resiliency-ext {version} is installed" in problem and f">= {NVRX_MIN}" in problem
    assert "pip uninstall -y nvidia-resiliency-ext" in problem


def _fake_nvrx_041(root: Path) -> Path:
    """What `pip install nvidia-resiliency-ext` leaves here: 0.4.1, its async-checkpoint modules, no
    __version__ (megatron only looks for those names)."""
    pkg = root / "nvidia_resiliency_ext"
    (pkg / "checkpointing" / "async_ckpt").mkdir(parents=True)
    for init in (pkg, pkg / "checkpointing", pkg / "checkpointing" / "async_ckpt"):
        (init / "__init__.py").write_text("")
    for name in ("core", "cached_metadata_filesystem_reader", "filesystem_async", "state_dict_saver"):
        (pkg / "checkpointing" / "async_ckpt" / f"{name}.py").write_text("")
    info = root / "nvidia_resiliency_ext-0.4.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nvidia-resiliency-ext\nVersion: 0.4.1\n")
    return root


def test_acmoe_pretrain_refuses_nvrx_041_before_megatron_breaks(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(_fake_nvrx_041(tmp_path / "site")), str(ROOT))))
    # the hazard: megatron's trainer does not import with it
    broken = subprocess.run([sys.executable, "-c", "import megatron.training.arguments"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode != 0 and "__version__" in broken.stderr, broken.stderr[-2000:]
    # the check: exit 2 with the package, the version and the fix, before any process starts
    out = subprocess.run([sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", "configs/tiny_cpu.yaml",
                          "--nproc", "1", f"run.dir={tmp_path / 'run'}"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "config error: nvidia-resiliency-ext 0.4.1 is installed" in out.stderr and "pip uninstall" in out.stderr
    assert not (tmp_path / "run").exists()
