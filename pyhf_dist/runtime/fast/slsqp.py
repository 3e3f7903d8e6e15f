"""scipy's SLSQP set up as pyhf sets it up, without ``scipy.optimize.minimize`` around it.

:meth:`~pyhf_dist.runtime.fast.problem.FitProblem.pyhf_stall` runs one iteration of pyhf's own
minimizer on every patch: scipy's SLSQP with the fixed parameters as equality constraints.
Through ``scipy.optimize.minimize`` that costs each worker the import of ``scipy.optimize``
(:mod:`~pyhf_dist.runtime.fast.routines`). :func:`minimize` drives scipy's SLSQP routine
(``slsqp``, in C since scipy 1.16) in the loop of scipy's ``_minimize_slsqp``, with the caching of
the ``ScalarFunction`` and ``MemoizeJac`` around the objective there: the same iterates, value,
count of evaluations and exit, bit for bit.

As for L-BFGS-B (:mod:`~pyhf_dist.runtime.fast.lbfgsb`), the routine is driven only on the scipy
versions whose loop this one restates (:data:`SCIPY_VERSIONS`: the same from 1.16, where it was
rewritten in C, to 1.18, whose integer array follows its LAPACK's integer width), and where it
reproduced ``scipy.optimize.minimize`` on check problems (once per scipy installation,
remembered); otherwise every call goes through ``scipy.optimize.minimize``.
"""

from __future__ import annotations

import functools
import typing

import numpy as np

from pyhf_dist.runtime.fast import routines

__all__ = ["SCIPY_VERSIONS", "Result", "direct", "minimize"]

#: The scipy versions (``(major, minor)``, from, up to and excluding) whose SLSQP loop
#: :func:`minimize` restates.
SCIPY_VERSIONS = ((1, 16), (1, 19))
#: scipy's default ``ftol`` of SLSQP (the routine's accuracy ``acc``), which pyhf keeps.
FTOL = 1e-6


class Result(typing.NamedTuple):
    """Where SLSQP stopped: ``x``, the value ``fun`` there, the evaluations ``nfev`` as scipy counts
    them, and ``success`` (exit mode 0)."""

    x: np.ndarray
    fun: float
    nfev: int
    success: bool


def minimize(fun, x0, lower, upper, fixed, *, maxiter: int) -> Result:
    """``scipy.optimize.minimize(fun, x0, jac=True, method="SLSQP", bounds=Bounds(lower, upper),
    constraints=[...], options={"maxiter": maxiter})`` where the constraints hold the parameters of
    ``fixed`` (indices) at their values in ``x0``, with their constant Jacobian given.

    Args:
        fun: ``x -> (value, gradient)``.
        x0: The start.
        lower, upper: The bounds (finite or infinite).
        fixed: Indices of the parameters held at their start.
        maxiter: SLSQP's ``maxiter``.
    """
    lower, upper = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    x0 = np.asarray(x0, dtype=float).ravel()
    fixed = np.asarray(fixed, dtype=np.intp)
    # Bounds that fix a parameter take scipy's own path (what minimize does with them is not
    # restated here).
    if direct() and np.all(lower < upper):
        return _drive(fun, x0, lower, upper, fixed, maxiter, _driven())
    return _scipy(fun, x0, lower, upper, fixed, maxiter)


def _constraints(x0: np.ndarray, fixed: np.ndarray) -> dict:
    values = x0[fixed]
    jacobian = np.eye(len(x0))[fixed]
    return {"type": "eq", "fun": lambda x: x[fixed] - values, "jac": lambda x: jacobian}


def _drive(fun, x0, lower, upper, fixed, maxiter, integer: str) -> Result:
    """scipy's ``_minimize_slsqp`` loop for these problems, less its wrappers (see the module);
    ``integer`` is the type of the routine's integer array (``"int32"``, or ``"int64"`` for an
    ILP64 build of scipy 1.18)."""
    slsqp = routines.extension("_slsqplib").slsqp
    x = np.clip(x0.copy(), lower, upper)
    n, meq = len(x), len(fixed)
    m = meq
    constraint = _constraints(x0, fixed)
    objective = _Memoized(fun, x)
    xl = np.where(np.isfinite(lower), lower, np.nan)
    xu = np.where(np.isfinite(upper), upper, np.nan)
    state = {
        "acc": FTOL, "alpha": 0.0, "f0": 0.0, "gs": 0.0, "h1": 0.0, "h2": 0.0, "h3": 0.0, "h4": 0.0,
        "t": 0.0, "t0": 0.0, "tol": 10.0 * FTOL, "exact": 0, "inconsistent": 0, "reset": 0, "iter": 0,
        "itermax": int(maxiter), "line": 0, "m": m, "meq": meq, "mode": 0, "n": n,
    }
    indices = np.zeros([max(m + 2 * n + 2, 1)], dtype=integer)
    # scipy's workspace size for these problems (equality constraints only).
    size = n * (n + 1) // 2 + 3 * m * n - (m + 5 * n + 7) * meq + 9 * m + 8 * n * n + 35 * n + meq * meq + 28
    size += 2 * n * (n + 1)
    buffer = np.zeros(max(size, 1), dtype=np.float64)
    fx, g = objective.value(x), objective.gradient(x)
    mult = np.zeros([max(1, m + 2 * n + 2)], dtype=np.float64)
    C = np.zeros([max(1, m), n], dtype=np.float64, order="F")
    d = np.zeros([max(1, m)], dtype=np.float64)
    if m:
        C[:meq, :] = constraint["jac"](x)
        d[:meq] = constraint["fun"](x)
    while True:
        slsqp(state, fx, g, C, d, x, mult, xl, xu, buffer, indices)
        if state["mode"] == 1:
            fx = objective.value(x)
            if m:
                d[:meq] = constraint["fun"](x)
        if state["mode"] == -1:
            g = objective.gradient(x)
            if m:
                C[:meq, :] = constraint["jac"](x)
        if abs(state["mode"]) != 1:
            break
    return Result(x, fx, objective.nfev, state["mode"] == 0)


