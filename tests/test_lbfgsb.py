"""L-BFGS-B driven without ``scipy.optimize.minimize``'s wrappers: scipy's iterates, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import scipy

pytest.importorskip("jax")

from scipy.optimize import Bounds  # noqa: E402
from scipy.optimize import minimize as scipy_minimize  # noqa: E402

from pyhf_dist.runtime.fast import FastHypotest, lbfgsb, problem  # noqa: E402

OPTIONS = {"gtol": problem.GTOL, "ftol": problem.FTOL, "maxcor": problem.MAXCOR, "maxiter": 500, "maxfun": 500}


def _scipy_version() -> tuple:
    return tuple(int(part) for part in scipy.__version__.split(".")[:2])


@pytest.fixture(scope="module")
def erjr_problem(erjr_pallet):
    """A 3L-eRJR patch's fit problem: the objective (scaled, as the fits see it) and its bounds."""
    fit = FastHypotest(erjr_pallet.workspace, verify=False).problem(erjr_pallet.patches[0].operations)
    free = ~fit.fixed
    scale = fit.scale[free]
    theta = fit.init.copy()

    def objective(x):
        theta[free] = x * scale
        result = np.asarray(fit.functions.value_and_grad(theta, fit.main, fit.aux, fit.layout))
        return result[0], result[1:][free] * scale

    return objective, fit.init[free] / scale, fit.lower[free] / scale, fit.upper[free] / scale


@pytest.mark.skipif(not lbfgsb.SCIPY_VERSIONS[0] <= _scipy_version() < lbfgsb.SCIPY_VERSIONS[1],
                    reason=f"scipy {scipy.__version__}: fits go through scipy.optimize.minimize")
def test_the_routine_is_driven_directly_on_the_scipy_versions_it_restates():
    assert lbfgsb.direct()


@pytest.mark.parametrize("stop_after", [None, 4])
def test_a_fit_is_scipys_bit_for_bit(erjr_problem, stop_after):
    """Every iterate, the minimum, its gradient and the evaluation count are scipy's own, also
    for a fit a callback stops (a probe that joined a known minimum)."""
    objective, start, lower, upper = erjr_problem

    def stopper(path):
        def callback(x, value):
            path.append((x.copy(), float(value)))
            return stop_after is not None and len(path) >= stop_after

        return callback

    ours, theirs = [], []
    found = lbfgsb.minimize(objective, start, lower, upper, callback=stopper(ours), **OPTIONS)

    def scipy_callback(intermediate_result):
        if stopper(theirs)(intermediate_result.x, intermediate_result.fun):
            raise StopIteration

    reference = scipy_minimize(objective, start, jac=True, method="L-BFGS-B", bounds=Bounds(lower, upper),
                               callback=scipy_callback, options=OPTIONS)
    assert np.array_equal(found.x, reference.x)
    assert float(found.fun) == float(reference.fun)
    assert np.array_equal(found.jac, reference.jac)
    assert (found.nfev, found.success) == (reference.nfev, reference.success)
    assert len(ours) == len(theirs) == (stop_after or len(theirs)) > 3
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(ours, theirs))
    assert found.success == (stop_after is None)


def test_without_the_direct_driver_fits_go_through_scipy(erjr_problem, monkeypatch):
    """Where the routine is not driven directly (another scipy), scipy's minimize gives the same fit."""
    objective, start, lower, upper = erjr_problem
    direct = lbfgsb.minimize(objective, start, lower, upper, **OPTIONS)
    monkeypatch.setattr(lbfgsb, "direct", lambda: False)
    through_scipy = lbfgsb.minimize(objective, start, lower, upper, **OPTIONS)
    assert np.array_equal(direct.x, through_scipy.x) and direct.nfev == through_scipy.nfev


def test_the_check_notices_a_driver_that_differs():
    """The once-per-process check compares with scipy's minimize and can fail: a driver with a
    tenfold gradient tolerance stops elsewhere."""

    def looser(fun, x0, lower, upper, **options):
        return lbfgsb._drive(fun, x0, lower, upper, **{**options, "gtol": options["gtol"] * 10})

    assert lbfgsb._same(lbfgsb._drive, lbfgsb._scipy, None)
    assert not lbfgsb._same(looser, lbfgsb._scipy, None)


def test_bounds_that_fix_every_parameter_get_scipys_answer():
    def quadratic(x):
        return float(np.sum((x - 3.0) ** 2)), 2.0 * (x - 3.0)

    found = lbfgsb.minimize(quadratic, np.zeros(2), np.ones(2), np.ones(2), **OPTIONS)
    assert np.array_equal(found.x, np.ones(2)) and found.fun == pytest.approx(8.0)
    partly = lbfgsb.minimize(quadratic, np.zeros(2), np.array([1.0, -5.0]), np.array([1.0, 5.0]), **OPTIONS)
    assert partly.x == pytest.approx([1.0, 3.0]) and partly.success
