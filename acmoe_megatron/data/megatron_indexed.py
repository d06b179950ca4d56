"""Megatron's indexed datasets (``.bin``/``.idx``) as a second input, blending, and a converter.

What this module implements, and what it leaves to megatron-core:

- ``shards_to_indexed`` / ``indexed_to_shards`` (CLI ``acmoe-data to-megatron`` / ``from-megatron``)
  convert between our token-shard directories and megatron's indexed format. The ``.bin/.idx``
  files are written and read by megatron-core's own ``IndexedDatasetBuilder`` / ``IndexedDataset``
  (the format is not re-implemented here); the shards by ``shards.py``'s packer and shard writer.
  One megatron *document* per source document: the split's token stream is cut after every EOD,
  so each document is its tokens plus the EOD, as megatron's ``preprocess_data.py --append-eod``
  writes them. A split ``S`` becomes the prefix ``<out>/S_text_document``.
- A JSON sidecar ``<prefix>.acmoe.json`` next to each prefix records what the ``.bin/.idx`` cannot:
  the tokenizer of our manifest (name, hash, vocab_size, eod), seq_length, dtype, the samples per
  shard, the split's document/text-byte/token/sample counts, the source and corruption
  descriptions. ``from-megatron`` and the launch checks (``megatron_args.build_argv``) read it; it
  is why shards -> indexed -> shards gives byte-identical shards and manifest (the manifest's
  ``source``, ``num_documents`` and ``num_text_bytes`` describe the text, which tokens do not
  determine; the sidecar carries them over). Indexed data made elsewhere (no sidecar) converts too
  with ``--tokenizer``; its manifest then says ``source.kind: megatron-indexed`` and
  ``num_text_bytes: 0`` (unknown), and a document that does not end with EOD gets one (our format
  ends every document with EOD; the count is recorded in ``source``).
- ``megatron_gpt_datasets_provider``: training from megatron indexed data through megatron-core's
  ``BlendedMegatronDatasetBuilder`` + ``GPTDataset``/``GPTDatasetConfig``, configured from
  megatron's own parsed arguments the way Megatron-LM's ``pretrain_gpt.py`` does
  (``core_gpt_dataset_config_from_args``; ``--data-path [w1] p1 [w2] p2 --split``, or
  ``--train/valid/test-data-path``, ``--mock-data``, ``--data-cache-path``). Megatron-LM's script is
  not part of the megatron-core wheel, so its ~40 lines of glue are here.
- ``ShardGPTDataset``: a ``MegatronDataset`` over one split of one of OUR shard directories, so
  that megatron's ``BlendedMegatronDatasetBuilder`` blends several shard directories
  (``data.blend: [0.3, dirA, 0.7, dirB]``, ``shard_blend_datasets_provider``). Megatron has no
  dataset over pre-packed fixed-length samples: ``GPTDataset`` re-packs documents of an
  ``IndexedDataset`` itself. Its "path" is ``<shard dir>/<split>``, the analogue of a megatron
  prefix ``<dir>/<split>_text_document``. Each sample gives ``GPTDataset``'s fields (tokens,
  labels, loss_mask, position_ids, and attention_mask when asked), masks and positions made by
  megatron's own ``_get_ltor_masks_and_position_ids``; the EOD padding of the split's last sample
  is masked out of the loss. The per-epoch order is ``sample_order.SampleOrder`` (seeded, random
  access, O(shards + window) memory) instead of ``GPTDataset``'s on-disk shuffle index.

Both providers build the datasets on every rank (``is_distributed = True``, ``is_built_on_rank``
always true): our ``forward_step`` reads its own micro-batch on every TP rank and pipeline stage
(``train.forward_step``), where ``pretrain_gpt.py`` reads on TP rank 0 of the first/last stage
and broadcasts. Megatron's builder still builds on rank 0 first, so its caches are written once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    MockGPTDataset,
    _get_ltor_masks_and_position_ids,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, get_bin_path, get_idx_path
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split, get_blend_from_list

from acmoe_megatron.data.corpus import SPLITS
from acmoe_megatron.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    SplitInfo,
    read_manifest,
    token_dtype_name,
    write_bytes_atomic,
)
from acmoe_megatron.data.sample_order import SampleOrder
from acmoe_megatron.data.shard_store import ShardSamples

__all__ = [
    "MEGATRON_DATA_KEYS",
    "SIDECAR_FORMAT",
    "SIDECAR_SUFFIX",
    "ShardGPTDataset",
    "check_megatron_data",
    "check_shard_blend",
    "core_gpt_dataset_config_from_args",
    "indexed_prefix",
    "indexed_to_shards",
    "megatron_data_prefixes",
    "megatron_gpt_datasets_provider",
    "parse_shard_blend",
    "read_sidecar",
    "shard_blend_datasets_provider",
    "shards_to_indexed",
    "sidecar_path",
    "sidecar_tokenizer",
    "uses_megatron_data",
]

SIDECAR_SUFFIX = ".acmoe.json"
SIDECAR_FORMAT = "acmoe-megatron-indexed"
SIDECAR_VERSION = 1
PREFIX_SUFFIX = "_text_document"  # megatron's preprocess_data.py: <output-prefix>_text_document
DEFAULT_SAMPLES_PER_SHARD = 4096
# megatron's recipe keys that select its own datasets (indexed data or mock data)
MEGATRON_DATA_KEYS = ("data_path", "train_data_path", "valid_data_path", "test_data_path", "data_args_path",
                      "per_split_data_args_path", "mock_data")
_DOCS_PER_READ = 4096  # documents per IndexedDataset read (indexed_to_shards)


# ---------------------------------------------------------------------------------------------
# prefixes and sidecars


def indexed_prefix(out_dir: str | os.PathLike, split: str) -> str:
    """The megatron prefix of ``split`` in ``out_dir``: ``<out_dir>/<split>_text_document``."""
    return os.path.join(os.fspath(out_dir), f"{split}{PREFIX_SUFFIX}")


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(os.fspath(prefix) + SIDECAR_SUFFIX)


def read_sidecar(prefix: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of ``prefix`` (None when there is none); ``ValueError`` naming the file when it is
    not ours, or when the ``.bin`` beside it is not the one it describes (replaced since)."""
    path = sidecar_path(prefix)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != SIDECAR_FORMAT or data.get("format_version") != SIDECAR_VERSION:
            raise ValueError(f"format {data.get('format')!r} v{data.get('format_version')!r}, expected "
                             f"{SIDECAR_FORMAT!r} v{SIDECAR_VERSION}")
        for key in ("tokenizer", "seq_length", "dtype", "split", "num_tokens", "bin_bytes"):
            if key not in data:
                raise ValueError(f"no {key!r}")
        for key in ("vocab_size", "eod", "name", "hash"):
            if key not in data["tokenizer"]:
                raise ValueError(f"no tokenizer {key!r}")
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not an acmoe sidecar ({exc}); delete it, or re-create the indexed data "
                         "with `acmoe-data to-megatron`") from exc
    bin_path = Path(get_bin_path(os.fspath(prefix)))
    if bin_path.is_file() and bin_path.stat().st_size != data["bin_bytes"]:
        raise ValueError(
            f"{path} describes a {data['bin_bytes']}-byte {bin_path.name}, but {bin_path} has "
            f"{bin_path.stat().st_size} bytes (replaced since): delete the stale sidecar, or re-create "
            "both with `acmoe-data to-megatron`"
        )
    return data


