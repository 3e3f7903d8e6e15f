"""Test statistics of pseudo-experiments on the batched fitting engine.

pyhf's :class:`~pyhf.infer.calculators.ToyCalculator` fits every toy twice (conditional and free)
with SLSQP, one after the other. Here the same statistics come from the batched engine
(:mod:`~pyhf_dist.runtime.fast.batched`), all fits of a chunk in one stream:

* the toys themselves are pyhf's, bit for bit: they are drawn by pyhf from the parameters of
  pyhf's own conditional fits (``pyhf.infer.mle.fixed_poi_fit``) after ``numpy.random.seed``
  (:func:`pyhf_dist.runtime.toys.draw`); only their fits move to the engine;
* each statistic is pyhf's formula (``pyhf.infer.test_statistics``) on the two minima:
  ``tmu = clip(-2 log L(mu) - (-2 log L(muhat)), 0)``, zero where ``muhat > mu`` (``qtilde``,
  ``q``) or ``muhat < 0`` (``q0``, with ``mu = 0``); every fit starts, as pyhf's, from the
  suggested initial values (the POI at the tested value for the conditional fit).

The fits of the observed data follow the certified policy of the asymptotic hypotests
(:mod:`~pyhf_dist.runtime.fast.fit`): the observed statistic comes from certified converged
fits (:class:`~pyhf_dist.runtime.fast.fit.PoiScan`), and where one of pyhf's generating fits
stops above the converged minimum (on 3L-eRJR pyhf's SLSQP stalls at its starting point), the
toys of that hypothesis are drawn from the converged fit instead: a toy distribution drawn from
the parameters of an unconverged fit is not the one the hypothesis predicts. The record says so
(``pyhf_default``); everywhere else the toys stay pyhf's, bit for bit. With ``match_pyhf``
(``--match-pyhf``) the numbers are pyhf's own instead: the observed statistic at the noise level
of pyhf's fits (:data:`~pyhf_dist.runtime.fast.fit.NOISE_FLOOR`) is pyhf's, and a patch where
pyhf's minimizer stalls is left to plain pyhf.

Example:
    >>> statistics = toy_statistics(fitter, samples, poi_test=1.0, test_stat="qtilde")  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from pyhf_dist.runtime.fast import batched, reflections
from pyhf_dist.runtime.fast.fit import NOISE_FLOOR, SIGN_FLOOR

__all__ = [
    "at_noise_level",
    "auxdata_columns",
    "run_chunk",
    "split_samples",
    "statistics_from_fits",
    "tested_value",
    "toy_statistics",
]


#: A free fit ending this far above its toy's conditional fit (``-2 log L``) is refitted from the
#: conditional minimum: at its own minimum it is at most the conditional one (its domain holds it).
FREE_ABOVE = 1e-6
#: A parameter within this many of its standard deviations (at the initial values) of a bound
#: is held there (:func:`_release_bounds`).
BOUND_TOLERANCE = 1e-6
#: Where each stage of :func:`toy_statistics` ends, as a fraction of its time (1Lbb, 2,000 toys:
#: every toy's first fits, the free fits' further starts, the conditional ones', released bounds,
#: reflections): only for the progress a worker reports, an estimate elsewhere.
STAGE_ENDS = (0.56, 0.68, 0.86, 0.95, 0.99)


def tested_value(poi_test: float, test_stat: str) -> float:
    """The POI value of the conditional fit: ``poi_test``, or 0 for ``q0`` (as pyhf's ``q0``)."""
    return 0.0 if test_stat == "q0" else float(poi_test)


def auxdata_columns(problem) -> np.ndarray:
    """Positions of pyhf's ``config.auxdata`` entries in the fast path's parameter vector.

    pyhf lists auxiliary data per constrained parameter in parameter order; the fast path's
    structure check compares exactly these entries with ``config.auxdata``.
    """
    layout = problem.layout
    constrained = np.asarray(layout["gauss"]) | np.asarray(layout["poisson"])
    return np.flatnonzero(constrained[: problem.n_pars])


def split_samples(problem, samples) -> tuple[np.ndarray, np.ndarray]:
    """pyhf data rows ``[main bins, auxdata]`` as ``(main [N, B], aux per parameter [N, n_pars])``."""
    samples = np.atleast_2d(np.asarray(samples, dtype=float))
    bins = len(np.asarray(problem.main))
    columns = auxdata_columns(problem)
    if samples.shape[1] != bins + len(columns):
        raise ValueError(f"data rows have {samples.shape[1]} entries, the model {bins} bins and {len(columns)} auxdata")
    aux = np.zeros((samples.shape[0], problem.n_pars))
    aux[:, columns] = samples[:, bins:]
    return samples[:, :bins], aux


def statistics_from_fits(test_stat: str, mu: float, conditional, free, muhat) -> np.ndarray:
    """pyhf's test statistics from the conditional and free minima (``-2 log L``) and ``muhat``."""
    tmu = np.clip(np.asarray(conditional) - np.asarray(free), 0.0, None)
    muhat = np.asarray(muhat)
    zeroed = muhat < 0 if test_stat == "q0" else muhat > mu
    return np.where(zeroed, 0.0, tmu)


def at_noise_level(test_stat: str, mu: float, conditional: float, free: float, muhat: float) -> bool:
    """Whether pyhf's statistic here is the noise of its fits (as the asymptotic fast path decides)."""
    zeroed = muhat < 0 if test_stat == "q0" else muhat > mu
    return (conditional - free) < (SIGN_FLOOR if zeroed else NOISE_FLOOR)


def toy_statistics(fitter, samples, poi_test: float, test_stat: str, metric_at=None, start=None,
                   second_start: bool = True, generating=None, report=None) -> dict:
    """The test statistic of every data row of ``samples``.

    Args:
        fitter: A :class:`~pyhf_dist.runtime.fast.batched.BatchFitter` of the patch.
        samples: ``[N, bins + auxdata]`` datasets in pyhf's layout (toys, or the observed data).
        poi_test: The tested POI value.
        test_stat: ``"qtilde"``, ``"q"`` or ``"q0"``.
        metric_at: Reference point of the engine's metric (the parameters the toys were drawn
            from; default the suggested initial values).
        start: Starting point of both fits (the POI set to the tested value for the conditional
            one); default the suggested initial values, as pyhf's.
        second_start: Fit each toy's conditional fit again from its free fit's minimum, and the
            free fit from the conditional one's where it ended above it (:data:`FREE_ABOVE`),
            keeping the lower minimum of each (on 1Lbb a conditional fit from pyhf's starting point
            stops in a local minimum 0.05 above the one pyhf's own SLSQP finds on some toys); last,
            every fit whose minimum holds a parameter at a bound again with it released
            (:func:`_release_bounds`), every fit from its minimum with a parameter of two basins
            reflected where that is near the minimum (:func:`_reflect`), and the free fit from a
            conditional minimum now below it.
        generating: The parameters the toys were drawn from: with ``second_start``, both fits of
            every toy start there too (the lower minimum kept). Their minima scatter around it,
            and a likelihood with two basins in one nuisance parameter (1Lbb toys: an
            asymmetric histosys, 0.2-0.3 apart in -2 log L) can send both fits from pyhf's
            starting point into the higher one, where SLSQP reaches the lower.
        report: Called now and then with the fraction of the work done (an estimate:
            :data:`STAGE_ENDS`), for the progress a worker reports.

    Returns:
        ``{"teststat": [N], "conditional": [N], "free": [N], "muhat": [N], "theta_conditional":
        [N, n_pars], "theta_free": [N, n_pars], "converged": [N], "runaway": [N],
        "evaluations": int, "fallbacks": int}`` (``-2 log L`` minima up to a
        constant per row; a statistic is NaN where a fit was lost, see
        :class:`~pyhf_dist.runtime.fast.batched.BatchResult`). ``runaway``: toys without a
        minimum, one of whose fits stopped below ``-RUNAWAY`` or ended with a bin of no events
        expecting fewer than ``NO_MINIMUM_YIELD`` events (:func:`~pyhf_dist.runtime.fast.batched.emptied`).
    """
    problem = fitter.problem
    mu = tested_value(poi_test, test_stat)
    main, aux = split_samples(problem, samples)
    count = main.shape[0]
    # Both fits of every toy in one stream: conditional ones first, then free ones.
    poi_values = np.concatenate([np.full(count, mu), np.full(count, np.nan)])
    starts = None if start is None else np.tile(np.asarray(start, dtype=float), (2 * count, 1))
    report = report or (lambda fraction: None)
    first_share = STAGE_ENDS[0] if second_start else 1.0
    result = fitter.fit(np.concatenate([main, main]), np.concatenate([aux, aux]), poi_values, starts, metric_at,
                        progress=lambda fraction: report(first_share * fraction))
    theta = result.theta
    values = result.twice_nll.copy()
    converged = result.converged.copy()
    runaway = result.runaway[:count] | result.runaway[count:]
    evaluations, fallbacks = int(np.sum(result.evaluations)), int(result.fallbacks)
    if second_start:
        # Further starts, the lower minimum of each fit kept; toys without a minimum left out.
        fitted = ~runaway & np.isfinite(values[:count]) & np.isfinite(values[count:])
        # The free fit from the conditional one's minimum wherever it ended above it (its domain
        # holds the conditional minimum: impossible at its own minimum), and from the
        # generating point.
        point = None if generating is None else np.asarray(generating, dtype=float)[: theta.shape[1]]
        above = _free_above(fitted, values)
        rows, starts = [above], [theta[above]]
        if point is not None:
            every = np.flatnonzero(fitted)
            rows.append(every)
            starts.append(np.broadcast_to(point, (len(every), len(point))))
        done = _refit(fitter, main, aux, np.concatenate(rows), count, np.concatenate(starts), np.nan, metric_at,
                      theta, values, converged)
        report(STAGE_ENDS[1])
        # Then the conditional fit from the free fit's minimum (the POI set to the tested value)
        # and from the generating point, where the best-fit POI does not set the statistic to
        # zero (qtilde and q: above the tested value; q0: below zero).
        muhat = theta[count:, problem.poi_index]
        zeroed = muhat < 0 if test_stat == "q0" else muhat > mu
        again = np.flatnonzero(fitted & ~zeroed)
        rows, starts = [again], [theta[count + again]]
        if point is not None:
            rows.append(again)
            starts.append(np.broadcast_to(point, (len(again), len(point))))
        more = _refit(fitter, main, aux, np.concatenate(rows), 0, np.concatenate(starts), mu, metric_at, theta, values,
                      converged)
        report(STAGE_ENDS[2])
        released = _release_bounds(fitter, main, aux, fitted, mu, metric_at, theta, values, converged)
        report(STAGE_ENDS[3])
        reflected = _reflect(fitter, main, aux, fitted, mu, metric_at, theta, values, converged)
        report(STAGE_ENDS[4])
        # A conditional minimum now below its free fit's: the free fit from there too.
        above = _free_above(fitted, values)
        last = _refit(fitter, main, aux, above, count, theta[above], np.nan, metric_at, theta, values, converged)
        evaluations += done[0] + more[0] + released[0] + reflected[0] + last[0]
        fallbacks += done[1] + more[1] + released[1] + reflected[1] + last[1]
    # Most fits of data without a minimum stop below -RUNAWAY; some end converged where the bounds
    # stop an empty bin's yield hundreds of events below zero (1Lbb: 1 of 2,000 background-only
    # toys, its free fit 435 below its conditional one): that toy has no minimum either.
    emptied = batched.emptied(np.concatenate([main, main]), fitter.yields(theta))
    runaway = runaway | emptied[:count] | emptied[count:]
    conditional, free = values[:count], values[count:]
    muhat = theta[count:, problem.poi_index]
    return {
        "teststat": statistics_from_fits(test_stat, mu, conditional, free, muhat),
        "conditional": conditional,
        "free": free,
        "muhat": muhat,
        "theta_conditional": theta[:count],
        "theta_free": theta[count:],
        "converged": converged[:count] & converged[count:],
        "runaway": runaway,
        "evaluations": evaluations,
        "fallbacks": fallbacks,
    }


def _free_above(fitted, values) -> np.ndarray:
    """Toys (of ``fitted``) whose free fit ended above their conditional one: impossible at the free
    fit's own minimum, whose domain holds the conditional one (``values``: conditional, then free)."""
    count = len(fitted)
    return np.flatnonzero(fitted & (values[count:] > values[:count] + FREE_ABOVE))


def _release_bounds(fitter, main, aux, fitted, mu: float, metric_at, theta, values, converged) -> tuple[int, int]:
    """Both fits of every toy whose minimum holds a parameter at a bound, again from that minimum
    with those parameters back at their initial values (full fits; the lower minimum kept).

    A step that overshoots can pin a parameter at its bound, typically a Poisson-constrained
    gamma at zero, and the fit then settles in a basin of its own there: on 3L-eRJR toys such
    minima lie up to 8 units of ``-2 log L`` above the one a fit reaches with the gamma released.
    These are full fits, not probes: the way out of such a basin can pass within the probe radius
    of the minimum it leaves. One that does not converge on the batched engine is dropped, not
    redone one at a time: the fit has its minimum already. A 3L-eRJR toy nearly always holds a
    gamma at zero, its auxiliary count drawn as 0 from a constraint with tau = 0.06, so there
    every toy is fitted again; on 1Lbb 1-8% of the fits are (1,000 toys of each hypothesis: 6
    fits lowered, by up to 1.7).

    Returns:
        ``(evaluations, fallbacks)`` of these fits.
    """
    problem = fitter.problem
    width = theta.shape[1]
    init = np.asarray(problem.init, dtype=float)[:width]
    tolerance = BOUND_TOLERANCE * np.asarray(problem.scale, dtype=float)[:width]
    free = ~np.asarray(problem.fixed, dtype=bool)[:width]
    free[problem.poi_index] = False  # the POI at its bound is the test statistic's business
    held = free & ((np.abs(theta - np.asarray(problem.lower)[:width]) <= tolerance)
                   | (np.abs(theta - np.asarray(problem.upper)[:width]) <= tolerance))
    slots = np.flatnonzero(np.concatenate([fitted, fitted]) & held.any(axis=1))
    # Both fits in one stream: the slots of a small stream cost as much as a full one's.
    starts = np.where(held[slots], init, theta[slots])
    return _refit_slots(fitter, main, aux, slots, starts, mu, metric_at, theta, values, converged, probe=False)


def _reflect(fitter, main, aux, fitted, mu: float, metric_at, theta, values, converged) -> tuple[int, int]:
    """Both fits of every toy again, as probes, from its minimum with one parameter of two basins
    reflected through zero, where ``-2 log L`` there is near the minimum
    (:mod:`~pyhf_dist.runtime.fast.reflections`; the lower minimum kept); then the other fit of
    each toy whose fit moved, from the new minimum.

    Returns:
        ``(evaluations, fallbacks)``: the reflected points evaluated and these fits' evaluations.
    """
    count = len(fitted)
    slots, starts, looked_at = reflections.reflected_starts(
        fitter, main, aux, theta, values, np.flatnonzero(np.concatenate([fitted, fitted]))
    )
    before = values.copy()
    evaluations, fallbacks = _refit_slots(fitter, main, aux, slots, starts, mu, metric_at, theta, values, converged)
    # A fit now in the other basin takes its toy's other fit there too: the free fit from the new
    # conditional minimum, the conditional fit from the new free one (lowering one fit alone
    # would move the statistic away from the answer as far as it moves towards it).
    moved = np.flatnonzero(values < before)
    other = np.where(moved < count, moved + count, moved - count)
    more = _refit_slots(fitter, main, aux, other, theta[moved], mu, metric_at, theta, values, converged)
    return evaluations + more[0] + looked_at, fallbacks + more[1]


def _refit_slots(fitter, main, aux, slots, starts, mu: float, metric_at, theta, values, converged,
                 probe: bool = True) -> tuple[int, int]:
    """:func:`_refit` of the fits ``slots`` of ``theta`` (each toy's conditional fit at ``mu`` in
    the first ``len(main)`` slots, its free fit in the next)."""
    count = len(main)
    conditional = np.asarray(slots) < count
    return _refit(fitter, main, aux, np.asarray(slots) % count, np.where(conditional, 0, count), starts,
                  np.where(conditional, mu, np.nan), metric_at, theta, values, converged, probe=probe)


def _refit(fitter, main, aux, rows, offset, starts, poi, metric_at, theta, values, converged,
           probe: bool = True) -> tuple[int, int]:
    """Fit the toys ``rows`` again from ``starts`` (POI fixed at ``poi``, NaN: free; ``offset`` and
    ``poi`` one for all rows or one per row), each a probe of the minimum it has (``probe=False``:
    a full fit, dropped where it does not converge on the batched engine), and keep each lower
    minimum in slot ``offset + row`` of ``theta``, ``values``, ``converged`` (in place).

    Returns:
        ``(evaluations, fallbacks)`` of these fits.
    """
    if not len(rows):
        return 0, 0
    slots = offset + np.asarray(rows)
    # Probes of the minimum each fit has: a start that comes within the probe radius of it, not
    # below, has fallen into its basin and stops there (about half a fit's evaluations).
    result = fitter.fit(main[rows], aux[rows], np.broadcast_to(poi, len(rows)), starts, metric_at,
                        known=(theta[slots], values[slots]) if probe else None, fallback=probe)
    # One toy may have several starts here: each replaces the minimum where lower.
    for index in np.flatnonzero(result.converged & ~result.runaway):
        slot = slots[index]
        if result.twice_nll[index] < values[slot]:
            theta[slot] = result.theta[index]
            values[slot] = result.twice_nll[index]
            converged[slot] = True
    return int(np.sum(result.evaluations)), int(result.fallbacks)


def run_chunk(fast, patch_operations, model, data, settings, chunk: dict, key: str | None = None,
              report=None) -> dict:
    """The toys ``[start, stop)`` of one patch on the batched engine: a chunk record as plain pyhf's.

    Args:
        fast: The worker's :class:`~pyhf_dist.runtime.fast.FastHypotest`.
        patch_operations: The patch's jsonpatch operations.
        model: The patched ``pyhf.pdf.Model`` (numpy backend): pyhf's generating fits and draws.
        data: Its observed data.
        settings: The scan's :class:`~pyhf_dist.settings.FitSettings`.
        chunk: An entry of :func:`pyhf_dist.chunks.plan`.
        key: See :func:`pyhf_dist.runtime.toys.draw`.
        report: A :class:`~pyhf_dist.runtime.reports.ChunkReport` of the chunk, or ``None``.

    Returns:
        As :func:`pyhf_dist.runtime.toys.run_chunk`, with ``engine="fast"`` and, under ``"toys"``, the
        toys whose likelihood has no minimum (``no_minimum``: ``{"sb": [[toy, q where the fits
        stopped], ...], "b": [...]}``; their statistic is :data:`pyhf_dist.runtime.toys.NO_MINIMUM_STATISTIC`,
        see :mod:`pyhf_dist.runtime.toys`), the number of fits redone one at a time (``fallbacks``) and
        of toys whose statistic is pyhf's own fits, both minimizers of the fast path having lost
        a fit (``by_pyhf``): every other toy's fits converged, or it has no minimum. Certified
        (not ``match_pyhf``): also ``converged`` (the observed data's fits certified and no toy
        left to pyhf), ``fits`` (their certificates) and ``pyhf_default`` (where pyhf's own fits
        of the observed data stall or stop above the minimum, and the hypotheses whose toys
        were therefore drawn from the converged fits), as an asymptotic record's.

    Raises:
        FastPathUnsupported: The fast path does not reproduce pyhf for this patch (its structure
            check; with ``match_pyhf``, pyhf's own minimizer stalling on it); plain pyhf fits the chunk.
    """
    from pyhf_dist.runtime import toys
    from pyhf_dist.runtime.fast.errors import FastPathUnsupported

    problem = fast.problem(patch_operations)
    mu = tested_value(settings.poi_test, settings.test_stat)
    background_mu = 1.0 if settings.test_stat == "q0" else 0.0
    lower, upper = problem.lower[problem.poi_index], problem.upper[problem.poi_index]
    if not (lower <= mu <= upper and lower <= background_mu <= upper):
        raise FastPathUnsupported("the tested POI value lies outside the POI bounds")
    fitter = batched.BatchFitter(problem)
    first = chunk["start"] == 0
    if settings.match_pyhf:
        observed = _ObservedAsPyhf(problem, fitter, model, data, settings, mu, background_mu, first)
    else:
        observed = _CertifiedObserved(problem, settings.test_stat, settings.poi_test, background_mu)
    samples = toys.chunk_samples(model, data, settings, chunk, key, generating=observed.generating)
    start, stop = chunk["start"], chunk["stop"]
    parts, no_minimum, fallbacks, by_pyhf = {}, {}, 0, 0
    hypotheses = (("sb", "signal", "signal_pars"), ("b", "background", "background_pars"))
    for index, (key, sample, generating) in enumerate(hypotheses):
        rows = np.asarray(samples[sample])
        # Every fit starts where pyhf's starts, at the suggested initial values: HistFactory
        # likelihoods have local minima (on 1Lbb toys 0.2 apart in -2 log L), and a fit started
        # elsewhere (the generating parameters save a tenth of the evaluations) ends in another
        # one on some toys (1 of the first 67 compared with pyhf on 1Lbb). The engine's metric
        # is the information at the generating parameters, around which the toys' minima scatter.
        generating_pars = np.asarray(samples[generating], dtype=float)
        result = toy_statistics(fitter, rows, settings.poi_test, settings.test_stat, metric_at=generating_pars,
                                generating=generating_pars, report=report.part(index / 2, 0.5) if report else None)
        values = result["teststat"]
        away = np.asarray(result["runaway"], dtype=bool)
        # A toy whose likelihood has no minimum takes toys.NO_MINIMUM_STATISTIC (see
        # pyhf_dist.runtime.toys); where its fits stopped is kept beside it, for the benchmark.
        stopped = values[away].copy()
        values[away] = toys.NO_MINIMUM_STATISTIC
        for i in np.flatnonzero(~np.isfinite(values)):
            # Lost by the engine and by the one-at-a-time minimizer: pyhf's own fits.
            values[i] = toys.pyhf_statistic(model, rows[i], settings)
            by_pyhf += 1
        parts[key] = [float(v) for v in values]
        no_minimum[key] = [[int(start + i), float(q)] for i, q in zip(np.flatnonzero(away), stopped)]
        fallbacks += result["fallbacks"]
    return {
        "toys": {
            "start": start,
            "stop": stop,
            "ntoys": chunk["ntoys"],
            "teststat": observed.teststat if first else None,
            "sb": parts["sb"],
            "b": parts["b"],
            "no_minimum": no_minimum,
            "fallbacks": fallbacks,
            "by_pyhf": by_pyhf,
        },
        "engine": "fast",
        "fallback_reason": None,
        **observed.certificate(by_pyhf),
    }


class _ObservedAsPyhf:
    """The observed data's side of a chunk with pyhf's own numbers (``match_pyhf``): pyhf's
    generating fits, and pyhf's observed statistic where it is the noise of pyhf's fits."""

    generating = None

    def __init__(self, problem, fitter, model, data, settings, mu, background_mu, first: bool):
        from pyhf_dist.runtime import toys
        from pyhf_dist.runtime.fast.errors import FastPathUnsupported

        main, aux = split_samples(problem, np.asarray(data, dtype=float)[None])
        fits = fitter.fit(np.repeat(main, 3, 0), np.repeat(aux, 3, 0), [mu, np.nan, background_mu])
        if not fits.converged.all():
            raise FastPathUnsupported("a fit of the observed data did not converge")
        if problem.pyhf_stalls(background_mu, float(fits.twice_nll[2])):
            raise FastPathUnsupported(
                "pyhf's minimizer stops at its starting point on this model (its toys' statistics come "
                "from unconverged fits); plain pyhf reproduces them"
            )
        self.teststat = None
        if first:
            conditional, free, muhat = fits.twice_nll[0], fits.twice_nll[1], fits.theta[1, problem.poi_index]
            if at_noise_level(settings.test_stat, mu, conditional, free, muhat):
                # Which toys tie with the observed statistic decides CLs here: take pyhf's own.
                self.teststat = toys.pyhf_statistic(model, data, settings)
            else:
                self.teststat = float(statistics_from_fits(settings.test_stat, mu, conditional, free, muhat))

    def certificate(self, by_pyhf: int) -> dict:
        return {}


class _CertifiedObserved:
    """The observed data's side of a chunk from certified fits (the module's policy): the
    observed statistic, and converged generating parameters where pyhf's fits stop short."""

    def __init__(self, problem, test_stat: str, poi_test: float, background_mu: float):
        from pyhf_dist.runtime.fast.fit import PoiScan, asymptotic_statistic, fit_name

        self.problem = problem
        scan = PoiScan(problem, test_stat)
        self.scan = scan
        # The fits pyhf draws each hypothesis's toys from (pyhf_dist.runtime.toys.draw), and the
        # conditional fit of the observed statistic (at 0 for q0).
        poi_test, mu = float(poi_test), tested_value(poi_test, test_stat)
        self.fits = {"sb": scan.conditional("observed", poi_test), "b": scan.conditional("observed", background_mu)}
        tested = scan.conditional("observed", mu)
        self.names = list(dict.fromkeys(["observed free", *(fit_name("observed", value) for value in (poi_test, background_mu, mu))]))
        free = scan.fits["observed free"]
        muhat = float(free.theta[problem.poi_index])
        self.teststat = float(asymptotic_statistic(test_stat, mu, tested.value - free.value, muhat))
        #: Per hypothesis, how far above the converged minimum pyhf's generating fit stopped,
        #: where that is more than a stop's rounding (its toys are then drawn from the minimum).
        self.stops_above: dict = {}

    def generating(self, signal_pars, background_pars) -> tuple:
        """The parameters to draw each hypothesis's toys from: pyhf's, or the converged fit's
        where pyhf's fit stops above its minimum by more than :data:`~pyhf_dist.runtime.fast.problem.STALL_GAP`."""
        from pyhf_dist.runtime.fast.problem import STALL_GAP

        problem, n = self.problem, self.problem.n_pars
        chosen = []
        for key, pars in (("sb", signal_pars), ("b", background_pars)):
            found = self.fits[key]
            theta = np.array(problem.init, dtype=float)
            theta[:n] = np.asarray(pars, dtype=float)[:n]
            gap = float(problem.functions.twice_nll(theta, problem.main, problem.aux, problem.layout)) - found.value
            if gap > STALL_GAP:
                self.stops_above[key] = gap
                chosen.append(np.array(found.theta[:n]))
            else:
                chosen.append(pars)
        return tuple(chosen)

    def certificate(self, by_pyhf: int) -> dict:
        certificate = self.scan.certificate(self.names)
        default = dict(certificate.pop("pyhf_default", None) or {})
        if self.stops_above:
            default["generating_fits_stop_above_minimum"] = dict(self.stops_above)
            default["toys_drawn_from"] = "converged fits"
        certificate["converged"] = bool(certificate["converged"]) and by_pyhf == 0
        certificate["pyhf_default"] = default or None
        return certificate
