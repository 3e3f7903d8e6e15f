"""The text summary of a scan (:meth:`pyhf_dist.results.ScanResult.summary`): counts, what the
numbers mean for the settings (exclusions, excesses of a discovery scan, limits a grid could not
bound), how the fits ended, what fitted them, and where.
"""

from __future__ import annotations

import collections

from pyhf_dist.records import COMBINATIONS

__all__ = ["P0_3SIGMA", "P0_5SIGMA", "summary"]

#: One-sided p-values of a 3 and a 5 standard deviation excess (discovery scans, ``q0``).
P0_3SIGMA, P0_5SIGMA = 1.349898e-3, 2.866516e-7


def summary(result) -> str:
    """The summary of ``result`` (a :class:`~pyhf_dist.results.ScanResult`), one line per fact."""
    counts = result.counts()
    wall = result.metadata.get("wall_seconds")
    lines = [
        f"{'patches':<28}{counts['total']}",
        f"{'ok':<28}{counts['ok']}",
        f"{'failed':<28}{counts['failed']}",
    ]
    pallets = result.pallets()
    if pallets and not result.discovery:  # exclusion counts are per pallet: one point is in several
        lines += _pallet_lines(result, pallets)
    if result.discovery:  # p0 of the background-only hypothesis: an excess, not an exclusion
        p0 = [record.CLs_obs for record in result.records if record.ok and record.CLs_obs is not None]
        lines.append(f"{'excess 3 sigma (p0<1.35e-3)':<28}{sum(value < P0_3SIGMA for value in p0)}")
        lines.append(f"{'excess 5 sigma (p0<2.87e-7)':<28}{sum(value < P0_5SIGMA for value in p0)}")
    elif not pallets and any(record.CLs_obs is not None for record in result.records):
        lines.append(f"{'excluded (CLs_obs < 0.05)':<28}{counts['excluded']}")
    if not pallets and any(record.mu_up_obs is not None for record in result.records):
        below = sum(1 for r in result.records if r.mu_up_obs is not None and r.mu_up_obs < 1)
        lines.append(f"{'excluded (mu_up_obs < 1)':<28}{below}")
    lines += _grid_top_lines(result)
    lines += _certification_lines(result)
    engines = result.engines()
    for engine, count in engines["engines"].items():
        lines.append(f"{'engine ' + engine:<28}{count}")
    for number, (reason, count) in enumerate(engines["fallbacks"].items()):
        lines.append(f"{'fast path declined' if number == 0 else '':<28}{reason} ({count})")
    if wall is not None:
        lines.append(f"{'wall time':<28}{wall:.1f} s")
    if result.metadata.get("executor"):
        workers = result.metadata.get("workers")
        fitted = _workers_that_fitted(result)
        # A batch system may run fewer of the jobs asked for (a full queue): say how many did.
        busy = f", {fitted} of them fitted" if isinstance(workers, int) and 0 < fitted < workers else ""
        lines.append(f"{'executor':<28}{result.metadata['executor']} ({workers} worker{'' if workers == 1 else 's'}"
                     f"{busy})")
    return "\n".join(lines)


def _grid_top_lines(result) -> list[str]:
    """A line for the limits a ``--scan`` grid could not bound: where CLs stays above the level
    up to the grid's last value, pyhf's interpolation returns that value (a lower bound)."""
    grid = (result.metadata.get("settings") or {}).get("upper_limit_scan")
    if not grid:
        return []
    top = float(grid[1])
    at_top = sum(1 for record in result.records if record.ok and any(
        value is not None and abs(value - top) <= 1e-9 * max(1.0, top)
        for value in [record.mu_up_obs, *(record.mu_up_exp or [])]))
    if not at_top:
        return []
    return [f"{'at the --scan grid top':<28}{at_top} (a limit of {top:g} there is only a lower bound: widen --scan)"]


def _workers_that_fitted(result) -> int:
    """How many worker processes fitted the records of this run (not those read from a journal)."""
    started = result.metadata.get("started")
    return len({(record.worker.get("host"), record.worker.get("pid")) for record in result.records
                if isinstance(record.worker, dict) and record.worker.get("pid") is not None
                and (started is None or (record.submitted or 0) >= started)})


def _certification_lines(result) -> list[str]:
    """Summary lines on how the fits ended (only where some record was checked)."""
    found = result.certification()
    checked = found["certified"] + found["not_converged"]
    if not checked:
        return []
    lines = [f"{'fits converged (certified)':<28}{found['certified']} of {checked}"]
    if found["pyhf_stalls"]:
        ok = result.counts()["ok"]
        lines.append(
            f"{'pyhf default fits stall':<28}on {found['pyhf_stalls']} of {ok} patches "
            "(the CLs here are from converged fits; --match-pyhf gives pyhf's own)"
        )
    return lines


def _pallet_lines(result, pallets: list[str]) -> list[str]:
    """One summary line per pallet: its counts, and for a combination the pallets it took."""
    limits = not any(record.CLs_obs is not None for record in result.records)
    test = "mu_up_obs < 1" if limits else "CLs_obs < 0.05"
    fitted = [name for name in pallets if name not in COMBINATIONS]
    lines = [f"{'pallets':<28}{len(fitted)} ({test} counted as excluded)"]
    for name in pallets:
        records = [record for record in result.records if record.pallet == name]
        ok = sum(record.ok for record in records)
        if limits:
            excluded = sum(1 for r in records if r.ok and r.mu_up_obs is not None and r.mu_up_obs < 1)
        else:
            excluded = sum(bool(record.excluded) for record in records)
        line = f"  {name:<26}{len(records)} {'points' if name in COMBINATIONS else 'patches'}: {ok} ok, " \
               f"{len(records) - ok} failed, {excluded} excluded"
        if name in COMBINATIONS:
            taken = collections.Counter(record.chosen_pallet for record in records if record.chosen_pallet)
            line += f" (from {', '.join(f'{pallet} {taken[pallet]}' for pallet in fitted if taken[pallet])})"
        lines.append(line)
    return lines
