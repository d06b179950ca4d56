"""Data path of acmoe_megatron: corpora -> tokens -> webdataset shards -> Megatron batches.

- ``prepare`` writes a corpus ("stdlib" by default; text, JSONL, Parquet, enwik8, WikiText) as
  fixed-length token samples in webdataset tar shards with a ``manifest.json``, tokenized
  byte-level or with a local Hugging Face ``tokenizer.json``, optionally with word-swap corrupted
  eval splits (CLI: ``acmoe-data prepare``; guide: docs/data.md).
- ``TokenBatches`` reads them back as deterministic, exactly resumable micro-batches for one
  data-parallel replica (and dataloader worker: ``worker_loader.make_dataloader``).
- ``check_manifest_matches`` compares a manifest with the model configuration.

Modules that need optional libraries (``hf_tokenizer``: tokenizers; ``parquet_corpus``: pyarrow)
import them only when used.
"""

from acmoe_megatron.core.errors import ShardError
from acmoe_megatron.data.corpus import SPLITS, Corpus, Document, FileCorpus, split_of
from acmoe_megatron.data.corrupt import Corruption, parse_corruption
from acmoe_megatron.data.enwik8 import Enwik8Corpus
from acmoe_megatron.data.jsonl_corpus import JsonlCorpus
from acmoe_megatron.data.loader import TokenBatches, load_split_samples
from acmoe_megatron.data.manifest import Manifest, ShardInfo, SplitInfo, check_manifest_matches, read_manifest
from acmoe_megatron.data.parquet_corpus import ParquetCorpus
from acmoe_megatron.data.shards import pack_blocks, prepare
from acmoe_megatron.data.sources import resolve_source
from acmoe_megatron.data.stdlib_corpus import stdlib_corpus, stdlib_documents
from acmoe_megatron.data.text_corpus import text_files_corpus
from acmoe_megatron.data.tokenizer import ByteTokenizer, load_tokenizer
from acmoe_megatron.data.wikitext import WikiTextCorpus
from acmoe_megatron.data.worker_loader import TokenBatchDataset, make_dataloader

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
