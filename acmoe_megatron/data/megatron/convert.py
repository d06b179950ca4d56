"""Convert between our token-shard directories and megatron's indexed datasets (``.bin``/``.idx``).

``shards_to_indexed`` / ``indexed_to_shards`` (CLI ``acmoe-data to-megatron`` / ``from-megatron``)
convert between our token-shard directories and megatron's indexed format. The ``.bin/.idx``
files are written and read by megatron-core's own ``IndexedDatasetBuilder`` / ``IndexedDataset``
(the format is not re-implemented here); the shards by ``shards/writer.py``'s packer and shard writer.
One megatron *document* per source document: the split's token stream is cut after every EOD,
so each document is its tokens plus the EOD, as megatron's ``preprocess_data.py --append-eod``
writes them. A split ``S`` becomes the prefix ``<out>/S_text_document``.

Next to each prefix goes an acmoe sidecar ``<prefix>.acmoe.json`` (``sidecar.py``) recording what the
``.bin/.idx`` cannot (tokenizer, seq_length, the split's text counts, source and corruption): it is
why shards -> indexed -> shards gives byte-identical shards and manifest. Indexed data made elsewhere
(no sidecar) converts too with ``--tokenizer``; its manifest then says ``source.kind: megatron-indexed``
and ``num_text_bytes: 0`` (unknown), and a document that does not end with EOD gets one (our format
ends every document with EOD; the count is recorded in ``source``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, get_bin_path, get_idx_path

from acmoe_megatron.data.corpora.corpus import SPLITS
from acmoe_megatron.data.megatron.sidecar import (
    PREFIX_SUFFIX,
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    SIDECAR_VERSION,
    indexed_prefix,
    read_sidecar,
    sidecar_path,
    sidecar_tokenizer,
)
from acmoe_megatron.data.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    SplitInfo,
    read_manifest,
    token_dtype_name,
    write_bytes_atomic,
)
from acmoe_megatron.data.shards.store import ShardSamples
from acmoe_megatron.data.shards.writer import _clear_previous_dataset, write_token_blocks
from acmoe_megatron.data.tokenizers.byte import load_tokenizer

__all__ = ["DEFAULT_SAMPLES_PER_SHARD", "indexed_to_shards", "shards_to_indexed"]

DEFAULT_SAMPLES_PER_SHARD = 4096
_DOCS_PER_READ = 4096  # documents per IndexedDataset read (indexed_to_shards)


# ---------------------------------------------------------------------------------------------
# shards -> indexed


def _indexed_dtype(manifest: Manifest) -> type[np.number]:
    """Token dtype of the ``.bin``: uint16 as our shards when ids fit, else int32 (megatron's
    ``DType`` has no uint32)."""
    if manifest.dtype == "uint16":
        return np.uint16
    if int(manifest.tokenizer["vocab_size"]) > np.iinfo(np.int32).max:
        raise ValueError(f"vocab_size {manifest.tokenizer['vocab_size']} does not fit megatron's int32 tokens")
    return np.int32


def _split_documents(store: ShardSamples, eod: int) -> Iterator[np.ndarray]:
    """The documents of a split (each ending with its EOD), shard by shard; the EOD padding of the
    split's last sample is cut off first."""
    info, length = store.info, store.sample_length
    last = info.num_samples - 1
    last_real = info.sample_length(last, length)
    pending = np.empty(0, dtype=store.dtype)
    first = 0
    for k in range(len(store.shard_sizes)):
        for chunk in store.iter_shard(k):
            stream = chunk.reshape(-1)
            if first + len(chunk) > last:  # holds the split's last sample: drop its padding
                stream = stream[: (last - first) * length + last_real]
            first += len(chunk)
            stream = np.concatenate([pending, stream])
            start = 0
            for end in (np.flatnonzero(stream == eod) + 1).tolist():
                yield stream[start:end]
                start = end
            pending = stream[start:].copy()
    if pending.size:
        raise ValueError(
            f"split {store.split!r} of {store.dir} ends with {pending.size} tokens after its last EOD "
            "(every document ends with EOD in a shard directory): the manifest's token count does not "
            "match the shards; re-create the directory with `acmoe-data prepare ... --overwrite`"
        )


