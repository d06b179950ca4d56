"""Shard writer: packing loses nothing, shards are deterministic and match their manifest."""

import io
import tarfile

import numpy as np
import pytest

from acmoe_megatron.data.corpora.stdlib import stdlib_corpus
from acmoe_megatron.data.shards.manifest import read_manifest, sha256_file
from acmoe_megatron.data.shards.writer import pack_blocks, prepare
from acmoe_megatron.data.tokenizers.byte import ByteTokenizer


def test_pack_blocks_keeps_every_token():
    docs = [np.arange(n, dtype=np.uint16) for n in (3, 0, 10, 1)]
    blocks = list(pack_blocks(docs, block_length=4, eod=99))
    stream = np.concatenate([np.append(d, 99) for d in docs])
    assert all(len(b) == 4 for b, _ in blocks)
    assert [n for _, n in blocks] == [4] * (len(stream) // 4) + [len(stream) % 4]
    packed = np.concatenate([b[:n] for b, n in blocks])
    np.testing.assert_array_equal(packed, stream)
    last, n = blocks[-1]
    assert (last[n:] == 99).all()


def test_pack_blocks_exact_multiple_has_no_padding_block():
    blocks = list(pack_blocks([np.arange(7, dtype=np.uint16)], block_length=4, eod=9))
    assert [n for _, n in blocks] == [4, 4]


def _shard_files(d):
    return sorted(p.name for p in d.iterdir())


def test_prepare_is_deterministic(tmp_path, small_shards):
    again = tmp_path / "again"
    prepare("stdlib", again, small_shards.seq_length, small_shards.samples_per_shard, max_bytes=small_shards.max_bytes)
    assert _shard_files(again) == _shard_files(small_shards.path)
    for name in _shard_files(small_shards.path):
        assert (again / name).read_bytes() == (small_shards.path / name).read_bytes(), name


def test_manifest_matches_shards(small_shards):
    shard_dir = small_shards.path
    manifest = read_manifest(shard_dir)
    assert manifest.seq_length == small_shards.seq_length and manifest.dtype == "uint16"
    assert manifest.tokenizer["hash"] == ByteTokenizer().hash
    listed = set()
    for split, info in manifest.splits.items():
        assert len(info.shards) >= 2
        first = 0
        for i, shard in enumerate(info.shards):
            assert shard.file == f"{split}-{i:06d}.tar"
            assert shard.first_sample == first
            assert sha256_file(shard_dir / shard.file) == shard.sha256
            assert (shard_dir / shard.file).stat().st_size == shard.bytes
            first += shard.samples
            listed |= {shard.file, shard.file + ".offsets.npy"}  # the shard and its sample-offset index
        assert first == info.num_samples
        assert sum(s.tokens for s in info.shards) == info.num_tokens
    assert listed | {"manifest.json"} == set(_shard_files(shard_dir))


def test_tar_members_are_reproducible_webdataset_samples(small_shards):
    n = small_shards.samples_per_shard
    with tarfile.open(small_shards.path / "train-000001.tar") as tar:
        members = tar.getmembers()
    assert len(members) == n
    assert members[0].name == f"{n:010d}.tokens.npy"
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o444)}
    assert all(not m.pax_headers for m in members)


def test_shards_reproduce_the_documents_exactly(small_shards):
    """Concatenating every sample's real tokens gives back each document followed by EOD."""
    tok = ByteTokenizer()
    shard_dir, seq_length = small_shards.path, small_shards.seq_length
    manifest = read_manifest(shard_dir)
    corpus = stdlib_corpus(max_bytes=small_shards.max_bytes)
    for split, info in manifest.splits.items():
        pieces = []
        for shard in info.shards:
            with tarfile.open(shard_dir / shard.file) as tar:
                for member in tar:
                    pieces.append(np.load(io.BytesIO(tar.extractfile(member).read())))
        samples = np.stack(pieces)
        assert samples.shape == (info.num_samples, seq_length + 1)
        lengths = [info.sample_length(i, seq_length + 1) for i in range(info.num_samples)]
        stream = np.concatenate([s[:n] for s, n in zip(samples, lengths, strict=True)])
        expected = np.concatenate([np.append(tok.encode(d.text), tok.eod) for d in corpus.documents(split)])
        np.testing.assert_array_equal(stream, expected)
        assert info.num_documents == len(corpus.files(split))
        assert (samples[-1][lengths[-1] :] == tok.eod).all()


def test_existing_dataset_needs_overwrite(tmp_path):
    out = tmp_path / "ds"
    prepare("stdlib", out, 32, 50, max_bytes=10_000, splits=["train"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare("stdlib", out, 32, 50, max_bytes=10_000, splits=["train"])
    # Overwriting with bigger shards removes the old, now unlisted, shards.
    before = _shard_files(out)
    manifest = prepare("stdlib", out, 32, 10_000, max_bytes=10_000, splits=["train"], overwrite=True)
    after = _shard_files(out)
    assert len(before) > len(after) == 3
    shard = manifest.splits["train"].shards[0].file
    assert after == ["manifest.json", shard, shard + ".offsets.npy"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_empty_split_warns(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "only.txt").write_text("x" * 100)
    with pytest.warns(UserWarning, match="is empty"):
        manifest = prepare(str(text), tmp_path / "out", 8, 10, valid_fraction=0.0, test_fraction=0.0)
    assert manifest.splits["valid"].num_samples == 0
    assert manifest.splits["train"].num_tokens == 101


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_length": 0}, "seq_length"),
        ({"samples_per_shard": 0}, "samples_per_shard"),
        ({"splits": ["dev"]}, "splits"),
    ],
)
def test_prepare_rejects_bad_arguments(tmp_path, kwargs, match):
    args = {"seq_length": 8, "samples_per_shard": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        prepare("stdlib", tmp_path, max_bytes=1000, **args)
