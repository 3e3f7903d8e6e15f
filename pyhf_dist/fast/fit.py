"""Maximum-likelihood fits and pyhf's asymptotic CLs on the compiled likelihood.

The fits minimise the same objective as pyhf (``-2 log L``, fixed parameters held at their
initial values, pyhf's suggested bounds) with scipy's L-BFGS-B on the jitted value and gradient,
in coordinates scaled by the Fisher-information diagonal at the start: staterror parameters
(widths of a few percent) and control-region normalisations (hundreds of events) otherwise make
the problem so badly conditioned that a fit takes ten times as many evaluations.

The test statistics and p-values are pyhf's (``pyhf.infer.calculators.AsymptoticCalculator``,
``pyhf.infer.test_statistics``): the same five fits, the same Asimov dataset (expected main and
auxiliary data at the conditional fit of the Asimov POI value), the same clipping and branches.

**Certified answers** (the default): the answer is the converged maximum-likelihood fit, the
lowest ``-2 log L`` within pyhf's bounds, and every fit is checked before its number is used
(:class:`Fit` is its certificate):

* its projected gradient is small (:data:`ACCEPT_GRADIENT`, in units of one standard deviation);
* the free fit's ``-2 log L`` is not above any conditional fit's (the free fit's domain contains
  every conditional fit's): where it is, the free fit is refitted from that minimum;
* a second start reaches the same value: each fit to the observed data starts from pyhf's
  initial values (and, where the measurement sets others, from the constraints' centres) and
  from the minimum of another fit (the free fit from the conditional fit
  that makes the Asimov data, and every conditional fit from the free fit's minimum); a second
  start stops early once it is within :data:`PROBE_RADIUS` of the first's minimum. Where two
  starts (or the check above) find different minima, the fits to the Asimov data get second
  starts too. Every fit starts where pyhf's starts, so where pyhf's fits converge, the numbers
  are pyhf's;
* a fit that does not converge is fitted harder: L-BFGS-B restarted, then MINUIT (iminuit's
  MIGRAD, where installed) on the compiled gradient.

Where pyhf's own minimizer (SciPy's SLSQP) stops at its starting point on a patch (cheaply
detected with one SLSQP iteration set up as pyhf's, :meth:`FitProblem.pyhf_stall`), the result
says how far above the minimum pyhf's fit would stop; the CLs values are the converged ones.

**pyhf's digits** (``match_pyhf=True``): the fits start where pyhf's start, from the suggested
initial values only, and :class:`FastPathUnsupported` is raised (the caller then runs plain pyhf
for the patch) where the number would not be pyhf's: a fit that does not converge; a model on
which pyhf's minimizer stalls at its starting point; a test statistic so close to zero that
pyhf's CLs are the rounding of its fits (:data:`NOISE_FLOOR`).
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
from scipy.optimize import minimize
from scipy.special import ndtr

from pyhf_dist.fast.errors import FastPathUnsupported

__all__ = ["Fit", "FitProblem", "PoiScan", "asymptotic_cls", "hypotest"]

# L-BFGS-B settings in Fisher-scaled coordinates, where one unit is about one standard deviation
# (the Hessian of -2 log L is about twice the identity): a projected gradient below GTOL leaves
# -2 log L within ~1e-10 of its minimum, and a CLs value moves by 1e-4 only when a test
# statistic moves by ~1e-4. Tighter settings cost evaluations and changed no CLs value on 1Lbb.
GTOL = 1e-5
FTOL = 1e-12
MAXCOR = 30
MAXITER = 5000
#: Most evaluations MINUIT may take to finish a fit L-BFGS-B did not.
MINUIT_CALLS = 20000
RESTARTS = 2
#: Largest projected gradient (in Fisher-scaled coordinates: per standard deviation) of a fit
#: counted as converged. L-BFGS-B stops below :data:`GTOL` or, when its line search can make no
#: more progress, at the floating-point floor of the objective, already converged.
ACCEPT_GRADIENT = 1e-3
#: Two minima closer than this in -2 log L are the same (the fits' own precision is ~1e-10).
SAME_MINIMUM = 1e-7
#: A further start of a fit that comes this close (in every coordinate, in standard deviations)
#: to the minimum already found has fallen into its basin, and stops there.
PROBE_RADIUS = 0.3
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


class Fit(typing.NamedTuple):
    """One fit's minimum and its certificate.

    Attributes:
        theta: The parameters at the minimum (padded).
        value: ``-2 log L`` there, up to a constant of the dataset.
        gradient: The largest component of the projected gradient there, per standard deviation
            (Fisher-scaled coordinates); ``inf`` where no start converged.
        converged: Whether the gradient is below :data:`ACCEPT_GRADIENT`.
        start: Where the fit that found the minimum started: ``"init"`` (pyhf's suggested
            initial values), or the name of the fit whose minimum it started from.
        others: ``{start: -2 log L}`` of the other starts that converged to a higher minimum.
    """

    theta: np.ndarray
    value: float
    gradient: float
    converged: bool
    start: str = "init"
    others: dict = {}

    def certificate(self) -> dict:
        """The JSON-able record of this fit: ``twice_nll``, ``gradient``, ``converged``, ``start``
        and, where another start ended on a higher minimum, ``other_starts``."""
        out = {"twice_nll": self.value, "gradient": self.gradient, "converged": self.converged, "start": self.start}
        if self.others:
            out["other_starts"] = dict(self.others)
        return out


@dataclasses.dataclass
class _Reached:
    """Where one start of a fit ended (``x`` in Fisher-scaled coordinates of the free parameters)."""

    x: np.ndarray
    value: float
    gradient: float
    start: str
    theta: np.ndarray

    def __post_init__(self):
        self.value = float(self.value) if np.isfinite(self.value) else np.inf
        self.gradient = float(self.gradient)

    @property
    def converged(self) -> bool:
        return self.gradient <= ACCEPT_GRADIENT


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

    @property
    def nominal(self) -> np.ndarray:
        """The constrained parameters at the centres of their constraints (the auxiliary data: a
        normsys or histosys at 0, a staterror or shapesys at 1), the others at their initial
        values; the start of a fit where the measurement sets other initial values."""
        layout = {key: np.asarray(self.layout[key]) for key in ("gauss", "poisson", "tau")}
        n = len(self.init)
        gauss, poisson = layout["gauss"][:n] & ~self.fixed, layout["poisson"][:n] & ~self.fixed
        centre = np.where(gauss, self.aux, np.where(poisson, self.aux / np.where(poisson, layout["tau"][:n], 1.0), self.init))
        return np.clip(centre, self.lower, self.upper)

    def fit(self, main, aux, start, poi_value=None):
        """Minimise ``-2 log L`` from ``start``; ``poi_value`` fixes the POI. Returns ``(theta, value)``.

        Raises:
            FastPathUnsupported: The fit did not converge.
        """
        found = self.minimum(main, aux, {"init": start}, poi_value)
        if not found.converged:
            raise FastPathUnsupported("a fit did not converge")
        return found.theta, found.value

    def minimum(self, main, aux, starts: dict, poi_value=None, *, harder: bool = False, known: Fit | None = None) -> Fit:
        """The lowest converged minimum of ``-2 log L`` reached from ``starts`` (``{name: theta}``).

        Within pyhf's bounds, in coordinates scaled by the Fisher diagonal. (Whitening by the
        full Fisher matrix halves the evaluations but, on a likelihood with several minima,
        leads some 1Lbb fits into other minima than pyhf's.) ``poi_value`` fixes the POI.

        The first start is fitted to convergence; each further start is a probe of the basin it
        falls into: it stops once within :data:`PROBE_RADIUS` of the minimum found (the same
        minimum, at about half the cost of a fit), and is fitted to its own minimum otherwise.
        With ``harder``, a fit that L-BFGS-B does not bring to convergence from any start is
        continued by MINUIT (where iminuit is installed). ``known`` is a minimum already found
        for the same data and POI value (the further starts probe it).

        Returns:
            The :class:`Fit`; ``converged`` is false when no start converged (its minimum is
            then the lowest point reached).
        """
        fixed = self.fixed.copy()
        if poi_value is not None:
            fixed[self.poi_index] = True
        free = ~fixed
        scale = self.scale[free]
        lower, upper = self.lower[free] / scale, self.upper[free] / scale
        value_and_grad, layout = self.functions.value_and_grad, self.layout
        theta = np.zeros(len(self.init))

        def objective(x):
            theta[free] = x * scale
            result = np.asarray(value_and_grad(theta, main, aux, layout))
            return result[0], result[1:][free] * scale

        reached: list[_Reached] = []
        if known is not None:
            entry = _Reached(known.theta[free] / scale, known.value, known.gradient, known.start, known.theta.copy())
            reached.append(entry)
        for name, start in starts.items():
            start = np.array(start, dtype=float)
            if poi_value is not None:
                start[self.poi_index] = poi_value
            theta[:] = np.where(fixed, start, 0.0)
            found = [entry for entry in reached if entry.converged]
            near = min(found, key=lambda entry: entry.value) if found else None
            x, value, gradient, joined = self._minimize(
                objective, np.clip(start[free] / scale, lower, upper), lower, upper, near
            )
            if not joined:
                reached.append(_Reached(x, value, gradient, name, theta.copy()))
        converged = [entry for entry in reached if entry.converged]
        if not converged and harder:
            best = min(reached, key=lambda entry: entry.value)
            theta[:] = best.theta
            x, value, gradient = self._migrad(objective, best.x, lower, upper)
            converged = [_Reached(x, value, gradient, best.start + ", MINUIT", theta.copy())]
            converged = [entry for entry in converged if entry.converged]
        pool = converged or reached
        lowest = min(entry.value for entry in pool)
        # Of starts that reach one minimum, the first (pyhf's) is named.
        best = next(entry for entry in pool if not entry.value > lowest + SAME_MINIMUM)
        out = best.theta
        out[free] = best.x * scale
        others = {entry.start: entry.value for entry in converged if entry.value - best.value > SAME_MINIMUM}
        if known is not None:
            others = {**known.others, **others}
        return Fit(out, best.value, best.gradient, best.converged, best.start, others)

    def _minimize(self, objective, x0, lower, upper, near=None):
        """L-BFGS-B, restarting a stalled line search: ``(x, value, projected gradient, joined)``.

        With ``near`` (a converged :class:`_Reached`), a probe: it stops (``joined``) once within
        :data:`PROBE_RADIUS` of that minimum without having gone below it.
        """
        x, value, gradient = x0, np.inf, np.inf
        bounds = list(zip(lower, upper))
        joined = []

        def probe(intermediate_result):
            if np.max(np.abs(intermediate_result.x - near.x), initial=0.0) < PROBE_RADIUS and (
                intermediate_result.fun >= near.value - SAME_MINIMUM
            ):
                joined.append(True)
                raise StopIteration

        # A line search that fails far from a minimum (curvature the scaling did not capture)
        # usually succeeds after a restart with a fresh Hessian approximation.
        for _ in range(RESTARTS + 1):
            result = minimize(
                objective,
                x,
                jac=True,
                method="L-BFGS-B",
                bounds=bounds,
                callback=probe if near is not None else None,
                options={"gtol": GTOL, "ftol": FTOL, "maxcor": MAXCOR, "maxiter": MAXITER, "maxfun": MAXITER},
            )
            self.evaluations += result.nfev
            if joined:
                return result.x, float(result.fun), np.inf, True
            if not np.isfinite(result.fun):
                break
            x, value = result.x, float(result.fun)
            gradient = _projected_gradient(result.jac, x, lower, upper)
            if result.success or gradient <= ACCEPT_GRADIENT:
                break
        return x, value, gradient, False

    def _migrad(self, objective, x0, lower, upper):
        """MINUIT's MIGRAD (strategy 2) on the compiled gradient from ``x0``: ``(x, value, gradient)``.

        ``(x0, inf, inf)`` where iminuit is not installed (``pip install iminuit``).
        """
        try:
            from iminuit import Minuit
        except ImportError:
            return x0, np.inf, np.inf
        x0 = np.clip(x0, lower, upper)
        minuit = Minuit(lambda x: objective(x)[0], x0, grad=lambda x: objective(x)[1])
        minuit.errordef = Minuit.LEAST_SQUARES  # -2 log L: one unit is one standard deviation
        minuit.limits = list(zip(lower, upper))
        minuit.strategy = 2
        minuit.tol = 1e-6
        minuit.migrad(ncall=MINUIT_CALLS)
        self.evaluations += minuit.nfcn
        x = np.clip(np.asarray(minuit.values), lower, upper)
        value, jac = objective(x)
        if not np.isfinite(value):
            return x0, np.inf, np.inf
        return x, float(value), _projected_gradient(jac, x, lower, upper)

    def pyhf_stall(self, poi_value: float, minimum: float) -> float | None:
        """How far above ``minimum`` pyhf's own fit of the observed data at ``poi_value`` stops
        when it stalls at its starting point (in ``-2 log L``), or ``None`` when it does not.

        pyhf minimises with scipy's SLSQP from the suggested initial values, fixed parameters as
        equality constraints. On badly scaled models (a shapesys with a near-zero uncertainty,
        a Poisson constraint factor of 1e11) its first step overshoots so far that the line
        search returns to the start and SLSQP reports convergence after one iteration: pyhf
        then computes CLs from fits that never left the initial values. One SLSQP iteration set
        up as pyhf's tells whether that happens.

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
        gap = float(result.fun) - minimum
        return gap if bool(result.success) and gap > STALL_GAP else None

    def pyhf_stalls(self, poi_value: float, minimum: float) -> bool:
        """Whether pyhf's own fit at ``poi_value`` stalls at its start (:meth:`pyhf_stall`)."""
        return self.pyhf_stall(poi_value, minimum) is not None


