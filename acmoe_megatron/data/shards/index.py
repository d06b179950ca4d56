"""Per-shard sample-offset index: where each sample's token payload starts inside an uncompressed tar.

A shard ``{split}-{i:06d}.tar`` written by ``acmoe-data prepare`` holds one tar member
``{key}.tokens.npy`` per sample. ``{shard}.offsets.npy`` beside it stores, for sample j of the shard,
the byte offset of that member's data (the ``.npy`` file, header included) as a ``uint64`` array
of length ``samples``. With it a reader seeks straight to any sample (``store.py``) instead of
reading the shard from the start, which is what makes memory per process independent of the corpus.

``prepare`` writes the index with each shard (``write_index``, from the file positions of its own
writer); ``acmoe-data index DIR`` writes it for
shard directories made before it existed, and a reader that finds none scans the tar headers
itself (``scan_offsets``: 512-byte headers only, no payload read) and keeps the result in memory.
Why our own: webdataset reads tars as streams (no random access), and tarfile's member table
holds a Python object per member (hundreds of bytes each) where this is 8 bytes per sample.
The index is not in the manifest (the manifest describes the shards; the index is derived from
them and is re-checked at every read: ``store.py`` compares each sample's ``.npy`` header).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from acmoe_megatron.data.shards.manifest import sample_key

__all__ = ["INDEX_SUFFIX", "ShardIndexError", "index_path", "read_index", "scan_offsets", "write_index"]

INDEX_SUFFIX = ".offsets.npy"


class ShardIndexError(RuntimeError):
    """A shard's layout does not match what the index says (or cannot be indexed)."""


def index_path(shard: str | os.PathLike) -> Path:
    return Path(os.fspath(shard) + INDEX_SUFFIX)


def scan_offsets(shard: str | os.PathLike, first_sample: int, samples: int, member_bytes: int | None = None) -> np.ndarray:
    """Data offsets of the ``samples`` members of ``shard`` (keys ``first_sample``, ... in order,
    each of ``member_bytes`` bytes if given), read from the tar headers; ``ShardIndexError`` naming
    the shard and member on any other layout."""
    shard = Path(shard)
    offsets = np.empty(samples, dtype=np.uint64)
    count = 0
    try:
        with tarfile.open(shard, mode="r:") as tar:  # uncompressed, seekable: headers only
            while (member := tar.next()) is not None:
                if count >= samples:
                    raise ShardIndexError(f"shard {shard}: holds more than the {samples} samples in the manifest")
                expected = f"{sample_key(first_sample + count)}.tokens.npy"
                if member.name != expected or not member.isfile():
                    raise ShardIndexError(f"shard {shard}: member {count} is {member.name!r}, expected {expected!r}")
                if member_bytes is not None and member.size != member_bytes:
                    raise ShardIndexError(
                        f"shard {shard}: sample {sample_key(first_sample + count)} has {member.size} bytes, "
                        f"expected {member_bytes} (another sample shape or dtype than the manifest's)")
                offsets[count] = member.offset_data
                count += 1
                tar.members.clear()  # tarfile keeps every TarInfo otherwise
    except tarfile.TarError as exc:
        raise ShardIndexError(f"shard {shard}: cannot be read as a tar ({exc})") from exc
    if count != samples:
        raise ShardIndexError(f"shard {shard}: holds {count} samples, the manifest says {samples}")
    return offsets


def write_index(shard: str | os.PathLike, offsets: np.ndarray) -> Path:
    """Write ``{shard}.offsets.npy`` (``offsets`` from the writer, or ``scan_offsets``) atomically."""
    path = index_path(shard)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.uint64), allow_pickle=False)
    os.replace(tmp, path)
    return path


def read_index(shard: str | os.PathLike, samples: int, shard_bytes: int) -> np.ndarray | None:
    """The stored index of ``shard`` (None if there is none); ``ShardIndexError`` if it cannot belong to
    a shard of ``samples`` samples and ``shard_bytes`` bytes (stale or damaged: re-index)."""
    path = index_path(shard)
    try:
        offsets = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as exc:
        raise ShardIndexError(f"index {path} cannot be read ({exc}); re-create it: `acmoe-data index {Path(shard).parent}`") from exc
    if offsets.dtype != np.uint64 or offsets.shape != (samples,) or (samples and int(offsets[-1]) >= shard_bytes):
        raise ShardIndexError(
            f"index {path} does not match its shard ({offsets.dtype} {offsets.shape}, the manifest says "
            f"{samples} samples in {shard_bytes} bytes); re-create it: `acmoe-data index {Path(shard).parent}`"
        )
    return offsets
