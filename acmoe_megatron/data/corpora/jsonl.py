"""JSON Lines corpora (``*.jsonl``, ``*.jsonl.gz``): the text of each line's ``--text-field``.

Every non-blank line must be a JSON object with a string in the text field; anything else (invalid
JSON or UTF-8, a missing field, a non-string value) is an error naming the file and line, never a
skipped record. Blank lines are not records. Splitting and ``max_bytes`` are as in
``records.py`` (the record number is the 1-based line number).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from acmoe_megatron.data.corpora.records import RecordCorpus

__all__ = ["JSONL_SUFFIXES", "JsonlCorpus"]

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


class JsonlCorpus(RecordCorpus):
    """JSONL files named by a file, a directory (its ``*.jsonl[.gz]`` files) or a glob."""

    kind = "jsonl"
    suffixes = JSONL_SUFFIXES

    def records(self, path: Path) -> Iterator[tuple[int, str]]:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        field = self.text_field
        with opener(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                    raise ValueError(
                        f"{path}:{number}: not a valid JSON line ({exc}); every line of a JSONL "
                        "file must be one UTF-8 JSON object"
                    ) from exc
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
                if field not in obj:
                    raise ValueError(
                        f"{path}:{number}: no field {field!r} (fields: {sorted(obj)[:10]}); pass "
                        "--text-field NAME with the field that holds the document text"
                    )
                text = obj[field]
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}:{number}: field {field!r} is a {type(text).__name__}, expected a "
                        "string; pass --text-field NAME with the field that holds the document text"
                    )
                yield number, text
