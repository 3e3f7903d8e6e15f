"""Reading signal points as a stream of rows: CSV (the standard library) or Parquet (pyarrow).

One row per point: a ``name`` column, the model parameters (any other columns), and the signal
yields, either one column per channel bin, ``SR[0]``, ``SR[1]``..., with absolute uncertainties
in ``SR[0].err``..., or a ``yields`` column holding a JSON object ``{"SR": [...], ...}`` (and
``uncertainties`` alike). Rows are read in order and never all at once: CSV line by line, Parquet
by record batches.

A file that cannot be used (missing, no ``name`` column, no yields, columns of a channel the
workspace lacks or with the wrong number of bins) raises :class:`SignalsError` at once. A row that
cannot be used (an empty or negative yield, NaN, a wrong bin count or an unknown channel in its
``yields``) becomes a point that fails alone: :func:`check_row` returns the reason.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

from pyhf_dist.exceptions import MissingDependencyError
from pyhf_dist.signals.template import Bound, SignalsError

__all__ = ["Layout", "read_rows", "header", "layout_of", "check_row", "parameter_value"]

_BIN = re.compile(r"^(?P<channel>.+)\[(?P<bin>\d+)\](?P<err>\.err)?$")
_BATCH = 4096  # Parquet rows decoded at a time: bounded memory, few calls


def _kind(path: Path) -> str:
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    if suffix in (".csv", ".csv.gz"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise SignalsError(f"{path}: signals are read from .csv or .parquet files, not {suffix or 'a file without suffix'!r}")


def _parquet():
    try:
        import pyarrow.parquet
    except ImportError:
        raise MissingDependencyError("pyarrow", "parquet", "reading signals from Parquet") from None
    return pyarrow.parquet


#: How to fix a CSV file in another encoding (a spreadsheet's plain "CSV" may be Latin-1).
_SAVE_AS_UTF8 = "save it as UTF-8 (a spreadsheet's \"CSV UTF-8\")"


def _open_csv(path: Path):
    if path.suffix.lower() == ".gz":
        import gzip

        return gzip.open(path, "rt", newline="", encoding="utf-8-sig")
    return open(path, newline="", encoding="utf-8-sig")  # a spreadsheet's "CSV UTF-8" begins with a BOM


def header(path: Path) -> list[str]:
    """The file's columns, in order.

    Raises:
        SignalsError: The file is missing, unreadable, empty, or not CSV/Parquet.
    """
    kind = _kind(path)
    try:
        if kind == "parquet":
            return list(_parquet().ParquetFile(path).schema_arrow.names)
        with _open_csv(path) as stream:
            columns = next(csv.reader(stream), None)
    except FileNotFoundError:
        raise SignalsError(f"{path} does not exist: check the path") from None
    except OSError as error:
        raise SignalsError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise SignalsError(f"{path} is not UTF-8 text: {_SAVE_AS_UTF8}") from None
    except csv.Error as error:
        raise SignalsError(f"{path} is not a CSV text file ({error})") from None
    except Exception as error:  # pyarrow's errors for a file that is not Parquet
        raise SignalsError(f"{path} is not a Parquet file ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if not columns:
        raise SignalsError(f"{path} is empty: the first line names the columns (name, parameters, yields)")
    return [column.strip() for column in columns]


def read_rows(path: Path, columns: list[str] | None = None) -> Iterator[tuple[int, dict]]:
    """``(row number, {column: value})`` for every row, in order (1-based; the header is not a row).

    Args:
        columns: Only these columns (Parquet reads only them; CSV parses the whole line anyway).

    Raises:
        SignalsError: The file breaks off or cannot be parsed (names the row).
    """
    number = 0
    try:
        if _kind(path) == "parquet":
            reader = _parquet().ParquetFile(path)
            for batch in reader.iter_batches(batch_size=_BATCH, columns=columns):
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
            return
        with _open_csv(path) as stream:
            lines = csv.reader(stream)
            names = [column.strip() for column in next(lines)]
            wanted = [(position, name) for position, name in enumerate(names) if columns is None or name in columns]
            for cells in lines:
                if not cells:
                    continue  # a blank line
                number += 1
                if len(cells) > len(names) and any(cell.strip() for cell in cells[len(names):]):
                    # A comma too many shifts every later value of the row: nothing may be guessed.
                    raise SignalsError(
                        f"{path}: row {number} (line {lines.line_num}) has {len(cells)} values under a header of "
                        f"{len(names)} columns: fix the row, or name the extra columns in the header"
                    )
                yield number, {name: (cells[position] if position < len(cells) else None) for position, name in wanted}
    except SignalsError:
        raise
    except UnicodeDecodeError:
        raise SignalsError(f"{path}: row {number + 1} is not UTF-8 text: {_SAVE_AS_UTF8}") from None
    except (csv.Error, OSError) as error:
        raise SignalsError(f"{path}: cannot read row {number + 1} ({error})") from None
    except Exception as error:
        raise SignalsError(f"{path}: cannot read row {number + 1} ({type(error).__name__}: {str(error).splitlines()[0]})") from None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which columns hold what (see the module's docstring)."""

    parameters: tuple
    wide: dict  # {channel: (column of bin 0, bin 1, ...)}
    wide_errors: dict
    json_yields: bool
    json_errors: bool

    @property
    def named_channels(self) -> list[str] | None:
        """The channels the columns name; ``None`` when each row names its own (``yields``)."""
        return None if self.json_yields else list(self.wide)


