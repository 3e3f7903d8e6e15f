"""Maximum-likelihood fits and pyhf's asymptotic CLs on the compiled likelihood.

The fits minimise the same objective as pyhf (``-2 log L``, fixed parameters held at their
initial values, pyhf's suggested bounds) with scipy's L-BFGS-B on the jitted value and gradient,
in coordinates scaled by the Fisher-information diagonal at the start: staterror parameters
(widths of a few percent) and control-region normalisations (hundreds of events) otherwise make
the problem so badly conditioned that a fit takes ten times as many evaluations.

The test statistics and p-values are pyhf's (``pyhf.infer.calculators.AsymptoticCalculator``,
``pyhf.infer.test_statistics``): the same five fits from the same starting points, the same
Asimov dataset (expected main and auxiliary data at the conditional fit of the Asimov POI
value), the same clipping and branches.

:class:`FastPathUnsupported` is raised, and the caller uses plain pyhf for the patch, where the
number would not be pyhf's: a fit that does not converge; a model on which pyhf's own minimizer
stalls at its starting point (:meth:`FitProblem.pyhf_stalls`); a test statistic so close to zero
that pyhf's CLs are the rounding of its fits (:data:`NOISE_FLOOR`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import minimize
from scipy.special import ndtr

from pyhf_dist.fast.errors import FastPathUnsupported

__all__ = ["FitProblem", "PoiScan", "asymptotic_cls", "hypotest"]

# L-BFGS-B settings in Fisher-scaled coordinates, where one unit is about one standard deviation
# (the Hessian of -2 log L is about twice the identity): a projected gradient below GTOL leaves
# -2 log L within ~1e-10 of its minimum, and a CLs value moves by 1e-4 only when a test
# statistic moves by ~1e-4. Tighter settings cost evaluations and changed no CLs value on 1Lbb.
GTOL = 1e-5
FTOL = 1e-12
MAXCOR = 30
MAXITER = 5000
RESTARTS = 2
#: Largest projected gradient accepted when L-BFGS-B stops because its line search cannot make
#: progress (it does that at the floating-point floor of the objective, already converged).
ACCEPT_GRADIENT = 1e-3
#: A minimum lower than where pyhf's optimizer stops by more than this (in -2 log L) means pyhf
#: would report a different, unconverged, result.
STALL_GAP = 1e-4
#: Below this, a likelihood ratio is zero up to the precision of pyhf's fits (SLSQP stops at
#: changes of ~1e-6 in -2 log L), and the CLs computed from its square root are that noise:
#: only pyhf reproduces pyhf's number there.
NOISE_FLOOR = 1e-3
#: Above this, the best-fit POI lies far enough from the tested value (~0.003 standard
#: deviations) that pyhf's fits put it on the same side: a statistic set to zero for that
#: reason is zero in pyhf too, however small the likelihood ratio.
SIGN_FLOOR = 1e-5


@dataclasses.dataclass
class FitProblem:
    """One patch on the compiled likelihood.

    Attributes:
        functions: The :class:`~pyhf_dist.fast.likelihood.Functions`.
        layout: The patch's device arrays (``L``).
        init, lower, upper: Suggested initial values and bounds (padded).
        fixed: Parameters held at their initial value.
        main, aux: Observed main and auxiliary data.
        poi_index: Index of the POI.
        n_pars: Parameters of the model (the rest is padding).
    """

    functions: object
    layout: dict
    init: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    fixed: np.ndarray
    main: np.ndarray
    aux: np.ndarray
    poi_index: int
    n_pars: int
    evaluations: int = 0

    def __post_init__(self):
        fisher = np.asarray(self.functions.fisher_diagonal(self.init, self.layout))
        good = np.isfinite(fisher) & (fisher > 0)
        self.scale = np.where(good, 1.0 / np.sqrt(np.where(good, fisher, 1.0)), 1.0)

    def fit(self, main, aux, start, poi_value=None):
        """Minimise ``-2 log L`` from ``start``; ``poi_value`` fixes the POI. Returns ``(theta, value)``.

        Within pyhf's bounds, in coordinates scaled by the Fisher diagonal. (Whitening by the
        full Fisher matrix halves the evaluations but, on a likelihood with several minima,
        leads some 1Lbb fits into other minima than pyhf's.)
        """
        fixed = self.fixed.copy()
        start = np.array(start, dtype=float)
        if poi_value is not None:
            fixed[self.poi_index] = True
            start[self.poi_index] = poi_value
        free = ~fixed
        theta = np.where(fixed, start, 0.0)
        scale = self.scale[free]
        lower, upper = self.lower[free] / scale, self.upper[free] / scale
        value_and_grad, layout = self.functions.value_and_grad, self.layout

        def objective(x):
            theta[free] = x * scale
            result = np.asarray(value_and_grad(theta, main, aux, layout))
            return result[0], result[1:][free] * scale

        result = self._minimize(objective, np.clip(start[free] / scale, lower, upper), lower, upper)
        if result is None:
            raise FastPathUnsupported("a fit did not converge")
        theta[free] = result.x * scale
        return theta, float(result.fun)

    def _minimize(self, objective, x0, lower, upper):
        """L-BFGS-B to convergence (restarting a stalled line search), or ``None``."""
        x = x0
        bounds = list(zip(lower, upper))
        # A line search that fails far from a minimum (curvature the scaling did not capture)
        # usually succeeds after a restart with a fresh Hessian approximation.
        for _ in range(RESTARTS + 1):
            result = minimize(
                objective,
                x,
                jac=True,
                method="L-BFGS-B",
                bounds=bounds,
                options={"gtol": GTOL, "ftol": FTOL, "maxcor": MAXCOR, "maxiter": MAXITER, "maxfun": MAXITER},
            )
            self.evaluations += result.nfev
            if not np.isfinite(result.fun):
                return None
            if result.success or _projected_gradient(result, lower, upper) <= ACCEPT_GRADIENT:
                return result
            x = result.x
        return None

    def pyhf_stalls(self, poi_value: float, minimum: float) -> bool:
        """Whether pyhf's own fit of the observed data at ``poi_value`` stops short of ``minimum``.

        pyhf minimises with scipy's SLSQP from the suggested initial values, fixed parameters as
        equality constraints. On badly scaled models (a shapesys with a near-zero uncertainty,
        a Poisson constraint factor of 1e11) its first step overshoots so far that the line
        search returns to the start and SLSQP reports convergence after one iteration: pyhf
        then computes CLs from fits that never left the initial values. One SLSQP iteration set
        up as pyhf's tells whether that happens; where it does, only plain pyhf reproduces
        pyhf's number.

        A stop after several iterations is not detected: on the stau Region-combined pallet with
        SR1's observation raised from 10 to 14 events, pyhf's background-only fit ends 2.2 in
        ``-2 log L`` above the minimum after 22 SLSQP iterations and its CLs differ from the
        converged ones by up to 0.4. An SLSQP run to the end, set up as pyhf's, reproduces that
        stop exactly, but costs about a second per fit.
        """
        n = self.n_pars
        start = self.init.copy()
        start[self.poi_index] = poi_value
        fixed = self.fixed[:n].copy()
        fixed[self.poi_index] = True
        theta = self.init.copy()
        value_and_grad, main, aux, layout = self.functions.value_and_grad, self.main, self.aux, self.layout

        def objective(x):
            theta[:n] = x
            result = np.asarray(value_and_grad(theta, main, aux, layout))
            return result[0], result[1 : n + 1]

        indices = np.flatnonzero(fixed)
        values = start[indices]
        result = minimize(
            objective,
            start[:n],
            jac=True,
            method="SLSQP",
            bounds=list(zip(self.lower[:n], self.upper[:n])),
            constraints=[{"type": "eq", "fun": lambda x: x[indices] - values}],
            options={"maxiter": 1},
        )
        self.evaluations += result.nfev
        return bool(result.success) and result.fun - minimum > STALL_GAP


def _projected_gradient(result, lower, upper) -> float:
    gradient = np.asarray(result.jac)
    x = result.x
    # At a bound, only the component pointing into the box counts.
    gradient = np.where((x <= lower) & (gradient > 0), 0.0, gradient)
    gradient = np.where((x >= upper) & (gradient < 0), 0.0, gradient)
    return float(np.max(np.abs(gradient), initial=0.0))


class PoiScan:
    """pyhf's asymptotic hypotest of one patch at any number of POI values, fits shared.

    Of the five fits of a hypotest (``pyhf.infer.calculators.AsymptoticCalculator``), three do
    not depend on the tested value: the conditional fit at the Asimov POI value (which makes the
    Asimov dataset), the free fit to the observed data and the free fit to the Asimov data. They
    are made once here; each tested value then costs its two conditional fits
    (:meth:`statistics`). pyhf runs all five from the same starting points at every value, so
    the results are the same.

    Every fit starts where pyhf's starts, from the suggested initial values (the POI set for the
    conditional fits): HistFactory likelihoods can have several local minima (1Lbb patches have
    some 0.1 apart in -2 log L), and a fit started elsewhere, even from another fit of the same
    patch, can settle in another one than pyhf's. The one exception is the free fit to the
    Asimov data, whose global minimum is known: the parameters the data were generated from.

    Args:
        problem: The patch.
        test_stat: ``"qtilde"``, ``"q"`` or ``"q0"`` (``q0`` tests ``mu = 0`` only).

    Raises:
        FastPathUnsupported: The Asimov POI value lies outside the POI bounds, a fit does not
            converge, or pyhf's own minimizer stalls on this patch.
    """

    def __init__(self, problem: FitProblem, test_stat: str):
        if test_stat not in ("qtilde", "q", "q0"):
            raise FastPathUnsupported(f"test statistic {test_stat!r}")
        self.problem = problem
        self.test_stat = test_stat
        poi = problem.poi_index
        self.bounds = (float(problem.lower[poi]), float(problem.upper[poi]))
        asimov_mu = 1.0 if test_stat == "q0" else 0.0
        if not self.bounds[0] <= asimov_mu <= self.bounds[1]:
            raise FastPathUnsupported("the Asimov POI value lies outside the POI bounds")
        main, aux = problem.main, problem.aux
        # The conditional fit at the Asimov POI value first: it makes the Asimov dataset and
        # tells whether pyhf's own fits get anywhere on this patch.
        asimov_theta, asimov_value = problem.fit(main, aux, problem.init, poi_value=asimov_mu)
        if problem.pyhf_stalls(asimov_mu, asimov_value):
            raise FastPathUnsupported(
                "pyhf's minimizer stops at its starting point on this model (its CLs come from "
                "unconverged fits); plain pyhf reproduces them"
            )
        # The fit to the observed data at the Asimov POI value is also that of a test of it.
        self._asimov_mu, self._asimov_value = asimov_mu, asimov_value
        free_theta, self._free_value = problem.fit(main, aux, problem.init)
        # Asimov data: expected main and auxiliary data at the conditional fit; its free fit is
        # that very point (every term is at its maximum there), so the fit from it converges at once.
        # Kept where the likelihood runs: every evaluation of every fit to it reads them.
        self._asimov = tuple(problem.functions.expected(asimov_theta, problem.layout))
        free_theta_a, self._free_value_a = problem.fit(*self._asimov, asimov_theta)
        self._muhat, self._muhat_a = float(free_theta[poi]), float(free_theta_a[poi])

    def statistics(self, mu: float, observed: bool = True) -> dict:
        """The observed and Asimov test statistics at ``mu`` (two conditional fits).

        Args:
            mu: The tested POI value.
            observed: ``False`` skips the fit to the observed data (the expected CLs band
                depends on the Asimov statistic alone); ``qmu`` is then ``None``.

        Returns:
            ``{"qmu", "qmu_A"}`` as pyhf computes them, and ``"noisy_obs"``, ``"noisy_A"``:
            whether each is zero within fit precision, where pyhf's value is the noise of its
            fits (:data:`NOISE_FLOOR`) and lies anywhere between 0 and about that floor.
        """
        problem, stat = self.problem, self.test_stat
        _, fixed_value_a = problem.fit(*self._asimov, problem.init, poi_value=mu)
        tmu_a = fixed_value_a - self._free_value_a
        stats = {
            "qmu": None,
            "qmu_A": _test_statistic(stat, mu, tmu_a, self._muhat_a),
            "noisy_obs": False,
            "noisy_A": _at_noise_level(stat, mu, tmu_a, self._muhat_a),
        }
        if observed:
            if mu == self._asimov_mu:
                fixed_value = self._asimov_value
            else:
                _, fixed_value = problem.fit(problem.main, problem.aux, problem.init, poi_value=mu)
            tmu = fixed_value - self._free_value
            stats.update(
                qmu=_test_statistic(stat, mu, tmu, self._muhat), noisy_obs=_at_noise_level(stat, mu, tmu, self._muhat)
            )
        return stats

    def statistics_many(self, mus, observed: bool = True) -> list[dict]:
        """:meth:`statistics` at each of ``mus`` (one after another; the fits are independent,
        so a batched engine can fit them together)."""
        return [self.statistics(float(mu), observed) for mu in mus]


def hypotest(problem: FitProblem, poi_test: float, test_stat: str) -> dict:
    """CLs (or CLs+b for ``q0``) observed and expected, exactly as ``pyhf.infer.hypotest``.

    The fits are those of :class:`PoiScan`, from pyhf's starting points.

    Returns:
        ``{"CLs_obs": float, "CLs_exp": [5 floats], "qmu": float, "qmu_A": float}``.
    """
    if test_stat not in ("qtilde", "q", "q0"):
        raise FastPathUnsupported(f"test statistic {test_stat!r}")
    mu = 0.0 if test_stat == "q0" else float(poi_test)
    poi = problem.poi_index
    if not problem.lower[poi] <= mu <= problem.upper[poi]:
        raise FastPathUnsupported("the tested POI value lies outside the POI bounds")
    stats = PoiScan(problem, test_stat).statistics(mu)
    if stats["noisy_obs"] or stats["noisy_A"]:
        raise FastPathUnsupported(
            "a test statistic is zero within fit precision: its CLs are the last digits of "
            "pyhf's fits, which only plain pyhf reproduces"
        )
    result = asymptotic_cls(stats["qmu"], stats["qmu_A"], test_stat)
    result.update(qmu=stats["qmu"], qmu_A=stats["qmu_A"])
    return result


def _at_noise_level(test_stat, mu, tmu, muhat) -> bool:
    """Whether pyhf's test statistic here is the noise of its fits (see :data:`NOISE_FLOOR`)."""
    zeroed = muhat < 0 if test_stat == "q0" else muhat > mu
    return tmu < (SIGN_FLOOR if zeroed else NOISE_FLOOR)


