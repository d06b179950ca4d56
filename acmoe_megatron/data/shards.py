"""Write a corpus as fixed-length token samples in webdataset tar shards (``prepare``).

Pipeline per split: documents -> ``tokenizer.encode`` -> append EOD -> one concatenated stream ->
non-overlapping blocks of ``seq_length + 1`` tokens -> tar shards of ``samples_per_shard``
samples, written with ``webdataset.TarWriter``. See ``manifest.py`` for the format and for how the
final partial block is kept (EOD-padded; its real length is in the manifest).

Notable:
- Deterministic: the same input gives byte-identical shards and manifest. Tar headers use a fixed
  mtime (0), owner ("" / uid 0) and mode (0444); the manifest has no timestamps.
- Atomic: every shard and the manifest are written to a temporary file and renamed into place.
  When overwriting, the old manifest is removed first and written last, so a reader never sees a
  manifest that points at a half-written dataset.
- Non-overlapping blocks mean the first token of each block is never a label; that costs
  1/(seq_length + 1) of the targets and keeps every sample independent.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from acmoe_megatron.data.corpus import SPLITS, Document, FileCorpus
from acmoe_megatron.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    SplitInfo,
    sample_key,
    sha256_file,
    shard_name,
    token_dtype_name,
    write_bytes_atomic,
)
from acmoe_megatron.data.sources import resolve_source
from acmoe_megatron.data.tokenizer import ByteTokenizer

__all__ = ["pack_blocks", "prepare", "write_split"]

# Called once per document with (split, number of file bytes consumed); used for progress bars.
ProgressFn = Callable[[str, int], None]

_SHARD_FILE = re.compile(rf"^(?:{'|'.join(SPLITS)})-\d{{6}}\.tar$")


def pack_blocks(token_arrays: Iterable[np.ndarray], block_length: int, eod: int) -> Iterator[tuple[np.ndarray, int]]:
    """Concatenate documents (each followed by ``eod``) and cut the stream into blocks.

    Yields ``(block, real_length)``: every block has ``block_length`` tokens; all but the last have
    ``real_length == block_length``, the last is padded with ``eod`` after ``real_length`` tokens.
    """
    if block_length < 2:
        raise ValueError(f"block_length must be >= 2 (seq_length >= 1), got {block_length}")
    eod_arr = None
    pending = None
    for tokens in token_arrays:
        if eod_arr is None:
            eod_arr = np.array([eod], dtype=tokens.dtype)
        parts = [tokens, eod_arr] if pending is None else [pending, tokens, eod_arr]
        stream = np.concatenate(parts)
        n_full = len(stream) // block_length
        for i in range(n_full):
            yield stream[i * block_length : (i + 1) * block_length], block_length
        pending = stream[n_full * block_length :]
    if pending is not None and len(pending):
        block = np.full(block_length, eod, dtype=pending.dtype)
        block[: len(pending)] = pending
        yield block, len(pending)


class _ShardSink:
    """Writes samples into ``{split}-{i:06d}.tar`` files, rolling every ``samples_per_shard``."""

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int):
        self.out_dir, self.split, self.samples_per_shard = out_dir, split, samples_per_shard
        self.shards: list[ShardInfo] = []
        self._writer: wds.TarWriter | None = None
        self._file: io.BufferedWriter | None = None
        self._tmp: Path | None = None
        self._first = self._count = self._tokens = 0

    def write(self, index: int, block: np.ndarray, real_length: int) -> None:
        if self._writer is None:
            self._open(index)
        self._writer.write({"__key__": sample_key(index), "tokens.npy": block})
        self._count += 1
        self._tokens += real_length
        if self._count == self.samples_per_shard:
            self.close()

    def _open(self, first_sample: int) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in close()/abort())
        # Fixed header fields make the tar reproducible (webdataset's default mtime is "now").
        # The mtime must be an int: a float makes tarfile add a PAX header to every member.
        self._writer = wds.TarWriter(self._file, user="", group="", mode=0o444, mtime=0, compress=False)
        self._first, self._count, self._tokens = first_sample, 0, 0

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self.split, len(self.shards))
        final = self.out_dir / name
        os.replace(self._tmp, final)
        self.shards.append(
            ShardInfo(
                file=name,
                first_sample=self._first,
                samples=self._count,
                tokens=self._tokens,
                bytes=final.stat().st_size,
                sha256=sha256_file(final),
            )
        )
        self._writer = self._file = self._tmp = None

    def abort(self) -> None:
        if self._writer is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = self._file = self._tmp = None


def write_split(
    documents: Iterable[Document],
    out_dir: str | os.PathLike,
    split: str,
    seq_length: int,
    samples_per_shard: int,
    tokenizer: ByteTokenizer,
    progress: ProgressFn | None = None,
) -> SplitInfo:
    """Tokenize, pack and write one split's documents as shards in ``out_dir``."""
    dtype = np.dtype(token_dtype_name(tokenizer.vocab_size))
    stats = {"docs": 0, "text_bytes": 0}

    def token_arrays() -> Iterator[np.ndarray]:
        for doc in documents:
            tokens = tokenizer.encode(doc.text)
            stats["docs"] += 1
            stats["text_bytes"] += len(tokens)  # byte tokenizer: one token per UTF-8 byte
            if progress is not None:
                progress(split, len(tokens))
            yield tokens.astype(dtype, copy=False)

    sink = _ShardSink(Path(out_dir), split, samples_per_shard)
    num_samples = num_tokens = 0
    try:
        for block, real_length in pack_blocks(token_arrays(), seq_length + 1, tokenizer.eod):
            sink.write(num_samples, block, real_length)
            num_samples += 1
            num_tokens += real_length
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return SplitInfo(
        num_documents=stats["docs"],
        num_text_bytes=stats["text_bytes"],
        num_tokens=num_tokens,
        num_samples=num_samples,
        shards=sink.shards,
    )


