"""Parquet corpora (``*.parquet``, read with pyarrow): the text of each row's ``--text-field``.

The text column must be a string column; a missing column, a null value or an unreadable file is
an error naming the file (and row), never a skipped record. Splitting and ``max_bytes`` are as in
``records.py`` (the record number is the 0-based row index within the file). pyarrow is
imported only when a Parquet source is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from acmoe_megatron.data.corpora.records import RecordCorpus

__all__ = ["PARQUET_SUFFIXES", "ParquetCorpus"]

PARQUET_SUFFIXES = (".parquet",)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("Parquet sources need pyarrow: pip install pyarrow") from exc
    return pa, pq


class ParquetCorpus(RecordCorpus):
    """Parquet files named by a file, a directory (its ``*.parquet`` files) or a glob."""

    kind = "parquet"
    suffixes = PARQUET_SUFFIXES

    def records(self, path: Path) -> Iterator[tuple[int, str]]:
        pa, pq = _pyarrow()
        field = self.text_field
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path}: cannot be read as Parquet ({exc})") from exc
        schema = parquet.schema_arrow
        if field not in schema.names:
            raise ValueError(
                f"{path}: no column {field!r} (columns: {schema.names[:10]}); pass --text-field NAME "
                "with the column that holds the document text"
            )
        column_type = schema.field(field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise ValueError(
                f"{path}: column {field!r} has type {column_type}, expected a string column; pass "
                "--text-field NAME with the column that holds the document text"
            )
        row = 0
        for batch in parquet.iter_batches(batch_size=4096, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise ValueError(
                        f"{path}: row {row} has a null {field!r}; drop or fill null texts before "
                        "preparing (acmoe-data never skips records silently)"
                    )
                yield row, text
                row += 1
