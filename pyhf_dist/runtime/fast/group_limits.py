"""Upper limits of a group's patches: their searches in lockstep, each round's fits in one loop.

pyhf's search for a limit (:func:`~pyhf_dist.runtime.fast.limits.search`: root-finding, or a grid)
asks for the CLs at one POI value after another, each value chosen from the CLs before it. Here
every patch's search runs as on the one-at-a-time path, in a thread of its own; the values the
searches ask for are gathered, and each round of them is fitted in one
:meth:`~pyhf_dist.runtime.fast.group.GroupScan.statistics` call: the whole group's next values in
one compiled loop. A round waits for every search still running, so a group takes as many rounds
as its longest search (about 40 with root-finding, one with a grid).

The fits and their checks are the group's (:class:`~pyhf_dist.runtime.fast.group.GroupScan`). Where
a patch's fits fail a check at the values its search asks for in a round (its starts find
different minima there, as on 1Lbb at some POI values), those values are fitted as the
one-at-a-time path fits them (:class:`~pyhf_dist.runtime.fast.fit.PoiScan`, the lowest of its
starts), and the search goes on. A patch the one-at-a-time path declines too, or whose search
fails (beyond the POI bounds, a bracket pyhf cannot search), is left ``None``, for the
one-at-a-time path to fit and, where its search fails there too, to report. The others' searches
go on.

Example:
    >>> found = upper_limits(engine.problem, patches)  # one dict, or None, per patch  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading

from pyhf_dist.runtime.fast import fit, limits
from pyhf_dist.runtime.fast.errors import FastPathUnsupported
from pyhf_dist.runtime.fast.group import GroupScan, scan_of

__all__ = ["upper_limits"]

log = logging.getLogger(__name__)


def upper_limits(problem_of, patches: list, test_stat: str = "qtilde", level: float = 0.05, scan=None) -> list[dict | None]:
    """The upper limits of each patch (its jsonpatch operations), the searches' fits made together.

    Each limit is the one :func:`~pyhf_dist.runtime.fast.limits.upper_limit` gives the patch alone
    with certified fits, to the precision of the fits.

    Args:
        problem_of: Makes a patch's :class:`~pyhf_dist.runtime.fast.problem.FitProblem`.
        patches: The patches' jsonpatch operations.
        test_stat: ``"qtilde"`` or ``"q"``.
        level: CLs level of the limits.
        scan: ``None`` for pyhf's root-finding between the POI bounds, or the grid of POI values.

    Returns:
        Per patch, ``{"mu_up_obs", "mu_up_exp"}`` and the certificate of its fits (as
        :meth:`~pyhf_dist.runtime.fast.engine.FastHypotest.upper_limit`), or ``None`` for a patch to
        fit one at a time: every patch, where the group cannot share a loop or holds fewer than
        :data:`~pyhf_dist.protocol.SMALLEST_GROUP` patches. Never raises for a patch.
    """
    out: list[dict | None] = [None] * len(patches)
    group, indices = scan_of(problem_of, patches, test_stat)
    if group is None:
        return out
    rows = [row for row in range(len(indices)) if group.answerable[row]]
    lockstep = _Lockstep(group, rows)
    members = {row: _Member(lockstep, row, group.problems[row]) for row in rows}
    found: dict[int, dict] = {}

    def search(row: int) -> None:
        try:
            found[row] = limits.search(members[row], test_stat, level, scan)
        except Exception as error:  # noqa: BLE001 - the one-at-a-time path fits it, with its own record
            log.info("fast path: a patch's limit not searched in the group (%s)", error)
        finally:
            lockstep.done(row)

    # Daemons: a worker stopped meanwhile does not wait for them.
    threads = [threading.Thread(target=search, args=(row,), name=f"limit-search-{row}", daemon=True) for row in rows]
    for thread in threads:
        thread.start()
    lockstep.run()
    for thread in threads:
        thread.join()
    log.info("fast path: %d of %d limits searched together in %d rounds", len(found), len(indices), lockstep.rounds)
    for row, limit in found.items():
        out[indices[row]] = {
            "mu_up_obs": limit["mu_up_obs"],
            "mu_up_exp": limit["mu_up_exp"],
            **_certificate(group, members[row].values),
        }
    return out


class _Lockstep:
    """The rounds: the statistics each running search asks for, fitted together once every
    running search has asked (:meth:`run`, in the calling thread)."""

    def __init__(self, group: GroupScan, rows: list[int]):
        self._group = group
        self._alone: dict[int, object] = {}  # row -> its PoiScan, for values the group cannot answer
        self._changed = threading.Condition()
        self._running = set(rows)
        self._asked: dict[int, list[float]] = {}
        self._answers: dict[int, list | None] = {}
        self.rounds = 0

    def ask(self, row: int, mus: list[float]) -> list[dict] | None:
        """In a search's thread: the statistics of patch ``row`` at ``mus`` (``None``: neither the
        group nor the one-at-a-time path answers them)."""
        with self._changed:
            self._asked[row] = list(mus)
            self._changed.notify_all()
            self._changed.wait_for(lambda: row in self._answers)
            return self._answers.pop(row)

    def done(self, row: int) -> None:
        """In a search's thread, when its search has ended (a limit or an error)."""
        with self._changed:
            self._running.discard(row)
            self._changed.notify_all()

    def run(self) -> None:
        """Fit round after round until every search has ended."""
        count = len(self._group.problems)
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._running <= self._asked.keys())
                if not self._running:
                    return
                asked, self._asked = self._asked, {}
            try:
                found = self._group.statistics([asked.get(row, []) for row in range(count)])
            except Exception as error:  # noqa: BLE001 - a round that fails leaves its patches to the one-at-a-time path
                log.info("fast path: a round of the group's limit searches failed (%s)", error)
                found = [None] * count
            for row in asked:
                if found[row] is None:
                    found[row] = self._one_at_a_time(row, asked[row])
            self.rounds += 1
            with self._changed:
                self._answers.update({row: found[row] for row in asked})
                self._changed.notify_all()

    def _one_at_a_time(self, row: int, mus: list[float]) -> list[dict] | None:
        """Patch ``row``'s statistics at ``mus`` from the one-at-a-time path's fits, in the form of the
        group's; ``None`` where that path declines the patch."""
        try:
            scan = self._alone.get(row)
            if scan is None:
                scan = self._alone[row] = fit.PoiScan(self._group.problems[row], self._group.test_stat)
            out = []
            for mu in mus:
                stats = scan.statistics(mu)
                names = [*scan.shared_fits, fit.fit_name("asimov", mu), fit.fit_name("observed", mu)]
                out.append({**stats, "fits": {name: scan.fits[name].certificate() for name in names}})
            return out
        except FastPathUnsupported as error:
            log.info("fast path: a patch's limit search left to one patch at a time (%s)", error)
            return None


