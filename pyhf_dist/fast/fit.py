"""Maximum-likelihood fits and pyhf's asymptotic CLs on the compiled likelihood.

The fits minimise the same objective as pyhf (``-2 log L``, fixed parameters held at their
initial values, pyhf's suggested bounds) with scipy's L-BFGS-B on the jitted value and gradient,
in coordinates scaled by the Fisher-information diagonal at the start: staterror parameters
(widths of a few percent) and control-region normalisations (hundreds of events) otherwise make
the problem so badly conditioned that a fit takes ten times as many evaluations.

The test statistics and p-values are pyhf's (``pyhf.infer.calculators.AsymptoticCalculator``,
``pyhf.infer.test_statistics``): the same five fits, the same Asimov dataset (expected main and
auxiliary data at the conditional fit of the Asimov POI value), the same clipping and branches.
Only the starting points differ: each fit starts from the closest earlier solution. The minima
do not depend on the start; every fit must converge, or :class:`FastPathUnsupported` is raised
and the caller uses plain pyhf for the patch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import minimize
from scipy.special import ndtr

from pyhf_dist.fast.errors import FastPathUnsupported

__all__ = ["FitProblem", "asymptotic_cls", "hypotest"]

# L-BFGS-B settings in Fisher-scaled coordinates, where one unit is about one standard deviation
# (the Hessian of -2 log L is about twice the identity): a projected gradient below GTOL leaves
# -2 log L within ~1e-14 of the minimum, far below what moves a CLs value by 1e-6.
GTOL = 1e-7
FTOL = 1e-14
MAXCOR = 20
MAXITER = 5000
#: Largest projected gradient accepted when L-BFGS-B stops because its line search cannot make
#: progress (it does that at the floating-point floor of the objective, already converged).
ACCEPT_GRADIENT = 1e-4


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
    evaluations: int = 0

    def __post_init__(self):
        fisher = np.asarray(self.functions.fisher_diagonal(self.init, self.layout))
        good = np.isfinite(fisher) & (fisher > 0)
        self.scale = np.where(good, 1.0 / np.sqrt(np.where(good, fisher, 1.0)), 1.0)

    def fit(self, main, aux, start, poi_value=None):
        """Minimise ``-2 log L`` from ``start``; ``poi_value`` fixes the POI. Returns ``(theta, value)``."""
        fixed = self.fixed.copy()
        start = np.array(start, dtype=float)
        if poi_value is not None:
            fixed[self.poi_index] = True
            start[self.poi_index] = poi_value
        free = ~fixed
        base = np.where(fixed, start, 0.0)
        scale = self.scale[free]
        value_and_grad = self.functions.value_and_grad
        layout = self.layout
        theta = base.copy()

        def objective(x):
            theta[free] = x * scale
            value, gradient = value_and_grad(theta, main, aux, layout)
            return float(value), np.asarray(gradient)[free] * scale

        lower, upper = self.lower[free] / scale, self.upper[free] / scale
        x0 = np.clip(start[free] / scale, lower, upper)
        result = minimize(
            objective,
            x0,
            jac=True,
            method="L-BFGS-B",
            bounds=list(zip(lower, upper)),
            options={"gtol": GTOL, "ftol": FTOL, "maxcor": MAXCOR, "maxiter": MAXITER, "maxfun": MAXITER},
        )
        self.evaluations += result.nfev
        if not np.isfinite(result.fun):
            raise FastPathUnsupported("the fit reached a non-finite likelihood")
        if not result.success and _projected_gradient(result, lower, upper) > ACCEPT_GRADIENT:
            raise FastPathUnsupported(f"a fit did not converge: {result.message}")
        best = base.copy()
        best[free] = result.x * scale
        return best, float(result.fun)


def _projected_gradient(result, lower, upper) -> float:
    gradient = np.asarray(result.jac)
    x = result.x
    # At a bound, only the component pointing into the box counts.
    gradient = np.where((x <= lower) & (gradient > 0), 0.0, gradient)
    gradient = np.where((x >= upper) & (gradient < 0), 0.0, gradient)
    return float(np.max(np.abs(gradient), initial=0.0))


def _lowest(problem, main, aux, fits):
    """The free fit: from the best of the given starts' solutions, as the global minimum."""
    theta, value = problem.fit(main, aux, fits[0])
    for start in fits[1:]:
        candidate, candidate_value = problem.fit(main, aux, start)
        if candidate_value < value:
            theta, value = candidate, candidate_value
    return theta, value


def hypotest(problem: FitProblem, poi_test: float, test_stat: str) -> dict:
    """CLs (or CLs+b for ``q0``) observed and expected, exactly as ``pyhf.infer.hypotest``.

    Returns:
        ``{"CLs_obs": float, "CLs_exp": [5 floats], "qmu": float, "qmu_A": float}``.
    """
    if test_stat not in ("qtilde", "q", "q0"):
        raise FastPathUnsupported(f"test statistic {test_stat!r}")
    mu = 0.0 if test_stat == "q0" else float(poi_test)
    asimov_mu = 1.0 if test_stat == "q0" else 0.0
    poi = problem.poi_index
    lower, upper = problem.lower[poi], problem.upper[poi]
    if not (lower <= mu <= upper and lower <= asimov_mu <= upper):
        raise FastPathUnsupported("the tested POI value lies outside the POI bounds")
    main, aux = problem.main, problem.aux

    # Observed data: the conditional fit at the Asimov POI value first (it also makes the Asimov
    # dataset), then the conditional fit at mu and the free fit, each from the nearest solution.
    asimov_theta, _ = problem.fit(main, aux, problem.init, poi_value=asimov_mu)
    fixed_theta, fixed_value = problem.fit(main, aux, asimov_theta, poi_value=mu)
    free_theta, free_value = problem.fit(main, aux, asimov_theta)
    if free_value > fixed_value:
        free_theta, free_value = _lowest(problem, main, aux, [free_theta, fixed_theta])
    qmu = _test_statistic(test_stat, mu, fixed_value, free_value, free_theta[poi])

    # Asimov data: expected main and auxiliary data at the conditional fit; its free fit is that
    # very point (every term is at its maximum there), so the fit from it converges at once.
    asimov_main, asimov_aux = (np.asarray(a) for a in problem.functions.expected(asimov_theta, problem.layout))
    fixed_theta_a, fixed_value_a = problem.fit(asimov_main, asimov_aux, fixed_theta, poi_value=mu)
    free_theta_a, free_value_a = problem.fit(asimov_main, asimov_aux, asimov_theta)
    if free_value_a > fixed_value_a:
        free_theta_a, free_value_a = _lowest(problem, asimov_main, asimov_aux, [free_theta_a, fixed_theta_a])
    qmu_a = _test_statistic(test_stat, mu, fixed_value_a, free_value_a, free_theta_a[poi])
    result = asymptotic_cls(qmu, qmu_a, test_stat)
    result.update(qmu=qmu, qmu_A=qmu_a)
    return result


def _test_statistic(test_stat, mu, fixed_value, free_value, muhat) -> float:
    tmu = max(fixed_value - free_value, 0.0)
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
