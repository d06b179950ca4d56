"""Shared fixtures for the data-path tests: one small stdlib shard directory per session."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from acmoe_megatron.data.shards import prepare


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


@pytest.fixture(scope="session")
def one_shard(tmp_path_factory) -> Path:
    """A tiny shard directory whose train split is a single shard (fewer shards than replicas)."""
    out = tmp_path_factory.mktemp("one_shard")
    prepare("stdlib", out, 32, 100_000, max_bytes=20_000, splits=["train"])
    return out
