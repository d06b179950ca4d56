"""Turn a ``--source`` (and ``--format``) from the command line into a corpus.

Formats (``--format auto`` detects them from the name):
- ``stdlib``: the embedded standard-library corpus (``--source stdlib``);
- ``enwik8``: ``enwik8.zip`` or the extracted ``enwik8`` file (fixed 90M/5M/5M byte splits);
- ``wikitext``: a directory holding ``wiki.{train,valid,test}.raw`` (or ``.tokens``);
- ``jsonl``: ``*.jsonl`` / ``*.jsonl.gz`` files (``--text-field``, default "text");
- ``parquet``: ``*.parquet`` files (``--text-field``);
- ``text``: plain-text files (a directory, a file or a glob);
- ``synthetic``: ``synthetic:SIZE`` (e.g. ``synthetic:2G``), seeded random bytes for scale tests.
Auto-detection looks at the file names: a directory or glob whose files are all JSONL (or all
Parquet) is read as such; one that mixes such files with others, and single files of other
structured formats (.json, .arrow, .tar, .zip, .gz, .zst), are refused rather than tokenized as
text. Pass ``--format`` to override. enwik8 and WikiText come with fixed splits, so split
fractions are refused for them.
"""

from __future__ import annotations

import glob
import os

from acmoe_megatron.data.corpora.corpus import Corpus
from acmoe_megatron.data.corpora.enwik8 import Enwik8Corpus
from acmoe_megatron.data.corpora.jsonl import JSONL_SUFFIXES, JsonlCorpus
from acmoe_megatron.data.corpora.parquet import PARQUET_SUFFIXES, ParquetCorpus
from acmoe_megatron.data.corpora.stdlib import stdlib_corpus
from acmoe_megatron.data.corpora.synthetic import parse_synthetic
from acmoe_megatron.data.corpora.text import select_files, text_files_corpus
from acmoe_megatron.data.corpora.wikitext import WikiTextCorpus, is_wikitext_dir

__all__ = ["FORMATS", "detect_format", "resolve_source"]

FORMATS = ("auto", "stdlib", "text", "jsonl", "parquet", "enwik8", "wikitext", "synthetic")
_UNSUPPORTED_SUFFIXES = (".json", ".arrow", ".gz", ".zst", ".tar", ".zip", ".npy", ".bin")
_DEFAULT_FRACTIONS = (0.02, 0.02)


def _structured_kind(name: str) -> str | None:
    name = name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_UNSUPPORTED_SUFFIXES):
        return name.rsplit(".", 1)[-1]
    return None


def detect_format(source: str) -> str:
    """The format ``--format auto`` picks for ``source`` (see the module docstring)."""
    if source == "stdlib":
        return "stdlib"
    if source.startswith("synthetic:"):
        return "synthetic"
    base = os.path.basename(source.rstrip("/")).lower()
    if base in ("enwik8", "enwik8.zip") and not os.path.isdir(source):
        return "enwik8"
    if is_wikitext_dir(source):
        return "wikitext"
    if not glob.has_magic(source) and not os.path.isdir(source):
        kind = _structured_kind(base)
        if kind in (None, "jsonl", "parquet"):
            return kind or "text"
        raise ValueError(
            f"source {source!r} looks like a .{kind} file, which acmoe-data does not read; supported "
            "are plain text, JSONL (.jsonl[.gz]), Parquet, enwik8 and WikiText. Convert it, or pass "
            "--format text if it really is plain text"
        )
    _, relpaths = select_files(source)
    kinds = {_structured_kind(rel) for rel in relpaths}
    if len(kinds) == 1 and kinds <= {"jsonl", "parquet"}:
        return kinds.pop()
    if kinds == {None}:
        return "text"
    examples = sorted({rel for rel in relpaths if _structured_kind(rel) is not None})[:3]
    raise ValueError(
        f"source {source!r} mixes plain files with structured ones (e.g. {examples}); select one "
        "kind with a glob such as 'DIR/**/*.jsonl' or 'DIR/**/*.txt', or pass --format"
    )


def resolve_source(
    source: str | Corpus,
    valid_fraction: float | None = None,
    test_fraction: float | None = None,
    max_bytes: int | None = None,
    *,
    source_format: str = "auto",
    text_field: str = "text",
) -> Corpus:
    """Return the corpus for ``source``: a corpus object (returned as is), "stdlib", or a path/glob.

    Split fractions default to 2 % valid and 2 % test for hash-split sources; giving them for
    enwik8/WikiText (fixed splits) is an error. Missing inputs raise ``ValueError`` naming them.
    """
    if not isinstance(source, str) and isinstance(source, Corpus):
        return source
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be 'stdlib' or a path/glob, got {source!r}")
    if source_format not in FORMATS:
        raise ValueError(f"unknown format {source_format!r}; expected one of {FORMATS}")
    try:
        fmt = detect_format(source) if source_format == "auto" else source_format
        if fmt in ("enwik8", "wikitext"):
            if valid_fraction is not None or test_fraction is not None:
                raise ValueError(
                    f"{fmt} has fixed train/valid/test splits; drop --valid-fraction/--test-fraction"
                )
            return Enwik8Corpus(source, max_bytes) if fmt == "enwik8" else WikiTextCorpus(source, max_bytes)
        if fmt == "synthetic":
            if valid_fraction is not None or test_fraction is not None:
                raise ValueError("synthetic sources have fixed splits (valid/test: 1 % of train each); "
                                 "drop --valid-fraction/--test-fraction")
            return parse_synthetic(source, max_bytes)
        vf = _DEFAULT_FRACTIONS[0] if valid_fraction is None else valid_fraction
        tf = _DEFAULT_FRACTIONS[1] if test_fraction is None else test_fraction
        if fmt == "stdlib":
            return stdlib_corpus(vf, tf, max_bytes)
        if fmt == "jsonl":
            return JsonlCorpus(source, text_field, vf, tf, max_bytes)
        if fmt == "parquet":
            return ParquetCorpus(source, text_field, vf, tf, max_bytes)
        return text_files_corpus(source, vf, tf, max_bytes)
    except FileNotFoundError as exc:
        raise ValueError(f"unknown source {source!r}: {exc}") from exc