def _write_indexed_split(shard_dir: Path, manifest: Manifest, split: str, prefix: str,
                         verify_checksums: bool) -> dict[str, Any]:
    info = manifest.splits[split]
    eod = int(manifest.tokenizer["eod"])
    dtype = _indexed_dtype(manifest)
    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    tmp_bin, tmp_idx = f"{bin_path}.tmp-{os.getpid()}", f"{idx_path}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    documents = tokens = 0
    try:
        if info.num_samples:
            store = ShardSamples(shard_dir, split, verify_checksums=verify_checksums, manifest=manifest)
            for doc in _split_documents(store, eod):
                builder.add_document(doc, [len(doc)])
                documents += 1
                tokens += len(doc)
            store.close()
        builder.finalize(tmp_idx)
        if tokens != info.num_tokens:
            raise ValueError(f"split {split!r} of {shard_dir} holds {tokens} real tokens, its manifest says "
                             f"{info.num_tokens}; re-create the directory with `acmoe-data prepare ... --overwrite`")
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except BaseException:
        builder.data_file.close()
        for tmp in (tmp_bin, tmp_idx):
            Path(tmp).unlink(missing_ok=True)
        raise
    sidecar = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "split": split,
        "tokenizer": manifest.tokenizer,
        "seq_length": manifest.seq_length,
        "dtype": manifest.dtype,
        "samples_per_shard": info.shards[0].samples if info.shards else None,
        "num_documents": info.num_documents,
        "num_text_bytes": info.num_text_bytes,
        "num_tokens": info.num_tokens,
        "num_samples": info.num_samples,
        "megatron_documents": documents,
        "bin_bytes": Path(bin_path).stat().st_size,
        "source": manifest.source,
        "corruption": manifest.corruption,
        "manifest_splits": list(manifest.splits),
    }
    write_bytes_atomic(sidecar_path(prefix), (json.dumps(sidecar, indent=2) + "\n").encode("utf-8"))
    return sidecar


def shards_to_indexed(shard_dir: str | os.PathLike, out_prefix_dir: str | os.PathLike,
                      splits: Sequence[str] | None = None, *, overwrite: bool = False,
                      verify_checksums: bool = True) -> dict[str, str]:
    """Write each split of the shard directory ``shard_dir`` as megatron indexed data
    ``<out_prefix_dir>/<split>_text_document.{bin,idx}`` plus its sidecar (``sidecar.py``).

    Streams shard by shard (memory: one chunk of samples and megatron's builder's per-document
    lengths). ``splits``: which splits (default: all of the manifest). Existing prefixes are an
    error unless ``overwrite``. Returns ``{split: prefix}``.
    """
    shard_dir, out = Path(shard_dir), Path(out_prefix_dir)
    manifest = read_manifest(shard_dir)
    splits = list(manifest.splits) if splits is None else list(splits)
    missing = [s for s in splits if s not in manifest.splits]
    if missing or not splits:
        raise ValueError(f"{shard_dir} has splits {list(manifest.splits)}, not {missing or splits}; "
                         "choose among them (--splits)")
    out.mkdir(parents=True, exist_ok=True)
    prefixes = {split: indexed_prefix(out, split) for split in splits}
    if not overwrite:
        existing = [p for prefix in prefixes.values()
                    for p in (get_bin_path(prefix), get_idx_path(prefix), str(sidecar_path(prefix)))
                    if os.path.exists(p)]
        if existing:
            raise FileExistsError(f"{existing[0]} exists; pass overwrite=True (--overwrite) to replace it, "
                                  "or choose another --out")
    for split, prefix in prefixes.items():
        sidecar_path(prefix).unlink(missing_ok=True)  # first: never a sidecar next to half-written data
        _write_indexed_split(shard_dir, manifest, split, prefix, verify_checksums)
    return prefixes


