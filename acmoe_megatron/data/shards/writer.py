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
- Tokenizers: ``ByteTokenizer`` (``encode_bytes``) or any object with ``encode_batch``/``encode``/
  ``eod``/``vocab_size``/``describe`` such as ``HFTokenizer``; ids are stored as uint16 while they
  fit, else uint32.
- ``corrupt`` (``corpora/corrupt.py``) corrupts the valid/test splits, never train.
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
from typing import TYPE_CHECKING

import numpy as np

from acmoe_megatron.data.corpora.corpus import SPLITS, Corpus, Document
from acmoe_megatron.data.corpora.corrupt import EVAL_SPLITS, Corruption, parse_corruption
from acmoe_megatron.data.corpora.sources import resolve_source
from acmoe_megatron.data.shards.index import INDEX_SUFFIX, index_path, write_index
from acmoe_megatron.data.shards.manifest import (
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
from acmoe_megatron.data.tokenizers.byte import ByteTokenizer, load_tokenizer

if TYPE_CHECKING:
    import webdataset as wds

__all__ = ["pack_blocks", "prepare", "write_split", "write_token_blocks"]

# Called once per document with (split, number of file bytes consumed); used for progress bars.
ProgressFn = Callable[[str, int], None]

_SHARD_FILE = re.compile(rf"^(?:{'|'.join(SPLITS)})-\d{{6}}\.tar(?:{re.escape(INDEX_SUFFIX)})?$")


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
        # the member's data ends at the archive's offset now (tarfile pads it to a 512-byte block)
        self._offsets.append(self._writer.tarstream.offset - -(-self._member_bytes(block) // 512) * 512)
        self._count += 1
        self._tokens += real_length
        if self._count == self.samples_per_shard:
            self.close()

    _header_bytes: dict = {}

    @classmethod
    def _member_bytes(cls, block: np.ndarray) -> int:
        """Size of the ``.npy`` member webdataset writes for ``block`` (header + data)."""
        key = (block.shape, block.dtype.str)
        if key not in cls._header_bytes:
            buffer = io.BytesIO()
            np.save(buffer, block, allow_pickle=False)
            cls._header_bytes[key] = len(buffer.getvalue())
        return cls._header_bytes[key]

    def _open(self, first_sample: int) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in close()/abort())
        # Fixed header fields make the tar reproducible (webdataset's default mtime is "now").
        # The mtime must be an int: a float makes tarfile add a PAX header to every member.
        import webdataset as wds  # imports torch: only once a shard is written (`acmoe-data --help` stays fast)

        self._writer = wds.TarWriter(self._file, user="", group="", mode=0o444, mtime=0, compress=False)
        self._first, self._count, self._tokens = first_sample, 0, 0
        self._offsets: list[int] = []

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
        write_index(final, np.array(self._offsets, dtype=np.uint64))  # random access for the reader (store.py)
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


def _encoder(
    tokenizer, corruption: Corruption | None, counts: dict[str, int]
) -> Callable[[list[Document]], list[tuple[np.ndarray, int]]]:
    """Documents -> [(token ids, source bytes)], corrupted if ``corruption`` is given (updating ``counts``)."""
    if getattr(tokenizer, "byte_level", False):

        def encode_one(doc: Document) -> tuple[np.ndarray, int]:
            data = doc.utf8()
            n_bytes = len(data)
            if corruption is not None:
                data, units, replaced = corruption.corrupt_bytes(data, doc.doc_id)
                counts["units"] += units
                counts["replaced"] += replaced
            return tokenizer.encode_bytes(data), n_bytes

        return lambda docs: [encode_one(doc) for doc in docs]

    marker_ids = tokenizer.encode(corruption.marker) if corruption is not None else None
    special_ids = getattr(tokenizer, "special_ids", frozenset())

    def encode_many(docs: list[Document]) -> list[tuple[np.ndarray, int]]:
        texts = [doc.as_text() for doc in docs]
        results = []
        for doc, text, ids in zip(docs, texts, tokenizer.encode_batch(texts), strict=True):
            if corruption is not None:
                ids, units, replaced = corruption.corrupt_tokens(ids, doc.doc_id, marker_ids, special_ids)
                counts["units"] += units
                counts["replaced"] += replaced
            results.append((ids, len(doc.raw) if doc.raw is not None else len(text.encode("utf-8"))))
        return results

    return encode_many


def _chunks(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    chunk = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_split(
    documents: Iterable[Document],
    out_dir: str | os.PathLike,
    split: str,
    seq_length: int,
    samples_per_shard: int,
    tokenizer=None,
    progress: ProgressFn | None = None,
    corruption: Corruption | None = None,
    corruption_counts: dict[str, int] | None = None,
) -> SplitInfo:
    """Tokenize, pack and write one split's documents as shards in ``out_dir``.

    ``tokenizer`` defaults to ``ByteTokenizer``. With ``corruption``, every document is corrupted
    before packing and ``corruption_counts`` (if given) gets the "units"/"replaced" totals.
    """
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    dtype = np.dtype(token_dtype_name(tokenizer.vocab_size))
    stats = {"docs": 0, "text_bytes": 0}
    counts = corruption_counts if corruption_counts is not None else {}
    counts.setdefault("units", 0)
    counts.setdefault("replaced", 0)
    encode = _encoder(tokenizer, corruption, counts)

    # Hugging Face tokenizers encode a batch of documents in parallel (Rust threads).
    chunk_size = 1 if getattr(tokenizer, "byte_level", False) else 256

    def token_arrays() -> Iterator[np.ndarray]:
        for chunk in _chunks(documents, chunk_size):
            for tokens, n_bytes in encode(chunk):
                stats["docs"] += 1
                stats["text_bytes"] += n_bytes
                if progress is not None:
                    progress(split, n_bytes)
                yield tokens.astype(dtype, copy=False)

    shards, num_samples, num_tokens = write_token_blocks(
        token_arrays(), out_dir, split, seq_length, samples_per_shard, tokenizer.eod)
    return SplitInfo(
        num_documents=stats["docs"],
        num_text_bytes=stats["text_bytes"],
        num_tokens=num_tokens,
        num_samples=num_samples,
        shards=shards,
    )


def write_token_blocks(
    documents: Iterable[np.ndarray], out_dir: str | os.PathLike, split: str, seq_length: int,
    samples_per_shard: int, eod: int,
) -> tuple[list[ShardInfo], int, int]:
    """Pack token arrays (one per document, EOD appended by ``pack_blocks``) into samples of
    ``seq_length + 1`` tokens and write them as ``split``'s shards (with their offset indexes) in
    ``out_dir``; a failure removes the shard being written. Returns (shards, samples, real tokens)."""
    sink = _ShardSink(Path(out_dir), split, samples_per_shard)
    num_samples = num_tokens = 0
    try:
        for block, real_length in pack_blocks(documents, seq_length + 1, eod):
            sink.write(num_samples, block, real_length)
            num_samples += 1
            num_tokens += real_length
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return sink.shards, num_samples, num_tokens


def prepare(
    source: str | Corpus,
    out_dir: str | os.PathLike,
    seq_length: int,
    samples_per_shard: int = 4096,
    *,
    splits: Iterable[str] = SPLITS,
    valid_fraction: float | None = None,
    test_fraction: float | None = None,
    max_bytes: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    tokenizer=None,
    source_format: str = "auto",
    text_field: str = "text",
    corrupt: str | Corruption | None = None,
) -> Manifest:
    """Tokenize ``source`` and write its splits as webdataset shards plus ``manifest.json``.

    Args:
        source: "stdlib", a path/glob (text, JSONL, Parquet, enwik8, WikiText; see
            ``sources.py``), or a corpus object.
        out_dir: output directory (created if missing).
        seq_length: model sequence length; each sample holds ``seq_length + 1`` tokens.
        samples_per_shard: samples per tar shard.
        splits: which splits to write.
        valid_fraction, test_fraction: hash-split fractions (default 0.02 each; an error for
            enwik8/WikiText, whose splits are fixed). Ignored when ``source`` is a corpus object.
        max_bytes: cap on the source bytes per split (see the corpus classes).
        overwrite: replace an existing dataset in ``out_dir`` (otherwise that is an error).
        progress: optional callback ``(split, n_bytes)`` called after each document.
        tokenizer: None/"bytes" (byte-level), a local tokenizer.json path, or a tokenizer object.
        source_format, text_field: see ``sources.resolve_source``.
        corrupt: "word-swap:P" or a ``Corruption``: applied to the valid/test splits only.

    Returns:
        The manifest that was written. A source with no documents in any written split is an
        error (nothing is written); a single empty split only warns.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    splits = list(splits)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits}")
    corruption = parse_corruption(corrupt)
    if corruption is not None and not set(splits) & set(EVAL_SPLITS):
        raise ValueError(
            f"corruption applies to the evaluation splits {EVAL_SPLITS} only, but only {splits} are "
            "being written; add --splits valid test"
        )
    corpus = resolve_source(
        source, valid_fraction, test_fraction, max_bytes, source_format=source_format, text_field=text_field
    )
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_dataset(out, overwrite)

    infos, corruption_counts = {}, {}
    for split in splits:
        split_corruption = corruption if split in EVAL_SPLITS else None
        counts = corruption_counts.setdefault(split, {}) if split_corruption is not None else None
        infos[split] = write_split(
            corpus.documents(split),
            out,
            split,
            seq_length,
            samples_per_shard,
            tokenizer,
            progress,
            corruption=split_corruption,
            corruption_counts=counts,
        )
    if all(info.num_text_bytes == 0 for info in infos.values()):
        for info in infos.values():  # documents of zero bytes still made EOD-only shards
            for shard in info.shards:
                (out / shard.file).unlink(missing_ok=True)
                index_path(out / shard.file).unlink(missing_ok=True)
        described = corpus.describe()
        where = described.get("spec") or described.get("root") or described.get("path") or ""
        raise ValueError(
            f"source {corpus.kind!r} {where} has no text in splits {splits} "
            f"({sum(i.num_documents for i in infos.values())} documents, 0 bytes): the corpus is "
            "empty. Check the input (and --max-bytes, --text-field, the split fractions)"
        )
    for split, info in infos.items():
        if info.num_samples == 0:
            warnings.warn(
                f"split {split!r} of source {corpus.kind!r} is empty (no documents selected); "
                "use a larger source or --max-bytes, or larger split fractions",
                stacklevel=2,
            )
    manifest = Manifest(
        tokenizer=tokenizer.describe(),
        seq_length=seq_length,
        dtype=token_dtype_name(tokenizer.vocab_size),
        source=corpus.describe(),
        splits=infos,
        corruption=None
        if corruption is None
        else corruption.describe() | {"applied_to": corruption_counts},
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
