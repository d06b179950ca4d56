"""Text corpora made of files, split into train/valid/test by a stable hash of each file's path.

Every corpus (this module's ``FileCorpus`` and the JSONL, Parquet, enwik8 and WikiText sources)
follows the small ``Corpus`` protocol: ``kind``, ``documents(split)``, ``num_bytes(split)`` and
``describe()``; ``prepare`` needs nothing else.

Notable:
- A document of a ``FileCorpus`` is one file: ``Document(doc_id=<relative posix path>,
  text=<file contents>)``. Byte-exact sources (enwik8) give ``raw`` bytes instead of ``text``.
- The split of a file depends only on its relative path (sha256 of the path -> a number in [0, 1)),
  so it never changes when other files are added or removed, and the splits are disjoint by
  construction. Fractions are parameters; the defaults are 2 % valid, 2 % test, the rest train.
- Files are read as UTF-8 with ``errors="replace"``. A file that contains NUL bytes is treated as
  binary and raises an error naming the file: it is neither decoded into junk nor silently skipped.
- ``max_bytes`` caps each split at a prefix of its files (sorted by path, whole files, stopping
  before the first file that would exceed the cap), so tests can build a small corpus quickly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = ["SPLITS", "Corpus", "Document", "FileCorpus", "split_of"]

SPLITS = ("train", "valid", "test")


class Document(NamedTuple):
    """One document: ``text`` (str), or ``raw`` bytes for sources that must stay byte-exact."""

    doc_id: str  # stable identifier, e.g. the relative posix path of the file
    text: str | None = None
    raw: bytes | None = None

    def utf8(self) -> bytes:
        """The document's bytes: ``raw`` as is, or ``text`` encoded as UTF-8."""
        return self.raw if self.raw is not None else self.text.encode("utf-8")

    def as_text(self) -> str:
        """The document's text: ``text``, or ``raw`` decoded as UTF-8 (invalid bytes -> U+FFFD)."""
        return self.text if self.text is not None else self.raw.decode("utf-8", errors="replace")


@runtime_checkable
class Corpus(Protocol):
    """What ``prepare`` needs from a source."""

    kind: str  # short name recorded in manifests ("stdlib", "text", "jsonl", "enwik8", ...)

    def documents(self, split: str) -> Iterator[Document]:
        """The documents of ``split`` in a fixed, deterministic order."""
        ...

    def num_bytes(self, split: str) -> int | None:
        """Approximate input bytes of ``split`` for progress bars (None: unknown without a pass)."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable description, recorded in manifests."""
        ...


def split_of(key: str, valid_fraction: float = 0.02, test_fraction: float = 0.02) -> str:
    """Assign ``key`` to "train", "valid" or "test" by a stable hash.

    The first 8 bytes of sha256(key) give a number u in [0, 1): u < valid_fraction is "valid",
    the next ``test_fraction`` is "test", the rest is "train".
    """
    check_fractions(valid_fraction, test_fraction)
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < valid_fraction:
        return "valid"
    if u < valid_fraction + test_fraction:
        return "test"
    return "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    if valid_fraction < 0.0 or test_fraction < 0.0 or valid_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"split fractions must be >= 0 and leave room for train: got valid_fraction="
            f"{valid_fraction}, test_fraction={test_fraction} (their sum must be < 1)"
        )


def check_max_bytes(max_bytes: int | None) -> None:
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive (or None for no cap), got {max_bytes}")


@dataclass(frozen=True)
class FileCorpus:
    """A sorted list of text files under ``root`` with a hash-based train/valid/test split.

    Args:
        kind: short name of the source ("stdlib", "text"), recorded in manifests.
        root: directory the relative paths are taken from.
        relpaths: relative posix paths of the files (sorted on construction).
        valid_fraction, test_fraction: split fractions (see ``split_of``).
        max_bytes: optional cap on the file bytes of each split (see module docstring).
        extra: additional description recorded in manifests (e.g. the glob pattern).
    """

    kind: str
    root: Path
    relpaths: Sequence[str]
    valid_fraction: float = 0.02
    test_fraction: float = 0.02
    max_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fractions(self.valid_fraction, self.test_fraction)
        check_max_bytes(self.max_bytes)
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "relpaths", tuple(sorted(self.relpaths)))

    def files(self, split: str) -> list[str]:
        """Relative paths of the files in ``split``, sorted, after the ``max_bytes`` cap."""
        check_split(split)
        selected, total = [], 0
        for rel in self.relpaths:
            if split_of(rel, self.valid_fraction, self.test_fraction) != split:
                continue
            size = (self.root / rel).stat().st_size
            if self.max_bytes is not None and total + size > self.max_bytes:
                break
            selected.append(rel)
            total += size
        return selected

    def num_bytes(self, split: str) -> int:
        """Total file size of ``split`` in bytes (used for progress bars)."""
        return sum((self.root / rel).stat().st_size for rel in self.files(split))

    def documents(self, split: str) -> Iterator[Document]:
        """Yield the documents of ``split`` in sorted path order."""
        for rel in self.files(split):
            raw = (self.root / rel).read_bytes()
            if b"\x00" in raw:
                raise ValueError(
                    f"{self.root / rel} contains NUL bytes, so it looks binary, not text. "
                    "Select only text files (e.g. pass a glob such as 'DIR/**/*.txt')."
                )
            yield Document(rel, raw.decode("utf-8", errors="replace"))

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable description of the source, for manifests."""
        return {
            "kind": self.kind,
            "root": str(self.root),
            "num_files": len(self.relpaths),
            "valid_fraction": self.valid_fraction,
            "test_fraction": self.test_fraction,
            "max_bytes": self.max_bytes,
            **self.extra,
        }