def sidecar_tokenizer(prefixes: Sequence[str]) -> dict[str, Any] | None:
    """The tokenizer entry the sidecars of ``prefixes`` agree on (None when none has a sidecar);
    ``ValueError`` naming two prefixes whose tokenizers differ."""
    first, found = None, None
    for prefix in prefixes:
        data = read_sidecar(prefix)
        if data is None:
            continue
        tok = data["tokenizer"]
        if found is None:
            first, found = prefix, tok
            continue
        for key in ("hash", "vocab_size", "eod"):
            if tok[key] != found[key]:
                raise ValueError(
                    f"indexed data {prefix} was tokenized with {tok['name']!r} ({key}={tok[key]}) but {first} "
                    f"with {found['name']!r} ({key}={found[key]}): a blend needs one tokenizer; re-create one "
                    "of them with the other's tokenizer (`acmoe-data prepare --tokenizer ...` then "
                    "`acmoe-data to-megatron`)"
                )
    return found


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
    ``<out_prefix_dir>/<split>_text_document.{bin,idx}`` plus its sidecar (see the module docstring).

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
    The shards are written by ``shards.py``'s packer and shard writer, the same code ``prepare`` uses,
    so shards -> indexed -> shards (same seq_length) gives byte-identical shards and manifest.
    """
    from acmoe_megatron.data.shards import _clear_previous_dataset, write_token_blocks
    from acmoe_megatron.data.tokenizer import load_tokenizer

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


# ---------------------------------------------------------------------------------------------
# weighted lists (megatron's --data-path form, our data.blend)


def _weighted(values: Sequence[Any], what: str) -> tuple[list[str], list[float] | None]:
    """``[w1, p1, w2, p2, ...]`` or ``[p1, p2, ...]`` -> (paths, weights or None), parsed by megatron's
    ``get_blend_from_list``; ``ValueError`` naming ``what`` for malformed lists and bad weights."""
    values = [str(v) for v in values]
    if not values:
        raise ValueError(f"{what} is empty: give [weight1, path1, weight2, path2, ...] or [path1, ...]")
    try:
        paths, weights = get_blend_from_list(values)
    except AssertionError:  # megatron asserts when only some pairs have a numeric weight
        raise ValueError(f"{what}={values}: some entries have a weight and some not: write [weight1, path1, "
                         "weight2, path2, ...] (or paths only)") from None
    if weights is None:
        numeric = [p for p in paths if _is_number(p)]
        if numeric:
            raise ValueError(
                f"{what}={values}: {numeric[0]!r} looks like a weight but the list does not alternate "
                "weight, path: write [weight1, path1, weight2, path2, ...] (or paths only)"
            )
        return paths, None
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(
            f"{what}={values}: weight {bad[0]} is not a positive number; every weight must be > 0 (they are "
            "normalised to sum to 1, as megatron does): drop a source instead of weighting it 0"
        )
    return paths, weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# megatron indexed data: recipe checks and the datasets provider


def uses_megatron_data(megatron: dict[str, Any]) -> bool:
    """Whether a recipe's ``megatron`` section selects megatron's own datasets."""
    return any(megatron.get(key) not in (None, False, [], "") for key in MEGATRON_DATA_KEYS)


def megatron_data_prefixes(values: dict[str, Any] | Any) -> list[tuple[str, str]]:
    """``[(key, prefix)]`` named by megatron's data arguments (a recipe's ``megatron`` mapping or
    megatron's parsed args), every prefix checked to exist and every weight to be positive;
    ``ValueError`` naming the key, the prefix and the fix."""
    get = values.get if isinstance(values, dict) else (lambda key: getattr(values, key, None))
    lists: list[tuple[str, list]] = []
    for key in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        value = get(key)
        if value:
            lists.append((key, value if isinstance(value, (list, tuple)) else [value]))
    if get("data_args_path"):
        lists.append(("data_args_path", Path(get("data_args_path")).read_text().split()))
    if get("per_split_data_args_path"):
        per_split = json.loads(Path(get("per_split_data_args_path")).read_text())
        for split in ("train", "valid", "test"):
            value = per_split.get(split)
            if value:
                lists.append((f"per_split_data_args_path[{split}]", value.split() if isinstance(value, str) else value))
    found = []
    for key, value in lists:
        paths, _ = _weighted(value, f"megatron.{key}")
        for prefix in paths:
            if not IndexedDataset.exists(prefix):
                raise ValueError(
                    f"megatron.{key}: prefix {prefix} has no {Path(get_bin_path(prefix)).name} + "
                    f"{Path(get_idx_path(prefix)).name}; give the path without .bin/.idx, or make the files "
                    f"with `acmoe-data to-megatron SHARD_DIR --out {Path(prefix).parent}` (or megatron's "
                    "preprocess_data.py)"
                )
            found.append((key, prefix))
    return found


def check_megatron_data(args, tokenizer=None) -> dict[str, Any] | None:
    """Before megatron's builder (whose errors are asserts): the prefixes exist, the weights are
    positive, the sidecars agree on one tokenizer and that tokenizer is megatron's (``vocab_size``,
    ``eod``). Returns the sidecars' tokenizer entry (None without sidecars)."""
    if getattr(args, "sft", False):
        raise ValueError("megatron.sft: our forward_step trains on GPT batches; SFT datasets need "
                         "pretrain_gpt.py's SFT path: leave sft out")
    prefixes = [p for _, p in megatron_data_prefixes(args)]
    tok = sidecar_tokenizer(prefixes)
    if tok is not None and tokenizer is not None:
        if tokenizer.vocab_size != tok["vocab_size"]:
            raise ValueError(
                f"the indexed data {prefixes[0]} was tokenized with {tok['name']!r} (vocab_size "
                f"{tok['vocab_size']}) but megatron's tokenizer has vocab_size {tokenizer.vocab_size}: set "
                f"megatron.vocab_size: {tok['vocab_size']} (NullTokenizer) or the tokenizer that made the data"
            )
        if getattr(tokenizer, "eod", tok["eod"]) != tok["eod"]:
            raise ValueError(
                f"the indexed data {prefixes[0]} ends documents with EOD {tok['eod']} but megatron's tokenizer "
                f"says eod {tokenizer.eod}: set megatron.null_tokenizer_eod_id: {tok['eod']} (NullTokenizer) or "
                "use the tokenizer that made the data"
            )
    return tok