def _projected_gradient(gradient, x, lower, upper) -> float:
    gradient = np.asarray(gradient)
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

    Certified (the default; see the module): every fit is checked and the lowest minimum any
    start reaches is the answer. With ``match_pyhf``, every fit starts where pyhf's starts, from
    the suggested initial values (the POI set for the conditional fits), since HistFactory
    likelihoods can have several local minima (1Lbb patches have some 0.1 apart in -2 log L)
    and a fit started elsewhere can settle in another one than pyhf's; the one exception is the
    free fit to the Asimov data, whose global minimum is known: the parameters the data were
    generated from.

    Args:
        problem: The patch.
        test_stat: ``"qtilde"``, ``"q"`` or ``"q0"`` (``q0`` tests ``mu = 0`` only).
        match_pyhf: Reproduce pyhf's own numbers (see the module).

    Attributes:
        fits: ``{name: Fit}`` of every fit made so far (``"observed free"``, ``"observed mu=0"``,
            ``"asimov free"``, ``"asimov mu=1"``, ...).
        pyhf_default: ``None``, or where pyhf's default minimizer stalls on this patch:
            ``{"stalls_at_start": True, "fit": name, "stops_above_minimum": gap}``.

    Raises:
        FastPathUnsupported: The Asimov POI value lies outside the POI bounds, a fit does not
            converge, or (``match_pyhf``) pyhf's own minimizer stalls on this patch.
    """

    def __init__(self, problem: FitProblem, test_stat: str, *, match_pyhf: bool = False):
        if test_stat not in ("qtilde", "q", "q0"):
            raise FastPathUnsupported(f"test statistic {test_stat!r}")
        self.problem = problem
        self.test_stat = test_stat
        self.match_pyhf = match_pyhf
        self.fits: dict[str, Fit] = {}
        poi = problem.poi_index
        self.bounds = (float(problem.lower[poi]), float(problem.upper[poi]))
        asimov_mu = 1.0 if test_stat == "q0" else 0.0
        if not self.bounds[0] <= asimov_mu <= self.bounds[1]:
            raise FastPathUnsupported("the Asimov POI value lies outside the POI bounds")
        main, aux = problem.main, problem.aux
        self._asimov_mu = asimov_mu
        certified = not match_pyhf
        #: Whether two starts of one fit found different minima (certified: more starts then).
        self.several_minima = False
        # The conditional fit at the Asimov POI value first: it makes the Asimov dataset and
        # tells whether pyhf's own fits get anywhere on this patch.
        background_name = _name("observed", asimov_mu)
        starts = {"init": problem.init}
        if certified and not np.array_equal(problem.nominal, problem.init):
            starts["nominal"] = problem.nominal
        background = self._fit(background_name, main, aux, starts, asimov_mu)
        if certified:
            starts[background_name] = background.theta
        free = self._fit("observed free", main, aux, starts)
        if certified:
            # The second start of the fit the Asimov data come from: the free fit's minimum.
            background = self._fit(background_name, main, aux, {"observed free": free.theta}, asimov_mu, known=background)
            self._settle_free("observed", background)
        gap = problem.pyhf_stall(asimov_mu, background.value)
        self.pyhf_default = None
        if gap is not None:
            if match_pyhf:
                raise FastPathUnsupported(
                    "pyhf's minimizer stops at its starting point on this model (its CLs come from "
                    "unconverged fits); plain pyhf reproduces them"
                )
            self.pyhf_default = {"stalls_at_start": True, "fit": background_name, "stops_above_minimum": gap}
        # Asimov data: expected main and auxiliary data at the conditional fit; its free fit is
        # that very point (every term is at its maximum there), so the fit from it converges at once.
        # Kept where the likelihood runs: every evaluation of every fit to it reads them.
        self._asimov = tuple(problem.functions.expected(background.theta, problem.layout))
        self._fit("asimov free", *self._asimov, {"generating point": background.theta})

    @property
    def _muhat(self) -> float:
        return float(self.fits["observed free"].theta[self.problem.poi_index])

    @property
    def _muhat_a(self) -> float:
        return float(self.fits["asimov free"].theta[self.problem.poi_index])

    @property
    def shared_fits(self) -> list[str]:
        """Names of the fits every tested POI value shares: the free fits and the fit that made the Asimov data."""
        return ["observed free", _name("observed", self._asimov_mu), "asimov free"]

    @property
    def converged(self) -> bool:
        """Whether every fit made so far converged."""
        return all(found.converged for found in self.fits.values())

    def _fit(self, name, main, aux, starts, poi_value=None, known=None) -> Fit:
        """Fit (certified: fitted harder where needed), remember it under ``name``; raise where it did not converge."""
        found = self.problem.minimum(main, aux, starts, poi_value, harder=not self.match_pyhf, known=known)
        if not found.converged:
            raise FastPathUnsupported(f"a fit did not converge ({name})")
        self.several_minima = self.several_minima or bool(found.others)
        self.fits[name] = found
        return found

    def _conditional(self, data: str, mu: float) -> Fit:
        """The fit at POI ``mu`` to the observed or Asimov data (certified, on a likelihood with
        several minima: also from the free fit's minimum)."""
        name = _name(data, mu)
        if name in self.fits:
            return self.fits[name]
        problem = self.problem
        main, aux = (problem.main, problem.aux) if data == "observed" else self._asimov
        starts = {"init": problem.init}
        if not self.match_pyhf and (data == "observed" or self.several_minima):
            # A conditional fit too high gives too large a test statistic: a false exclusion.
            starts[f"{data} free"] = self.fits[f"{data} free"].theta
        found = self._fit(name, main, aux, starts, mu)
        self._settle_free(data, found)
        return found

    def _settle_free(self, data: str, conditional: Fit) -> None:
        """Certified: a free fit above a conditional one has missed its minimum; refit it from there.

        The free fit's domain contains every conditional fit's, so at the true minimum its
        ``-2 log L`` is never higher. (A published record showed the miss: a free fit 2.8 above
        its own ``mu = 0`` fit gave ``CLs_obs`` 0.0045 instead of 0.0014.)
        """
        if self.match_pyhf:
            return
        name = f"{data} free"
        free = self.fits[name]
        if free.value <= conditional.value + SAME_MINIMUM:
            return
        problem = self.problem
        main, aux = (problem.main, problem.aux) if data == "observed" else self._asimov
        conditional_name = next(key for key, value in self.fits.items() if value is conditional)
        again = self.problem.minimum(main, aux, {conditional_name: conditional.theta}, harder=True)
        self.several_minima = True
        if again.converged and again.value < free.value:
            self.fits[name] = again._replace(others={**again.others, free.start: free.value})

    def statistics(self, mu: float, observed: bool = True) -> dict:
        """The observed and Asimov test statistics at ``mu`` (two conditional fits).

        Args:
            mu: The tested POI value.
            observed: ``False`` skips the fit to the observed data (the expected CLs band
                depends on the Asimov statistic alone); ``qmu`` is then ``None``.

        Returns:
            ``{"qmu", "qmu_A"}`` as pyhf computes them, and ``"noisy_obs"``, ``"noisy_A"``
            (``match_pyhf`` only; else false): whether each is zero within the precision of
            pyhf's fits, where pyhf's value is the noise of its fits (:data:`NOISE_FLOOR`).
        """
        stat = self.test_stat
        stats = {"qmu": None, "qmu_A": None, "noisy_obs": False, "noisy_A": False}
        for data, key, noisy in (("asimov", "qmu_A", "noisy_A"), ("observed", "qmu", "noisy_obs")):
            if data == "observed" and not observed:
                continue
            tmu = self._conditional(data, mu).value - self.fits[f"{data} free"].value
            muhat = self._muhat if data == "observed" else self._muhat_a
            if not self.match_pyhf and mu == self._asimov_mu and stat != "q0":
                # The tested hypothesis is the background the Asimov data were made from (and,
                # for qtilde, the observed statistic is 0 whatever muhat): 0 exactly, not fit noise.
                tmu = 0.0 if data == "asimov" or stat == "qtilde" else tmu
            stats[key] = _test_statistic(stat, mu, tmu, muhat)
            stats[noisy] = self.match_pyhf and _at_noise_level(stat, mu, tmu, muhat)
        return stats

    def statistics_many(self, mus, observed: bool = True) -> list[dict]:
        """:meth:`statistics` at each of ``mus`` (one after another; the fits are independent,
        so a batched engine can fit them together)."""
        return [self.statistics(float(mu), observed) for mu in mus]

    def certificate(self, fits: list[str] | None = None) -> dict:
        """``{"converged", "fits": {name: certificate}}`` (``fits``: which, default all);
        ``"pyhf_default"`` too where pyhf's default minimizer stalls on the patch."""
        names = list(self.fits) if fits is None else fits
        out = {
            "converged": self.converged,
            "fits": {name: self.fits[name].certificate() for name in names},
        }
        if self.pyhf_default is not None:
            out["pyhf_default"] = dict(self.pyhf_default)
        return out


def _name(data: str, mu: float) -> str:
    return f"{data} mu={mu:g}"


def hypotest(problem: FitProblem, poi_test: float, test_stat: str, *, match_pyhf: bool = False) -> dict:
    """CLs (or CLs+b for ``q0``) observed and expected, as ``pyhf.infer.hypotest``, from the
    fits of :class:`PoiScan` (certified, or from pyhf's starting points with ``match_pyhf``).

    Returns:
        ``{"CLs_obs": float, "CLs_exp": [5 floats], "qmu": float, "qmu_A": float}`` and the
        fits' certificate (:meth:`PoiScan.certificate`: ``converged``, ``fits``, and
        ``pyhf_default`` where pyhf's own minimizer stalls on the patch).
    """
    if test_stat not in ("qtilde", "q", "q0"):
        raise FastPathUnsupported(f"test statistic {test_stat!r}")
    mu = 0.0 if test_stat == "q0" else float(poi_test)
    poi = problem.poi_index
    if not problem.lower[poi] <= mu <= problem.upper[poi]:
        raise FastPathUnsupported("the tested POI value lies outside the POI bounds")
    scan = PoiScan(problem, test_stat, match_pyhf=match_pyhf)
    stats = scan.statistics(mu)
    if stats["noisy_obs"] or stats["noisy_A"]:
        raise FastPathUnsupported(
            "a test statistic is zero within fit precision: its CLs are the last digits of "
            "pyhf's fits, which only plain pyhf reproduces"
        )
    result = asymptotic_cls(stats["qmu"], stats["qmu_A"], test_stat, powerless_is_one=not match_pyhf)
    result.update(qmu=stats["qmu"], qmu_A=stats["qmu_A"], **scan.certificate())
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


def asymptotic_cls(qmu: float, qmu_a: float, test_stat: str, *, powerless_is_one: bool = False) -> dict:
    """pyhf's asymptotic p-values from the observed and Asimov test statistics.

    Args:
        qmu, qmu_a: The observed and Asimov test statistics.
        test_stat: ``"qtilde"``, ``"q"`` or ``"q0"``.
        powerless_is_one: Where the Asimov statistic is zero (a test without power: the
            likelihood does not depend on the POI) CLs is 1, which excludes nothing; pyhf divides
            0 by 0 there when its fits leave the observed statistic above zero, and gives NaN.

    >>> r = asymptotic_cls(0.0, 4.0, "qtilde")
    >>> round(r["CLs_obs"], 6), round(r["CLs_exp"][2], 6)
    (0.51164, 0.0455)
    >>> asymptotic_cls(1e-12, 0.0, "qtilde", powerless_is_one=True)["CLs_obs"]
    1.0
    """
    sqrtqmu, sqrtqmu_a = np.sqrt(qmu), np.sqrt(qmu_a)
    with np.errstate(divide="ignore", invalid="ignore"):
        if powerless_is_one and sqrtqmu_a == 0:
            teststat = 0.0
        elif test_stat in ("q", "q0") or sqrtqmu <= sqrtqmu_a:
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
