"""Upper limits on the compiled likelihood: pyhf's searches driven by :class:`~pyhf_dist.runtime.fast.fit.PoiScan`.

pyhf's ``upper_limit`` calls a full hypotest (five fits) at every POI value its search visits,
40 to 50 of them per patch with the default root-finding. Here the three fits that do not depend
on the POI value are made once per patch, each value costs two conditional fits, and the values
first met in the searches of the expected limits only the fit to the Asimov data (the expected
band depends on nothing else). Once other values are fitted, a value's fits start from the
minimum interpolated between the nearest ones (:meth:`~pyhf_dist.runtime.fast.fit.PoiScan.conditional`).
The searches themselves are pyhf's
(:func:`pyhf_dist.runtime.reference.toms748_scan`, :func:`pyhf_dist.runtime.reference.grid_scan`).

The fits are certified (:mod:`~pyhf_dist.runtime.fast.fit`): every CLs value is that of converged fits.
With ``match_pyhf`` the limits are pyhf's own instead, noise included. A test statistic within
fit precision of zero (:data:`~pyhf_dist.runtime.fast.fit.NOISE_FLOOR`; at ``mu = 0``, always for the
Asimov data) has a CLs that is the noise of pyhf's fits there. That
noise changes no limit as long as it leaves the CLs on the same side of the level in a root
search (it only steers the next trial value: the search ends within its tolerance of the same
crossing), and no interpolated limit of a grid. Where it could, and where it could make pyhf's
CLs undefined (``0/0`` when its Asimov statistic rounds to zero and the observed one does not,
which makes pyhf's search fail), the value at that POI is pyhf's own hypotest (``exact``), or
the patch is declined for plain pyhf when none is given.

A search that must test a value outside the POI's bounds fails as pyhf's does (pyhf refuses the
fit there), with :class:`~pyhf_dist.exceptions.UpperLimitError`.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np

from pyhf_dist.exceptions import UpperLimitError
from pyhf_dist.runtime.fast import fit
from pyhf_dist.runtime.fast.errors import FastPathUnsupported

__all__ = ["upper_limit", "search", "conditional_summary", "LIMIT_NOISE"]

#: Largest relative change of a grid-interpolated limit allowed when a noisy CLs value it uses
#: moves across its range (beyond it, pyhf's own value at that point is used).
LIMIT_NOISE = 1e-4


def upper_limit(
    problem,
    test_stat: str,
    level: float,
    scan=None,
    exact: Callable[[float], tuple] | None = None,
    *,
    match_pyhf: bool = False,
) -> dict:
    """Observed and expected upper limits of one patch, as ``pyhf...upper_limit(data, model, scan, level)``.

    Args:
        problem: The patch (:class:`~pyhf_dist.runtime.fast.problem.FitProblem`).
        test_stat: ``"qtilde"`` or ``"q"``.
        level: CLs level of the limit (0.05: 95% CL).
        scan: ``None`` for pyhf's root-finding between the POI bounds, or the grid of POI values.
        exact: ``mu -> (CLs_obs, [CLs_exp x5])`` from plain pyhf, for the POI values where the
            noise of pyhf's fits decides the outcome (``match_pyhf``); ``None`` declines such patches.
        match_pyhf: Reproduce pyhf's limits (its fits' starting points and noise) instead of
            those of the certified converged fits.

    Returns:
        ``{"mu_up_obs": float, "mu_up_exp": [5 floats], "poi_values": int, "exact_values": int}``
        (how many POI values the search tested, and how many of them plain pyhf computed), and
        the fits' certificate: ``converged``, ``fits`` (the three fits every POI value shares,
        and ``"conditional"``: how many conditional fits, their largest gradient, whether all
        converged), ``pyhf_default`` where pyhf's default minimizer stalls on the patch.

    Raises:
        FastPathUnsupported: The limit would not be pyhf's (see the module); plain pyhf then.
        UpperLimitError: The search reaches beyond the POI bounds (pyhf fails there too).
    """
    if test_stat not in ("qtilde", "q"):
        raise FastPathUnsupported(f"upper limits with test statistic {test_stat!r}")
    poi_scan = fit.PoiScan(problem, test_stat, match_pyhf=match_pyhf)
    searched = search(poi_scan, test_stat, level, scan, exact, match_pyhf=match_pyhf)
    shared = poi_scan.shared_fits
    certificate = poi_scan.certificate(shared)
    certificate["fits"]["conditional"] = conditional_summary(
        [found.certificate() for name, found in poi_scan.fits.items() if name not in shared]
    )
    return {**searched, **certificate}


def conditional_summary(certificates: list[dict]) -> dict:
    """A limit's conditional fits (their certificates) in one certificate entry: how many, their
    largest gradient, whether all converged."""
    return {
        "count": len(certificates),
        "gradient": max((found["gradient"] for found in certificates), default=0.0),
        "converged": all(found["converged"] for found in certificates),
    }


def search(source, test_stat: str, level: float, scan=None, exact: Callable[[float], tuple] | None = None, *,
           match_pyhf: bool = False) -> dict:
    """pyhf's search for the observed and expected limits, on the test statistics of ``source``.

    Args:
        source: Where the statistics come from: ``bounds`` (the POI's) and
            ``statistics_many(mus, observed)`` as :class:`~pyhf_dist.runtime.fast.fit.PoiScan`'s
            (one patch's fits, or its share of a group's, :mod:`~pyhf_dist.runtime.fast.group_limits`).
        test_stat, level, scan, exact, match_pyhf: As :func:`upper_limit`.

    Returns:
        ``{"mu_up_obs", "mu_up_exp", "poi_values", "exact_values"}`` (as :func:`upper_limit`,
        without the certificate).

    Raises:
        FastPathUnsupported, UpperLimitError: As :func:`upper_limit`.
    """
    from pyhf_dist.runtime import reference as limits

    lower, upper = source.bounds
    ranges: dict[float, tuple] = {}  # mu -> (least, greatest) CLs values over pyhf's noise
    exact_values: dict[float, tuple] = {}

    def pyhf_value(mu, why):
        if exact is None:
            raise FastPathUnsupported(
                f"at mu = {mu:g} a test statistic is zero within fit precision and {why}: only plain "
                "pyhf reproduces pyhf's limit"
            )
        if mu not in exact_values:
            obs, expected = exact(mu)
            exact_values[mu] = (float(obs), [float(value) for value in expected])
        return exact_values[mu]

    def hypotests(mus, observed=True):
        for mu in mus:
            if not lower <= mu <= upper:
                if scan is not None:
                    raise UpperLimitError(
                        f"the grid of --scan reaches mu = {mu:g}, outside the POI bounds [{lower:g}, {upper:g}], "
                        "where pyhf cannot fit: give a grid within them, or widen the POI bounds in the "
                        "workspace's measurement"
                    )
                raise UpperLimitError(
                    f"pyhf's upper limit search must test mu = {mu:g}, outside the POI bounds "
                    f"[{lower:g}, {upper:g}], where pyhf cannot fit: widen the POI bounds in the "
                    "workspace's measurement, or give a grid within them (--scan)"
                )
        results = []
        for mu, stats in zip(mus, source.statistics_many(mus, observed)):
            central, low, high = _cls_range(stats, test_stat, powerless_is_one=not match_pyhf)
            ranges[mu] = (low, high)
            if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
                results.append(pyhf_value(mu, "pyhf's CLs there may be undefined (0/0)"))
            elif scan is None and np.any((low < level) != (high < level)):
                results.append(pyhf_value(mu, f"its CLs may lie on either side of {level}"))
            else:
                results.append((central[0] if observed else None, list(central[1:])))
        return results

    if scan is None:
        observed, expected = limits.toms748_scan(lambda mu, obs: hypotests([mu], obs)[0], lower, upper, level)
    else:
        grid = [float(mu) for mu in scan]
        results = hypotests(grid)
        for index, mu in enumerate(grid):
            if mu not in exact_values and _moves_limit(results, index, ranges[mu], grid, level):
                results[index] = pyhf_value(mu, "the interpolated limit depends on its CLs")
        observed, expected = limits.grid_scan(lambda mus: results, grid, level)
    return {"mu_up_obs": observed, "mu_up_exp": expected, "poi_values": len(ranges), "exact_values": len(exact_values)}


def _moves_limit(results: list, index: int, bounds: tuple, grid: list, level: float) -> bool:
    """Whether moving the CLs values at ``grid[index]`` across their noise range moves a limit."""
    from pyhf_dist.runtime import reference as limits

    low, high = bounds
    if np.array_equal(low, high):
        return False
    limits_now = limits.grid_scan(lambda mus: results, grid, level)
    for values in (low, high):
        moved = list(results)
        moved[index] = (values[0], list(values[1:]))
        limits_moved = limits.grid_scan(lambda mus: moved, grid, level)
        for ours, other in zip([limits_now[0], *limits_now[1]], [limits_moved[0], *limits_moved[1]]):
            if not math.isclose(ours, other, rel_tol=LIMIT_NOISE, abs_tol=0.0):
                return True
    return False


def _cls_range(stats: dict, test_stat: str, *, powerless_is_one: bool = False):
    """CLs observed and expected (6 values) at the statistics, and their least and greatest over
    the range a noisy statistic may take in pyhf (between 0 and :data:`~pyhf_dist.runtime.fast.fit.NOISE_FLOOR`).

    >>> central, low, high = _cls_range({"qmu": 0.0, "qmu_A": 1e-11, "noisy_obs": True, "noisy_A": True}, "qtilde")
    >>> bool(np.isnan(low[0]))  # pyhf's qmu_A rounded to 0 and its qmu not: 0/0
    True
    >>> central, low, high = _cls_range({"qmu": 4.0, "qmu_A": 9.0, "noisy_obs": False, "noisy_A": False}, "qtilde")
    >>> bool(np.array_equal(low, central) and np.array_equal(high, central))
    True
    """
    # Without the observed statistic (not fitted: only the expected band was asked for, and it
    # depends on qmu_A alone), 0.5 stands for CLs_obs.
    observed = stats["qmu"] is not None

    def cls(qmu, qmu_a):
        with np.errstate(divide="ignore", invalid="ignore"):
            result = fit.asymptotic_cls(qmu, qmu_a, test_stat, powerless_is_one=powerless_is_one)
        return np.array([result["CLs_obs"] if observed else 0.5, *result["CLs_exp"]])

    qmu = stats["qmu"] if observed else 0.0
    central = cls(qmu, stats["qmu_A"])
    if not (stats["noisy_obs"] or stats["noisy_A"]):
        return central, central, central
    options = [
        [value, 0.0, fit.NOISE_FLOOR] if noisy else [value]
        for value, noisy in ((qmu, stats["noisy_obs"]), (stats["qmu_A"], stats["noisy_A"]))
    ]
    # The corners of the range (over so small a range CLs is monotonic in each statistic); a NaN
    # among them propagates to the least and greatest values.
    values = np.array([cls(q, q_a) for q, q_a in itertools.product(*options)])
    return central, values.min(axis=0), values.max(axis=0)
