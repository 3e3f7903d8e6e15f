"""Combining the results of several pallets of one search: the best-expected selection.

Multi-region searches publish one pallet per signal region (e.g. the ATLAS stau search's
``Region-lowMass`` and ``Region-highMass``) and draw their exclusion contour from the region with
the best expected sensitivity at each signal point. :func:`combine` with ``"best-expected"`` does
that, from the pallets' own records:

* A signal point is a tuple of patch ``values``: the records of the pallets with the same values
  are one point (patches without values are matched by name).
* The candidates at a point are the pallets that have a record for it; a pallet that has no patch
  for the point is no candidate, and the point is chosen among the others.
* If a candidate's fit failed there, the choice cannot be made: the combined record is failed and
  its ``error`` names the pallet (refit it, e.g. ``--resume``, and the combination is made again).
* A candidate whose median expected value is undefined (CLs = 0/0) cannot be compared and is
  passed over; where none is left the combined record is failed.
* Of the rest, the pallet with the smallest median expected CLs wins (for upper-limit results: the
  smallest median expected μ_up); a tie goes to the pallet listed first.
* The combined record is a copy of the winner's record (its observed CLs and expected band, its
  patch name, fit time, worker) with ``pallet="best-expected"`` and ``chosen_pallet`` naming the
  winner.

>>> from pyhf_dist.results import FitRecord
>>> records = [FitRecord("P_100_1", [100, 1], CLs_obs=0.02, CLs_exp=[0, 0, 0.04, 0, 0], pallet="low"),
...            FitRecord("P_100_1", [100, 1], CLs_obs=0.20, CLs_exp=[0, 0, 0.30, 0, 0], pallet="high")]
>>> [(r.pallet, r.chosen_pallet, r.CLs_obs) for r in combine(records, "best-expected")]
[('best-expected', 'low', 0.02)]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

from pyhf_dist.exceptions import InputError
from pyhf_dist.records import COMBINATIONS, FitRecord

__all__ = ["combine", "best_expected", "check_method"]

BEST_EXPECTED = "best-expected"


def check_method(method: str | None, pallets: Sequence) -> str | None:
    """``method`` if it is a known combination and there are pallets to combine; else one clear line.

    Raises:
        InputError: An unknown combination, or fewer than two pallets.
    """
    if method is None:
        return None
    if method not in COMBINATIONS:
        raise InputError(f"unknown combination {method!r}: choose {', '.join(COMBINATIONS)}")
    if len(pallets) < 2:
        raise InputError(
            f"combining pallets ({method}) needs at least two: choose them with --pallet NAME --pallet NAME "
            f"or --pallet all (pallet= in Python)"
        )
    return method


def combine(records: Iterable[FitRecord], method: str = BEST_EXPECTED, pallets: Sequence[str] | None = None) -> list:
    """The combined records of several pallets' records (see the module's rules).

    Args:
        records: The pallets' records (records of a combination among them are ignored).
        method: ``"best-expected"``.
        pallets: The pallets in order of preference for ties; default: as they first appear.

    Returns:
        One :class:`FitRecord` per signal point, in the order the points first appear.
    """
    check_method(method, ["", ""])
    return best_expected(records, pallets)


def best_expected(records: Iterable[FitRecord], pallets: Sequence[str] | None = None) -> list:
    """Per signal point, the record of the pallet with the smallest median expected CLs (or μ_up)."""
    records = [record for record in records if not record.combined]
    order = list(pallets) if pallets is not None else list(dict.fromkeys(record.pallet for record in records))
    rank = {name: index for index, name in enumerate(order)}
    limits = not any(record.CLs_exp for record in records) and any(record.mu_up_exp for record in records)
    points: dict[tuple, list[FitRecord]] = {}
    for record in records:
        if record.pallet in rank:
            points.setdefault(_point(record), []).append(record)
    combined = []
    for candidates in points.values():
        candidates.sort(key=lambda record: rank[record.pallet])
        combined.append(_choose(candidates, limits))
    return combined


def _point(record: FitRecord) -> tuple:
    if record.values:
        return ("values", tuple(float(value) for value in record.values))
    return ("name", record.name)


def _median(record: FitRecord, limits: bool) -> float | None:
    band = record.mu_up_exp if limits else record.CLs_exp
    if not isinstance(band, (list, tuple)) or len(band) != 5:
        return None
    value = band[2]
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _choose(candidates: list[FitRecord], limits: bool) -> FitRecord:
    first = candidates[0]
    failed = [record for record in candidates if not record.ok]
    if failed:
        reasons = "; ".join(f"{record.pallet} failed: {record.error}" for record in failed)
        return _failed(first, f"no best-expected choice without every pallet's fit ({reasons})")
    comparable = [(value, record) for record in candidates if (value := _median(record, limits)) is not None]
    if not comparable:
        quantity = "mu_up" if limits else "CLs"
        return _failed(first, f"no pallet has a defined median expected {quantity} at this point")
    best = min(comparable, key=lambda item: item[0])[1]  # min keeps the first of equal values
    return dataclasses.replace(best, pallet=BEST_EXPECTED, chosen_pallet=best.pallet,
                               values=list(best.values), worker=dict(best.worker) if best.worker else best.worker)


def _failed(first: FitRecord, error: str) -> FitRecord:
    return FitRecord(first.name, list(first.values), status="failed", error=error, pallet=BEST_EXPECTED)
