"""Signal points as data: a table of signal yields, one row per model point, scanned like a pallet.

Reinterpretation tools produce signal yields for 10^4-10^6 model points. Instead of one patch file
per point, ``map_fits("BkgOnly.json", signals="yields.csv", template=...)`` (``pyhf-dist fit
BkgOnly.json --signals yields.csv --template template.json``) reads a CSV or Parquet file of
rows (:mod:`pyhf_dist.signals.rows`) and turns each into the patch a reinterpreter would write
(:mod:`pyhf_dist.signals.template`). Records keep the row's model parameters as their ``values``,
labelled by the parameter columns (so ``to_pandas`` has them as columns).

The file is read twice, each time as a stream: once at the start for the names and parameters
(what the results, the journal and resuming need), and once while the scan submits its fits, a
patch made from each row just before its task is sent. No list of the points' patches is ever
held: a 10^6-row file costs the scan its names and parameters, not 10^6 patches. A row that cannot
be fitted (see :func:`pyhf_dist.signals.rows.check_row`) becomes a :class:`SignalPatch` with an
``error``: the scan records that point as failed with that reason, and fits the others.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator

from pyhf_dist.exceptions import InputError
from pyhf_dist.pallet import Pallet, Patch, load_workspace, select_across
from pyhf_dist.signals.output import read_parquet
from pyhf_dist.signals.rows import check_row, header, layout_of, parameter_value, read_rows
from pyhf_dist.signals.template import SignalsError, Template, load_template

__all__ = [
    "SignalPatch", "SignalPoints", "SignalsError", "Template", "load_signals", "load_template", "select",
    "named_values", "pending", "read_parquet",
]


@dataclasses.dataclass(frozen=True)
class SignalPatch(Patch):
    """A patch made from one row; ``error`` says why the row cannot be fitted (then the
    operations are empty and the point fails alone)."""

    error: str | None = None


class SignalPoints:
    """The points of a signals file: sized, iterable as :class:`SignalPatch` objects made one row
    at a time, optionally restricted to chosen names.

    Args:
        path: The CSV or Parquet file.
        workspace: The background workspace the patches apply to.
        template: The :class:`Template`.

    Raises:
        SignalsError: The file or the template cannot be used (one line, before any fit).
    """

    def __init__(self, path: str | os.PathLike, workspace: dict, template: Template):
        self.path = Path(path)
        columns = header(self.path)
        self.layout = layout_of(columns, workspace, template.parameters, str(self.path))
        self.bound = template.resolve(workspace, self.layout.named_channels)
        self.labels = list(self.layout.parameters)
        self.point_names, self.point_values = self._index()
        self.chosen: set | None = None

    def _index(self) -> tuple[list[str], list[list]]:
        """Every row's name and parameters (one streaming pass over the file).

        The parameters of a row are a list: the one its records' ``values`` will be (the scan's
        plan and records share it, :func:`named_values`), so that a point holds one list, not a
        tuple here and a list in its record. Equal integers and texts of many rows (a grid's
        masses) are one object: an int above 256 is 32 bytes a row otherwise.
        """
        names: list[str] = []
        values: list[list] = []
        seen: dict[str, int] = {}
        shared: dict = {}  # ints and texts only: a float -0.0 would become 0.0 (they are equal)
        columns = self.layout.parameters
        for number, row in read_rows(self.path, ["name", *columns]):
            name = row.get("name")
            name = "" if name is None else str(name).strip()
            if not name:
                raise SignalsError(f"{self.path}: row {number} has no name (every point needs a unique name)")
            if name in seen:
                raise SignalsError(f"{self.path}: rows {seen[name]} and {number} are both named {name!r}: names must be unique")
            seen[name] = number
            names.append(name)
            point = tuple(_one_of(parameter_value(row.get(column)), shared) for column in columns)
            values.append(list(point))  # exactly as long as the row (a list grown by appends has spare room)
        if not names:
            raise SignalsError(f"{self.path} has no rows: nothing to fit")
        return names, values

    def __len__(self) -> int:
        return len(self.point_names) if self.chosen is None else len(self.chosen)

    def names(self) -> list[str]:
        """The points' names, in the file's order."""
        return self.point_names if self.chosen is None else [name for name in self.point_names if name in self.chosen]

    def named_values(self) -> Iterator[tuple[str, list]]:
        """``(name, parameters)`` of the chosen points, without reading the file again (the lists
        of the index: not copies)."""
        for name, values in zip(self.point_names, self.point_values):
            if self.chosen is None or name in self.chosen:
                yield name, values

    def select(self, chosen: set | None) -> "SignalPoints":
        """The same file restricted to the names in ``chosen`` (``None``: all)."""
        view = object.__new__(SignalPoints)
        view.__dict__.update(self.__dict__)
        view.chosen = chosen
        return view

    def __iter__(self) -> Iterator[SignalPatch]:
        """The chosen points as patches, made one row at a time, in the file's order."""
        for (number, row), name, values in zip(read_rows(self.path), self.point_names, self.point_values):
            if self.chosen is not None and name not in self.chosen:
                continue
            if str(row.get("name")).strip() != name:  # read twice: it must be the same file both times
                raise SignalsError(f"{self.path} changed while the scan read it (row {number} is no longer {name!r})")
            checked = check_row(row, self.layout, self.bound)
            values = tuple(values)  # a Patch's values are a tuple
            if isinstance(checked, str):
                yield SignalPatch(name, values, [], error=checked)
            else:
                yield SignalPatch(name, values, self.bound.operations(*checked))


