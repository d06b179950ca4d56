"""Data path of acmoe_megatron: corpora -> tokens -> webdataset shards -> Megatron batches.

- ``prepare`` writes a corpus ("stdlib" by default; text, JSONL, Parquet, enwik8, WikiText) as
  fixed-length token samples in webdataset tar shards with a ``manifest.json``, tokenized
  byte-level or with a local Hugging Face ``tokenizer.json``, optionally with word-swap corrupted
  eval splits (CLI: ``acmoe-data prepare``; guide: docs/data.md).
- ``TokenBatches`` reads them back as deterministic, exactly resumable micro-batches for one
  data-parallel replica (and dataloader worker: ``loader.workers.make_dataloader``).
- ``check_manifest_matches`` compares a manifest with the model configuration.

Sub-packages, by job: ``corpora`` (corpus readers, the ``--source`` registry, eval-split
corruption), ``tokenizers`` (byte-level and Hugging Face), ``shards`` (the shard directory format,
its writer, index, reader and remote shards), ``loader`` (``TokenBatches``, its sample order, its
DataLoader workers) and ``megatron`` (megatron's indexed data, blending, the converter and the
datasets providers of megatron's ``pretrain``).

The names below are imported on first use (PEP 562 ``__getattr__``): importing a light module of
this package (``megatron.keys``, ``shards.remote``, ...) does not import torch, which only
``TokenBatches`` and the DataLoader workers need. Modules that need optional libraries
(``tokenizers.hf``: tokenizers; ``corpora.parquet``: pyarrow) import them only when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from acmoe_megatron.core.errors import ShardError

if TYPE_CHECKING:
    from acmoe_megatron.data.corpora.corpus import SPLITS, Corpus, Document, FileCorpus, split_of
    from acmoe_megatron.data.corpora.corrupt import Corruption, parse_corruption
    from acmoe_megatron.data.corpora.enwik8 import Enwik8Corpus
    from acmoe_megatron.data.corpora.jsonl import JsonlCorpus
    from acmoe_megatron.data.corpora.parquet import ParquetCorpus
    from acmoe_megatron.data.corpora.sources import resolve_source
    from acmoe_megatron.data.corpora.stdlib import stdlib_corpus, stdlib_documents
    from acmoe_megatron.data.corpora.text import text_files_corpus
    from acmoe_megatron.data.corpora.wikitext import WikiTextCorpus
    from acmoe_megatron.data.loader.batches import TokenBatches
    from acmoe_megatron.data.loader.workers import TokenBatchDataset, make_dataloader
    from acmoe_megatron.data.shards.manifest import (
        Manifest,
        ShardInfo,
        SplitInfo,
        check_manifest_matches,
        read_manifest,
    )
    from acmoe_megatron.data.shards.store import load_split_samples
    from acmoe_megatron.data.shards.writer import pack_blocks, prepare
    from acmoe_megatron.data.tokenizers.byte import ByteTokenizer, load_tokenizer

__all__ = [
    "SPLITS",
    "ByteTokenizer",
    "Corpus",
    "Corruption",
    "Document",
    "Enwik8Corpus",
    "FileCorpus",
    "JsonlCorpus",
    "Manifest",
    "ParquetCorpus",
    "ShardError",
    "ShardInfo",
    "SplitInfo",
    "TokenBatchDataset",
    "TokenBatches",
    "WikiTextCorpus",
    "check_manifest_matches",
    "load_split_samples",
    "load_tokenizer",
    "make_dataloader",
    "pack_blocks",
    "parse_corruption",
    "prepare",
    "read_manifest",
    "resolve_source",
    "split_of",
    "stdlib_corpus",
    "stdlib_documents",
    "text_files_corpus",
]

# public name -> the module that defines it (imported by ``__getattr__`` on first use)
_EXPORTS = {
    **dict.fromkeys(("SPLITS", "Corpus", "Document", "FileCorpus", "split_of"), "corpora.corpus"),
    **dict.fromkeys(("Corruption", "parse_corruption"), "corpora.corrupt"),
    "Enwik8Corpus": "corpora.enwik8",
    "JsonlCorpus": "corpora.jsonl",
    "ParquetCorpus": "corpora.parquet",
    "resolve_source": "corpora.sources",
    **dict.fromkeys(("stdlib_corpus", "stdlib_documents"), "corpora.stdlib"),
    "text_files_corpus": "corpora.text",
    "WikiTextCorpus": "corpora.wikitext",
    "TokenBatches": "loader.batches",
    **dict.fromkeys(("TokenBatchDataset", "make_dataloader"), "loader.workers"),
    **dict.fromkeys(("Manifest", "ShardInfo", "SplitInfo", "check_manifest_matches", "read_manifest"),
                    "shards.manifest"),
    "load_split_samples": "shards.store",
    **dict.fromkeys(("pack_blocks", "prepare"), "shards.writer"),
    **dict.fromkeys(("ByteTokenizer", "load_tokenizer"), "tokenizers.byte"),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