def is_dataset_built_on_rank(vp_stage=None) -> bool:
    """Every rank builds the datasets: our forward_step reads its micro-batch on every TP rank and
    pipeline stage (see the module docstring)."""
    return True


def core_gpt_dataset_config_from_args(args, tokenizer, **overrides) -> GPTDatasetConfig:
    """megatron's ``GPTDatasetConfig`` from its parsed arguments, as Megatron-LM's
    ``pretrain_gpt.core_gpt_dataset_config_from_args`` builds it (``overrides`` replace fields)."""
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if getattr(args, "per_dataset_sequences_path", None) is not None:
        sequences_per_dataset = json.loads(Path(args.per_dataset_sequences_path).read_text())
    data_args = {
        "random_seed": args.seed,
        "sequence_length": args.seq_length,
        "blend": blend,
        "blend_per_split": blend_per_split,
        "split": args.split,
        "multiple_validation_sets": args.multiple_validation_sets,
        "full_validation": args.full_validation,
        "num_dataset_builder_threads": args.num_dataset_builder_threads,
        "path_to_cache": args.data_cache_path,
        "mmap_bin_files": args.mmap_bin_files,
        "tokenizer": tokenizer,
        "reset_position_ids": args.reset_position_ids,
        "reset_attention_mask": args.reset_attention_mask,
        "eod_mask_loss": args.eod_mask_loss,
        "create_attention_mask": args.create_attention_mask_in_dataloader,
        "object_storage_cache_path": args.object_storage_cache_path,
        "mid_level_dataset_surplus": args.mid_level_dataset_surplus,
        "allow_ambiguous_pad_tokens": args.allow_ambiguous_pad_tokens,
        "fast_cache_load": args.dataloader_fast_cache_load,
        "sequences_per_dataset": sequences_per_dataset,
        "defer_npy_index_mmap": args.dataloader_defer_npy_index_mmap,
    } | overrides
    if getattr(args, "fim_data", False):
        from megatron.training.datasets.fim_dataset import GPTFIMDatasetConfig

        extra_tokens = {"prefix": args.fim_prefix_token, "middle": args.fim_middle_token,
                        "suffix": args.fim_suffix_token, "pad": args.fim_pad_token, "eod": args.fim_eod_token}
        return GPTFIMDatasetConfig(**data_args, fim_rate=args.fim_rate, fim_spm_rate=args.fim_spm_rate,
                                   fim_extra_tokens=extra_tokens, fim_split_sample=args.fim_split_sample,
                                   fim_fragment_rate=args.fim_fragment_rate, fim_no_prefix=args.fim_no_prefix)
    return GPTDatasetConfig(**data_args)


