"""Megatron prefixes and the acmoe sidecar next to each: what a ``.bin/.idx`` pair cannot record.

- A split ``S`` of a shard directory becomes the megatron prefix ``<out>/S_text_document``
  (``indexed_prefix``; megatron's ``preprocess_data.py`` names its output ``<output-prefix>_text_document``).
  ``get_bin_path``/``get_idx_path``/``indexed_exists`` are megatron's ``get_bin_path``/``get_idx_path``/
  ``IndexedDataset.exists`` (``<prefix>.bin`` and ``<prefix>.idx``, both present; object-storage
  prefixes, ``s3://`` and ``msc://``, are left to megatron's own check).
- A JSON sidecar ``<prefix>.acmoe.json`` next to each prefix records what the ``.bin/.idx`` cannot:
  the tokenizer of our manifest (name, hash, vocab_size, eod), seq_length, dtype, the samples per
  shard, the split's document/text-byte/token/sample counts, the source and corruption
  descriptions. ``convert.shards_to_indexed`` writes it; ``from-megatron`` (``convert.indexed_to_shards``)
  and the launch checks (``megatron_args.build_argv``) read it; it is why shards -> indexed -> shards
  gives byte-identical shards and manifest (the manifest's ``source``, ``num_documents`` and
  ``num_text_bytes`` describe the text, which tokens do not determine; the sidecar carries them over).

Imports neither torch nor megatron: the launch checks read the sidecars before megatron is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PREFIX_SUFFIX",
    "SIDECAR_FORMAT",
    "SIDECAR_SUFFIX",
    "SIDECAR_VERSION",
    "get_bin_path",
    "get_idx_path",
    "indexed_exists",
    "indexed_prefix",
    "read_sidecar",
    "sidecar_path",
    "sidecar_tokenizer",
]

SIDECAR_SUFFIX = ".acmoe.json"
SIDECAR_FORMAT = "acmoe-megatron-indexed"
SIDECAR_VERSION = 1
PREFIX_SUFFIX = "_text_document"  # megatron's preprocess_data.py: <output-prefix>_text_document
_OBJECT_STORAGE_PREFIXES = ("s3://", "msc://")  # megatron's S3_PREFIX, MSC_PREFIX


def indexed_prefix(out_dir: str | os.PathLike, split: str) -> str:
    """The megatron prefix of ``split`` in ``out_dir``: ``<out_dir>/<split>_text_document``."""
    return os.path.join(os.fspath(out_dir), f"{split}{PREFIX_SUFFIX}")


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(os.fspath(prefix) + SIDECAR_SUFFIX)


def get_bin_path(prefix: str) -> str:
    """The ``.bin`` of a megatron prefix (as megatron's ``get_bin_path``)."""
    return prefix + ".bin"


def get_idx_path(prefix: str) -> str:
    """The ``.idx`` of a megatron prefix (as megatron's ``get_idx_path``)."""
    return prefix + ".idx"


def indexed_exists(prefix: str) -> bool:
    """Whether megatron indexed data exists at ``prefix`` (megatron's ``IndexedDataset.exists``): both
    files on disk; an object-storage prefix (``s3://``, ``msc://``) is asked of megatron, whose clients
    read it."""
    if prefix.startswith(_OBJECT_STORAGE_PREFIXES):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        return IndexedDataset.exists(prefix)
    return os.path.exists(get_idx_path(prefix)) and os.path.exists(get_bin_path(prefix))


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
