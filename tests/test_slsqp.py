"""pyhf's SLSQP (the stall check) and L-BFGS-B driven without ``scipy.optimize``: scipy's answers,
bit for bit, and a worker that never imports ``scipy.optimize`` once its checks are remembered."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy

pytest.importorskip("jax")

from scipy.optimize import Bounds  # noqa: E402
from scipy.optimize import minimize as scipy_minimize  # noqa: E402

from pyhf_dist import cache  # noqa: E402
from pyhf_dist.runtime.fast import FastHypotest, routines, slsqp  # noqa: E402

from helpers import last_json_line  # noqa: E402

IN_RANGE = slsqp.SCIPY_VERSIONS[0] <= tuple(int(p) for p in scipy.__version__.split(".")[:2]) < slsqp.SCIPY_VERSIONS[1]


@pytest.fixture(scope="module")
def stall_problem(erjr_pallet):
    """The stall check's problem on a 3L-eRJR patch (where pyhf's own fit stops at its start):
    the objective in pyhf's coordinates, the start, the bounds and the held parameters."""
    fit = FastHypotest(erjr_pallet.workspace, verify=False).problem(erjr_pallet.patches[0].operations)
    n = fit.n_pars
    start = fit.init.copy()
    start[fit.poi_index] = 0.0
    fixed = fit.fixed[:n].copy()
    fixed[fit.poi_index] = True
    theta = fit.init.copy()

    def objective(x):
        theta[:n] = x
        result = np.asarray(fit.functions.value_and_grad(theta, fit.main, fit.aux, fit.layout))
        return result[0], result[1 : n + 1]

    return fit, objective, start[:n], fit.lower[:n], fit.upper[:n], np.flatnonzero(fixed)


@pytest.mark.skipif(not IN_RANGE, reason=f"scipy {scipy.__version__}: SLSQP goes through scipy.optimize.minimize")
def test_the_routine_is_driven_directly_on_the_scipy_versions_it_restates():
    assert slsqp.direct()


@pytest.mark.parametrize("maxiter", [1, 3, 100])
def test_slsqp_is_scipys_bit_for_bit(stall_problem, maxiter):
    """The point, value, evaluation count and exit of pyhf's SLSQP set-up are scipy's own: one
    iteration (the stall check), a few, and a run to the end."""
    _, objective, start, lower, upper, fixed = stall_problem
    values = start[fixed]
    jacobian = np.eye(len(start))[fixed]
    reference = scipy_minimize(
        objective, start, jac=True, method="SLSQP", bounds=Bounds(lower, upper),
        constraints=[{"type": "eq", "fun": lambda x: x[fixed] - values, "jac": lambda x: jacobian}],
        options={"maxiter": maxiter},
    )
    found = slsqp.minimize(objective, start, lower, upper, fixed, maxiter=maxiter)
    assert np.array_equal(found.x, reference.x)
    assert float(found.fun) == float(reference.fun)
    assert (found.nfev, found.success) == (reference.nfev, reference.success)
    assert found.nfev > 1


def test_the_stall_check_is_the_same_without_the_direct_driver(stall_problem, monkeypatch):
    """Where the routine is not driven directly (another scipy), scipy's minimize gives the same
    stall check: pyhf's fit stops at its start on this patch, the same distance above the minimum."""
    fit = stall_problem[0]
    minimum = fit.minimum(fit.main, fit.aux, {"init": fit.init}, 0.0).value

    def stall() -> tuple:
        before = fit.evaluations
        return fit.pyhf_stall(0.0, minimum), fit.evaluations - before

    direct = stall()
    monkeypatch.setattr(slsqp, "direct", lambda: False)
    assert direct[0] is not None and direct[0] > 0
    assert stall() == direct


def test_the_check_notices_a_driver_that_differs(monkeypatch):
    """The check compares with scipy's minimize and can fail: a driver with a looser accuracy
    stops elsewhere on the problem run to the end."""
    integer = routines.integer_type()
    assert all(slsqp._same(integer, *case) for case in slsqp._CASES)
    monkeypatch.setattr(slsqp, "FTOL", 1e-2)
    assert not all(slsqp._same(integer, *case) for case in slsqp._CASES)


def test_a_check_is_remembered_and_made_again_for_a_changed_driver(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    made = []

    def check() -> str:
        made.append(1)
        return "same int32"

    source = tmp_path / "driver.py"
    source.write_text("# one driver\n")
    assert routines.checked("probe", ("_slsqplib",), check, str(source)) == "same int32"
    assert routines.checked("probe", ("_slsqplib",), check, str(source)) == "same int32"
    assert len(made) == 1
    source.write_text("# another driver\n")
    routines.checked("probe", ("_slsqplib",), check, str(source))
    assert len(made) == 2


def test_an_extension_is_loaded_without_scipy_optimize():
    code = (
        "import sys, json\n"
        "from pyhf_dist.runtime.fast import routines\n"
        "setulb = routines.extension('_lbfgsb').setulb\n"
        "slsqp = routines.extension('_slsqplib').slsqp\n"
        "print(json.dumps([callable(setulb), callable(slsqp), 'scipy.optimize' in sys.modules]))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # The routines, without the package (whose import is what costs).
    assert json.loads(completed.stdout) == [True, True, False]


_PRELOAD = r"""
import json, sys
from pyhf_dist.runtime import preload
from pyhf_dist.settings import FitSettings
preload(FitSettings(backend="jax").to_dict())
from pyhf_dist.runtime.fast import lbfgsb, slsqp
print(json.dumps({"optimize": "scipy.optimize" in sys.modules, "direct": [lbfgsb.direct(), slsqp.direct()]}))
"""


@pytest.mark.skipif(not IN_RANGE, reason=f"scipy {scipy.__version__}: SLSQP goes through scipy.optimize.minimize")
def test_a_workers_imports_leave_scipy_optimize_out_once_its_checks_are_remembered(tmp_path):
    """The first worker on a machine imports scipy.optimize to check the drivers; the next ones
    read the answers and never import it (0.15 s of CPU each)."""
    first, second = last_json_line(_PRELOAD, cache=tmp_path), last_json_line(_PRELOAD, cache=tmp_path)
    assert first == {"optimize": True, "direct": [True, True]}
    assert second == {"optimize": False, "direct": [True, True]}
    assert sorted(name.split("-")[0] for name in os.listdir(tmp_path / "routines")) == ["lbfgsb", "slsqp"]