def megatron_gpt_datasets_provider(train_val_test_num_samples, vp_stage=None, *, args=None, tokenizer=None):
    """``pretrain``'s ``train_valid_test_datasets_provider`` over megatron indexed data (or
    ``--mock-data``): megatron's ``BlendedMegatronDatasetBuilder`` of ``GPTDataset`` (``MockGPTDataset``,
    ``GPTFIMDataset`` with ``--fim-data``), configured from megatron's parsed arguments and global
    tokenizer (``args``/``tokenizer`` replace them, for tests). Use with ``dataloader_type`` single
    or cyclic."""
    if args is None:
        from megatron.training import get_args

        args = get_args()
    if tokenizer is None:
        from megatron.training import get_tokenizer

        tokenizer = get_tokenizer()
    check_megatron_data(args, tokenizer)
    config = core_gpt_dataset_config_from_args(args, tokenizer)
    if args.mock_data:
        cls = MockGPTDataset
    elif getattr(args, "fim_data", False):
        from megatron.training.datasets.fim_dataset import GPTFIMDataset

        cls = GPTFIMDataset
    else:
        cls = GPTDataset
    return BlendedMegatronDatasetBuilder(cls, train_val_test_num_samples, is_dataset_built_on_rank, config).build()


megatron_gpt_datasets_provider.is_distributed = True  # built on every rank (module docstring)