def layout_of(columns: list[str], workspace: dict, parameters: tuple | None, where: str) -> Layout:
    """Read the columns' roles from the header, checked against the workspace.

    Raises:
        SignalsError: No ``name`` column, no yields, a duplicate column, columns of a channel the
            workspace lacks, bins missing or beyond the channel's.
    """
    if "name" not in columns:
        separator = next((mark for mark in (";", "\t", "|") if len(columns) == 1 and mark in columns[0]), None)
        if separator is not None:  # a CSV written with another separator reads as one column
            raise SignalsError(f"{where} separates its columns with {separator!r}: write it with commas "
                               f"(pandas: to_csv(path, index=False))")
        raise SignalsError(f"{where} has no 'name' column (columns: {', '.join(columns[:6])}...)")
    duplicated = sorted({column for column in columns if columns.count(column) > 1})
    if duplicated:
        raise SignalsError(f"{where}: column {duplicated[0]!r} appears twice")
    bins = {channel["name"]: len(channel["samples"][0]["data"]) for channel in workspace["channels"]}
    found: dict[str, dict] = {}
    found_errors: dict[str, dict] = {}
    others = []
    for column in columns:
        match = _BIN.match(column)
        if column in ("name", "yields", "uncertainties") or match is None:
            if column not in ("name", "yields", "uncertainties"):
                others.append(column)
            continue
        channel, number = match["channel"], int(match["bin"])
        if channel not in bins:
            raise SignalsError(f"{where}: column {column!r} names no channel of the workspace (channels: "
                               f"{', '.join(list(bins)[:8])})")
        (found_errors if match["err"] else found).setdefault(channel, {})[number] = column
    wide = {channel: _bins(numbers, bins[channel], channel, where) for channel, numbers in found.items()}
    errors = {channel: _bins(numbers, bins[channel], channel + " uncertainties", where)
              for channel, numbers in found_errors.items()}
    if not wide and "yields" not in columns:
        raise SignalsError(f"{where} has no signal yields: give columns CHANNEL[0], CHANNEL[1]... or a 'yields' "
                           "column of JSON objects")
    if wide and "yields" in columns:
        raise SignalsError(f"{where} has both CHANNEL[i] columns and a 'yields' column: keep one")
    if parameters is not None:
        missing = [name for name in parameters if name not in columns]
        if missing:
            raise SignalsError(f"{where} has no column {missing[0]!r} (the template's parameters)")
        others = list(parameters)
    return Layout(tuple(others), wide, errors, "yields" in columns, "uncertainties" in columns)