class _Memoized:
    """The objective as scipy's ``ScalarFunction`` and ``MemoizeJac`` present it to SLSQP: a value
    and a gradient per point, the pair computed once per point, evaluations counted as scipy counts
    them (values asked for at a new point)."""

    def __init__(self, fun, x0):
        self._fun = fun
        self._at = np.array(x0, dtype=float)  # ScalarFunction's point
        self._pair_at = None  # MemoizeJac's point, value and gradient
        self._pair = None
        self.nfev = 0
        self._f = self._g = None
        self._compute_value()
        self._compute_gradient()

    def _move(self, x) -> None:
        if not np.array_equal(x, self._at):
            self._at = np.array(x, dtype=float)
            self._f = self._g = None

    def _evaluated(self, x):
        if self._pair_at is None or not np.all(x == self._pair_at):
            self._pair_at = np.asarray(x).copy()
            self._pair = self._fun(np.copy(x))
        return self._pair

    def _compute_value(self) -> None:
        if self._f is None:
            value = self._evaluated(self._at)[0]
            self._f = value if np.isscalar(value) else np.asarray(value).item()
            self.nfev += 1

    def _compute_gradient(self) -> None:
        if self._g is None:
            self._g = np.atleast_1d(self._evaluated(self._at)[1])

    def value(self, x):
        self._move(x)
        self._compute_value()
        return self._f

    def gradient(self, x):
        self._move(x)
        self._compute_gradient()
        return self._g


def _scipy(fun, x0, lower, upper, fixed, maxiter) -> Result:
    from scipy.optimize import Bounds
    from scipy.optimize import minimize as scipy_minimize

    result = scipy_minimize(
        fun, x0, jac=True, method="SLSQP", bounds=Bounds(lower, upper),
        constraints=[_constraints(x0, fixed)], options={"maxiter": maxiter},
    )
    return Result(result.x, result.fun, int(result.nfev), bool(result.success))


def direct() -> bool:
    """Whether :func:`minimize` drives scipy's routine itself (see the module)."""
    return _driven() is not None


@functools.cache
def _driven() -> str | None:
    return routines.driven("SLSQP", "slsqp", SCIPY_VERSIONS, ("_slsqplib",), _check, __file__)


def _check() -> str:
    """``"same int32"`` (or ``"same int64"``, the routine's integer type) where the driver
    reproduces ``scipy.optimize.minimize`` on the check problems, else ``"different"``."""
    integer = routines.integer_type()
    return f"same {integer}" if all(_same(integer, *case) for case in _CASES) else "different"


def _rosenbrock(x):
    return routines.rosenbrock(x, np.linspace(0.5, 3.0, len(x)))


#: ``(x0, lower, upper, fixed, maxiter)`` of the check problems: pyhf's one iteration and a run to
#: the end, bounds finite and infinite, one or two parameters held.
_CASES = (
    (np.full(6, -0.4), np.full(6, -2.0), np.full(6, 2.0), [2], 1),
    (np.full(6, -0.4), np.array([-2.0, -np.inf, -2.0, 0.0, -2.0, -2.0]), np.array([2.0, 2.0, np.inf, 2.0, 0.3, 2.0]), [0, 4], 100),
    (np.linspace(-1.0, 1.0, 5), np.full(5, -3.0), np.full(5, 3.0), [], 100),
)


def _same(integer, x0, lower, upper, fixed, maxiter) -> bool:
    mine = _drive(_rosenbrock, np.asarray(x0, dtype=float), lower, upper, np.asarray(fixed, dtype=np.intp), maxiter, integer)
    theirs = _scipy(_rosenbrock, np.asarray(x0, dtype=float), lower, upper, np.asarray(fixed, dtype=np.intp), maxiter)
    return (
        np.array_equal(mine.x, theirs.x) and float(mine.fun) == float(theirs.fun)
        and mine.nfev == theirs.nfev and mine.success == theirs.success
    )
