"""WikiText-103 (or -2) from its token files: ``wiki.{train,valid,test}.raw`` or ``.tokens``.

The directory is what the official zips unpack to: ``wikitext-103-raw/`` holds ``wiki.*.raw``
(original text) and ``wikitext-103/`` holds ``wiki.*.tokens`` (word-level, rare words as
``<unk>``). The three files are the three splits, as published; no hashing.

Notable:
- Documents are articles. An article starts at a title line `` = Title = `` (one ``=`` on each
  side; section headings `` = = Section = = `` have more) and runs to the next title. Lines
  before the first title belong to the first article, so the articles of a file concatenate back
  to the file exactly.
- A directory holding both variants is refused (pass the directory of the one you want).
- ``max_bytes`` keeps a prefix of whole articles per split (UTF-8 bytes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from acmoe_megatron.data.corpora.corpus import SPLITS, Document, check_max_bytes, check_split

__all__ = ["WIKITEXT_VARIANTS", "WikiTextCorpus", "is_wikitext_dir", "split_articles"]

WIKITEXT_VARIANTS = (".raw", ".tokens")
_TITLE = re.compile(r"^ = [^=].* = $")


def is_wikitext_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding at least one ``wiki.<split>.(raw|tokens)`` file."""
    path = Path(path)
    return path.is_dir() and any(
        (path / f"wiki.{split}{ext}").is_file() for split in SPLITS for ext in WIKITEXT_VARIANTS
    )


def split_articles(lines: Iterator[str]) -> Iterator[tuple[int, str]]:
    """Group the lines of a WikiText file into articles: ``(1-based line of the title, text)``."""
    buffer: list[str] = []
    start = 1
    seen_title = False
    for number, line in enumerate(lines, 1):
        if _TITLE.match(line.rstrip("\r\n")):
            if seen_title:
                yield start, "".join(buffer)
                buffer, start = [], number
            seen_title = True
        buffer.append(line)
    if buffer:
        yield start, "".join(buffer)


class WikiTextCorpus:
    """The WikiText splits of one directory (see the module docstring)."""

    kind = "wikitext"

    def __init__(self, directory: str | os.PathLike, max_bytes: int | None = None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(
                f"WikiText directory {self.directory} does not exist; unzip wikitext-103-raw-v1.zip "
                "and pass the directory holding wiki.train.raw"
            )
        check_max_bytes(max_bytes)
        self.max_bytes = max_bytes
        present = [ext for ext in WIKITEXT_VARIANTS if any(self.directory.glob(f"wiki.*{ext}"))]
        if len(present) != 1:
            holds = "both wiki.*.raw and wiki.*.tokens" if present else "no wiki.*.raw or wiki.*.tokens"
            raise ValueError(
                f"{self.directory} holds {holds} files; pass a directory with exactly one WikiText "
                "variant (e.g. wikitext-103-raw/)"
            )
        self.variant = present[0]

    def file(self, split: str) -> Path:
        check_split(split)
        path = self.directory / f"wiki.{split}{self.variant}"
        if not path.is_file():
            raise FileNotFoundError(
                f"WikiText split {split!r} needs {path}, which does not exist; restore it from the "
                "official zip or prepare only the splits you have (--splits)"
            )
        return path

    def documents(self, split: str) -> Iterator[Document]:
        path = self.file(split)
        total = 0
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            for line, text in split_articles(f):
                if self.max_bytes is not None:
                    total += len(text.encode("utf-8"))
                    if total > self.max_bytes:
                        return
                yield Document(f"{path.name}:{line}", text)

    def num_bytes(self, split: str) -> int:
        size = self.file(split).stat().st_size
        return size if self.max_bytes is None else min(size, self.max_bytes)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "root": str(self.directory),
            "variant": self.variant,
            "files": {
                s: f"wiki.{s}{self.variant}" for s in SPLITS if (self.directory / f"wiki.{s}{self.variant}").is_file()
            },
            "max_bytes": self.max_bytes,
            "documents": "articles (split at ' = Title = ' lines)",
        }