def _bins(found: dict, size: int, channel: str, where: str) -> tuple:
    if sorted(found) != list(range(size)):
        given = ", ".join(str(number) for number in sorted(found))
        raise SignalsError(f"{where}: {channel} needs bins 0..{size - 1} ({size} columns), the file has bins {given}")
    return tuple(found[number] for number in range(size))


def parameter_value(value: Any) -> Any:
    """A parameter cell as a number where it is one (CSV cells are text), else as it is."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if text.lstrip("+-").isdigit() else number


def check_row(row: dict, layout: Layout, bound: Bound) -> tuple[dict, dict | None] | str:
    """The row's checked yields (and uncertainties), or the one-line reason it cannot be fitted."""
    yields = _cells(row, "yields", layout.json_yields, layout.wide, bound)
    if isinstance(yields, str):
        return yields
    reason = _check_values(yields, bound, "yield")
    if reason:
        return reason
    errors = None
    if bound.template.uncertainty is not None:
        errors = _cells(row, "uncertainties", layout.json_errors, layout.wide_errors, bound)
        if isinstance(errors, str):
            return errors
        missing = [channel for channel in yields if channel not in errors]
        if missing:
            return (f"no uncertainties for {missing[0]} (the template's {bound.template.uncertainty} needs "
                    f"{missing[0]}[i].err columns or an 'uncertainties' entry)")
        errors = {channel: errors[channel] for channel in yields}
        reason = _check_values(errors, bound, "uncertainty")
        if reason:
            return reason
    return yields, errors


def _cells(row: dict, column: str, as_json: bool, wide: dict, bound: Bound) -> dict | str:
    """``{channel: [cells]}`` of the yields or the uncertainties, from wide columns or JSON."""
    if as_json:
        return _json_cells(row.get(column), column, bound)
    return {channel: [row.get(name) for name in names] for channel, names in wide.items()}


def _json_cells(cell: Any, column: str, bound: Bound) -> dict | str:
    """``{channel: [values]}`` from a JSON cell, or why not."""
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return f"no {column}: the {column!r} cell is empty"
    try:
        value = json.loads(cell) if isinstance(cell, str) else cell
    except json.JSONDecodeError as error:
        return f"{column!r} is not JSON ({error.msg} at column {error.colno})"
    if not isinstance(value, dict):
        return f"{column!r} must be a JSON object {{channel: [per bin]}}, got {type(value).__name__}"
    for channel, numbers in value.items():
        if channel not in bound.index:
            return f"unknown channel {channel!r} in {column} (channels: {', '.join(list(bound.index)[:8])})"
        if bound.channels is not None and channel not in bound.channels:
            return f"channel {channel!r} in {column} is not one of the template's channels ({', '.join(bound.channels)})"
        if not isinstance(numbers, list):
            return f"{column} of {channel} must be a list of numbers, got {type(numbers).__name__}"
    return value


def _check_values(cells: dict, bound: Bound, what: str) -> str | None:
    """Convert ``cells`` in place to floats; the reason a point cannot be fitted, or ``None``."""
    wanted = bound.channels if bound.channels is not None else tuple(cells)
    if not wanted:
        return f"no {what}s for any channel"
    for channel in wanted:
        if channel not in cells:
            return f"no {what}s for channel {channel}"
        values = cells[channel]
        if len(values) != bound.bins[channel]:
            return f"{channel} has {len(values)} {what}s, the workspace's {channel} has {bound.bins[channel]} bins"
        for number, value in enumerate(values):
            try:
                value = float(value) if not isinstance(value, bool) else None
            except (TypeError, ValueError):
                value = None
            if value is None:
                given = values[number]
                return f"{what} {channel}[{number}] is {'empty' if given in (None, '') else repr(given) + ', not a number'}"
            if math.isnan(value) or math.isinf(value):
                return f"{what} {channel}[{number}] is {value} (must be a finite number)"
            if value < 0:
                return f"{what} {channel}[{number}] is negative ({value:g})"
            values[number] = value
    return None
