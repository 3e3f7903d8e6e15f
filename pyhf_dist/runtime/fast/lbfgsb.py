"""scipy's L-BFGS-B without ``scipy.optimize.minimize``'s machinery around every call.

A 1Lbb hypotest runs about eight L-BFGS-B fits of ~25 evaluations each, and one evaluation of the
compiled likelihood takes ~0.25 ms. ``scipy.optimize.minimize`` adds about as much again around
it: per fit, bounds converted element by element in Python; per evaluation, ``ScalarFunction``'s
copies, comparisons and caches. :func:`minimize` drives scipy's own L-BFGS-B routine (the
reverse-communication step ``setulb`` that ``scipy.optimize.minimize`` calls) in the loop of
scipy's ``_minimize_lbfgsb``, so its iterates are scipy's to the last bit, at less than half the
cost around each evaluation (``benchmarks/lbfgsb_overhead.py``).

The routine is private to scipy, and it trusts its caller with the sizes of its work arrays. So
it is driven here only on the scipy versions whose loop this one restates (:data:`SCIPY_VERSIONS`:
the routine and its loop are the same from 1.15, where it was rewritten in C, to 1.18, whose
integer arrays follow its LAPACK's integer width), where it takes the arguments it took there, and after this loop reproduced ``scipy.optimize.minimize`` on
a small bounded problem, run to convergence and stopped by a callback: the same points, values,
gradients and evaluation counts, bit for bit. That check runs once per scipy installation and is
remembered (:mod:`~pyhf_dist.runtime.fast.routines`, which also loads the routine without
importing ``scipy.optimize``). Otherwise every fit goes through ``scipy.optimize.minimize``, with
the same results, only slower.
"""

from __future__ import annotations

import functools
import typing

import numpy as np

from pyhf_dist.runtime.fast import routines

__all__ = ["SCIPY_VERSIONS", "Minimum", "direct", "minimize"]

#: The scipy versions (``(major, minor)``, from, up to and excluding) whose L-BFGS-B loop
#: :func:`minimize` restates.
SCIPY_VERSIONS = ((1, 15), (1, 19))
#: Most steps of one line search: scipy's default ``maxls``.
MAXLS = 20
_SIGNATURE = "setulb(m,x,l,u,nbd,f,g,factr,pgtol,wa,iwa,task,lsave,isave,dsave,maxls,ln_task)"


class Minimum(typing.NamedTuple):
    """Where L-BFGS-B stopped: ``x``, the value ``fun`` and gradient ``jac`` there, the evaluations
    ``nfev``, and ``success`` (it converged by its own criteria)."""

    x: np.ndarray
    fun: float
    jac: np.ndarray
    nfev: int
    success: bool


def minimize(fun, x0, lower, upper, *, gtol: float, ftol: float, maxcor: int, maxiter: int, maxfun: int,
             callback=None) -> Minimum:
    """Minimise ``fun`` (``x -> (value, gradient)``) from ``x0`` within ``[lower, upper]``, as
    ``scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=Bounds(lower, upper),
    options=...)`` does.

    Args:
        fun: The objective and its gradient.
        x0: The start (clipped to the bounds).
        lower, upper: Bounds, finite or infinite (a parameter with ``lower == upper`` stays there).
        gtol, ftol, maxcor, maxiter, maxfun: scipy's options of the same names.
        callback: ``(x, value) -> bool`` after each iteration; true stops the fit there (as a
            scipy callback raising ``StopIteration``).
    """
    options = {"gtol": gtol, "ftol": ftol, "maxcor": maxcor, "maxiter": maxiter, "maxfun": maxfun}
    lower, upper = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    # Bounds scipy refuses, or that fix every parameter, get scipy's own answer.
    if direct() and np.all(lower <= upper) and np.any(lower < upper):
        return _drive(fun, x0, lower, upper, callback=callback, **options)
    return _scipy(fun, x0, lower, upper, callback=callback, **options)


