"""Random access to the samples of one split of a token-shard directory, in bounded memory.

``ShardSamples(dir, split)`` answers ``read(ids)`` (split-level sample indices -> an array
``[len(ids), seq_length + 1]``) by positioned reads (``os.preadv``) into the uncompressed tar
shards at the offsets of the shard's index (``index.py``). Nothing of a split is held in
memory beyond O(shards) numbers and the indexes of the ``max_open`` most recently used shards
(8 bytes per sample each; ``TokenBatches`` keeps one shuffle window's shards open): memory does
not grow with the corpus. Positioned reads, not ``mmap``:
pages of a mapped file count in the process's RSS (what cluster schedulers police) for as long as
they stay mapped, and a whole epoch would map the whole corpus; ``pread`` leaves caching to the
kernel's page cache. The same reads work after ``fork`` (DataLoader workers): no shared file
position. A URL or ``pipe:`` location reads the same way from a local cache of fetched shards
(``remote.py``).

Checks, each an error naming the shard, the sample and the fix, none a silent skip:
- at construction: every shard exists with the manifest's size (O(shards) ``stat`` calls);
- on a shard's first use: its sha256 with ``verify_checksums`` (hashing every shard up front would
  read the whole corpus in every process), its index matches it (or the tar headers are scanned
  when it has none);
- on every read: the sample's tar member header names the sample (``{key}.tokens.npy``) and its
  ``.npy`` header is the one ``prepare`` writes (both read in the same call as its tokens), so an
  index that points elsewhere or a damaged header cannot pass;
- on every read: every token id is below the manifest's vocabulary size (one vectorised max per
  batch), whatever ``verify_checksums`` says: a flipped byte can otherwise reach the embedding as an
  out-of-range id.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from acmoe_megatron.core.errors import ShardError
from acmoe_megatron.data.shards.index import ShardIndexError, read_index, scan_offsets
from acmoe_megatron.data.shards.manifest import KEY_WIDTH, Manifest, ShardInfo, read_manifest, sample_key, sha256_file
from acmoe_megatron.data.shards.remote import RemoteShards, is_remote

__all__ = ["ShardError", "ShardSamples", "load_split_samples", "npy_header"]


_TAR_BLOCK = 512  # a tar member header
_NAME_BYTES = KEY_WIDTH + len(".tokens.npy")  # a sample's member name: manifest.sample_key + ".tokens.npy"
_POWERS = 10 ** np.arange(KEY_WIDTH - 1, -1, -1, dtype=np.int64)
_SUFFIX = np.frombuffer(b".tokens.npy\0", dtype=np.uint8)


def shard_error(path: Path, problem: str) -> ShardError:
    return ShardError(
        f"shard {path}: {problem}. The shard directory is damaged or incomplete; re-create it with "
        f"`acmoe-data prepare ... --out {path.parent} --overwrite`"
    )


def npy_header(sample_length: int, dtype: np.dtype) -> bytes:
    """The .npy header ``prepare`` writes for a sample (all samples of a split share it)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(sample_length, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()[: -sample_length * dtype.itemsize]


class _OpenShard:
    """A shard in use: its file descriptor and payload offsets (header included)."""

    def __init__(self, fd: int, offsets: np.ndarray):
        self.fd, self.offsets = fd, offsets


class ShardSamples:
    """The samples of ``split`` of the shard directory ``manifest_dir`` (see the module docstring)."""

    def __init__(self, manifest_dir: str | os.PathLike, split: str, verify_checksums: bool = False,
                 open_shards: int = 32, manifest: Manifest | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_shards: int = 64):
        # a URL or pipe: command (remote.py): shards are fetched, checked, into a local cache
        self.remote = RemoteShards(manifest_dir, cache_dir, cache_shards) if is_remote(manifest_dir) else None
        self.dir = self.remote.cache_dir if self.remote else Path(manifest_dir)
        self.manifest = manifest if manifest is not None else read_manifest(manifest_dir)
        if split not in self.manifest.splits:
            raise KeyError(
                f"split {split!r} is not in {self.dir} (it has {sorted(self.manifest.splits)}); "
                "re-run acmoe-data prepare with that split"
            )
        self.split, self.info = split, self.manifest.splits[split]
        if self.info.num_samples == 0:
            raise ValueError(
                f"split {split!r} in {self.dir} has no samples; prepare it from a larger source "
                "(or raise --max-bytes / the split fraction)"
            )
        counted = sum(s.samples for s in self.info.shards)
        if counted != self.info.num_samples:
            raise ValueError(
                f"{self.dir}: split {split!r} shards hold {counted} samples, the manifest total is "
                f"{self.info.num_samples}; the manifest is inconsistent, re-create the directory"
            )
        self.verify_checksums = verify_checksums
        self.dtype = np.dtype(self.manifest.dtype)
        self.sample_length = self.manifest.sample_length
        self.vocab_size = int(self.manifest.tokenizer["vocab_size"])
        self._header = npy_header(self.sample_length, self.dtype)
        self._member = len(self._header) + self.sample_length * self.dtype.itemsize  # the .npy member
        self._record = _TAR_BLOCK + self._member  # read from the member's tar header on
        # shard k holds split samples starts[k] .. starts[k+1]-1: O(shards) memory
        self.starts = np.array([s.first_sample for s in self.info.shards] + [self.info.num_samples], dtype=np.int64)
        self.shard_sizes = np.diff(self.starts)
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self.max_open = max(1, open_shards)
        self._checked: set[int] = set()  # shards whose size/sha256 passed (checked once per process)
        self._pid = os.getpid()
        for info in self.info.shards if self.remote is None else ():  # O(shards) stats, before any read
            self._check_file(self.dir / info.file, info)

    def __len__(self) -> int:
        return self.info.num_samples

    # -- shards ------------------------------------------------------------------------------

    def _shard(self, k: int) -> _OpenShard:
        if self._pid != os.getpid():  # a forked DataLoader worker: descriptors are shared, keep
            self._open = OrderedDict()  # the parent's (pread has no file position) but stop closing them
            self._pid = os.getpid()
        shard = self._open.get(k)
        if shard is not None:
            self._open.move_to_end(k)
            return shard
        info = self.info.shards[k]
        if self.remote is not None:  # fetched whole, size and sha256 checked on the way in
            self._checked.add(k)
            path = self.remote.local(info.file, info.bytes, info.sha256)
        else:
            path = self.dir / info.file
        self._check_file(path, info)
        if self.verify_checksums and k not in self._checked and sha256_file(path) != info.sha256:
            raise shard_error(path, "sha256 does not match the manifest")
        self._checked.add(k)
        shard = _OpenShard(os.open(path, os.O_RDONLY), self._offsets(path, info))
        self._open[k] = shard
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            os.close(old.fd)
        return shard

    @staticmethod
    def _check_file(path: Path, info: ShardInfo) -> None:
        if not path.is_file():
            raise shard_error(path, "is missing")
        size = path.stat().st_size
        if size != info.bytes:
            raise shard_error(path, f"has {size} bytes, the manifest says {info.bytes}")

    def _offsets(self, path: Path, info: ShardInfo) -> np.ndarray:
        try:
            offsets = read_index(path, info.samples, info.bytes)
        except ShardIndexError as exc:  # names the index file and `acmoe-data index`
            raise ShardError(str(exc)) from exc
        if offsets is None:
            try:
                offsets = scan_offsets(path, info.first_sample, info.samples, self._member)
            except ShardIndexError as exc:
                raise shard_error(path, str(exc).removeprefix(f"shard {path}: ")) from exc
        if info.samples and int(offsets[-1]) + self._member > info.bytes:
            raise shard_error(path, "its last sample ends past the end of the file")
        return offsets

    def close(self) -> None:
        if self._pid == os.getpid():
            for shard in self._open.values():
                os.close(shard.fd)
        self._open.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    def shard_of(self, index: int) -> tuple[int, int]:
        """(shard number, position in that shard) of split sample ``index``."""
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return k, index - int(self.starts[k])

    # -- samples -----------------------------------------------------------------------------

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Samples ``ids`` (split-level indices, any order, repeats allowed) as ``[len(ids), L]``."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.info.num_samples):
            raise IndexError(f"sample ids out of range [0, {self.info.num_samples}) of split {self.split!r}")
        record = self._record
        raw = np.empty((len(ids), record), dtype=np.uint8)
        shards = np.searchsorted(self.starts, ids, side="right") - 1
        local = (ids - self.starts[shards]).tolist()
        last_k, shard = -1, None
        for row, k in enumerate(shards.tolist()):
            if k != last_k:
                shard, last_k = self._shard(k), k
            got = os.preadv(shard.fd, [raw[row]], int(shard.offsets[local[row]]) - _TAR_BLOCK)
            if got != record:
                path = self.dir / self.info.shards[k].file
                raise shard_error(path, f"sample {sample_key(int(ids[row]))} is cut short ({got} of {record} bytes)")
        # the member name: the 10-digit key (digits computed, not formatted) + ".tokens.npy" + NUL
        digits = (ids[:, None] // _POWERS % 10 + 48).astype(np.uint8)
        bad = np.flatnonzero((raw[:, :KEY_WIDTH] != digits).any(axis=1)
                             | (raw[:, KEY_WIDTH:_NAME_BYTES + 1] != _SUFFIX).any(axis=1))
        if bad.size:
            self._raise_sample(ids, shards, int(bad[0]), "has a damaged tar header or the index points elsewhere "
                               "(`acmoe-data index` rewrites the index)")
        header = np.frombuffer(self._header, dtype=np.uint8)
        raw = raw[:, _TAR_BLOCK:]
        bad = np.flatnonzero((raw[:, : len(header)] != header).any(axis=1))
        if bad.size:
            self._raise_sample(ids, shards, int(bad[0]), "does not start with the .npy header prepare writes "
                               "(a damaged shard or a stale index: `acmoe-data index` rewrites the index)")
        tokens = raw[:, len(header):].view(self.dtype)
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            row = int(np.flatnonzero((tokens >= self.vocab_size).any(axis=1))[0])
            bad_id = int(tokens[row].max())
            self._raise_sample(ids, shards, row, f"holds token id {bad_id}, not below the vocabulary size "
                               f"{self.vocab_size} of the manifest (a damaged shard)")
        return tokens

    def _raise_sample(self, ids, shards, row: int, problem: str):
        path = self.dir / self.info.shards[int(shards[row])].file
        raise shard_error(path, f"sample {sample_key(int(ids[row]))} {problem}")

    def iter_shard(self, k: int, chunk: int = 4096):
        """The samples of shard ``k`` in order, ``chunk`` at a time (for converters and checks)."""
        start, stop = int(self.starts[k]), int(self.starts[k + 1])
        for first in range(start, stop, chunk):
            yield self.read(np.arange(first, min(first + chunk, stop)))


def load_split_samples(manifest_dir: str | os.PathLike, split: str,
                       verify_checksums: bool = True) -> tuple[Manifest, np.ndarray]:
    """Every sample of ``split`` as one array ``[num_samples, seq_length + 1]`` (for tools and tests
    on small splits; training reads on demand through ``ShardSamples``)."""
    store = ShardSamples(manifest_dir, split, verify_checksums)
    samples = np.concatenate([np.array(chunk) for k in range(len(store.shard_sizes)) for chunk in store.iter_shard(k)])
    store.close()
    return store.manifest, samples