def prepare(
    source: str | FileCorpus,
    out_dir: str | os.PathLike,
    seq_length: int,
    samples_per_shard: int = 4096,
    *,
    splits: Iterable[str] = SPLITS,
    valid_fraction: float = 0.02,
    test_fraction: float = 0.02,
    max_bytes: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> Manifest:
    """Tokenize ``source`` and write its splits as webdataset shards plus ``manifest.json``.

    Args:
        source: "stdlib", a directory/file/glob of text files, or a ``FileCorpus``.
        out_dir: output directory (created if missing).
        seq_length: model sequence length; each sample holds ``seq_length + 1`` tokens.
        samples_per_shard: samples per tar shard.
        splits: which splits to write.
        valid_fraction, test_fraction, max_bytes: see ``corpus.FileCorpus`` (ignored when
            ``source`` already is a ``FileCorpus``).
        overwrite: replace an existing dataset in ``out_dir`` (otherwise that is an error).
        progress: optional callback ``(split, n_bytes)`` called after each document.

    Returns:
        The manifest that was written.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    splits = list(splits)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits}")
    corpus = resolve_source(source, valid_fraction, test_fraction, max_bytes)
    tokenizer = ByteTokenizer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_dataset(out, overwrite)

    infos = {}
    for split in splits:
        infos[split] = write_split(
            corpus.documents(split), out, split, seq_length, samples_per_shard, tokenizer, progress
        )
        if infos[split].num_samples == 0:
            warnings.warn(
                f"split {split!r} of source {corpus.kind!r} is empty (no documents selected); "
                "use a larger source or --max-bytes, or larger split fractions",
                stacklevel=2,
            )
    manifest = Manifest(
        tokenizer={
            "name": tokenizer.name,
            "hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
        },
        seq_length=seq_length,
        dtype=token_dtype_name(tokenizer.vocab_size),
        source=corpus.describe(),
        splits=infos,
    )
    write_bytes_atomic(out / MANIFEST_NAME, manifest.to_json().encode("utf-8"))
    return manifest


def _clear_previous_dataset(out: Path, overwrite: bool) -> None:
    """Refuse to mix datasets; with ``overwrite``, delete the old manifest and shards."""
    old = sorted(p for p in out.iterdir() if p.name == MANIFEST_NAME or _SHARD_FILE.match(p.name))
    if not old:
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} already holds a token-shard dataset ({len(old)} files such as {old[0].name}); "
            "pass overwrite=True (--overwrite) to replace it, or choose another output directory"
        )
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        manifest.unlink()  # first, so no reader trusts the shards while they are being replaced
    for path in old:
        path.unlink(missing_ok=True)
