"""The likelihood in C (pyhf_dist/runtime/fast/native.py) against the jax one it restates.

Value and gradient on every interpolation code and every branch, on the shared pallets' patches
with observed, Asimov and emptied data, with normsys factors at exactly zero; its guard (a patch
on which it disagrees keeps jax's), its switch, and its refusal of tables it cannot trust.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

pytest.importorskip("jax")

from helpers import (
    HISTOSYS_CODES,
    NORMSYS_CODES,
    interp_settings,
    random_points,
    small_workspace,
)

from pyhf_dist.runtime.fast import FastHypotest, layout, likelihood, native

#: Agreement asked of the two implementations: float64 sums of the same terms in other orders.
AGREEMENT = 1e-10


def _agree(mine, theirs, scale=1.0):
    """Values within AGREEMENT relative; gradients within AGREEMENT of their largest component in
    the coordinates the fits use (times ``scale``: a Poisson constraint's gradient, unscaled,
    carries the rounding of its factor, up to 1e11 on 3L-eRJR)."""
    mine, theirs = np.asarray(mine), np.asarray(theirs)
    assert np.all(np.isfinite(mine)) and np.all(np.isfinite(theirs))
    assert mine[0] == pytest.approx(theirs[0], rel=AGREEMENT, abs=AGREEMENT)
    mine_scaled, theirs_scaled = mine[1:] * scale, theirs[1:] * scale
    size = max(1.0, float(np.max(np.abs(theirs_scaled))))
    assert np.max(np.abs(mine_scaled - theirs_scaled)) <= AGREEMENT * size


def _small(normsys, histosys):
    spec = small_workspace()
    fast = FastHypotest(spec, interp_settings(normsys, histosys), verify=False)
    _, arrays = fast.arrays(None)
    caps = layout.Caps.around(arrays.sizes)
    params = layout.pad_parameters(arrays, caps)
    device = likelihood.device_layout(layout.pad(arrays, caps), (normsys, histosys))
    return arrays, params, layout.pad_main(arrays, caps), device, likelihood.functions(normsys, histosys)


def test_the_extension_is_built():
    # CI and the README's install compile it; without it every fit is ~1.5x slower.
    assert native.available(), "pyhf_dist.runtime.fast.sparse_likelihood is not built: pip install -e . with a C compiler"


@pytest.mark.parametrize("normsys", NORMSYS_CODES)
@pytest.mark.parametrize("histosys", HISTOSYS_CODES)
def test_every_interpolation_code_and_branch(normsys, histosys):
    arrays, params, main, device, functions = _small(normsys, histosys)
    n = len(arrays.init)
    scale = np.ones(len(params["init"]))
    value_and_grad = native.for_patch(device, (normsys, histosys), functions, params["init"], main, params["aux"],
                                      params["lower"], params["upper"], scale)
    assert value_and_grad is not None
    rng = np.random.default_rng(2)
    emptied = np.where(rng.uniform(size=main.shape) < 0.4, 0.0, main)  # bins without events: pyhf's -lam
    for point in random_points(arrays, 30, seed=3):  # |alpha| > 1 as well as inside
        theta = params["init"].copy()
        theta[:n] = point
        for data in (main, emptied, np.asarray(functions.expected(theta, device)[0])):
            _agree(value_and_grad(theta, data, params["aux"]), functions.value_and_grad(theta, data, params["aux"], device))


@pytest.mark.parametrize("source", ["erjr_pallet", "stau_low_mass", "lbb_pallet"])
def test_shared_pallets(source, request):
    pallet = request.getfixturevalue(source)
    fast = FastHypotest(pallet.workspace, verify=False)
    rng = np.random.default_rng(5)
    for index in rng.choice(len(pallet.patches), 3, replace=False):
        problem = fast.problem(pallet.patches[index].operations)
        main, aux = np.asarray(problem.main), np.asarray(problem.aux)
        assert problem.in_c, "the C likelihood did not pass its check on a published patch"
        value_and_grad = problem.evaluator(main, aux)
        for spread in (0.3, 3.0):
            theta = np.clip(problem.init + spread * problem.scale * rng.normal(size=problem.init.size),
                            problem.lower, problem.upper)
            _agree(value_and_grad(theta), problem.functions.value_and_grad(theta, main, aux, problem.layout),
                   problem.scale)


def test_normsys_factors_at_exactly_zero():
    """A code4 polynomial that reaches zero (pyhf multiplies it in as it is): the gradient of a
    slot's product is then the product of the other factors, not a division by zero."""
    _, params, main, device, functions = _small("code4", "code4p")
    host = {key: np.array(value) for key, value in device.items()}
    coef = host["norm_coef"]  # [rows, 6, slots]
    rows, slots = np.nonzero(np.any(coef != 0, axis=1))
    slot = np.bincount(slots).argmax()
    on_slot = rows[slots == slot]
    assert len(on_slot) >= 2
    first, second = on_slot[:2]
    theta = params["init"].copy()
    for zeros in ([first], [first, second]):
        changed = dict(host, norm_coef=coef.copy())
        for row in zeros:
            changed["norm_coef"][row, :, slot] = [-2.0, 0, 0, 0, 0, 0]  # 1 - 2 alpha: zero at alpha = 0.5
            theta[host["norm_par"][row]] = 0.5
        value_and_grad = native.for_patch(changed, ("code4", "code4p"), functions, params["init"], main, params["aux"],
                                          params["lower"], params["upper"], np.ones(len(theta)))
        assert value_and_grad is not None
        theirs = np.asarray(functions.value_and_grad(theta, main, params["aux"], changed))
        assert np.all(np.isfinite(theirs))
        _agree(value_and_grad(theta, main, params["aux"]), theirs)
        if len(zeros) == 1:  # the zero factor's own parameter still moves the yields
            assert theirs[1 + host["norm_par"][first]] != 0.0


