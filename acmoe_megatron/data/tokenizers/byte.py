"""Byte-level tokenizer: one token per UTF-8 byte, plus an end-of-document id.

Notable:
- The vocabulary is the 256 byte values (ids 0..255) and one end-of-document (EOD) id, 256, so
  ``vocab_size`` is 257. Nothing is ever out of vocabulary and no tokenizer files are needed.
- ``hash`` identifies the tokenizer's behaviour (not its Python object). It is written into every
  shard manifest, and the loader checks it, so shards made with another tokenizer are never read
  by mistake.
- ``tokenize``/``detokenize``/``eod``/``vocab_size`` mirror the names Megatron's tokenizers use, so
  the object can be handed to code that expects them.
- ``load_tokenizer`` turns a ``--tokenizer`` argument into a tokenizer: "bytes" (the default) or a
  local Hugging Face ``tokenizer.json`` (``hf.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import numpy as np

from acmoe_megatron.data.tokenizers.hf import HFTokenizer

__all__ = ["EOD_ID", "VOCAB_SIZE", "ByteTokenizer", "load_tokenizer", "tokenizer_from_manifest"]

EOD_ID = 256
VOCAB_SIZE = 257


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus ``eod`` = 256."""

    name = "bytes"
    vocab_size = VOCAB_SIZE
    eod = EOD_ID
    byte_level = True  # encodes raw bytes (``encode_bytes``); word-swap corruption works on bytes

    # Bump the version suffix if encode/decode ever change behaviour: old shards then stop matching.
    _description = "acmoe_megatron.data.ByteTokenizer v1: utf-8 bytes 0..255, eod=256, vocab_size=257"

    @property
    def hash(self) -> str:
        """A stable identifier of this tokenizer's behaviour (sha256 of its description)."""
        return hashlib.sha256(self._description.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        """Return the UTF-8 bytes of ``text`` as a uint16 array of token ids (no EOD appended)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Return ``data`` as a uint16 array of token ids, one per byte (no EOD appended)."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def describe(self) -> dict:
        """The manifest's ``tokenizer`` entry."""
        return {"name": self.name, "hash": self.hash, "vocab_size": self.vocab_size, "eod": self.eod}

    def decode(self, ids: Iterable[int] | np.ndarray, eod_text: str = "") -> str:
        """Turn token ids back into text.

        Args:
            ids: token ids; each must be a byte (0..255) or ``eod``.
            eod_text: what each EOD id becomes in the output (default: nothing).

        Invalid UTF-8 byte sequences (e.g. a block cut in the middle of a multi-byte character)
        decode to U+FFFD rather than raising.
        """
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        bad = (ids < 0) | (ids > EOD_ID)
        if bad.any():
            raise ValueError(
                f"ByteTokenizer.decode: ids must be in 0..{EOD_ID}, got {ids[bad][:5].tolist()}; "
                "these ids were not produced by this tokenizer"
            )
        # np.split at the EOD positions: every chunk after the first starts with its EOD.
        chunks = np.split(ids, np.flatnonzero(ids == EOD_ID))
        pieces = [_bytes_to_text(chunks[0])]
        pieces += [eod_text + _bytes_to_text(chunk[1:]) for chunk in chunks[1:]]
        return "".join(pieces)

    # Megatron-style aliases.
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text).tolist()

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"


def load_tokenizer(spec: str | os.PathLike | None = None, eod_token: str | None = None):
    """The tokenizer named by ``spec``: None or "bytes" -> ``ByteTokenizer``; a local
    ``tokenizer.json`` (or a directory holding one) -> ``HFTokenizer``. Hub names are refused:
    nothing is downloaded at run time."""
    if spec is None or spec == "bytes":
        if eod_token is not None:
            raise ValueError("eod_token applies to Hugging Face tokenizers only; the byte tokenizer's EOD is 256")
        return ByteTokenizer()
    return HFTokenizer(spec, eod_token=eod_token)


def tokenizer_from_manifest(entry: dict):
    """The tokenizer a manifest's ``tokenizer`` entry describes, checked against its recorded hash
    (a model's data names the tokenizer its outputs must be decoded with)."""
    tok = load_tokenizer(entry.get("file") or entry["name"], entry.get("eod_token"))
    if tok.hash != entry["hash"]:
        raise ValueError(f"the tokenizer at {entry.get('file') or entry['name']} is not the one the data was made "
                         f"with (hash {tok.hash[:12]}..., the manifest records {entry['hash'][:12]}...)")
    return tok


def _bytes_to_text(byte_ids: np.ndarray) -> str:
    return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
