"""Shared fixtures: a world-size-1 gloo process group with megatron's parallel state."""

import warnings

import pytest

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(autouse=True)
def _device_redirect(request):
    """Each test runs inside ``cpu_runtime.device_redirect()`` (a no-op with CUDA): megatron's
    ``device="cuda"`` requests land on the CPU for that test only, as they do in a training run.
    A test marked ``no_device_redirect`` runs without it (to see torch as a user script does)."""
    if request.node.get_closest_marker("no_device_redirect"):
        yield
        return
    from acmoe_megatron.runtime import cpu_runtime
    with cpu_runtime.device_redirect():
        yield


@pytest.fixture(scope="session")
def megatron_ws1():
    """Initialise torch.distributed (gloo, 1 rank) and megatron's model-parallel groups once."""
    from acmoe_megatron.testing import init_single_process

    init_single_process("gloo")
    yield


import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference_acmoe.py
