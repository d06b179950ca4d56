"""The on-disk format of a token-shard directory and its ``manifest.json``.

A shard directory holds webdataset tar shards ``{split}-{i:06d}.tar`` and one ``manifest.json``.
Each tar sample is ``{__key__: f"{index:010d}", "tokens.npy": array[seq_length + 1]}``, where
``index`` is the sample's position within its split (0, 1, 2, ... across shards in order).

Sample layout: the documents of a split are tokenized, an EOD id is appended after each document,
and the concatenated stream is cut into consecutive, non-overlapping blocks of ``seq_length + 1``
tokens (inputs are ``block[:-1]``, labels ``block[1:]``). Nothing is dropped: the final, partial
block is padded with EOD, and its real length follows from the manifest (a shard's ``tokens``
counts real tokens only, so only the split's last sample can be shorter; see
``SplitInfo.sample_length``). The loader masks the padded labels out of the loss.

The manifest records the tokenizer (name, hash, vocab size, EOD id), the sequence length, the token
dtype (uint16 while every id fits, i.e. vocab_size <= 65536, else uint32), the source, the eval-split
corruption if any (``corrupt.py``), and per split the shards with their sample count, real token
count, size and sha256. It contains no timestamps, so re-running ``prepare`` on the same input
reproduces it byte for byte. ``check_manifest_matches`` compares it with a model configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from acmoe_megatron.data.corpora.corpus import SPLITS
from acmoe_megatron.data.shards.remote import fetch_text, is_remote

__all__ = [
    "check_manifest_matches",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "ShardInfo",
    "SplitInfo",
    "read_manifest",
    "sha256_file",
    "shard_name",
    "token_dtype_name",
    "write_bytes_atomic",
]

FORMAT = "acmoe-token-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KEY_WIDTH = 10


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# The only shard names a manifest may hold: those ``shard_name`` writes. A manifest read from a
# location that is not ours (https://, pipe:) supplies names that are substituted into a pipe:
# command and joined to the cache directory, so any other name (shell syntax, ../, an absolute
# path) is refused before anything is fetched or opened.
SHARD_FILE = re.compile(rf"^(?P<split>{'|'.join(SPLITS)})-\d{{6}}\.tar$")


def check_shard_names(splits: dict[str, Any], where: str) -> None:
    """ValueError naming the first split or shard name that ``acmoe-data prepare`` does not write."""
    for split, info in splits.items():
        if split not in SPLITS:
            raise ValueError(f"{where}: split {split!r} is not one of {SPLITS}")
        for shard in info["shards"]:
            name = shard.get("file") if isinstance(shard, dict) else None
            match = SHARD_FILE.match(name) if isinstance(name, str) else None
            if match is None or match["split"] != split:
                raise ValueError(
                    f"{where}: shard name {name!r} of split {split!r} is not one acmoe-data writes "
                    f"({split}-NNNNNN.tar); refused before anything is fetched or opened (a manifest's names go "
                    "into pipe: commands and cache paths)")


def sample_key(index: int) -> str:
    return f"{index:0{KEY_WIDTH}d}"


def token_dtype_name(vocab_size: int) -> str:
    """uint16 when every id fits (vocab_size <= 65536, ids < 65536), else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


@dataclass(frozen=True)
class ShardInfo:
    file: str  # name relative to the shard directory
    first_sample: int  # split-level index of the shard's first sample
    samples: int
    tokens: int  # real tokens (EOD padding of the final block excluded)
    bytes: int  # file size
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    num_documents: int
    num_text_bytes: int  # UTF-8 bytes of the documents' text
    num_tokens: int  # real tokens, including one EOD per document
    num_samples: int
    shards: list[ShardInfo] = field(default_factory=list)

    def sample_length(self, index: int, sample_length: int) -> int:
        """Number of real (non-padding) tokens of sample ``index`` out of ``sample_length``."""
        if index == self.num_samples - 1:
            return self.num_tokens - (self.num_samples - 1) * sample_length
        return sample_length