def test_a_patch_where_it_disagrees_keeps_jax(caplog, monkeypatch):
    monkeypatch.setattr(native, "_SAID", set())  # said once per process: not yet in this test
    _, params, main, device, functions = _small("code4", "code4p")

    class Shifted:
        """The jax functions with -2 log L moved by 1e-6: as a wrong C likelihood would look."""

        def value_and_grad(self, theta, main, aux, L):
            return np.asarray(functions.value_and_grad(theta, main, aux, L)) + np.r_[1e-6, np.zeros(len(theta))]

    with caplog.at_level(logging.INFO, logger=native.__name__):
        found = native.for_patch(device, ("code4", "code4p"), Shifted(), params["init"], main, params["aux"],
                                 params["lower"], params["upper"], np.ones(len(params["init"])))
    assert found is None
    assert "disagrees with jax's" in caplog.text


def test_switched_off_gives_the_same_hypotest(erjr_pallet, monkeypatch):
    patch = erjr_pallet.patches[7].operations
    with_c = FastHypotest(erjr_pallet.workspace).hypotest(patch)
    monkeypatch.setenv(native.ENV, "jax")
    assert not native.available()
    fast = FastHypotest(erjr_pallet.workspace)
    with_jax = fast.hypotest(patch)
    assert not fast.problem(patch).in_c
    assert with_c["CLs_obs"] == pytest.approx(with_jax["CLs_obs"], abs=1e-9)
    assert with_c["CLs_exp"] == pytest.approx(with_jax["CLs_exp"], abs=1e-9)
    for name, fit in with_jax["fits"].items():
        assert with_c["fits"][name]["twice_nll"] == pytest.approx(fit["twice_nll"], abs=1e-8)
        assert with_c["fits"][name]["converged"] == fit["converged"]


def test_without_the_extension_fits_use_jax(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pyhf_dist.runtime.fast.sparse_likelihood", None)  # as where it was not built
    monkeypatch.setattr(native, "_SAID", set())
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert not native.available()
    assert "the C likelihood is not built" in caplog.text
    _, params, main, device, functions = _small("code4", "code4p")
    assert native.for_patch(device, ("code4", "code4p"), functions, params["init"], main, params["aux"],
                            params["lower"], params["upper"], np.ones(len(params["init"]))) is None


def test_tables_it_cannot_trust_are_refused():
    _, params, main, device, _ = _small("code4", "code4p")
    args = native.tables(device, ("code4", "code4p"))
    extension = native._extension()
    likelihood_c = extension.Likelihood(*args)
    n = args[0]
    with pytest.raises(ValueError, match="expected float64 theta"):
        likelihood_c(np.zeros(n - 1), main, params["aux"], np.empty(n + 1))
    tables = list(args[-1])
    tables[12] = tables[12].copy()
    tables[12][0] = args[1] + 1  # a bin index past the last bin
    with pytest.raises(ValueError, match=r"bin_index\[0\]"):
        extension.Likelihood(*args[:-1], tuple(tables))
    with pytest.raises(ValueError, match=r"bin_index\[0\]"):
        likelihood_c.__init__(*args[:-1], tuple(tables))  # one given bad tables keeps none of its old ones
    with pytest.raises(RuntimeError, match="not initialised"):
        likelihood_c(np.zeros(n), main, params["aux"], np.empty(n + 1))
    with pytest.raises(ValueError, match="interpolation codes"):
        extension.Likelihood(*args[:4], 3, 5, args[-1])
