"""Shard directories that live elsewhere: an HTTP(S) URL or a ``pipe:`` command, read through a local cache.

``data.path`` (or any shard-directory argument) may be
- ``http://host/dir`` / ``https://...``: ``dir/manifest.json`` and ``dir/<shard>`` are fetched with
  ``urllib`` (object stores that serve HTTP(S), presigned or public);
- ``pipe:CMD`` where CMD writes a file to stdout and holds ``{name}`` where the file name goes, as
  webdataset's ``pipe:`` URLs (``pipe:aws s3 cp s3://bucket/dir/{name} -``,
  ``pipe:gsutil cat gs://bucket/dir/{name}``); run by ``webdataset.gopen``, which raises on a
  non-zero exit.

The manifest is read at start-up; a shard is fetched whole the first time one of its samples is
needed, into ``cache_dir`` (default: ``$TMPDIR/acmoe-shards/<hash of the location>``), its size
and sha256 checked against the manifest while it streams in (a damaged or partial transfer is an
error naming the shard, never a cached file), then renamed into place, so readers never see part
of a shard. The reader then works on the local copy exactly as on a local directory
(``store.py``). At most ``max_shards`` fetched shards are kept (least recently used go first);
with the two-level shuffle (``sample_order``) an epoch walks the corpus window by window, so a
cache of a window's shards (``shuffle_window / samples_per_shard`` plus two) fetches each shard
about once per epoch and rank. Why our own: webdataset streams remote tars but has no random access
and no integrity check against a manifest; megatron's object-storage support is for its indexed
format.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import tempfile
import urllib.request
from collections import OrderedDict
from pathlib import Path

from acmoe_megatron.core.errors import ShardError

__all__ = ["RemoteShards", "fetch_text", "is_remote"]

_SCHEMES = ("http://", "https://", "pipe:")


def is_remote(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and location.startswith(_SCHEMES)


def _check(location: str) -> None:
    if location.startswith("pipe:") and "{name}" not in location:
        raise ValueError(
            f"data location {location!r}: a pipe: command must hold {{name}} where the file name goes, "
            "e.g. 'pipe:aws s3 cp s3://bucket/dir/{name} -'"
        )


def _url(location: str, name: str) -> str:
    if location.startswith("pipe:"):  # the name as one shell word, whatever it holds
        return location.replace("{name}", shlex.quote(name))
    return location.rstrip("/") + "/" + name


def _open(location: str, name: str):
    url = _url(location, name)
    try:
        if url.startswith("pipe:"):
            import webdataset as wds

            return wds.gopen(url, "rb")
        return urllib.request.urlopen(url, timeout=60)  # noqa: S310 (http/https only: _SCHEMES)
    except OSError as exc:
        raise FileNotFoundError(f"cannot fetch {name} from {location}: {exc}") from exc


def fetch_text(location: str, name: str) -> str:
    """The text of ``name`` at ``location`` (e.g. its manifest.json)."""
    _check(location)
    try:
        with _open(location, name) as stream:
            return stream.read().decode("utf-8")
    except FileNotFoundError:
        raise
    except OSError as exc:  # a pipe: command that fails reports it when read or closed
        raise FileNotFoundError(f"cannot fetch {name} from {location}: {exc}") from exc


class RemoteShards:
    """Fetches shards of ``location`` into ``cache_dir`` on demand (see the module docstring)."""

    def __init__(self, location: str, cache_dir: str | os.PathLike | None = None, max_shards: int = 64):
        _check(location)
        self.location = location
        digest = hashlib.sha256(location.encode()).hexdigest()[:16]
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "acmoe-shards" / digest
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_shards = max(1, max_shards)
        self._cached: OrderedDict[str, None] = OrderedDict()
        self.fetches = 0  # shards fetched by this process (tests, logs)

    def local(self, name: str, size: int, sha256: str) -> Path:
        """The local copy of shard ``name`` (fetched and checked if not cached)."""
        path = self.cache_dir / name
        if path.resolve().parent != self.cache_dir.resolve():
            raise ValueError(f"shard name {name!r} of {self.location} would leave the cache {self.cache_dir}")
        if name in self._cached:
            self._cached.move_to_end(name)
            if path.is_file():
                return path
        elif path.is_file() and path.stat().st_size == size:  # fetched earlier (another run or rank)
            self._remember(name)
            return path
        self._fetch(name, path, size, sha256)
        self._remember(name)
        return path

    def _remember(self, name: str) -> None:
        self._cached[name] = None
        self._cached.move_to_end(name)
        while len(self._cached) > self.max_shards:
            old, _ = self._cached.popitem(last=False)
            (self.cache_dir / old).unlink(missing_ok=True)  # an open descriptor of it stays readable

    def _fetch(self, name: str, path: Path, size: int, sha256: str) -> None:
        tmp = path.with_name(f".{name}.part-{os.getpid()}")
        digest, got = hashlib.sha256(), 0
        try:
            with _open(self.location, name) as stream, open(tmp, "wb") as out:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
            if got != size or digest.hexdigest() != sha256:
                raise OSError(f"got {got} bytes with sha256 {digest.hexdigest()[:12]}..., the manifest says "
                              f"{size} bytes, {sha256[:12]}...")
        except (OSError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            raise ShardError(
                f"shard {name} from {self.location}: {exc}. The remote copy is damaged, incomplete or "
                "unreachable; check the location (and re-upload the directory written by acmoe-data prepare)"
            ) from exc
        os.replace(tmp, path)
        self.fetches += 1

    def clear(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)