# ---------------------------------------------------------------------------------------------
# indexed -> shards


def _resolve_prefixes(prefix_or_dir: str | os.PathLike, split: str | None) -> dict[str, str]:
    """``{split: prefix}`` for a directory of ``<split>_text_document`` prefixes or for one prefix."""
    path = os.fspath(prefix_or_dir)
    if os.path.isdir(path):
        found = {s: indexed_prefix(path, s) for s in SPLITS if IndexedDataset.exists(indexed_prefix(path, s))}
        if split is not None:
            found = {s: p for s, p in found.items() if s == split}
        if not found:
            wanted = f"{split}{PREFIX_SUFFIX}" if split else f"{{{','.join(SPLITS)}}}{PREFIX_SUFFIX}"
            raise FileNotFoundError(
                f"{path} holds no megatron indexed data {wanted}.bin/.idx; give the prefix itself "
                f"(PATH/NAME for NAME.bin + NAME.idx), or convert shards first with `acmoe-data to-megatron`"
            )
        return found
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    if not IndexedDataset.exists(path):
        raise FileNotFoundError(
            f"megatron prefix {path}: {get_bin_path(path)} and/or {get_idx_path(path)} do not exist; give "
            "a prefix (the path without .bin/.idx) or a directory of <split>_text_document prefixes"
        )
    if split is None:
        name = os.path.basename(path)
        split = name[: -len(PREFIX_SUFFIX)] if name.endswith(PREFIX_SUFFIX) and name[: -len(PREFIX_SUFFIX)] in SPLITS \
            else "train"
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    return {split: path}


def _indexed_documents(prefix: str, eod: int, vocab_size: int, counts: dict[str, int]) -> Iterator[np.ndarray]:
    """The documents of megatron prefix ``prefix`` without their final EOD (``pack_blocks`` appends
    one after every document), read ``_DOCS_PER_READ`` documents at a time; ids are checked."""
    dataset = IndexedDataset(prefix, mmap=True)
    doc_index = np.asarray(dataset.document_indices, dtype=np.int64)
    n_docs = len(doc_index) - 1
    for first in range(0, n_docs, _DOCS_PER_READ):
        last = min(first + _DOCS_PER_READ, n_docs)
        seq_lo, seq_hi = int(doc_index[first]), int(doc_index[last])
        if seq_hi == seq_lo:
            sequences = []
        else:
            sequences = dataset[seq_lo:seq_hi]
        cuts = np.concatenate([[0], np.cumsum(dataset.sequence_lengths[seq_lo:seq_hi], dtype=np.int64)])
        flat = np.concatenate(sequences) if sequences else np.empty(0, dtype=dataset.index.dtype)
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
            bad = int(flat.max()) if int(flat.max()) >= vocab_size else int(flat.min())
            raise ValueError(
                f"megatron prefix {prefix} holds token id {bad}, outside the vocabulary 0..{vocab_size - 1} of "
                "the tokenizer given for it: pass the tokenizer the data was made with (--tokenizer)"
            )
        for d in range(first, last):
            doc = flat[cuts[doc_index[d] - seq_lo]: cuts[doc_index[d + 1] - seq_lo]]
            counts["documents"] += 1
            if doc.size and int(doc[-1]) == eod:
                doc = doc[:-1]
            else:
                counts["without_eod"] += 1
            yield doc
    del dataset


