"""Shards from an HTTP server on 127.0.0.1 and from a ``pipe:`` command: the same batches as local reads.

The server is Python's ``http.server`` in a thread, serving a copy of a small shard directory; the
reference is ``TokenBatches`` over the local directory itself.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from acmoe_megatron.core.errors import ShardError
from acmoe_megatron.data.loader.batches import TokenBatches
from acmoe_megatron.data.shards.manifest import read_manifest
from acmoe_megatron.data.shards.store import ShardSamples

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def served(tmp_path, small_shards):
    root = tmp_path / "served"
    shutil.copytree(small_shards.path, root)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _same_batches(a: TokenBatches, b: TokenBatches, n: int) -> None:
    for k in range(n):
        x, y = a.batch(k), b.batch(k)
        assert all(x[key].equal(y[key]) for key in x), k


def test_http_shards_give_the_local_batches(served, small_shards, tmp_path):
    _, url = served
    assert read_manifest(url) == read_manifest(small_shards.path)
    kw = dict(micro_batch_size=4, dp_rank=1, dp_size=2, seed=3, consumed_samples=40)
    remote = TokenBatches(url, "train", cache_dir=tmp_path / "cache", **kw)
    _same_batches(remote, TokenBatches(small_shards.path, "train", **kw), 30)
    assert remote._store.remote.fetches == len(read_manifest(url).splits["train"].shards)  # each once
    again = TokenBatches(url, "train", cache_dir=tmp_path / "cache", **kw)  # a restart reuses the cache
    _same_batches(again, remote, 5)
    assert again._store.remote.fetches == 0


def test_a_small_cache_refetches_and_stays_exact(served, small_shards, tmp_path):
    _, url = served
    store = ShardSamples(url, "valid", cache_dir=tmp_path / "c1", cache_shards=1, open_shards=1)
    ids = np.random.default_rng(0).integers(0, len(store), 200)
    assert np.array_equal(store.read(ids), ShardSamples(small_shards.path, "valid").read(ids))
    assert len(list((tmp_path / "c1").glob("*.tar"))) == 1
    assert store.remote.fetches > len(store.shard_sizes)


def test_a_damaged_remote_shard_is_an_error_and_is_not_cached(served, tmp_path):
    root, url = served
    shard = root / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    tb = TokenBatches(url, "train", 4, 0, 1, seed=0, shuffle=False, infinite=False, cache_dir=tmp_path / "cache")
    with pytest.raises(ShardError, match=r"shard train-000001\.tar from http://127\.0\.0\.1:\d+/: got \d+ bytes "
                       r"with sha256 .*remote copy is damaged"):
        list(tb)
    assert not (tmp_path / "cache" / "train-000001.tar").exists()
    assert not list((tmp_path / "cache").glob(".*part*"))


def test_a_missing_remote_shard_is_an_error_naming_it(served, tmp_path):
    root, url = served
    (root / "valid-000002.tar").unlink()
    tb = TokenBatches(url, "valid", 4, 0, 1, seed=0, shuffle=False, infinite=False, cache_dir=tmp_path / "cache")
    with pytest.raises(ShardError, match=r"shard valid-000002\.tar from http://.*404"):
        list(tb)


def test_a_missing_remote_manifest_names_the_location(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot fetch manifest\.json from pipe:cat"):
        read_manifest(f"pipe:cat {tmp_path}/nowhere/{{name}}")


def test_pipe_command_shards_give_the_local_batches(small_shards, tmp_path):
    location = f"pipe:cat {small_shards.path}/{{name}}"
    kw = dict(micro_batch_size=2, dp_rank=0, dp_size=1, seed=5)
    _same_batches(TokenBatches(location, "valid", cache_dir=tmp_path / "cache", **kw),
                  TokenBatches(small_shards.path, "valid", **kw), 20)


def test_a_pipe_command_without_a_name_placeholder_is_refused(small_shards):
    with pytest.raises(ValueError, match=r"must hold \{name\}"):
        read_manifest(f"pipe:cat {small_shards.path}/manifest.json")


@pytest.mark.parametrize("bad", ["train-000000.tar; touch PWNED", "../escape.tar", "/tmp/abs/train-000000.tar",
                                 "valid-000000.tar"])
def test_manifest_names_that_acmoe_data_does_not_write_are_refused_before_anything_runs(
        bad, small_shards, tmp_path, monkeypatch):
    """A pipe: location whose manifest names a shard with shell syntax, a ../, an absolute path (or a
    shard of another split): refused by name when the manifest is read, before any shard is fetched,
    so no command runs and nothing is written outside the cache."""
    import json

    from acmoe_megatron.core.errors import ConfigError
    from acmoe_megatron.runtime.recipe import load_recipe
    from acmoe_megatron.runtime.run_plan import build_plan

    root = tmp_path / "evil"
    shutil.copytree(small_shards.path, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = bad
    (root / "manifest.json").write_text(json.dumps(manifest))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    location = f"pipe:cat {root}/{{name}}"
    with pytest.raises(ValueError, match=rf"shard name {re.escape(repr(bad))} of split 'train' is not one acmoe-data"):
        read_manifest(location)
    recipe = load_recipe(ROOT / "configs" / "tiny_cpu.yaml", [f"data.path={location}"])
    with pytest.raises(ConfigError, match="refused before anything is fetched or opened"):
        build_plan(recipe, 2, host_checks=False)
    assert not (work / "PWNED").exists() and not (tmp_path / "escape.tar").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil", "work"]


def test_a_pipe_command_gets_the_name_as_one_quoted_word(tmp_path):
    from acmoe_megatron.data.shards.remote import _url

    assert _url("pipe:cat /d/{name}", "train-000001.tar") == "pipe:cat /d/train-000001.tar"
    assert _url("pipe:cat /d/{name}", "x; touch PWNED") == "pipe:cat /d/'x; touch PWNED'"


def test_the_cache_keeps_names_inside_it(tmp_path):
    from acmoe_megatron.data.shards.remote import RemoteShards

    cache = RemoteShards("https://example.invalid/dir/", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="would leave the cache"):
        cache.local("../escape.tar", 10, "0" * 64)
