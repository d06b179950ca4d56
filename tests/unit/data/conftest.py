"""Shared fixtures for the data-path tests: one small stdlib shard directory per session."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
from data_synthetic import synthetic_words, wikitext_file_text

from acmoe_megatron.data.shards.writer import prepare


class ShardDir(NamedTuple):
    path: Path
    seq_length: int
    samples_per_shard: int
    max_bytes: int


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> ShardDir:
    """A stdlib shard directory capped at 200 kB per split (several shards per split)."""
    shards = ShardDir(tmp_path_factory.mktemp("stdlib_shards"), 64, 500, 200_000)
    prepare("stdlib", shards.path, shards.seq_length, shards.samples_per_shard, max_bytes=shards.max_bytes)
    return shards


@pytest.fixture
def shard_copy(tmp_path, small_shards) -> Path:
    """A private copy of ``small_shards`` that a test may damage."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(small_shards.path, out)
    return out


@pytest.fixture(scope="session")
def one_shard(tmp_path_factory) -> Path:
    """A tiny shard directory whose train split is a single shard (fewer shards than replicas)."""
    out = tmp_path_factory.mktemp("one_shard")
    prepare("stdlib", out, 32, 100_000, max_bytes=20_000, splits=["train"])
    return out


# -- synthetic inputs for the other sources -------------------------------------------------------

@pytest.fixture(scope="session")
def wikitext_dir(tmp_path_factory) -> Path:
    """A small WikiText-103-raw-like directory: wiki.{train,valid,test}.raw."""
    d = tmp_path_factory.mktemp("wikitext-103-raw")
    for seed, (split, n, words) in enumerate([("train", 60, 100), ("valid", 60, 250), ("test", 8, 60)]):
        (d / f"wiki.{split}.raw").write_text(wikitext_file_text(seed, n, words), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def bpe_tokenizer_file(tmp_path_factory) -> Path:
    """A tiny byte-level BPE tokenizer.json (trained here with the tokenizers library)."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([" ".join(synthetic_words(s, 2000)) for s in range(5)], trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path
