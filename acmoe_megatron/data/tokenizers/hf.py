"""A local Hugging Face ``tokenizer.json`` (``tokenizers`` library) as an acmoe-data tokenizer.

Notable:
- Only local files: ``HFTokenizer("path/to/tokenizer.json")`` or a directory holding one. A hub
  name such as ``gpt2`` is refused with a message saying how to fetch the file once; nothing is
  downloaded at run time.
- ``vocab_size`` counts added tokens. Token ids are written as uint16 while they fit
  (vocab_size <= 65536), else uint32.
- End of document: the tokenizer's own special token, ``eod_token`` if given, else the first of
  ``EOD_CANDIDATES`` that the tokenizer has; none is an error (pass ``--eod-token``).
- Text is encoded without the tokenizer's post-processor specials (no BOS/EOS per document);
  ``prepare`` appends the EOD id after each document itself.
- ``hash`` is the sha256 of the file's bytes plus the EOD id: shards made with another file or
  another EOD never pass the loader's tokenizer check.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["EOD_CANDIDATES", "HFTokenizer"]

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _resolve_file(spec: str | os.PathLike) -> Path:
    path = Path(spec)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{path} holds no tokenizer.json; pass the path of a Hugging Face tokenizer.json "
                "(save a transformers tokenizer with .save_pretrained(DIR) to get one)"
            )
        return path / "tokenizer.json"
    if path.is_file():
        return path
    text = os.fspath(spec)
    if _HUB_NAME.match(text) and not text.endswith(".json"):
        raise ValueError(
            f"tokenizer {text!r} is not a local file; it looks like a Hugging Face hub name, and "
            "acmoe-data never downloads at run time. Fetch the file once, e.g. `huggingface-cli "
            f"download {text} tokenizer.json --local-dir tok/`, then pass --tokenizer tok/tokenizer.json"
        )
    raise FileNotFoundError(f"tokenizer file {text} does not exist; pass the path of a local tokenizer.json")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from a local ``tokenizer.json``."""

    byte_level = False

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        self.path = _resolve_file(path)
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError(
                "Hugging Face tokenizer files need the tokenizers library: pip install tokenizers"
            ) from exc
        data = self.path.read_bytes()
        try:
            self._tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # the Rust side raises a plain Exception
            raise ValueError(f"{self.path} is not a valid Hugging Face tokenizer.json ({exc})") from exc
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self.eod_token, self.eod = self._find_eod(eod_token)
        self.name = f"hf:{self.path.parent.name}/{self.path.name}" if self.path.parent.name else f"hf:{self.path.name}"
        self.hash = hashlib.sha256(data + f"\0eod={self.eod}".encode()).hexdigest()

    def _find_eod(self, eod_token: str | None) -> tuple[str, int]:
        candidates = (eod_token,) if eod_token is not None else EOD_CANDIDATES
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token, token_id
        specials = sorted(t.content for t in self._tok.get_added_tokens_decoder().values())[:10]
        wanted = f"has no token {eod_token!r}" if eod_token is not None else f"has none of {list(EOD_CANDIDATES)}"
        raise ValueError(
            f"{self.path} {wanted} to mark the end of a document (its added tokens: {specials}); "
            "pass --eod-token TOKEN naming one of its tokens"
        )

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (no specials added, no EOD appended), as uint32."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """``encode`` of several texts at once (the library runs them in parallel)."""
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ``ids``; special tokens (EOD included) are kept in the output."""
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(f"{self.name}: ids must be in 0..{self.vocab_size - 1}, got {ids[bad][:5].tolist()}")
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    def describe(self) -> dict:
        """The manifest's ``tokenizer`` entry."""
        return {
            "name": self.name,
            "hash": self.hash,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "eod_token": self.eod_token,
            "file": str(self.path),
            "library": "tokenizers",
        }

    # Megatron-style aliases.
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text).tolist()

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eod={self.eod})"
