"""checkpoint_digest: the per-process parts cover a save, and verify finds a changed byte at the same size."""

import json
from pathlib import Path

import pytest

from acmoe_megatron.runtime.checkpoint_digest import (
    DIGEST_DIR,
    ChecksumWriter,
    checkpoint_files,
    read_digest,
    verify,
    write_part,
)


def _save(root: Path, iteration: int, shards: int = 5) -> Path:
    d = root / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"meta" * 100)
    (d / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    for i in range(shards):
        (d / f"__{i}_0.distcp").write_bytes(bytes([i]) * (1000 + i))
    return d


def test_parts_of_every_process_cover_the_save(tmp_path):
    d = _save(tmp_path, 4)
    for rank in range(3):
        write_part(d, rank, 3)
    files, world = read_digest(d)
    assert world == 3 and sorted(files) == checkpoint_files(d) and len(files) == 7
    assert verify(d, "full") == (None, None)


def test_a_flipped_byte_at_the_same_size_is_named(tmp_path):
    d = _save(tmp_path, 4)
    write_part(d, 0, 1)
    shard = d / "__3_0.distcp"
    data = bytearray(shard.read_bytes())
    data[500] ^= 0x04
    shard.write_bytes(bytes(data))
    problem, _ = verify(d, "full")
    assert problem.startswith(f"{shard} has the size it was saved with but not the same bytes")
    assert verify(d, "sizes") == (None, None)  # sizes only: the flip is not seen


def test_size_and_missing_files_are_named_before_any_hashing(tmp_path):
    d = _save(tmp_path, 4)
    write_part(d, 0, 1)
    (d / "__1_0.distcp").write_bytes(b"x")
    assert "has 1 bytes, 1001 when it was saved" in verify(d, "sample")[0]
    (d / "__1_0.distcp").unlink()
    assert verify(d, "sample")[0] == f"{d / '__1_0.distcp'} is missing (it has a checksum)"


def test_old_checkpoints_and_unfinished_parts_warn(tmp_path):
    d = _save(tmp_path, 4)
    problem, warning = verify(d, "auto")
    assert problem is None and "has no checksums" in warning
    write_part(d, 0, 2)  # rank 1 never wrote its part
    problem, warning = verify(d, "full")
    assert problem is None and "3 file(s)" in warning and "checked by size only" in warning
    (d / "acmoe_inference_stats.pt").write_bytes(b"calibrated later")  # acmoe-eval --calibrate
    assert "acmoe_inference_stats.pt" not in checkpoint_files(d)


def test_sample_mode_hashes_the_metadata(tmp_path):
    d = _save(tmp_path, 4)
    write_part(d, 0, 1)
    meta = d / ".metadata"
    meta.write_bytes(b"META" + meta.read_bytes()[4:])
    assert ".metadata has the size it was saved with" in verify(d, "sample")[0]


def test_writer_hashes_only_completed_iterations_this_run_saved(tmp_path):
    for it in (2, 4, 6):
        _save(tmp_path, it)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")  # 6: still being written
    writer = ChecksumWriter(rank=0, world_size=1)
    writer.start(tmp_path, loaded_iteration=2)  # 2 was loaded: not this run's save
    done = writer.finish(None, 2)
    assert [h["iteration"] for h in done] == ["iter_0000004"]
    assert not (tmp_path / "iter_0000002" / DIGEST_DIR).exists() and not (tmp_path / "iter_0000006" / DIGEST_DIR).exists()
    part = json.loads((tmp_path / "iter_0000004" / DIGEST_DIR / "rank_0.json").read_text())
    assert part["algorithm"] == "sha256" and len(part["files"]) == 7


def test_unknown_verify_mode_is_refused():
    from acmoe_megatron.runtime.recipe import load_recipe

    with pytest.raises(Exception, match="run.checkpoint_verify='fast'"):
        load_recipe("configs/tiny_cpu.yaml", ["run.checkpoint_verify=fast"])
