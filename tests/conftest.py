"""Shared fixtures: a world-size-1 gloo process group with megatron's parallel state."""

import warnings

import pytest

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def megatron_ws1():
    """Initialise torch.distributed (gloo, 1 rank) and megatron's model-parallel groups once."""
    from acmoe_megatron.testing import init_single_process

    init_single_process("gloo")
    yield


import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference_acmoe.py
