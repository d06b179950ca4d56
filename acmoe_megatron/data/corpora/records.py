"""Corpora of records (JSONL lines, Parquet rows): one document per record, hash-split per record.

A record's key is ``"<relative path>:<record number>"`` (the 1-based line number in a JSONL file,
the 0-based row index in a Parquet file). Its split is ``corpus.split_of(key)``, so one big file
is split record by record, and a record's split never depends on other files. Files are read in
sorted path order and records in file order. ``max_bytes`` caps each split at a prefix of its
records (UTF-8 bytes of their text, whole records). Subclasses only implement ``records(path)``.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from acmoe_megatron.data.corpora.corpus import Document, check_fractions, check_max_bytes, check_split, split_of
from acmoe_megatron.data.corpora.text import select_files

__all__ = ["RecordCorpus"]


class RecordCorpus(abc.ABC):
    """Base class: files named by a path/directory/glob, each a sequence of text records."""

    kind = "records"
    suffixes: tuple[str, ...] = ()

    def __init__(
        self,
        spec: str | os.PathLike,
        text_field: str = "text",
        valid_fraction: float = 0.02,
        test_fraction: float = 0.02,
        max_bytes: int | None = None,
    ):
        check_fractions(valid_fraction, test_fraction)
        if not text_field:
            raise ValueError(f"text_field must name the field holding the text, got {text_field!r}")
        check_max_bytes(max_bytes)
        self.spec = os.fspath(spec)
        self.root, relpaths = select_files(self.spec, self.suffixes, self.kind)
        self.relpaths = tuple(sorted(relpaths))
        self.text_field = text_field
        self.valid_fraction, self.test_fraction, self.max_bytes = valid_fraction, test_fraction, max_bytes

    @abc.abstractmethod
    def records(self, path: Path) -> Iterator[tuple[int, str]]:
        """Yield ``(record number, text)`` for every record of one file, in file order."""

    def documents(self, split: str) -> Iterator[Document]:
        check_split(split)
        total = 0
        for rel in self.relpaths:
            for number, text in self.records(self.root / rel):
                key = f"{rel}:{number}"
                if split_of(key, self.valid_fraction, self.test_fraction) != split:
                    continue
                if self.max_bytes is not None:
                    size = len(text.encode("utf-8"))
                    if total + size > self.max_bytes:
                        return
                    total += size
                yield Document(key, text)

    def num_bytes(self, split: str) -> int | None:
        return None  # unknown without reading every record

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "spec": self.spec,
            "root": str(self.root),
            "num_files": len(self.relpaths),
            "text_field": self.text_field,
            "valid_fraction": self.valid_fraction,
            "test_fraction": self.test_fraction,
            "max_bytes": self.max_bytes,
            "split_key": "relative_path:record_number",
        }
