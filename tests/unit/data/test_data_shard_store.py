"""Bounded-memory reading: the shard index, positioned reads with their checks, the two-level order.

``ShardSamples`` reads samples by offset (``shards/index.py``); ``SampleOrder`` permutes a split in
O(shards + window). The references: the tar headers themselves (``scan_offsets``), a whole-split
read, and the definition of the order (a permutation of every epoch, random access = sequential).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from acmoe_megatron.core.errors import ShardError
from acmoe_megatron.data.loader.batches import TokenBatches
from acmoe_megatron.data.loader.sample_order import SampleOrder
from acmoe_megatron.data.shards.index import index_path, scan_offsets
from acmoe_megatron.data.shards.manifest import read_manifest, sample_key
from acmoe_megatron.data.shards.store import ShardSamples, load_split_samples


def test_prepare_writes_the_index_the_tar_headers_give(small_shards):
    manifest = read_manifest(small_shards.path)
    for info in manifest.splits.values():
        for shard in info.shards:
            path = small_shards.path / shard.file
            stored = np.load(index_path(path))
            assert stored.dtype == np.uint64 and len(stored) == shard.samples
            assert np.array_equal(stored, scan_offsets(path, shard.first_sample, shard.samples))


def test_reading_without_an_index_scans_the_tar_and_gives_the_same_samples(shard_copy, small_shards):
    _, expected = load_split_samples(small_shards.path, "train")
    for index in shard_copy.glob("*.offsets.npy"):
        index.unlink()
    store = ShardSamples(shard_copy, "train")
    ids = np.random.default_rng(0).permutation(len(store))[:300]
    assert np.array_equal(store.read(ids), expected[ids])
    assert np.array_equal(load_split_samples(shard_copy, "train")[1], expected)


def test_a_stale_index_is_an_error_naming_it(shard_copy):
    index = shard_copy / "train-000001.tar.offsets.npy"
    np.save(index, np.load(index)[:-1])
    store = ShardSamples(shard_copy, "train", verify_checksums=False)
    with pytest.raises(ShardError, match=r"index .*train-000001\.tar\.offsets\.npy does not match its shard.*acmoe-data index"):
        store.read(np.array([int(store.starts[1])]))


def test_an_index_pointing_elsewhere_cannot_pass_the_header_check(shard_copy):
    index = shard_copy / "train-000000.tar.offsets.npy"
    np.save(index, np.load(index) + np.uint64(512))
    store = ShardSamples(shard_copy, "train", verify_checksums=False)
    with pytest.raises(ShardError, match=r"train-000000\.tar: sample 0000000003 has a damaged tar header or the "
                       r"index points elsewhere"):
        store.read(np.array([3]))


def test_a_damaged_npy_header_is_an_error(shard_copy):
    path = shard_copy / "train-000000.tar"
    data = bytearray(path.read_bytes())
    data[int(np.load(index_path(path))[2]) + 20] ^= 0x01  # inside sample 2's .npy header
    path.write_bytes(bytes(data))
    store = ShardSamples(shard_copy, "train", verify_checksums=False)
    assert store.read(np.array([1, 3])).shape == (2, 65)
    with pytest.raises(ShardError, match=r"train-000000\.tar: sample 0000000002 does not start with the \.npy header"):
        store.read(np.array([1, 2]))


def test_an_out_of_vocabulary_token_is_an_error_naming_shard_and_sample(shard_copy):
    """A flipped byte that turns a token id into 65535 (vocab 257) is caught without checksums."""
    manifest = read_manifest(shard_copy)
    shard = manifest.splits["train"].shards[1]
    path = shard_copy / shard.file
    offset = int(np.load(index_path(path))[7]) + 128 + 2 * 5  # header, then token 5 of sample 7
    data = bytearray(path.read_bytes())
    data[offset : offset + 2] = b"\xff\xff"
    path.write_bytes(bytes(data))
    store = ShardSamples(shard_copy, "train", verify_checksums=False)
    key = sample_key(shard.first_sample + 7)
    with pytest.raises(ShardError, match=rf"train-000001\.tar: sample {key} holds token id 65535, not below the "
                       r"vocabulary size 257"):
        store.read(np.arange(shard.first_sample, shard.first_sample + 10))
    with pytest.raises(ShardError, match=rf"sample {key} holds token id 65535"):
        list(TokenBatches(shard_copy, "train", 4, 0, 1, seed=0, verify_checksums=False, infinite=False))


def test_missing_shard_is_found_at_construction(shard_copy):
    (shard_copy / "train-000002.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000002\.tar: is missing"):
        ShardSamples(shard_copy, "train")


def test_reads_are_exact_in_any_order_and_after_the_open_file_limit(small_shards):
    _, expected = load_split_samples(small_shards.path, "valid")
    store = ShardSamples(small_shards.path, "valid", open_shards=1)  # forces close/reopen per shard
    ids = np.random.default_rng(1).integers(0, len(store), 500)
    assert np.array_equal(store.read(ids), expected[ids])


# -- the order ------------------------------------------------------------------------------------

SHARDS = [500, 500, 500, 500, 500, 137]


def test_a_split_within_the_window_keeps_the_full_permutation():
    order = SampleOrder(SHARDS, seed=7, window=10_000)
    n = sum(SHARDS)
    assert not order.two_level
    for epoch in (0, 3):
        expected = np.random.default_rng([7, epoch]).permutation(n)
        assert np.array_equal(order.ids(epoch, np.arange(n)), expected)


@pytest.mark.parametrize("window", [1, 64, 700, 2000])
def test_two_level_order_is_a_permutation_per_epoch_and_random_access(window):
    n = sum(SHARDS)
    order = SampleOrder(SHARDS, seed=3, window=window)
    assert order.two_level
    epochs = [order.ids(e, np.arange(n)) for e in range(2)]
    for ids in epochs:
        assert np.array_equal(np.sort(ids), np.arange(n))
        if window > 1:  # shuffled within windows too, not only shard by shard
            assert np.mean(np.diff(ids) == 1) < 0.5
    assert not np.array_equal(epochs[0], epochs[1])
    fresh = SampleOrder(SHARDS, seed=3, window=window)  # random access, another instance, any order
    probe = np.random.default_rng(5).integers(0, n, 200)
    assert np.array_equal(fresh.ids(1, probe), epochs[1][probe])
    assert not np.array_equal(SampleOrder(SHARDS, seed=4, window=window).ids(0, np.arange(n)), epochs[0])


def test_a_window_mixes_several_shards_and_memory_is_the_window():
    order = SampleOrder([1000] * 40, seed=0, window=4000)
    first_window = order.ids(0, np.arange(4000))
    shards = np.unique(first_window // 1000)
    assert len(shards) >= 4  # 4000 positions over 1000-sample shards, shard order permuted
    assert not np.array_equal(shards, np.arange(len(shards)))  # not the file order
    assert max(v.size for v in order._cache.values()) <= 4000  # no O(samples) array


def test_token_batches_with_a_small_window_cover_each_epoch_once_and_resume_exactly(small_shards):
    n = read_manifest(small_shards.path).splits["train"].num_samples
    kw = dict(seed=9, shuffle_window=300, verify_checksums=False)
    tb = TokenBatches(small_shards.path, "train", 4, 0, 1, **kw)
    assert tb._order.two_level
    stream = [i for k in range(-(-n // 4) + 1) for i in tb.sample_ids(k)]
    assert sorted(stream[:n]) == list(range(n))
    resumed = TokenBatches(small_shards.path, "train", 4, 1, 2, consumed_samples=96, **kw)
    one = TokenBatches(small_shards.path, "train", 4, 0, 1, consumed_samples=96, **kw)
    for k in range(5):  # DP rank 1 of 2 = micro-batch 1 of each DP=1 step of 2 micro-batches
        assert resumed.sample_ids(k) == one.sample_ids(2 * k + 1)
        for key, value in resumed.batch(k).items():
            assert value.equal(one.batch(2 * k + 1)[key])


def test_shuffle_window_must_be_positive():
    with pytest.raises(ValueError, match="shuffle window must be >= 1"):
        SampleOrder(SHARDS, seed=0, window=0)


def test_manifest_inconsistent_with_its_shards_is_refused(shard_copy):
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["splits"]["train"]["num_samples"] += 1
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="the manifest is inconsistent"):
        ShardSamples(shard_copy, "train")


def test_acmoe_data_index_writes_the_indexes_prepare_writes(shard_copy, small_shards):
    from acmoe_megatron.cli.data import main

    for index in shard_copy.glob("*.offsets.npy"):
        index.unlink()
    assert main(["index", str(shard_copy)]) == 0
    written = sorted(p.name for p in shard_copy.glob("*.offsets.npy"))
    assert written == sorted(p.name for p in small_shards.path.glob("*.offsets.npy")) and written
    for name in written:
        assert np.array_equal(np.load(shard_copy / name), np.load(small_shards.path / name))
    (shard_copy / "valid-000001.tar").write_bytes(b"not a tar")
    assert main(["index", str(shard_copy)]) == 2  # a damaged shard: an error naming it, not an index
