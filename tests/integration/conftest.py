"""Integration tests launch 1-4 gloo processes (torchrun, acmoe-pretrain, a local SLURM) and compare
their runs with one process or with a reference: every test here is marked ``slow``
(``pytest -m "not slow"`` runs the in-process tests of tests/unit alone)."""

import pytest


def pytest_collection_modifyitems(config, items):
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.slow)
