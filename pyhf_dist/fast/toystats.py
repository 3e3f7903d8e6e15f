"""Test statistics of pseudo-experiments on the batched fitting engine.

pyhf's :class:`~pyhf.infer.calculators.ToyCalculator` fits every toy twice (conditional and free)
with SLSQP, one after the other. Here the same statistics come from the batched engine
(:mod:`~pyhf_dist.fast.batched`), all fits of a chunk in one stream:

* the toys themselves are pyhf's, bit for bit: they are drawn by pyhf from the parameters of
  pyhf's own conditional fits (``pyhf.infer.mle.fixed_poi_fit``) after ``numpy.random.seed``
  (:func:`pyhf_dist.toys.draw`); only their fits move to the engine;
* each statistic is pyhf's formula (``pyhf.infer.test_statistics``) on the two minima:
  ``tmu = clip(-2 log L(mu) - (-2 log L(muhat)), 0)``, zero where ``muhat > mu`` (``qtilde``,
  ``q``) or ``muhat < 0`` (``q0``, with ``mu = 0``); every fit starts, as pyhf's, from the
  suggested initial values (the POI at the tested value for the conditional fit);
* the observed statistic too, unless it lies at the noise level of pyhf's fits
  (:data:`~pyhf_dist.fast.fit.NOISE_FLOOR`): there CLs hinges on which toys tie with it, so it is
  taken from pyhf's own fits.

Example:
    >>> statistics = toy_statistics(fitter, samples, poi_test=1.0, test_stat="qtilde")  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from pyhf_dist.fast.fit import NOISE_FLOOR, SIGN_FLOOR

__all__ = [
    "at_noise_level",
    "auxdata_columns",
    "run_chunk",
    "split_samples",
    "statistics_from_fits",
    "tested_value",
    "toy_statistics",
]


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


def toy_statistics(fitter, samples, poi_test: float, test_stat: str, metric_at=None, start=None) -> dict:
    """The test statistic of every data row of ``samples``.

    Args:
        fitter: A :class:`~pyhf_dist.fast.batched.BatchFitter` of the patch.
        samples: ``[N, bins + auxdata]`` datasets in pyhf's layout (toys, or the observed data).
        poi_test: The tested POI value.
        test_stat: ``"qtilde"``, ``"q"`` or ``"q0"``.
        metric_at: Reference point of the engine's metric (the parameters the toys were drawn
            from; default the suggested initial values).
        start: Starting point of both fits (the POI set to the tested value for the conditional
            one); default the suggested initial values, as pyhf's.

    Returns:
        ``{"teststat": [N], "conditional": [N], "free": [N], "muhat": [N], "converged": [N],
        "runaway": [N], "evaluations": int, "fallbacks": int}`` (``-2 log L`` minima up to a
        constant per row; a statistic is NaN where a fit was lost, see
        :class:`~pyhf_dist.fast.batched.BatchResult`).
    """
    problem = fitter.problem
    mu = tested_value(poi_test, test_stat)
    main, aux = split_samples(problem, samples)
    count = main.shape[0]
    # Both fits of every toy in one stream: conditional ones first, then free ones.
    poi_values = np.concatenate([np.full(count, mu), np.full(count, np.nan)])
    starts = None if start is None else np.tile(np.asarray(start, dtype=float), (2 * count, 1))
    result = fitter.fit(np.concatenate([main, main]), np.concatenate([aux, aux]), poi_values, starts, metric_at)
    conditional, free = result.twice_nll[:count], result.twice_nll[count:]
    muhat = result.theta[count:, problem.poi_index]
    converged = result.converged[:count] & result.converged[count:]
    runaway = result.runaway[:count] | result.runaway[count:]
    return {
        "teststat": statistics_from_fits(test_stat, mu, conditional, free, muhat),
        "conditional": conditional,
        "free": free,
        "muhat": muhat,
        "converged": converged,
        "runaway": runaway,
        "evaluations": int(np.sum(result.evaluations)),
        "fallbacks": int(result.fallbacks),
    }


def run_chunk(fast, patch_operations, model, data, settings, chunk: dict, key: str | None = None) -> dict:
    """The toys ``[start, stop)`` of one patch on the batched engine: a chunk record as plain pyhf's.

    Args:
        fast: The worker's :class:`~pyhf_dist.fast.FastHypotest`.
        patch_operations: The patch's jsonpatch operations.
        model: The patched ``pyhf.pdf.Model`` (numpy backend): pyhf's generating fits and draws.
        data: Its observed data.
        settings: The scan's :class:`~pyhf_dist.settings.FitSettings`.
        chunk: An entry of :func:`pyhf_dist.toys.plan`.
        key: See :func:`pyhf_dist.toys.draw`.

    Returns:
        As :func:`pyhf_dist.toys.run_chunk`, with ``engine="fast"`` and, under ``"toys"``, the
        number of toys with a fit that ran away (``runaway``: its likelihood has no minimum; the
        statistic is taken where the fit stopped, as pyhf's minimizer does) and of fits redone one
        at a time (``fallbacks``).

    Raises:
        FastPathUnsupported: The fast path does not reproduce pyhf for this patch (its structure
            check, or pyhf's own minimizer stalling on it); plain pyhf fits the chunk.
    """
    from pyhf_dist import toys
    from pyhf_dist.fast.batched import BatchFitter
    from pyhf_dist.fast.errors import FastPathUnsupported

    problem = fast.problem(patch_operations)
    fitter = BatchFitter(problem)
    mu = tested_value(settings.poi_test, settings.test_stat)
    background_mu = 1.0 if settings.test_stat == "q0" else 0.0
    lower, upper = problem.lower[problem.poi_index], problem.upper[problem.poi_index]
    if not (lower <= mu <= upper and lower <= background_mu <= upper):
        raise FastPathUnsupported("the tested POI value lies outside the POI bounds")
    observed = np.asarray(data, dtype=float)[None]
    main, aux = split_samples(problem, observed)
    fits = fitter.fit(np.repeat(main, 3, 0), np.repeat(aux, 3, 0), [mu, np.nan, background_mu])
    if not fits.converged.all():
        raise FastPathUnsupported("a fit of the observed data did not converge")
    if problem.pyhf_stalls(background_mu, float(fits.twice_nll[2])):
        raise FastPathUnsupported(
            "pyhf's minimizer stops at its starting point on this model (its toys' statistics come "
            "from unconverged fits); plain pyhf reproduces them"
        )
    samples = toys.draw(model, data, settings, chunk["ntoys"], key)
    teststat = None
    if chunk["index"] == 0:
        conditional, free, muhat = fits.twice_nll[0], fits.twice_nll[1], fits.theta[1, problem.poi_index]
        if at_noise_level(settings.test_stat, mu, conditional, free, muhat):
            # Which toys tie with the observed statistic decides CLs here: take pyhf's own.
            teststat = toys.pyhf_statistic(model, data, settings)
        else:
            teststat = float(statistics_from_fits(settings.test_stat, mu, conditional, free, muhat))
    start, stop = chunk["start"], chunk["stop"]
    parts, runaway, fallbacks = {}, 0, 0
    for key, sample, generating in (("sb", "signal", "signal_pars"), ("b", "background", "background_pars")):
        rows = np.asarray(samples[sample])[start:stop]
        # Toys fluctuate around the parameters they were drawn from: their fits start there
        # (about a tenth fewer evaluations than from pyhf's initial values, the same minima on
        # the toys compared with pyhf), and the engine's metric is the information there.
        generating_pars = np.asarray(samples[generating], dtype=float)
        result = toy_statistics(
            fitter, rows, settings.poi_test, settings.test_stat, metric_at=generating_pars, start=generating_pars
        )
        values = result["teststat"]
        for i in np.flatnonzero(~np.isfinite(values)):
            # Lost by the engine and by the one-at-a-time minimizer: pyhf's own fits.
            values[i] = toys.pyhf_statistic(model, rows[i], settings)
        parts[key] = [float(v) for v in values]
        runaway += int(np.sum(result["runaway"]))
        fallbacks += result["fallbacks"]
    return {
        "toys": {
            "start": start,
            "stop": stop,
            "ntoys": chunk["ntoys"],
            "teststat": teststat,
            "sb": parts["sb"],
            "b": parts["b"],
            "runaway": runaway,
            "fallbacks": fallbacks,
        },
        "engine": "fast",
        "fallback_reason": None,
    }
