"""TokenBatches: exactly-once coverage across data-parallel replicas, exact resume, loud failures.

The reference is the definition in ``loader/batches.py``: global stream position p is sample
perm_epoch[p % N]; each global step of mbs * dp_size positions after ``consumed_samples`` is cut
into dp_size contiguous slices, replica r taking slice r (Megatron's sampler convention).
"""


import numpy as np
import pytest
import torch

from acmoe_megatron.core.errors import ShardError
from acmoe_megatron.data.loader.batches import TokenBatches, load_split_samples
from acmoe_megatron.data.shards.manifest import read_manifest


def _global_stream(shard_dir, split, mbs, dp_size, num_batches, consumed=0, **kw):
    """Merge the replicas' sample ids back into the global order they consume."""
    ranks = [
        TokenBatches(shard_dir, split, mbs, r, dp_size, seed=7, consumed_samples=consumed, **kw) for r in range(dp_size)
    ]
    stream = []
    for k in range(num_batches):
        per_rank = [tb.sample_ids(k) for tb in ranks]
        for r in range(dp_size):
            stream.extend(per_rank[r])
    return stream


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_each_epoch_covers_every_sample_once(small_shards, dp_size):
    n = read_manifest(small_shards.path).splits["train"].num_samples
    mbs = 4
    batches = -(-2 * n // (mbs * dp_size))
    stream = _global_stream(small_shards.path, "train", mbs, dp_size, batches)
    epoch0, epoch1 = stream[:n], stream[n : 2 * n]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))  # reshuffled each epoch
    # The global order is independent of dp_size.
    assert stream[: 2 * n] == _global_stream(small_shards.path, "train", mbs, 1, 2 * n // mbs + 1)[: 2 * n]


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_replicas_are_disjoint_within_an_epoch(small_shards, dp_size):
    n = read_manifest(small_shards.path).splits["train"].num_samples
    seen = []
    for r in range(dp_size):
        tb = TokenBatches(small_shards.path, "train", 5, r, dp_size, seed=3)
        ids = [i for k in range(n // (5 * dp_size)) for i in tb.sample_ids(k)]
        seen.append(set(ids))
        assert len(ids) == len(set(ids))
    assert sum(len(s) for s in seen) == len(set().union(*seen))


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_validation_pass_covers_every_sample_exactly_once(small_shards, dp_size):
    n = read_manifest(small_shards.path).splits["valid"].num_samples
    ids, real_rows, num_batches = [], 0, None
    for r in range(dp_size):
        tb = TokenBatches(small_shards.path, "valid", 4, r, dp_size, seed=0, shuffle=False, infinite=False)
        batches = list(tb)
        num_batches = num_batches or len(batches)
        assert len(batches) == num_batches == len(tb)  # every replica runs the same steps
        ids += [i for k in range(len(tb)) for i in tb.sample_ids(k) if i is not None]
        real_rows += sum(int((b["loss_mask"].sum(1) > 0).sum()) for b in batches)
    assert sorted(ids) == list(range(n))
    assert real_rows == n  # padding rows are fully masked


def test_batch_contents(small_shards):
    manifest, samples = load_split_samples(small_shards.path, "valid")
    s = manifest.seq_length
    tb = TokenBatches(small_shards.path, "valid", 3, 1, 2, seed=0, shuffle=False, infinite=False)
    assert tb.sample_ids(0) == [3, 4, 5]  # step 0 = samples 0..5; replica 1 takes the 2nd half
    batch = next(tb)
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "sample_ids"}
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float32
    assert all(batch[k].shape == (3, s) for k in ("tokens", "labels", "loss_mask", "position_ids"))
    assert batch["sample_ids"].tolist() == [3, 4, 5]  # what run.trace_samples records
    np.testing.assert_array_equal(batch["tokens"][0].numpy(), samples[3, :-1])
    np.testing.assert_array_equal(batch["labels"][0].numpy(), samples[3, 1:])
    assert batch["loss_mask"].all() and (batch["position_ids"] == torch.arange(s)).all()

    # The last sample of a split is EOD-padded: its padded labels are masked out.
    n = len(samples)
    real = manifest.splits["valid"].sample_length(n - 1, s + 1)
    assert real < s + 1
    last = TokenBatches(
        small_shards.path, "valid", 1, 0, 1, seed=0, shuffle=False, infinite=False, consumed_samples=n - 1
    )
    batch = next(last)
    assert batch["loss_mask"][0].tolist() == [1.0] * (real - 1) + [0.0] * (s - real + 1)
    with pytest.raises(StopIteration):
        next(last)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_resume_continues_exactly(small_shards, dp_size):
    mbs, k = 4, 7
    full = [TokenBatches(small_shards.path, "train", mbs, r, dp_size, seed=11) for r in range(dp_size)]
    before = [[next(tb) for _ in range(k)] for tb in full]
    consumed = full[0].consumed_samples
    assert consumed == k * mbs * dp_size
    after = [[next(tb) for _ in range(5)] for tb in full]
    for r in range(dp_size):
        resumed = TokenBatches(small_shards.path, "train", mbs, r, dp_size, seed=11, consumed_samples=consumed)
        for expected in after[r]:
            got = next(resumed)
            assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert not torch.equal(before[0][0]["tokens"], after[0][0]["tokens"])


def test_resume_across_epoch_boundary_with_other_dp_size(small_shards):
    n = read_manifest(small_shards.path).splits["train"].num_samples
    consumed = n - 6  # the next global batch straddles the epoch boundary
    straight = _global_stream(small_shards.path, "train", 4, 1, (n + 20) // 4 + 1)
    resumed = _global_stream(small_shards.path, "train", 4, 3, 2, consumed=consumed)
    assert resumed == straight[consumed : consumed + 24]


def test_fewer_shards_than_replicas(one_shard):
    manifest = read_manifest(one_shard)
    assert len(manifest.splits["train"].shards) == 1
    n = manifest.splits["train"].num_samples
    ids = []
    for r in range(3):
        tb = TokenBatches(one_shard, "train", 2, r, 3, seed=5, infinite=False)
        batches = list(tb)
        assert batches
        ids += [i for k in range(len(batches)) for i in tb.sample_ids(k) if i is not None]
    assert sorted(ids) == list(range(n))


def test_rank_env_vars_are_ignored(small_shards, monkeypatch):
    expected = TokenBatches(small_shards.path, "train", 2, 1, 2, seed=1).sample_ids(0)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert TokenBatches(small_shards.path, "train", 2, 1, 2, seed=1).sample_ids(0) == expected


def test_corrupt_shard_fails_loudly(shard_copy):
    shard = shard_copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF  # inside a token payload: only the checksum can notice
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000001.tar: sha256 does not match.*--overwrite"):
        list(TokenBatches(shard_copy, "train", 2, 0, 1, seed=0, infinite=False))  # checked when first read


def test_corrupt_tar_header_fails_loudly_without_checksums(shard_copy):
    shard = shard_copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1024 * 3 + 10] ^= 0xFF  # inside the name field of the 4th member header
    # tarfile's stream mode treats a bad header after the first as the end of the archive and
    # stops without an error; the loader must notice the missing samples itself.
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000001\.tar"):
        list(TokenBatches(shard_copy, "train", 2, 0, 1, seed=0, verify_checksums=False, infinite=False))


def test_truncated_shard_fails_loudly(shard_copy):
    shard = shard_copy / "valid-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-5000])
    with pytest.raises(ShardError, match=r"valid-000000\.tar: has \d+ bytes, the manifest says"):
        TokenBatches(shard_copy, "valid", 2, 0, 1, seed=0, verify_checksums=False)


def test_missing_shard_fails_loudly(shard_copy):
    (shard_copy / "test-000000.tar").unlink()
    with pytest.raises(ShardError, match=r"test-000000\.tar: is missing"):
        TokenBatches(shard_copy, "test", 2, 0, 1, seed=0)


def test_configuration_errors(small_shards, tmp_path):
    with pytest.raises(ValueError, match="dp_rank"):
        TokenBatches(small_shards.path, "train", 2, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"--seq-length 128"):
        TokenBatches(small_shards.path, "train", 2, 0, 1, seed=0, seq_length=128)
    with pytest.raises(KeyError, match=r"split 'dev'"):
        TokenBatches(small_shards.path, "dev", 2, 0, 1, seed=0)
    with pytest.raises(FileNotFoundError, match=r"acmoe-data prepare"):
        TokenBatches(tmp_path, "train", 2, 0, 1, seed=0)
    with pytest.raises(TypeError, match="no length"):
        len(TokenBatches(small_shards.path, "valid", 2, 0, 1, seed=0))


def test_replica_r_gets_micro_batch_r_of_a_single_replica_run(small_shards):
    """DP=n replica r sees exactly the samples of micro-batch r of each DP=1 step (parity tests)."""
    one = TokenBatches(small_shards.path, "train", 4, 0, 1, seed=2)
    for r in range(3):
        tb = TokenBatches(small_shards.path, "train", 4, r, 3, seed=2)
        for step in range(3):
            assert tb.sample_ids(step) == one.sample_ids(step * 3 + r)


def test_manifest_vs_model_config(small_shards):
    from acmoe_megatron.data.shards.manifest import check_manifest_matches

    manifest = read_manifest(small_shards.path)
    check_manifest_matches(manifest, seq_length=64, vocab_size=257, tokenizer_hash=manifest.tokenizer["hash"])
    with pytest.raises(ValueError, match=r"seq_length=64 but the model uses seq_length=128.*--seq-length 128"):
        check_manifest_matches(manifest, seq_length=128)
    vocab_hint = r"vocab_size=257\) but the model uses vocab_size=50304.*set the model's vocab_size to 257"
    with pytest.raises(ValueError, match=vocab_hint):
        check_manifest_matches(manifest, vocab_size=50304)
    hash_hint = r"'bytes' \(hash [0-9a-f]{12}\.\.\.\) but the model expects .* hash 0123456789ab"
    with pytest.raises(ValueError, match=hash_hint):
        check_manifest_matches(manifest, tokenizer_hash="0123456789abcdef")
    with pytest.raises(ValueError, match=r"model uses vocab_size=300"):
        TokenBatches(small_shards.path, "valid", 2, 0, 1, seed=0, vocab_size=300)


def test_split_smaller_than_a_global_step_is_refused(small_shards):
    n = read_manifest(small_shards.path).splits["valid"].num_samples
    mbs = n // 2 + 1
    numbers = rf"has {n} samples, fewer than one global step of dp_size 2 x micro_batch_size {mbs} = {2 * mbs}"
    with pytest.raises(ValueError, match=numbers):
        TokenBatches(small_shards.path, "valid", mbs, 0, 2, seed=0)
    TokenBatches(small_shards.path, "valid", n // 2, 1, 2, seed=0)  # exactly one step is fine


def test_truncated_tar_is_detected_by_the_reader(shard_copy):
    """Even when the size check is bypassed (manifest edited), a short tar is an error."""
    import json

    from acmoe_megatron.data.shards.manifest import sha256_file

    shard = shard_copy / "valid-000000.tar"
    shard.write_bytes(shard.read_bytes()[: 512 * 41 + 100])  # cut inside a member's payload
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    info = manifest["splits"]["valid"]["shards"][0]
    info["bytes"], info["sha256"] = shard.stat().st_size, sha256_file(shard)
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    # the shard's index no longer fits it: named with the fix (without the index: the tar scan fails)
    with pytest.raises(ShardError, match=r"valid-000000\.tar(: (cannot be read|holds \d+ samples, the manifest says)"
                       r"|\.offsets\.npy does not match its shard)"):
        list(TokenBatches(shard_copy, "valid", 2, 0, 1, seed=0, infinite=False))


def test_sample_with_wrong_dtype_is_an_error(tmp_path):
    """A shard whose samples are not (seq_length + 1,) of the manifest dtype is refused."""
    import json

    import webdataset as wds

    from acmoe_megatron.data.shards.manifest import sha256_file
    from acmoe_megatron.data.shards.writer import prepare

    prepare("stdlib", tmp_path, 16, 100_000, max_bytes=20_000, splits=["train"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    info = manifest["splits"]["train"]["shards"][0]
    shard = tmp_path / info["file"]
    (tmp_path / (info["file"] + ".offsets.npy")).unlink()  # the reader scans the new tar itself
    with wds.TarWriter(str(shard)) as sink:
        for i in range(info["samples"]):
            sink.write({"__key__": f"{i:010d}", "tokens.npy": np.zeros(17, dtype=np.uint16 if i != 3 else np.int32)})
    info["bytes"], info["sha256"] = shard.stat().st_size, sha256_file(shard)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"sample 0000000003 has 196 bytes, expected 162 \(another sample shape or dtype"):
        list(TokenBatches(tmp_path, "train", 1, 0, 1, seed=0, infinite=False))


def _check_batches_against_reference(tb, samples, info, batches):
    s, n = tb.manifest.seq_length, len(samples)
    seen_last = False
    for k in batches:
        got = tb.batch(k)
        for row, i in enumerate(tb.sample_ids(k)):
            block = samples[i].astype(np.int64) if i is not None else np.full(s + 1, 256)
            length = 0 if i is None else info.sample_length(i, s + 1)
            seen_last |= i == n - 1
            assert torch.equal(got["tokens"][row], torch.from_numpy(block[:-1]))
            assert torch.equal(got["labels"][row], torch.from_numpy(block[1:]))
            assert got["loss_mask"][row].tolist() == [1.0] * (length - 1) + [0.0] * (s - max(length - 1, 0))
        assert torch.equal(got["position_ids"], torch.arange(s).repeat(tb.micro_batch_size, 1))
    return seen_last


@pytest.mark.parametrize("shuffle, infinite", [(True, True), (False, True), (False, False)])
def test_vectorised_batches_match_a_per_sample_reference(small_shards, shuffle, infinite):
    """``batch`` (one gather per micro-batch) equals a row-by-row build from ``sample_ids``,
    wherever the split's EOD-padded last sample falls in a micro-batch."""
    manifest, samples = load_split_samples(small_shards.path, "valid")
    info, s, n = manifest.splits["valid"], manifest.seq_length, len(samples)
    assert info.sample_length(n - 1, s + 1) < s + 1  # the split ends with an EOD-padded sample
    mbs, dp = 5, 2
    probe = TokenBatches(small_shards.path, "valid", 1, 0, 1, seed=4, shuffle=shuffle, verify_checksums=False)
    where_last = next(p for p in range(mbs, 2 * n) if probe.sample_ids(p) == [n - 1])
    for slot in range(mbs):  # replica 1's micro-batch holds the last sample in slot `slot`
        consumed = (where_last - mbs - slot) % (mbs * dp)
        if not infinite and where_last >= n:
            continue
        tb = TokenBatches(small_shards.path, "valid", mbs, 1, dp, seed=4, shuffle=shuffle, infinite=infinite,
                          consumed_samples=consumed, verify_checksums=False)
        k = (where_last - consumed - mbs) // (mbs * dp)
        assert tb.sample_ids(k)[slot] == n - 1
        assert _check_batches_against_reference(tb, samples, info, [k])
    tb = TokenBatches(small_shards.path, "valid", mbs, 1, dp, seed=4, shuffle=shuffle, infinite=infinite,
                      consumed_samples=3, verify_checksums=False)
    batches = range(2 * n // (mbs * dp) + 2) if infinite else range(len(tb))
    assert _check_batches_against_reference(tb, samples, info, batches)
