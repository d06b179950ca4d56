"""Word-swap corruption of evaluation data, for robustness evaluation (``--corrupt word-swap:P``).

The analogue of the paper's attacked WikiText-103 (about 2.5 % of words replaced by "AAA"):
- byte-level tokenizer: each whitespace-delimited word (a maximal run of non-ASCII-whitespace
  bytes) is replaced, with probability P, by the marker (default ``AAA``);
- Hugging Face tokenizers: each non-special token is replaced, with probability P, by the
  marker's token ids (``tokenizer.encode(marker)``, one or more tokens).
Unlike the paper, stop words are not exempt: every word (token) is a candidate.

Reproducible: the draws of a document come from ``numpy.random.default_rng([seed, h])`` where h
is a hash of its ``doc_id``, so they do not depend on other documents or on the order of work.
``prepare`` applies it to the valid and test splits only and records the spec, marker, seed and
per-split counts (candidates, replaced) in the manifest.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

__all__ = ["EVAL_SPLITS", "Corruption", "parse_corruption"]

EVAL_SPLITS = ("valid", "test")
KINDS = ("word-swap",)
_WORD = re.compile(rb"\S+")


@dataclass(frozen=True)
class Corruption:
    """Replace a ``fraction`` of words (bytes) or tokens (BPE) by ``marker``."""

    fraction: float
    marker: str = "AAA"
    seed: int = 0
    kind: str = "word-swap"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown corruption {self.kind!r}; supported: {KINDS}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"corruption fraction must be in (0, 1], got {self.fraction}")
        if not self.marker or any(c.isspace() for c in self.marker):
            raise ValueError(f"corruption marker must be a non-empty word without whitespace, got {self.marker!r}")

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.fraction}"

    def _rng(self, doc_id: str) -> np.random.Generator:
        h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
        return np.random.default_rng([self.seed, h])

    def corrupt_bytes(self, data: bytes, doc_id: str) -> tuple[bytes, int, int]:
        """Word-swap on UTF-8 bytes: ``(corrupted bytes, number of words, words replaced)``."""
        spans = [m.span() for m in _WORD.finditer(data)]
        if not spans:
            return data, 0, 0
        chosen = np.flatnonzero(self._rng(doc_id).random(len(spans)) < self.fraction)
        marker = self.marker.encode("utf-8")
        pieces, last = [], 0
        for i in chosen.tolist():
            start, end = spans[i]
            pieces += [data[last:start], marker]
            last = end
        pieces.append(data[last:])
        return b"".join(pieces), len(spans), len(chosen)

    def corrupt_tokens(
        self, ids: np.ndarray, doc_id: str, marker_ids: np.ndarray, special_ids: frozenset[int] = frozenset()
    ) -> tuple[np.ndarray, int, int]:
        """Token-swap: ``(corrupted ids, number of candidate tokens, tokens replaced)``.

        Candidates are the tokens not in ``special_ids``; each chosen one becomes ``marker_ids``.
        """
        ids = np.asarray(ids)
        if special_ids:
            candidate = ~np.isin(ids, np.fromiter(special_ids, dtype=np.int64))
        else:
            candidate = np.ones(len(ids), dtype=bool)
        draws = self._rng(doc_id).random(len(ids))
        chosen = candidate & (draws < self.fraction)
        n_chosen = int(chosen.sum())
        if n_chosen == 0:
            return ids, int(candidate.sum()), 0
        m = len(marker_ids)
        repeats = np.where(chosen, m, 1)
        out = np.repeat(ids, repeats)
        starts = (np.cumsum(repeats) - repeats)[chosen]
        out[(starts[:, None] + np.arange(m)).ravel()] = np.tile(np.asarray(marker_ids, dtype=out.dtype), n_chosen)
        return out, int(candidate.sum()), n_chosen

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "fraction": self.fraction,
            "marker": self.marker,
            "seed": self.seed,
        }


def parse_corruption(spec: str | Corruption | None, marker: str = "AAA", seed: int = 0) -> Corruption | None:
    """Parse ``"word-swap:0.025"`` (None passes through; a ``Corruption`` is returned as is)."""
    if spec is None or isinstance(spec, Corruption):
        return spec
    kind, sep, value = spec.partition(":")
    try:
        fraction = float(value)
    except ValueError:
        fraction = None
    if not sep or fraction is None:
        raise ValueError(f"--corrupt expects KIND:FRACTION such as 'word-swap:0.025', got {spec!r}")
    return Corruption(fraction=fraction, marker=marker, seed=seed, kind=kind)