# ---------------------------------------------------------------------------------------------
# our shard directories through megatron's blending


def _shard_path(path: str) -> tuple[Path, str]:
    """``<shard dir>/<split>`` -> (shard dir, split)."""
    p = Path(path)
    if p.name not in SPLITS or not (p.parent / MANIFEST_NAME).is_file():
        raise ValueError(
            f"ShardGPTDataset path {path!r} must be <shard dir>/<split>: a directory holding {MANIFEST_NAME} "
            f"and one of its splits {SPLITS} (e.g. data/stdlib_s256/train)"
        )
    return p.parent, p.name


class ShardGPTDataset(MegatronDataset):
    """One split of one of our shard directories as a megatron ``MegatronDataset`` (module docstring).

    Built by ``BlendedMegatronDatasetBuilder(ShardGPTDataset, sizes, is_built_on_rank, config)`` from
    paths ``<shard dir>/<split>`` (``config.blend_per_split``, or ``config.blend`` + ``split`` to carve
    one split's samples the way megatron carves a prefix's). Item ``i`` is sample
    ``sample_id(i)`` of the split: epoch ``i // n`` of the ``n`` samples of ``indices``, a seeded
    permutation per epoch (``config.random_seed``). ``num_samples`` beyond ``n`` adds epochs.
    """

    def __init__(self, dataset: ShardSamples, dataset_path: str | None, indices: np.ndarray,
                 num_samples: int | None, index_split: Split, config: GPTDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        manifest = dataset.manifest
        if config.sequence_length != manifest.seq_length:
            raise ValueError(
                f"{dataset.dir} holds samples of seq_length {manifest.seq_length} but the model uses "
                f"{config.sequence_length}: set megatron.seq_length: {manifest.seq_length} or re-run "
                f"`acmoe-data prepare --seq-length {config.sequence_length}` for it"
            )
        if not config.add_extra_token_to_sequence:
            raise ValueError("ShardGPTDataset samples hold seq_length + 1 tokens (inputs and shifted labels): "
                             "add_extra_token_to_sequence must stay true")
        indices = np.asarray(indices, dtype=np.int64)
        self.n = len(indices)
        if self.n == 0:
            raise ValueError(f"{dataset_path}: the {index_split.name} part of split {dataset.split!r} has no "
                             f"samples; prepare more data or give that split a larger share")
        self.num_epochs = max(1, -(-num_samples // self.n)) if num_samples else 1
        self.eod = int(manifest.tokenizer["eod"])
        self._last = dataset.info.num_samples - 1
        self._last_real = dataset.info.sample_length(self._last, manifest.sample_length)
        if self.n == int(indices[-1]) - int(indices[0]) + 1 and np.all(np.diff(indices) == 1):
            # a contiguous range (what the builder passes): shuffle by shards, as TokenBatches does
            start = int(indices[0])
            edges = np.clip(dataset.starts, start, start + self.n) - start
            sizes = np.diff(edges)
            self._order = SampleOrder(sizes[sizes > 0], config.random_seed, shuffle=True)
            self._base, self._map = start, None
        else:
            self._order = SampleOrder([self.n], config.random_seed, shuffle=True)
            self._base, self._map = 0, indices
        self._cacheable = not any([config.reset_position_ids, config.reset_attention_mask, config.eod_mask_loss])
        self._cached = None

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: ShardSamples) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig) -> ShardSamples:
        shard_dir, split = _shard_path(dataset_path)
        return ShardSamples(shard_dir, split)

    def __len__(self) -> int:
        return self.num_epochs * self.n

    def sample_id(self, idx: int) -> int:
        """The split-level sample index of item ``idx``."""
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range [0, {len(self)})")
        epoch, position = divmod(int(idx), self.n)
        local = int(self._order.ids(epoch, np.array([position]))[0])
        return int(self._map[local]) if self._map is not None else self._base + local

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        sid = self.sample_id(0 if idx is None else idx)
        text = torch.from_numpy(self.dataset.read(np.array([sid]))[0].astype(np.int64))
        tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        config = self.config
        if self._cacheable and self._cached is not None:
            attention_mask, loss_mask, position_ids = self._cached
            loss_mask = loss_mask.clone()
        else:
            attention_mask, loss_mask, position_ids = _get_ltor_masks_and_position_ids(
                tokens, self.eod, config.reset_position_ids, config.reset_attention_mask, config.eod_mask_loss,
                config.create_attention_mask,
            )
            if self._cacheable:
                self._cached = (attention_mask, loss_mask.clone(), position_ids)
        if sid == self._last and self._last_real < len(text):
            loss_mask[self._last_real - 1:] = 0.0  # label j = text[j + 1] is EOD padding from j = real - 1
        # as GPTDataset: labels equal to the tokenizer's pad id are not trained on
        loss_mask[labels == self._pad_token_id] = 0.0
        tokens[tokens == self._pad_token_id] = 0
        labels[labels == self._pad_token_id] = 0
        if idx is None:  # megatron's batch-padding sample
            loss_mask = torch.zeros_like(loss_mask)
        sample = {"tokens": tokens, "labels": labels}
        if config.create_attention_mask:
            sample["attention_mask"] = attention_mask
        sample["loss_mask"] = loss_mask
        sample["position_ids"] = position_ids
        return sample


def parse_shard_blend(values: Sequence[Any], what: str = "data.blend") -> tuple[list[str], list[float]]:
    """``[w1, dir1, w2, dir2, ...]`` -> (dirs, weights): weights positive numbers (normalised, as
    megatron does), every directory a shard directory; ``ValueError`` naming the entry and the fix."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{what}={values!r}: give a list [weight1, dir1, weight2, dir2, ...]")
    if len(values) % 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values[0::2]) \
            or any(not isinstance(v, str) for v in values[1::2]):
        raise ValueError(f"{what}={list(values)}: write [weight1, dir1, weight2, dir2, ...], a positive number "
                         "before each shard directory")
    dirs, weights = _weighted(values, what)
    for d in dirs:
        if not (Path(d) / MANIFEST_NAME).is_file():
            raise ValueError(f"{what}: {d} is not a shard directory (no {MANIFEST_NAME}); build it with "
                             f"`acmoe-data prepare --out {d} ...` or `acmoe-data from-megatron PREFIX --out {d} ...`")
    return dirs, weights


def check_shard_blend(dirs: Sequence[str]) -> Manifest:
    """The manifests of the blended directories agree on tokenizer, seq_length and dtype (one model
    reads them all); ``ValueError`` naming the two directories, the field and the fix. Returns the
    first manifest."""
    first = read_manifest(dirs[0])
    for d in dirs[1:]:
        other = read_manifest(d)
        for field, a, b in (("tokenizer hash", first.tokenizer["hash"], other.tokenizer["hash"]),
                            ("vocab_size", first.tokenizer["vocab_size"], other.tokenizer["vocab_size"]),
                            ("eod", first.tokenizer["eod"], other.tokenizer["eod"]),
                            ("seq_length", first.seq_length, other.seq_length),
                            ("dtype", first.dtype, other.dtype)):
            if a != b:
                raise ValueError(
                    f"data.blend: {d} has {field} {b} (tokenizer {other.tokenizer['name']!r}) but {dirs[0]} has "
                    f"{a} (tokenizer {first.tokenizer['name']!r}): blended directories must share one tokenizer "
                    f"and seq_length; re-run `acmoe-data prepare` for {d} with the tokenizer and --seq-length of "
                    f"{dirs[0]}"
                )
    return first


def shard_blend_config(args, tokenizer, dirs: Sequence[str], weights: Sequence[float] | None,
                       sizes: Sequence[int | None], seed: int | None = None) -> GPTDatasetConfig:
    """megatron's ``GPTDatasetConfig`` for a blend of our directories: ``blend_per_split`` of the
    ``<dir>/<split>`` paths (each directory brings its own train/valid/test), the rest from megatron's
    arguments. A split is left out (None) when megatron asks 0 samples of it, and the test split when
    a directory has none (as our shard provider, which never builds test); a missing valid split
    that evaluation needs is an error."""
    if getattr(args, "fim_data", False):
        raise ValueError("megatron.fim_data re-arranges documents, which our packed shard samples no longer have: "
                         "convert the directories with `acmoe-data to-megatron` and give megatron.data_path")
    manifests = [read_manifest(d) for d in dirs]
    blend_per_split = []
    for i, split in enumerate(SPLITS):
        lacking = [d for d, m in zip(dirs, manifests) if not m.splits.get(split) or not m.splits[split].num_samples]
        if sizes[i] == 0 or (lacking and split == "test"):
            blend_per_split.append(None)
            continue
        if lacking:
            fix = "megatron.eval_iters: 0" if split == "valid" else "megatron.skip_train or more data"
            raise ValueError(f"data.blend: {lacking[0]} has no {split} samples, which megatron asks for; prepare "
                             f"that directory with a {split} split, or set {fix}")
        # megatron: weights need a requested size; without one (full validation) blend by length
        blend_per_split.append(([f"{d}/{split}" for d in dirs], list(weights) if sizes[i] is not None else None))
    return core_gpt_dataset_config_from_args(
        args, tokenizer, blend=None, blend_per_split=blend_per_split, split=None,
        random_seed=args.seed if seed is None else seed, sequences_per_dataset=None,
        fast_cache_load=False, defer_npy_index_mmap=False,
    )


def shard_blend_datasets_provider(blend: Sequence[Any], seed: int | None = None):
    """``pretrain``'s datasets provider for ``data.blend: [w1, dir1, w2, dir2, ...]``: megatron's
    ``BlendedMegatronDatasetBuilder`` of ``ShardGPTDataset`` (each directory's own splits), with
    megatron's samplers (``dataloader_type`` single or cyclic). ``seed``: the shuffle seed (default
    megatron's ``--seed``)."""
    dirs, weights = parse_shard_blend(blend)
    check_shard_blend(dirs)

    def provider(train_val_test_num_samples, vp_stage=None, *, args=None, tokenizer=None):
        if args is None:
            from megatron.training import get_args

            args = get_args()
        if tokenizer is None:
            from megatron.training import get_tokenizer

            tokenizer = get_tokenizer()
        config = shard_blend_config(args, tokenizer, dirs, weights, train_val_test_num_samples, seed)
        return BlendedMegatronDatasetBuilder(ShardGPTDataset, list(train_val_test_num_samples),
                                             is_dataset_built_on_rank, config).build()

    provider.is_distributed = True  # built on every rank (module docstring)
    return provider