def _drive(fun, x0, lower, upper, *, gtol, ftol, maxcor, maxiter, maxfun, callback, integer=None) -> Minimum:
    """scipy's ``_minimize_lbfgsb`` loop, less its wrappers (see the module's doc); ``integer`` is
    the type of the routine's integer arrays (by default the one :func:`direct` found)."""
    setulb = routines.extension("_lbfgsb").setulb
    x = np.clip(np.asarray(x0, dtype=np.float64).ravel(), lower, upper)
    m, n = maxcor, x.size
    integer = integer or _driven() or routines.integer_type()
    factr = ftol / np.finfo(float).eps
    # Bound kinds: 0 none, 1 lower only, 2 both, 3 upper only.
    has_lower, has_upper = np.isfinite(lower), np.isfinite(upper)
    nbd = np.where(has_lower, np.where(has_upper, 2, 1), np.where(has_upper, 3, 0)).astype(integer)
    low = np.where(has_lower, lower, 0.0)
    high = np.where(has_upper, upper, 0.0)
    f = np.array(0.0, dtype=np.float64)
    g = np.zeros(n, dtype=np.float64)
    wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, dtype=np.float64)
    iwa = np.zeros(3 * n, dtype=integer)
    task = np.zeros(2, dtype=integer)
    ln_task = np.zeros(2, dtype=integer)
    lsave = np.zeros(4, dtype=integer)
    isave = np.zeros(44, dtype=integer)
    dsave = np.zeros(29, dtype=np.float64)
    iterations = nfev = 0
    evaluated = None  # scipy evaluates a point once, however often the routine asks for it
    while True:
        g = g.astype(np.float64)
        setulb(m, x, low, high, nbd, f, g, factr, gtol, wa, iwa, task, lsave, isave, dsave, MAXLS, ln_task)
        if task[0] == 3:  # the value and gradient at x, please
            # As np.array_equal (and scipy's cache) compare, at half its cost: hundreds per patch.
            if evaluated is None or not (x == evaluated[0]).all():
                value, gradient = fun(x.copy())
                evaluated = (x.copy(), value, np.atleast_1d(gradient))
                nfev += 1
            f, g = evaluated[1], evaluated[2]
        elif task[0] == 1:  # a new iterate
            iterations += 1
            if callback is not None and callback(x, f):
                task[0], task[1] = 5, 505
            if iterations >= maxiter:
                task[0], task[1] = 5, 504
            elif nfev > maxfun:
                task[0], task[1] = 5, 502
        else:
            break
    return Minimum(x, f, g, nfev, bool(task[0] == 4))


def _scipy(fun, x0, lower, upper, *, gtol, ftol, maxcor, maxiter, maxfun, callback) -> Minimum:
    from scipy.optimize import Bounds
    from scipy.optimize import minimize as scipy_minimize

    def stop(intermediate_result):
        if callback(intermediate_result.x, intermediate_result.fun):
            raise StopIteration

    result = scipy_minimize(
        fun, x0, jac=True, method="L-BFGS-B", bounds=Bounds(lower, upper),
        callback=stop if callback is not None else None,
        options={"gtol": gtol, "ftol": ftol, "maxcor": maxcor, "maxiter": maxiter, "maxfun": maxfun},
    )
    # Bounds that fix every parameter give a result without a gradient: the one there, then.
    gradient = result["jac"] if "jac" in result else np.atleast_1d(fun(np.array(result.x))[1])
    return Minimum(result.x, result.fun, gradient, int(result.get("nfev", 1)), bool(result.success))


def direct() -> bool:
    """Whether :func:`minimize` drives scipy's routine itself: it reproduces
    ``scipy.optimize.minimize`` bit for bit on a check problem (once per scipy installation,
    remembered: :func:`~pyhf_dist.runtime.fast.routines.checked`)."""
    return _driven() is not None


@functools.cache
def _driven() -> str | None:
    return routines.driven("L-BFGS-B", "lbfgsb", SCIPY_VERSIONS, ("_lbfgsb",), _check, __file__, accepts=_documented)


def _documented() -> bool:
    # The routine's arguments, in order (scipy 1.18 spaces them and documents each below).
    setulb = routines.extension("_lbfgsb").setulb
    return "".join((setulb.__doc__ or "").strip().split("\n")[0].split()) == _SIGNATURE


def _check() -> str:
    """``"same int32"`` (or ``"same int64"``: the routine's integer type) where the driver
    reproduces ``scipy.optimize.minimize``, else ``"different"``."""
    integer = routines.integer_type()
    drive = functools.partial(_drive, integer=integer)
    return f"same {integer}" if all(_same(drive, _scipy, stop_after) for stop_after in (None, 3)) else "different"


def _same(mine, theirs, stop_after) -> bool:
    """Both drivers on a bounded, badly scaled Rosenbrock problem in 6 dimensions (two bounds
    active at the minimum), stopped after ``stop_after`` iterations where given."""
    scale = np.array([1.0, 3.0, 0.5, 10.0, 1.0, 2.0])
    rosenbrock = functools.partial(routines.rosenbrock, scale=scale)

    lower = np.array([-2.0, -2.0, -2.0, -2.0, 0.0, -2.0]) / scale
    upper = np.array([2.0, 0.2, 2.0, 2.0, 2.0, 2.0]) / scale
    options = {"gtol": 1e-6, "ftol": 0.0, "maxcor": 5, "maxiter": 1000, "maxfun": 1000}

    def run(driver):
        iterations = []

        def callback(x, value):
            iterations.append((x.copy(), float(value)))
            return stop_after is not None and len(iterations) >= stop_after

        return driver(rosenbrock, np.full(6, -0.5) / scale, lower, upper, callback=callback, **options), iterations

    (a, path_a), (b, path_b) = run(mine), run(theirs)
    return (
        np.array_equal(a.x, b.x) and float(a.fun) == float(b.fun) and np.array_equal(a.jac, b.jac)
        and a.nfev == b.nfev and a.success == b.success and len(path_a) == len(path_b) > 2
        and all(np.array_equal(p[0], q[0]) and p[1] == q[1] for p, q in zip(path_a, path_b))
    )
