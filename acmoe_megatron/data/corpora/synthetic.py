"""A seeded synthetic corpus of random bytes, for data-path scale tests and throughput benchmarks.

``--source synthetic:SIZE`` (``SIZE`` in bytes, with an optional K/M/G suffix: ``synthetic:2G``)
gives a train split of ``SIZE`` bytes and valid/test splits of 1 % of it each (at least one
document), in documents of ``doc_bytes`` (1 MiB) uniformly random bytes drawn from
``numpy.random.default_rng([seed, split, document])``: reproducible byte for byte, no input files,
and as large as a test needs (the embedded stdlib corpus is ~10 MB). With the byte tokenizer every
byte is a token, so a 2 GiB source makes ~2 G tokens of shards. Not for training models: random
bytes have nothing to learn; the point is the size.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from acmoe_megatron.data.corpora.corpus import SPLITS, Document, check_max_bytes, check_split

__all__ = ["SyntheticCorpus", "parse_synthetic"]

_SPEC = re.compile(r"^synthetic:(\d+)([KMG]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_synthetic(source: str, max_bytes: int | None = None) -> SyntheticCorpus:
    match = _SPEC.match(source)
    if match is None:
        raise ValueError(f"synthetic source {source!r}: expected 'synthetic:SIZE' such as synthetic:2G or synthetic:500M")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size < 1:
        raise ValueError(f"synthetic source {source!r}: the size must be at least 1 byte")
    return SyntheticCorpus(size, max_bytes=max_bytes)


@dataclass(frozen=True)
class SyntheticCorpus:
    train_bytes: int
    seed: int = 0
    doc_bytes: int = 2**20
    max_bytes: int | None = None
    kind: str = "synthetic"

    def __post_init__(self):
        check_max_bytes(self.max_bytes)

    def num_bytes(self, split: str) -> int:
        check_split(split)
        size = self.train_bytes if split == "train" else max(1, self.train_bytes // 100)
        return size if self.max_bytes is None else min(size, self.max_bytes)

    def documents(self, split: str) -> Iterator[Document]:
        remaining, index = self.num_bytes(split), 0
        while remaining > 0:
            n = min(self.doc_bytes, remaining)
            rng = np.random.default_rng([self.seed, SPLITS.index(split), index])
            yield Document(doc_id=f"{split}/{index:08d}", raw=rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            remaining -= n
            index += 1

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "train_bytes": self.train_bytes, "seed": self.seed,
                "doc_bytes": self.doc_bytes, "max_bytes": self.max_bytes}
