"""Data path of acmoe_megatron: text corpora -> byte tokens -> webdataset shards -> Megatron batches.

- ``prepare`` writes a corpus ("stdlib" by default, or text files) as fixed-length token samples
  in webdataset tar shards with a ``manifest.json`` (CLI: ``acmoe-data prepare``).
- ``TokenBatches`` reads them back as deterministic, exactly resumable micro-batches for one
  data-parallel replica.
"""

from acmoe_megatron.data.corpus import SPLITS, Document, FileCorpus, split_of
from acmoe_megatron.data.loader import ShardError, TokenBatches, load_split_samples
from acmoe_megatron.data.manifest import Manifest, ShardInfo, SplitInfo, read_manifest
from acmoe_megatron.data.shards import pack_blocks, prepare
from acmoe_megatron.data.sources import resolve_source
from acmoe_megatron.data.stdlib_corpus import stdlib_corpus, stdlib_documents
from acmoe_megatron.data.text_corpus import text_files_corpus
from acmoe_megatron.data.tokenizer import ByteTokenizer

__all__ = [
    "SPLITS",
    "ByteTokenizer",
    "Document",
    "FileCorpus",
    "Manifest",
    "ShardError",
    "ShardInfo",
    "SplitInfo",
    "TokenBatches",
    "load_split_samples",
    "pack_blocks",
    "prepare",
    "read_manifest",
    "resolve_source",
    "split_of",
    "stdlib_corpus",
    "stdlib_documents",
    "text_files_corpus",
]
