"""Results as a Parquet table: one row per record, the model parameters as columns.

The columns are those of :meth:`pyhf_dist.results.ScanResult.rows` (the CSV's, with the values
under their labels); the scan's metadata is kept as JSON in the file's key-value metadata. As the
JSON and CSV results, the file is written aside and renamed: an interrupted write leaves the file
that was there before, or none, never half a table.
"""

from __future__ import annotations

import json
import os

from pyhf_dist.exceptions import MissingDependencyError
from pyhf_dist.records import written_aside

__all__ = ["write_parquet"]


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