def _test_statistic(test_stat, mu, tmu, muhat) -> float:
    tmu = max(tmu, 0.0)
    if test_stat == "q0":
        return 0.0 if muhat < 0 else tmu
    return 0.0 if muhat > mu else tmu


def asymptotic_cls(qmu: float, qmu_a: float, test_stat: str) -> dict:
    """pyhf's asymptotic p-values from the observed and Asimov test statistics.

    >>> r = asymptotic_cls(0.0, 4.0, "qtilde")
    >>> round(r["CLs_obs"], 6), round(r["CLs_exp"][2], 6)
    (0.51164, 0.0455)
    """
    sqrtqmu, sqrtqmu_a = np.sqrt(qmu), np.sqrt(qmu_a)
    with np.errstate(divide="ignore", invalid="ignore"):
        if test_stat in ("q", "q0") or sqrtqmu <= sqrtqmu_a:
            teststat = sqrtqmu - sqrtqmu_a
        else:
            teststat = (sqrtqmu**2 - sqrtqmu_a**2) / (2 * sqrtqmu_a)

        def pvalues(value):
            clsb = ndtr(-(value + sqrtqmu_a))
            clb = ndtr(-value)
            return clsb, clb, clsb / clb

        clsb_obs, _, cls_obs = pvalues(teststat)
        expected = [pvalues(float(n)) for n in (2, 1, 0, -1, -2)]
    if test_stat == "q0":
        return {"CLs_obs": float(clsb_obs), "CLs_exp": [float(e[0]) for e in expected]}
    return {"CLs_obs": float(cls_obs), "CLs_exp": [float(e[2]) for e in expected]}
