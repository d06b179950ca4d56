"""enwik8: the first 10^8 bytes of an English Wikipedia XML dump (Hutter prize benchmark).

The standard character-level setup (Transformer-XL, the bits-per-character literature) is
reproduced exactly: the ``enwik8`` byte stream, read from the standard ``enwik8.zip``
(http://mattmahoney.net/dc/enwik8.zip, member ``enwik8``) or from the extracted file, is split
into the first 90,000,000 bytes (train), the next 5,000,000 (valid) and the last 5,000,000 (test).

Notable:
- Each split is one document of raw bytes (``Document.raw``): the byte tokenizer sees exactly the
  original bytes, even where a split boundary cuts a multi-byte UTF-8 character, so loss per
  token is bits per character in the standard sense. (A BPE tokenizer sees the UTF-8 decoding,
  with invalid bytes replaced.)
- The input must hold exactly the sum of the split sizes; anything else is refused, since a
  different file would silently change every reported number. ``split_bytes`` exists for tests.
- ``max_bytes`` keeps a prefix of each split (quick experiments).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from acmoe_megatron.data.corpora.corpus import SPLITS, Document, check_max_bytes, check_split
from acmoe_megatron.data.shards.manifest import sha256_file

__all__ = ["ENWIK8_SPLIT_BYTES", "ENWIK8_URL", "Enwik8Corpus"]

ENWIK8_SPLIT_BYTES = (90_000_000, 5_000_000, 5_000_000)  # train, valid, test
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
_MEMBER = "enwik8"


class Enwik8Corpus:
    """The enwik8 splits from ``enwik8.zip`` or the extracted ``enwik8`` file."""

    kind = "enwik8"

    def __init__(
        self,
        path: str | os.PathLike,
        max_bytes: int | None = None,
        split_bytes: tuple[int, int, int] = ENWIK8_SPLIT_BYTES,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"enwik8 input {self.path} does not exist; download {ENWIK8_URL} and pass the zip "
                "(or the extracted 'enwik8' file) as --source"
            )
        check_max_bytes(max_bytes)
        self.max_bytes = max_bytes
        self.split_bytes = tuple(split_bytes)
        self.is_zip = zipfile.is_zipfile(self.path)
        size = self._member_size()
        if size != sum(self.split_bytes):
            raise ValueError(
                f"{self.path} holds {size:,} bytes of enwik8, expected {sum(self.split_bytes):,} "
                f"(train/valid/test = {'/'.join(f'{n:,}' for n in self.split_bytes)}); use the "
                f"unmodified standard file from {ENWIK8_URL}"
            )

    def _member_size(self) -> int:
        if not self.is_zip:
            return self.path.stat().st_size
        with zipfile.ZipFile(self.path) as zf:
            names = zf.namelist()
            if _MEMBER not in names:
                raise ValueError(
                    f"{self.path} has no member {_MEMBER!r} (members: {names[:5]}); pass the "
                    f"standard enwik8.zip from {ENWIK8_URL}"
                )
            return zf.getinfo(_MEMBER).file_size

    def _range(self, split: str) -> tuple[int, int]:
        check_split(split)
        index = SPLITS.index(split)
        start = sum(self.split_bytes[:index])
        length = self.split_bytes[index]
        if self.max_bytes is not None:
            length = min(length, self.max_bytes)
        return start, start + length

    def _read(self, start: int, end: int) -> bytes:
        if self.is_zip:
            with zipfile.ZipFile(self.path) as zf, zf.open(_MEMBER) as f:
                f.seek(start)
                data = f.read(end - start)
        else:
            with open(self.path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        if len(data) != end - start:
            raise ValueError(f"{self.path}: read {len(data)} bytes at offset {start}, expected {end - start}")
        return data

    def documents(self, split: str) -> Iterator[Document]:
        start, end = self._range(split)
        yield Document(f"enwik8[{start}:{end}]", raw=self._read(start, end))

    def num_bytes(self, split: str) -> int:
        start, end = self._range(split)
        return end - start

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "sha256": sha256_file(self.path),
            "member": _MEMBER if self.is_zip else None,
            "split_bytes": dict(zip(SPLITS, self.split_bytes, strict=True)),
            "max_bytes": self.max_bytes,
        }