def indexed_to_shards(prefix_or_dir: str | os.PathLike, out_dir: str | os.PathLike, seq_length: int,
                      samples_per_shard: int | None = None, *, tokenizer=None, split: str | None = None,
                      overwrite: bool = False) -> Manifest:
    """Write megatron indexed data as a shard directory (our ``manifest.json`` + tar shards).

    Args:
        prefix_or_dir: a directory of ``<split>_text_document`` prefixes (``to-megatron``'s output:
            every split found), or one prefix (its split: ``<split>_text_document`` names it, else
            ``split`` or "train").
        out_dir: the shard directory to write (created; an existing dataset needs ``overwrite``).
        seq_length: samples hold ``seq_length + 1`` tokens (any length: the documents are re-packed).
        samples_per_shard: default: the sidecar's (what the shards it came from had), else 4096.
        tokenizer: None (the sidecar's), "bytes", a ``tokenizer.json`` path or a tokenizer object:
            required for indexed data without a sidecar; with one, it must be the same tokenizer.
    The shards are written by ``shards/writer.py``'s packer and shard writer, the same code ``prepare`` uses,
    so shards -> indexed -> shards (same seq_length) gives byte-identical shards and manifest.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    prefixes = _resolve_prefixes(prefix_or_dir, split)
    sidecars = {s: read_sidecar(p) for s, p in prefixes.items()}
    tok = sidecar_tokenizer(list(prefixes.values()))
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        given = tokenizer.describe()
        if tok is not None and given["hash"] != tok["hash"]:
            raise ValueError(
                f"{prefix_or_dir} was tokenized with {tok['name']!r} (hash {tok['hash'][:12]}...), not with the "
                f"given {given['name']!r} (hash {given['hash'][:12]}...); leave out --tokenizer (its sidecar knows)"
            )
        tok = tok or given
    if tok is None:
        raise ValueError(
            f"{prefix_or_dir} has no acmoe sidecar ({SIDECAR_SUFFIX}) telling its tokenizer: pass the tokenizer "
            "the data was made with (--tokenizer bytes, or --tokenizer path/to/tokenizer.json)"
        )
    if samples_per_shard is None:
        known = [s["samples_per_shard"] for s in sidecars.values() if s is not None and s.get("samples_per_shard")]
        samples_per_shard = known[0] if known else DEFAULT_SAMPLES_PER_SHARD
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    order = next((s["manifest_splits"] for s in sidecars.values() if s is not None and "manifest_splits" in s),
                 list(SPLITS))
    splits = sorted(prefixes, key=lambda s: order.index(s) if s in order else len(order) + SPLITS.index(s))
    vocab, eod = int(tok["vocab_size"]), int(tok["eod"])
    dtype = np.dtype(token_dtype_name(vocab))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_dataset(out, overwrite)

    infos: dict[str, SplitInfo] = {}
    counts_per_split: dict[str, dict[str, int]] = {}
    for name in splits:
        counts = counts_per_split.setdefault(name, {"documents": 0, "without_eod": 0})
        docs = (d.astype(dtype, copy=False) for d in _indexed_documents(prefixes[name], eod, vocab, counts))
        shards, num_samples, num_tokens = write_token_blocks(docs, out, name, seq_length, samples_per_shard, eod)
        side = sidecars[name]
        # the sidecar's text counts describe the source text (tokens do not determine them)
        same = side is not None and side["num_tokens"] == num_tokens
        infos[name] = SplitInfo(
            num_documents=side["num_documents"] if same else counts["documents"],
            num_text_bytes=side["num_text_bytes"] if same else 0,
            num_tokens=num_tokens,
            num_samples=num_samples,
            shards=shards,
        )
    if all(s is not None for s in sidecars.values()) and \
            len({json.dumps(s["source"], sort_keys=True) for s in sidecars.values()}) == 1:
        source = next(iter(sidecars.values()))["source"]
    else:
        source = {"kind": "megatron-indexed", "path": os.fspath(prefix_or_dir),
                  "prefixes": {s: prefixes[s] for s in splits},
                  "documents_without_eod": {s: counts_per_split[s]["without_eod"] for s in splits}}
    corruption = next((s["corruption"] for s in sidecars.values() if s is not None and s.get("corruption")), None)
    if corruption is not None:
        applied = {s: n for s, n in corruption.get("applied_to", {}).items() if s in infos}
        corruption = (corruption | {"applied_to": applied}) if applied else None
    manifest = Manifest(tokenizer=tok, seq_length=seq_length, dtype=dtype.name, source=source, splits=infos,
                        corruption=corruption)
    write_bytes_atomic(out / MANIFEST_NAME, manifest.to_json().encode("utf-8"))
    return manifest
