"""One patch's fits on the compiled likelihood, each with its certificate.

:class:`FitProblem` minimises the same objective as pyhf (``-2 log L``, fixed parameters held at
their initial values, pyhf's suggested bounds) with scipy's L-BFGS-B (driven by
:mod:`~pyhf_dist.runtime.fast.lbfgsb`) on the likelihood's value and gradient (in C where built:
:mod:`~pyhf_dist.runtime.fast.native`; else the jitted function), in coordinates scaled by
the Fisher-information diagonal at the start: staterror parameters (widths of a few percent) and
control-region normalisations (hundreds of events) otherwise make the problem so badly
conditioned that a fit takes ten times as many evaluations.
A fit may start from several points (the lowest minimum is the answer), and one that L-BFGS-B
does not finish is continued by MINUIT. :class:`Fit` is a minimum and its certificate.
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np

from pyhf_dist.runtime.fast import lbfgsb, native, slsqp
from pyhf_dist.runtime.fast.errors import FastPathUnsupported

__all__ = ["ACCEPT_GRADIENT", "PROBE_RADIUS", "SAME_MINIMUM", "Fit", "FitProblem"]

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
#: Relative decrease of -2 log L below which :meth:`FitProblem.continued` stops, and its most
#: evaluations: a fit that stalled under :data:`FTOL` on the way to where it has no minimum goes on
#: with this tolerance (two 1Lbb toys' fits stopped at 27 and 29 went on to an empty bin expecting
#: 1,000 and 230 events below zero, in 250-600 evaluations).
CONTINUE_FTOL = 1e-15
CONTINUE_EVALUATIONS = 2000


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
        functions: The :class:`~pyhf_dist.runtime.fast.likelihood.Functions`.
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
        self._native = None  # built at the first fit (a group's problems never need it)

    @property
    def in_c(self) -> bool:
        """Whether this patch's fits call the C likelihood (:mod:`~pyhf_dist.runtime.fast.native`):
        built, not switched off, and in agreement with the compiled one on this patch."""
        if self._native is None:
            self._native = native.for_patch(
                self.layout, self.functions.codes, self.functions, self.init, self.main, self.aux,
                self.lower, self.upper, self.scale,
            ) or False
        return bool(self._native)

    def evaluator(self, main, aux):
        """``theta -> [-2 log L, gradient...]`` (a host array) on the data ``main``, ``aux``: the C
        likelihood where :attr:`in_c`, else the compiled one."""
        if self.in_c:
            value_and_grad = self._native
            main, aux = np.ascontiguousarray(main, dtype=float), np.ascontiguousarray(aux, dtype=float)
            return lambda theta: value_and_grad(theta, main, aux)
        value_and_grad, layout = self.functions.value_and_grad, self.layout
        return lambda theta: np.asarray(value_and_grad(theta, main, aux, layout))

    @property
    def nominal(self) -> np.ndarray:
        """The constrained parameters at the centres of their constraints (the auxiliary data: a
        normsys or histosys at 0, a staterror or shapesys at 1), the others at their initial
        values; the start of a fit where the measurement sets other initial values."""
        layout = {key: np.asarray(self.layout[key]) for key in ("gauss", "poisson", "tau")}
        # On the host: arithmetic on the device array would trace and compile a division in every
        # worker's first patch (~30 ms), for the same IEEE quotient.
        aux = np.asarray(self.aux)
        n = len(self.init)
        gauss, poisson = layout["gauss"][:n] & ~self.fixed, layout["poisson"][:n] & ~self.fixed
        centre = np.where(gauss, aux, np.where(poisson, aux / np.where(poisson, layout["tau"][:n], 1.0), self.init))
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
        theta = np.zeros(len(self.init))
        free, scale, lower, upper, objective = self._scaled(main, aux, poi_value, theta)
        fixed = ~free
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

    def continued(self, main, aux, stopped: Fit, poi_value=None) -> Fit:
        """A fit that did not converge (``stopped``, from :meth:`minimum`) continued from where it
        stopped, with no stop on a relative decrease above :data:`CONTINUE_FTOL`.

        A fit can stall short of its end under :data:`FTOL` (a relative decrease that small, at a
        projected gradient far above :data:`ACCEPT_GRADIENT`): on data without a minimum, on the
        way to where an empty bin's expected yield is as far below zero as the bounds allow; or
        near a flat minimum. The :class:`Fit` returned is ``stopped`` where going on found nothing
        lower; its ``converged`` says whether it now meets :data:`ACCEPT_GRADIENT`.
        """
        theta = np.array(stopped.theta, dtype=float)
        free, scale, lower, upper, objective = self._scaled(main, aux, poi_value, theta)
        result = lbfgsb.minimize(
            objective, theta[free] / scale, lower, upper,
            gtol=GTOL, ftol=CONTINUE_FTOL, maxcor=MAXCOR, maxiter=CONTINUE_EVALUATIONS, maxfun=CONTINUE_EVALUATIONS,
        )
        self.evaluations += result.nfev
        if not result.fun <= stopped.value:  # nothing lower (or not finite)
            return stopped
        theta[free] = result.x * scale
        gradient = _projected_gradient(result.jac, result.x, lower, upper)
        return Fit(theta, float(result.fun), gradient, gradient <= ACCEPT_GRADIENT, stopped.start + ", continued")

    def _scaled(self, main, aux, poi_value, theta: np.ndarray):
        """A fit in Fisher-scaled coordinates: ``(free, scale, lower, upper, objective)``.

        ``free`` masks the parameters it moves (``poi_value`` fixes the POI); ``scale`` and the
        bounds are theirs; ``objective`` maps their scaled values to ``(-2 log L, its gradient)``,
        writing them into ``theta``, whose other entries (the fixed values) the caller sets.
        """
        fixed = self.fixed.copy()
        if poi_value is not None:
            fixed[self.poi_index] = True
        free = ~fixed
        scale = self.scale[free]
        value_and_grad = self.evaluator(main, aux)

        def objective(x):
            theta[free] = x * scale
            result = value_and_grad(theta)
            return result[0], result[1:][free] * scale

        return free, scale, self.lower[free] / scale, self.upper[free] / scale, objective

    def _minimize(self, objective, x0, lower, upper, near=None):
        """L-BFGS-B, restarting a stalled line search: ``(x, value, projected gradient, joined)``.

        With ``near`` (a converged :class:`_Reached`), a probe: it stops (``joined``) once within
        :data:`PROBE_RADIUS` of that minimum without having gone below it.
        """
        x, value, gradient = x0, np.inf, np.inf
        joined = []

        def probe(x, value):
            if np.abs(x - near.x).max(initial=0.0) < PROBE_RADIUS and value >= near.value - SAME_MINIMUM:
                joined.append(True)
                return True
            return False

        # A line search that fails far from a minimum (curvature the scaling did not capture)
        # usually succeeds after a restart with a fresh Hessian approximation.
        for _ in range(RESTARTS + 1):
            result = lbfgsb.minimize(
                objective, x, lower, upper, callback=probe if near is not None else None,
                gtol=GTOL, ftol=FTOL, maxcor=MAXCOR, maxiter=MAXITER, maxfun=MAXITER,
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
        value_and_grad = self.evaluator(self.main, self.aux)

        def objective(x):
            theta[:n] = x
            result = value_and_grad(theta)
            return result[0], result[1 : n + 1]

        # The constraints' Jacobian is constant: given, it spares SLSQP a finite-difference
        # Jacobian per iteration (one constraint evaluation per parameter, half this check's
        # cost on 1Lbb); the differences it replaces are exact for these linear constraints.
        result = slsqp.minimize(objective, start[:n], self.lower[:n], self.upper[:n], np.flatnonzero(fixed), maxiter=1)
        self.evaluations += result.nfev
        gap = float(result.fun) - minimum
        return gap if bool(result.success) and gap > STALL_GAP else None

    def pyhf_default(self, poi_value: float, minimum: float, fit: str) -> dict | None:
        """A certificate's ``pyhf_default`` where pyhf's own fit ``fit`` (at ``poi_value``) stalls at
        its start, ``minimum`` being that fit's converged value (:meth:`pyhf_stall`); else ``None``."""
        gap = self.pyhf_stall(poi_value, minimum)
        if gap is None or not np.isfinite(gap):
            return None
        return {"stalls_at_start": True, "fit": fit, "stops_above_minimum": gap}

    def pyhf_stalls(self, poi_value: float, minimum: float) -> bool:
        """Whether pyhf's own fit at ``poi_value`` stalls at its start (:meth:`pyhf_stall`)."""
        return self.pyhf_stall(poi_value, minimum) is not None


def _projected_gradient(gradient, x, lower, upper) -> float:
    gradient = np.asarray(gradient)
    # At a bound, only the component pointing into the box counts.
    gradient = np.where((x <= lower) & (gradient > 0), 0.0, gradient)
    gradient = np.where((x >= upper) & (gradient < 0), 0.0, gradient)
    return float(np.max(np.abs(gradient), initial=0.0))