def _one_of(value: Any, shared: dict) -> Any:
    """``value``, or the equal int or text met before (kept in ``shared``)."""
    return shared.setdefault(value, value) if type(value) in (int, str) else value


def load_signals(workspace: Any, signals: Any, template: Any = None) -> Pallet:
    """A :class:`~pyhf_dist.pallet.Pallet` whose patches are the points of a signals file.

    Args:
        workspace: The background workspace (``BkgOnly.json`` path, dict or ``pyhf.Workspace``).
        signals: The CSV or Parquet file of points.
        template: A :class:`Template`, its dict, a JSON file or JSON text; ``None``: the defaults.

    Raises:
        SignalsError: The file or the template cannot be used.
    """
    if isinstance(signals, Pallet):
        return signals
    if not isinstance(signals, (str, os.PathLike)):
        raise InputError(f"signals= takes the path of a .csv or .parquet file, got {type(signals).__name__}")
    spec = load_workspace(workspace, validate=False)
    points = SignalPoints(signals, spec, load_template(template))
    source = str(workspace) if isinstance(workspace, (str, os.PathLike)) else "<memory>"
    return Pallet(spec, points, points.labels, source, f"signal points of {points.path.name}")


# ------------------------------------------------------------------ what the scan loop calls


def select(pallets: list[Pallet], selection: Any) -> list:
    """:func:`~pyhf_dist.pallet.select_across`, keeping a signals file's points a lazy view."""
    if not any(isinstance(each.patches, SignalPoints) for each in pallets):
        return select_across(pallets, selection)
    if len(pallets) != 1:
        raise InputError("a signals file is one pallet: it cannot be fitted with other pallets")
    points = pallets[0].patches
    if selection is None:
        return [points]
    # The names go through the same matching (and messages) as a patchset's.
    light = Pallet({}, [Patch(name, (), []) for name in points.names()], [])
    chosen = select_across([light], selection)[0]
    return [points.select({patch.name for patch in chosen})]


def named_values(selected) -> Iterator[tuple[str, list]]:
    """``(name, values)`` of selected patches, the values a list of the scan's own for each: a
    signals file's index holds such lists already (its points' records share them, no copy);
    a patch's values are copied."""
    if isinstance(selected, SignalPoints):
        return selected.named_values()
    return ((patch.name, list(patch.values)) for patch in selected)


class Pending:
    """The patches still to fit, ``(pallet, patch)``, made as they are taken: sized, iterable."""

    def __init__(self, pallet: str | None, points: SignalPoints, finished: dict):
        self.pallet, self.points = pallet, points
        self.finished = {name for key_pallet, name in finished if key_pallet == pallet}
        self.count = len(points) - sum(1 for name in self.finished if points.chosen is None or name in points.chosen)

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for patch in self.points:
            if patch.name not in self.finished:
                yield self.pallet, patch


def pending(pallets: list[Pallet], chosen: list, finished: dict):
    """The scan's ``todo``: a list of ``(pallet name, patch)``, or a :class:`Pending` stream for a
    signals file."""
    if len(chosen) == 1 and isinstance(chosen[0], SignalPoints):
        return Pending(pallets[0].name, chosen[0], finished)
    return [(each.name, patch) for each, selected in zip(pallets, chosen) for patch in selected
            if (each.name, patch.name) not in finished]