class _Member:
    """One patch's share of the group, as its search reads statistics (``bounds``,
    ``statistics_many``: :class:`~pyhf_dist.runtime.fast.fit.PoiScan`'s)."""

    def __init__(self, lockstep: _Lockstep, row: int, problem):
        self._lockstep, self._row = lockstep, row
        poi = problem.poi_index
        self.bounds = (float(problem.lower[poi]), float(problem.upper[poi]))
        #: Every value's answer so far (statistics, CLs and the certificates of its fits).
        self.values: list[dict] = []

    def statistics_many(self, mus, observed: bool = True) -> list[dict]:
        found = self._lockstep.ask(self._row, [float(mu) for mu in mus])
        if found is None:
            raise FastPathUnsupported("the group's fits failed a check at a POI value of the search")
        self.values += found
        # The group fits the observed data at every value; a search that did not ask for the
        # observed CLs reads none, as the one-at-a-time path's. Certified fits: no noise.
        return [{**stats, "qmu": stats["qmu"] if observed else None, "noisy_obs": False, "noisy_A": False}
                for stats in found]


def _certificate(group: GroupScan, values: list[dict]) -> dict:
    """The certificate of a patch's limit (as the one-at-a-time path's): the three fits every POI
    value shares, and its conditional fits summarised in one entry."""
    shared = ["observed free", group.background_name, "asimov free"]
    fits = values[0]["fits"]
    conditional = {name: found for value in values for name, found in value["fits"].items() if name not in shared}
    out = {
        "converged": True,
        "fits": {
            **{name: dict(fits[name]) for name in shared},
            "conditional": limits.conditional_summary(list(conditional.values())),
        },
    }
    if "pyhf_default" in values[0]:
        out["pyhf_default"] = dict(values[0]["pyhf_default"])
    return out
