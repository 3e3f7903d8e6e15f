"""Results as a Parquet table: one row per record, the model parameters as columns.

The columns are those of :meth:`pyhf_dist.results.ScanResult.rows` (the CSV's, with the values
under their labels); the scan's metadata is kept as JSON in the file's key-value metadata. As the
JSON and CSV results, the file is written aside and renamed: an interrupted write leaves the file
that was there before, or none, never half a table.
"""

from __future__ import annotations

import json
import os

from pyhf_dist.exceptions import MissingDependencyError, PalletError
from pyhf_dist.records import written_aside

__all__ = ["write_parquet", "read_parquet"]


def write_parquet(result, path: str | os.PathLike) -> None:
    """Write ``result`` (a :class:`~pyhf_dist.results.ScanResult`) to a Parquet file.

    Raises:
        MissingDependencyError: pyarrow is not installed (extra ``parquet``).
    """
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MissingDependencyError("pyarrow", "parquet", "writing results as Parquet") from None
    rows = result.rows()
    columns = list(rows[0]) if rows else ["name"]
    # Column by column: a column whose cells are all None gets a type pyarrow can write.
    table = pyarrow.table({column: [row.get(column) for row in rows] for column in columns})
    metadata = {b"pyhf_dist": json.dumps(result.metadata, default=str).encode()}
    with written_aside(path) as temporary:
        pyarrow.parquet.write_table(table.replace_schema_metadata(metadata), temporary)


def read_parquet(path: str | os.PathLike):
    """The :class:`~pyhf_dist.results.ScanResult` :func:`write_parquet` wrote to ``path``: its
    records, and the scan's metadata.

    Raises:
        MissingDependencyError: pyarrow is not installed (extra ``parquet``).
        PalletError: The file cannot be read, or is not a results table of pyhf-dist.
    """
    from pyhf_dist.results import CSV_COLUMNS, ScanResult, record_from_row

    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MissingDependencyError("pyarrow", "parquet", "reading results from Parquet") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, pyarrow.ArrowException) as error:
        raise PalletError(f"cannot read {path} as a Parquet table: {str(error).splitlines()[0]}") from None
    if not {"name", "status"} <= set(table.column_names):
        raise PalletError(f"{path} is not a results table of pyhf-dist (pyhf-dist fit ... -o results.parquet writes one)")
    metadata = json.loads((table.schema.metadata or {}).get(b"pyhf_dist", b"{}"))
    # The signal point's values sit under their labels: every column a results table has not.
    labels = [column for column in table.column_names if column not in CSV_COLUMNS]
    records = []
    for number, row in enumerate(table.to_pylist(), start=1):
        cells = {column: "" if value is None else str(value) for column, value in row.items() if column not in labels}
        cells["values"] = " ".join(str(row[label]) for label in labels if row[label] is not None)
        try:
            records.append(record_from_row(cells))
        except ValueError as error:
            raise PalletError(f"{path}, row {number}: {error}") from None
    return ScanResult(records, metadata)
