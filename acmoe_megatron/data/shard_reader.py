"""Read one split of a token-shard directory into memory, checking every shard against the manifest.

Each shard is read through a webdataset pipeline (``SimpleShardList`` + ``tarfile_to_samples``)
with no node or worker splitter: splitting happens at sample level in ``TokenBatches``. Every
problem is a ``ShardError`` naming the shard and the fix: a missing shard, a size or sha256 that
differs from the manifest, a truncated or corrupt tar, wrong keys, shapes or dtypes, or a sample
count that differs from the manifest (tarfile's stream mode silently stops at a damaged header,
so the count is always checked).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import webdataset as wds

from acmoe_megatron.data.manifest import Manifest, ShardInfo, read_manifest, sample_key, sha256_file

__all__ = ["ShardError", "load_split_samples"]


class ShardError(RuntimeError):
    """A shard is missing, corrupt or does not match the manifest."""


def _shard_error(path: Path, problem: str) -> ShardError:
    return ShardError(
        f"shard {path}: {problem}. The shard directory is damaged or incomplete; re-create it with "
        f"`acmoe-data prepare ... --out {path.parent} --overwrite`"
    )


def _npy_header(sample_length: int, dtype: np.dtype) -> bytes:
    """The .npy header ``prepare`` writes for a sample (all samples of a split share it)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(sample_length, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()[: -sample_length * dtype.itemsize]


def _read_shard(path: Path, info: ShardInfo, sample_length: int, dtype: np.dtype) -> np.ndarray:
    """Read one shard into an array [samples, sample_length], checking it against the manifest."""
    out = np.empty((info.samples, sample_length), dtype=dtype)
    header = _npy_header(sample_length, dtype)
    payload_size = len(header) + sample_length * dtype.itemsize
    # No nodesplitter/workersplitter stages: splitting happens at sample level in TokenBatches.
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())
    count = 0
    try:
        for sample in pipeline:
            if count >= info.samples:
                raise _shard_error(path, f"holds more than the {info.samples} samples in the manifest")
            expected = sample_key(info.first_sample + count)
            if sample.get("__key__") != expected or "tokens.npy" not in sample:
                fields = sorted(k for k in sample if not k.startswith("__"))
                raise _shard_error(
                    path,
                    f"sample {count} has key {sample.get('__key__')!r} and fields {fields}, "
                    f"expected key {expected!r} with 'tokens.npy'",
                )
            payload = sample["tokens.npy"]
            if len(payload) == payload_size and payload.startswith(header):  # the usual case
                out[count] = np.frombuffer(payload, dtype=dtype, offset=len(header))
                count += 1
                continue
            tokens = np.load(io.BytesIO(payload), allow_pickle=False)
            if tokens.shape != (sample_length,) or tokens.dtype != dtype:
                raise _shard_error(
                    path,
                    f"sample {expected} has shape {tokens.shape} and dtype {tokens.dtype}, "
                    f"expected ({sample_length},) {dtype}",
                )
            out[count] = tokens
            count += 1
    except ShardError:
        raise
    except Exception as exc:  # tarfile/numpy errors on corrupt bytes
        raise _shard_error(path, f"cannot be read ({type(exc).__name__}: {exc})") from exc
    if count != info.samples:
        raise _shard_error(path, f"holds {count} samples, the manifest says {info.samples}")
    return out


def load_split_samples(
    manifest_dir: str | os.PathLike, split: str, verify_checksums: bool = True
) -> tuple[Manifest, np.ndarray]:
    """Load every sample of ``split`` as an array [num_samples, seq_length + 1].

    Each shard must exist with the size recorded in the manifest; with ``verify_checksums`` its
    sha256 must match too. Any mismatch raises ``ShardError`` naming the shard.
    """
    manifest_dir = Path(manifest_dir)
    manifest = read_manifest(manifest_dir)
    if split not in manifest.splits:
        raise KeyError(
            f"split {split!r} is not in {manifest_dir} (it has {sorted(manifest.splits)}); "
            "re-run acmoe-data prepare with that split"
        )
    info = manifest.splits[split]
    if info.num_samples == 0:
        raise ValueError(
            f"split {split!r} in {manifest_dir} has no samples; prepare it from a larger source "
            "(or raise --max-bytes / the split fraction)"
        )
    dtype = np.dtype(manifest.dtype)
    parts = []
    for shard in info.shards:
        path = manifest_dir / shard.file
        if not path.is_file():
            raise _shard_error(path, "is missing")
        size = path.stat().st_size
        if size != shard.bytes:
            raise _shard_error(path, f"has {size} bytes, the manifest says {shard.bytes}")
        if verify_checksums and sha256_file(path) != shard.sha256:
            raise _shard_error(path, "sha256 does not match the manifest")
        parts.append(_read_shard(path, shard, manifest.sample_length, dtype))
    samples = np.concatenate(parts)
    if len(samples) != info.num_samples:
        raise ValueError(
            f"{manifest_dir}: split {split!r} shards hold {len(samples)} samples, the manifest "
            f"total is {info.num_samples}; the manifest is inconsistent, re-create the directory"
        )
    return manifest, samples
