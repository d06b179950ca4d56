"""The light part of data/megatron/ (keys.py, sidecar.py): the launch checks load without torch and
megatron, and their stand-ins for megatron's helpers (``get_blend_from_list``, ``IndexedDataset.exists``)
answer as megatron's own do."""

from __future__ import annotations

import subprocess
import sys

import pytest

from acmoe_megatron.data.megatron.keys import blend_from_list
from acmoe_megatron.data.megatron.sidecar import get_bin_path, get_idx_path, indexed_exists


def test_the_launch_check_modules_import_neither_torch_nor_megatron():
    code = ("import sys; import acmoe_megatron.data, acmoe_megatron.data.megatron.keys, "
            "acmoe_megatron.data.megatron.sidecar, acmoe_megatron.data.shards.remote; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')); "
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("blend", [
    ["a"], ["a", "b"], ["a", "b", "c"], [" a ", "b "], ["0.3", "a", "0.7", "b"], ["1", "a"], ["-1", "a", "0", "b"],
    ["a", "b", "0.5", "a"], ["0.5", "a", "b", "c"], ["x", "0.5", "y", "z"], ["nan", "a", "inf", "b"],
    ["1e-3", "a", "2", " b"],
])
def test_blend_lists_parse_as_megatron_parses_them(blend):
    from megatron.core.datasets.utils import get_blend_from_list

    try:
        expected = get_blend_from_list(list(blend))
    except AssertionError:
        with pytest.raises(AssertionError):
            blend_from_list(list(blend))
        return
    assert repr(blend_from_list(list(blend))) == repr(expected)  # repr: nan == nan


def test_indexed_data_exists_as_megatron_says(tmp_path):
    from megatron.core.datasets import indexed_dataset

    prefix = str(tmp_path / "train_text_document")
    assert get_bin_path(prefix) == indexed_dataset.get_bin_path(prefix)
    assert get_idx_path(prefix) == indexed_dataset.get_idx_path(prefix)
    for files in ((), (".bin",), (".idx",), (".bin", ".idx")):
        for suffix in (".bin", ".idx"):
            (tmp_path / f"train_text_document{suffix}").unlink(missing_ok=True)
        for suffix in files:
            (tmp_path / f"train_text_document{suffix}").write_bytes(b"")
        assert indexed_exists(prefix) == indexed_dataset.IndexedDataset.exists(prefix) == (len(files) == 2)