@dataclass(frozen=True)
class Manifest:
    tokenizer: dict[str, Any]  # name, hash, vocab_size, eod
    seq_length: int
    dtype: str
    source: dict[str, Any]
    splits: dict[str, SplitInfo]
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    corruption: dict[str, Any] | None = None  # eval-split corruption (corrupt.py), None: clean

    @property
    def sample_length(self) -> int:
        return self.seq_length + 1

    def to_json(self) -> str:
        data = {
            "format": self.format,
            "format_version": self.format_version,
            "tokenizer": self.tokenizer,
            "seq_length": self.seq_length,
            "sample_length": self.sample_length,
            "dtype": self.dtype,
            "source": self.source,
            "totals": {
                key: sum(getattr(s, key) for s in self.splits.values())
                for key in ("num_documents", "num_text_bytes", "num_tokens", "num_samples")
            }
            | {"num_shards": sum(len(s.shards) for s in self.splits.values())},
            "splits": {name: asdict(info) for name, info in self.splits.items()},
        }
        if self.corruption is not None:  # absent for clean data: older readers ignore extra keys
            data["corruption"] = self.corruption
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"format_version is {data.get('format_version')!r}, this code reads "
                    f"{FORMAT_VERSION}; re-create the shards with this version of acmoe-data prepare"
                )
            check_shard_names(data["splits"], where)
            splits = {
                name: SplitInfo(
                    **{k: v for k, v in info.items() if k != "shards"}, shards=[ShardInfo(**s) for s in info["shards"]]
                )
                for name, info in data["splits"].items()
            }
            return cls(
                tokenizer=data["tokenizer"],
                seq_length=data["seq_length"],
                dtype=data["dtype"],
                source=data["source"],
                splits=splits,
                corruption=data.get("corruption"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{where} is not a valid {FORMAT} manifest: {exc!r}") from exc


def check_manifest_matches(
    manifest: Manifest,
    *,
    seq_length: int | None = None,
    vocab_size: int | None = None,
    tokenizer_hash: str | None = None,
    where: str = "the shard directory",
) -> None:
    """Raise ``ValueError`` if ``manifest`` disagrees with the model configuration.

    Args:
        seq_length: the model's sequence length (samples hold ``seq_length + 1`` tokens).
        vocab_size: the model's vocabulary size before any padding (Megatron's ``--vocab-size``).
        tokenizer_hash: the ``hash`` of the tokenizer the model was (or will be) trained with.
        where: the shard directory, for the message.
    Arguments left as None are not checked.
    """
    tok = manifest.tokenizer
    if seq_length is not None and seq_length != manifest.seq_length:
        raise ValueError(
            f"{where} was prepared with seq_length={manifest.seq_length} but the model uses "
            f"seq_length={seq_length}; re-run `acmoe-data prepare --seq-length {seq_length}` "
            f"or set the model's seq_length to {manifest.seq_length}"
        )
    if vocab_size is not None and vocab_size != tok["vocab_size"]:
        raise ValueError(
            f"{where} was tokenized with {tok['name']!r} (vocab_size={tok['vocab_size']}) but the "
            f"model uses vocab_size={vocab_size}; set the model's vocab_size to {tok['vocab_size']} "
            "or re-run acmoe-data prepare with the model's tokenizer (--tokenizer)"
        )
    if tokenizer_hash is not None and tokenizer_hash != tok["hash"]:
        raise ValueError(
            f"{where} was tokenized with {tok['name']!r} (hash {tok['hash'][:12]}...) but the model "
            f"expects the tokenizer with hash {tokenizer_hash[:12]}...; re-run acmoe-data prepare "
            "with the model's tokenizer (--tokenizer), or point the model at shards made with it"
        )


def read_manifest(shard_dir: str | os.PathLike) -> Manifest:
    """Read and validate ``shard_dir/manifest.json`` (``shard_dir`` may be a URL or ``pipe:`` command:
    ``remote.py``)."""
    if is_remote(shard_dir):
        return Manifest.from_json(fetch_text(shard_dir, MANIFEST_NAME), where=f"{shard_dir} {MANIFEST_NAME}")
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {shard_dir}; create the shards first with "
            f"`acmoe-data prepare --source stdlib --out {shard_dir} --seq-length N`"
        )
    return Manifest.from_json(path.read_text(encoding="utf-8"), where=str(path))


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
