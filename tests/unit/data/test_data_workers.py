"""Dataloader-worker split: DP=2 x workers=2 streams are disjoint, cover an epoch exactly once,
and reassemble into the single-worker stream; a real multi-worker DataLoader returns it unchanged."""

import pytest
import torch

from acmoe_megatron.data.loader.batches import TokenBatches
from acmoe_megatron.data.loader.workers import TokenBatchDataset, make_dataloader
from acmoe_megatron.data.shards.manifest import read_manifest


def _worker_ids(shard_dir, split, mbs, dp, workers, num_batches=None, **kw):
    """{(rank, worker): [(replica batch index, sample ids)]} by iterating each worker's stream."""
    out = {}
    for r in range(dp):
        for w in range(workers):
            tb = TokenBatches(shard_dir, split, mbs, r, dp, num_workers=workers, worker_id=w, **kw)
            got = []
            while num_batches is None or tb.next_batch_index < num_batches:
                k = tb.next_batch_index
                try:
                    next(tb)
                except StopIteration:
                    break
                got.append((k, tb.sample_ids(k)))
            out[r, w] = got
    return out


def test_dp2_workers2_cover_a_validation_pass_exactly_once(small_shards):
    n = read_manifest(small_shards.path).splits["valid"].num_samples
    streams = _worker_ids(small_shards.path, "valid", 4, 2, 2, seed=0, shuffle=False, infinite=False)
    ids = [i for got in streams.values() for _, batch in got for i in batch if i is not None]
    assert sorted(ids) == list(range(n))  # disjoint and complete
    for (r, w), got in streams.items():
        assert [k for k, _ in got] == list(range(w, len(got) * 2 + w, 2))[: len(got)]
    # every replica runs the same number of micro-batches, whatever the worker split
    assert len(streams[0, 0]) + len(streams[0, 1]) == len(streams[1, 0]) + len(streams[1, 1])


@pytest.mark.parametrize("consumed", [0, 1000])
def test_dp2_workers2_training_epoch_is_the_single_worker_stream(small_shards, consumed):
    n = read_manifest(small_shards.path).splits["train"].num_samples
    mbs, dp, workers = 4, 2, 2
    epoch_start = -consumed % n  # offset of the next full epoch in this (resumed) stream
    steps = -(-(epoch_start + n) // (mbs * dp))
    streams = _worker_ids(small_shards.path, "train", mbs, dp, workers, num_batches=steps, seed=9,
                          consumed_samples=consumed)
    by_index = {(r, k): ids for (r, _), got in streams.items() for k, ids in got}
    merged = [i for k in range(steps) for r in range(dp) for i in by_index[r, k]]
    single = TokenBatches(small_shards.path, "train", mbs * dp, 0, 1, seed=9, consumed_samples=consumed)
    assert merged == [i for k in range(steps) for i in single.sample_ids(k)]  # same order as DP=1, 1 worker
    # Within the epoch, the four (rank, worker) streams are disjoint and together cover it once.
    owner = {}
    for p in range(epoch_start, epoch_start + n):
        k, r = p // (mbs * dp), p % (mbs * dp) // mbs
        owner.setdefault((r, k % workers), set()).add(merged[p])
    assert len(owner) == dp * workers
    assert sum(len(s) for s in owner.values()) == n and set().union(*owner.values()) == set(range(n))


def test_multiworker_dataloader_matches_plain_iterator(small_shards):
    args = (small_shards.path, "train", 4, 1, 2)
    kw = dict(seed=3, consumed_samples=56, verify_checksums=False)
    plain = TokenBatches(*args, **kw)
    expected = [next(plain) for _ in range(9)]
    loader = make_dataloader(*args, num_workers=2, **kw)
    got = []
    for batch in loader:
        got.append(batch)
        if len(got) == len(expected):
            break
    del loader
    for a, b in zip(got, expected, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in b)


def test_finite_dataloader_and_worker_arguments(small_shards):
    kw = dict(seed=0, shuffle=False, infinite=False, verify_checksums=False)
    plain = list(TokenBatches(small_shards.path, "valid", 8, 0, 1, **kw))
    got = list(make_dataloader(small_shards.path, "valid", 8, 0, 1, num_workers=0, **kw))
    assert len(got) == len(plain) and all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(got, plain, strict=True))
    with pytest.raises(ValueError, match="worker_id < num_workers"):
        TokenBatches(small_shards.path, "valid", 8, 0, 1, num_workers=2, worker_id=2, **kw)
    with pytest.raises(TypeError, match="takes the worker split from the DataLoader"):
        TokenBatchDataset(small_shards.path, "valid", 8, 0, 1, num_workers=2, **kw)
    with pytest.raises(TypeError, match="consumed_samples of a single dataloader worker"):
        _ = TokenBatches(small_shards.path, "valid", 8, 0, 1, num_workers=2, worker_id=1, **kw).consumed_samples
