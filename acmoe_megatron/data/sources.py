"""Turn a source name from the command line into a corpus.

``"stdlib"`` is the embedded standard-library corpus; anything else is a directory, a file or a
glob of plain-text files. Other formats (jsonl, parquet, HF datasets) are not supported yet.
"""

from __future__ import annotations

from acmoe_megatron.data.corpus import FileCorpus
from acmoe_megatron.data.stdlib_corpus import stdlib_corpus
from acmoe_megatron.data.text_corpus import text_files_corpus

__all__ = ["resolve_source"]

_UNSUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".gz", ".zst", ".tar")


def resolve_source(
    source: str | FileCorpus,
    valid_fraction: float = 0.02,
    test_fraction: float = 0.02,
    max_bytes: int | None = None,
) -> FileCorpus:
    """Return the corpus for ``source``: a ``FileCorpus`` (returned as is), "stdlib", or a path/glob."""
    if isinstance(source, FileCorpus):
        return source
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be 'stdlib' or a path/glob of text files, got {source!r}")
    if source == "stdlib":
        return stdlib_corpus(valid_fraction, test_fraction, max_bytes)
    if source.lower().endswith(_UNSUPPORTED_SUFFIXES):
        raise ValueError(
            f"source {source!r} looks like a {source.rsplit('.', 1)[-1]} file; only 'stdlib' and "
            "plain-text files (a directory, file or glob) are supported so far. Convert it to text "
            "files first."
        )
    try:
        return text_files_corpus(source, valid_fraction, test_fraction, max_bytes)
    except FileNotFoundError as exc:
        raise ValueError(f"unknown source {source!r}: {exc}") from exc
