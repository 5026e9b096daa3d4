"""Parquet files (``.parquet``): the documents of one text column, read in row-group batches with pyarrow.

Corpora such as FineWeb and Dolma ship Parquet: a column store, so only the ``text_field`` column is read, a batch
of rows at a time (pyarrow's ``iter_batches`` decodes one row group after another): memory holds a batch, not the
file. A file whose footer is missing (a truncated download) or is not Parquet, a missing column, a column that is
not text, and a null value are each one :class:`DataError` naming the file (and the row).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from llm.errors import DataError

if TYPE_CHECKING:
    from datamodules.sources import SourceStats

BATCH_ROWS = 1024  # rows decoded at a time (pyarrow reads row groups in turn to fill them)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            'reading .parquet files needs pyarrow: pip install -e ".[data]" (or pip install pyarrow)'
        ) from None
    return pa, pc, pq


def _reason(e: BaseException) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def read_parquet(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    """The strings of column ``text_field`` of ``path``, row by row; counts files, documents and text bytes (UTF-8)
    in ``stats`` (``disk_bytes`` advances by row group, for progress)."""
    pa, pc, pq = _pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # no footer: truncated, or not Parquet at all
        raise DataError(f"{path}: cannot be read as Parquet ({_reason(e)})") from None
    schema = pf.schema_arrow
    if schema.get_field_index(text_field) < 0:
        columns = ", ".join(repr(n) for n in schema.names[:10])
        raise DataError(f"{path}: no column data.text_field={text_field!r} (columns: {columns})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"):
        raise DataError(f"{path}: column data.text_field={text_field!r} is {kind}, not a string")
    n_rows = max(pf.metadata.num_rows, 1)
    size = path.stat().st_size
    disk_before = stats.disk_bytes
    stats.files += 1
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[text_field], use_threads=False):
            column = batch.column(0)
            if column.null_count:
                first = row + int(pc.index(pc.is_null(column), True).as_py())
                raise DataError(f"{path}[row {first}]: data.text_field={text_field!r} is null, not a string")
            stats.bytes += int(pc.sum(pc.binary_length(column)).as_py() or 0)
            for value in column.to_pylist():
                row += 1
                stats.documents += 1
                yield value
            stats.disk_bytes = disk_before + size * row // n_rows
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # a damaged page or row group, bytes not UTF-8
        raise DataError(f"{path}: cannot be read as Parquet ({_reason(e)})") from None
    stats.disk_bytes = disk_before + size
    if row == 0:
        stats.empty_files += 1
