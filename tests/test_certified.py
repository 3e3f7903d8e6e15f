"""Certified answers: the fast path's CLs come from converged fits, each fit's certificate is on its
record, and pyhf's own digits are one setting away (``match_pyhf``).

The arbiter where pyhf's default minimizer (SciPy's SLSQP) stalls is MINUIT (iminuit, strategy 2,
through pyhf), the field's standard minimizer; where both fail, the lowest -2 log L found.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

import pyhf_dist
from pyhf_dist.pallet import Pallet, Patch

from helpers import (
    CODE4, ERJR_MINUIT_CANDIDATES, ERJR_MINUIT_FAILS, FAST_PATH_TOLERANCE, assert_matches_reference, minuit_optimizer,
    patched_workspace, serial_pyhf,
)

pytest.importorskip("jax")
pytest.importorskip("iminuit")

#: Where pyhf's fits stop short, CLs near q = 0 move with sqrt(q); MINUIT's own precision there.
MINUIT_TOLERANCE = 5e-3


def _minuit_converging(pallet, wanted: int = 2) -> dict:
    """MINUIT's ``{name: (CLs_obs, CLs_exp)}`` on the first ``wanted`` candidates it converges on here."""
    found = {}
    for name in ERJR_MINUIT_CANDIDATES:
        result = serial_pyhf(pallet, [name], optimizer="minuit")[name]
        if result is not None:
            found[name] = result
        if len(found) == wanted:
            return found
    raise AssertionError(f"MINUIT converges on only {sorted(found)} of {ERJR_MINUIT_CANDIDATES} here")


def _cls(record) -> list[float]:
    return [record.CLs_obs, *record.CLs_exp]


def _assert_certificate(record, stalls: bool, mu: float = 1.0) -> None:
    """A fast-path record whose every fit is certified converged, with a readable certificate."""
    from pyhf_dist.runtime.fast.fit import fit_name

    assert record.ok and record.engine == "fast", (record.name, record.error, record.fallback_reason)
    assert record.converged is True
    assert record.fallback_reason is None
    names = set(record.fits)
    assert {"observed free", "observed mu=0", fit_name("observed", mu), "asimov free", fit_name("asimov", mu)} <= names
    for name, fit in record.fits.items():
        assert fit["converged"] is True, (record.name, name, fit)
        assert 0 <= fit["gradient"] <= 1e-3, (record.name, name, fit)
        assert math.isfinite(fit["twice_nll"])
    # The free fit's domain holds every conditional fit's: its minimum is never higher.
    free = record.fits["observed free"]["twice_nll"]
    assert free <= min(fit["twice_nll"] for name, fit in record.fits.items() if name.startswith("observed mu")) + 1e-7
    assert all(math.isfinite(value) for value in _cls(record))
    if stalls:
        assert record.pyhf_default["stalls_at_start"] is True
        assert record.pyhf_default["stops_above_minimum"] > 1.0
    else:
        assert record.pyhf_default is None


@pytest.fixture(scope="module")
def erjr_scan(erjr_pallet):
    return pyhf_dist.map_fits(erjr_pallet, executor="local", workers=2, backend="jax")


def test_erjr_stalls_of_pyhf_become_certified_converged_fits(erjr_scan, erjr_pallet):
    """3L-eRJR: pyhf's SLSQP stops at its starting point on every patch (CLs_obs ~ 0.999). Every
    patch takes the fast path, converges, and its record says how far pyhf would stop."""
    assert len(erjr_scan) == len(erjr_pallet.patches) == 66
    for record in erjr_scan:
        _assert_certificate(record, stalls=True)
    summary = erjr_scan.summary()
    assert f"{'fits converged (certified)':<28}66 of 66" in summary
    assert "pyhf default fits stall     on 66 of 66 patches" in summary
    # pyhf's stalled fits exclude nothing here; converged ones do.
    assert erjr_scan.counts()["excluded"] > 0
    assert erjr_scan.certification() == {"certified": 66, "not_converged": 0, "unchecked": 0, "pyhf_stalls": 66}


def test_erjr_agrees_with_minuit_where_minuit_converges(erjr_scan, erjr_pallet):
    minuit = _minuit_converging(erjr_pallet)
    slsqp = serial_pyhf(erjr_pallet, list(minuit))
    for name in minuit:
        reference = [minuit[name][0], *minuit[name][1]]
        ours = _cls(erjr_scan[name])
        assert ours == pytest.approx(reference, abs=MINUIT_TOLERANCE), name
        # ... where pyhf's default answer is the stalled fit's, nowhere near.
        assert abs(slsqp[name][0] - minuit[name][0]) > 0.1, name


def test_certificates_survive_the_results_files(erjr_scan, tmp_path):
    path = tmp_path / "r.json"
    erjr_scan.to_json(path)
    again = pyhf_dist.ScanResult.from_json(path)
    assert [(r.converged, r.fits, r.pyhf_default) for r in again] == [
        (r.converged, r.fits, r.pyhf_default) for r in erjr_scan
    ]
    erjr_scan.to_csv(tmp_path / "r.csv")
    table = pyhf_dist.ScanResult.from_csv(tmp_path / "r.csv")
    assert [r.converged for r in table] == [True] * len(erjr_scan)


def test_match_pyhf_reproduces_plain_pyhf(erjr_pallet, erjr_reference):
    """``match_pyhf=True`` gives pyhf's own numbers, stalled fits included (plain pyhf fits them)."""
    names = [patch.name for patch in erjr_pallet.patches[:2]]
    result = pyhf_dist.map_fits(erjr_pallet, executor="sequential", backend="jax", patches=names, match_pyhf=True)
    assert_matches_reference(result, {name: erjr_reference[name] for name in names}, tolerance=1e-6)
    for record in result:
        assert record.engine == "pyhf" and "starting point" in record.fallback_reason
        assert record.converged is None  # plain pyhf's fits are not checked


def test_match_pyhf_and_certified_digests_differ():
    from pyhf_dist.settings import FitSettings

    certified, matching = FitSettings(backend="jax"), FitSettings(backend="jax", match_pyhf=True)
    assert certified.digest() != matching.digest()
    # The numpy backend is plain pyhf either way.
    assert FitSettings(backend="numpy").digest() == FitSettings(backend="numpy", match_pyhf=True).digest()


def test_minuit_on_the_plain_path_is_pyhfs_minuit(erjr_pallet):
    converging = next(iter(_minuit_converging(erjr_pallet, wanted=1)))
    # A point MINUIT fails on here (which, again, depends on the machine).
    failing = next(
        (name for name in ERJR_MINUIT_FAILS if serial_pyhf(erjr_pallet, [name], optimizer="minuit")[name] is None), None
    )
    assert failing, f"MINUIT converges on every one of {ERJR_MINUIT_FAILS} here"
    names = [converging, failing]
    minuit = serial_pyhf(erjr_pallet, names, optimizer="minuit")
    result = pyhf_dist.map_fits(erjr_pallet, executor="sequential", backend="numpy", optimizer="minuit", patches=names)
    converged, failed = result[names[0]], result[names[1]]
    assert _cls(converged) == pytest.approx([minuit[names[0]][0], *minuit[names[0]][1]], abs=1e-6)
    # MINUIT fails on this point: a failed record that says so, in one line.
    assert minuit[names[1]] is None
    assert not failed.ok and failed.error.startswith("FailedMinimization") and "\n" not in failed.error


def test_cli_match_pyhf_and_optimizer(erjr_dir, tmp_path):
    output = tmp_path / "out.json"
    run = subprocess.run(
        [sys.executable, "-m", "pyhf_dist", "fit", str(erjr_dir), "-p", "ERJR_150p0_60p0", "--executor", "sequential",
         "-o", str(output), "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "pyhf default fits stall     on 1 of 1 patches" in run.stdout
    (record,) = json.loads(output.read_text())["results"]
    assert record["converged"] is True and record["CLs_obs"] < 0.05
    run = subprocess.run(
        [sys.executable, "-m", "pyhf_dist", "fit", str(erjr_dir), "-p", "ERJR_150p0_60p0", "--executor", "sequential",
         "--match-pyhf", "-o", str(output), "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    (record,) = json.loads(output.read_text())["results"]
    assert record["engine"] == "pyhf" and record["CLs_obs"] > 0.9  # pyhf's stalled answer, as asked


def _derived(pallet, name: str, operations, label: str) -> Pallet:
    patch = next(p for p in pallet.patches if p.name == name)
    return Pallet(pallet.workspace, [Patch(patch.name, patch.values, operations(patch))], pallet.labels,
                  source=f"{pallet.source}#{label}")


def _trap_channel(init: float):
    """A channel whose background has a strongly non-linear interpolation with two minima.

    Both the up and the down variation raise the yield (13 and 15 over 10): an excess (16 events)
    is explained by the nuisance parameter at about +0.9 or at about -0.8, and the second is lower
    in -2 log L (a smaller pull). Its initial value (``init``) sets which basin a fit from pyhf's
    starting point falls into.
    """

    def operations(patch):
        return patch.operations + [
            {"op": "add", "path": "/channels/-", "value": {"name": "TRAP_cuts", "samples": [
                {"name": "trap_signal", "data": [6.0], "modifiers": [
                    {"name": "mu_SIG", "type": "normfactor", "data": None}]},
                {"name": "trap_bkg", "data": [10.0], "modifiers": [
                    {"name": "trap_alpha", "type": "histosys", "data": {"hi_data": [13.0], "lo_data": [15.0]}}]},
            ]}},
            {"op": "add", "path": "/observations/-", "value": {"name": "TRAP_cuts", "data": [16.0]}},
            {"op": "add", "path": "/measurements/0/config/parameters/-",
             "value": {"name": "trap_alpha", "inits": [init]}},
        ]

    return operations


def _pyhf_background_fit(pallet, optimizer: str) -> float:
    """-2 log L where pyhf's fit at mu = 0 of the pallet's one patch ends, with SLSQP or MINUIT
    (strategy 1: the minimum is wanted, not MINUIT's errors)."""
    import pyhf

    workspace = patched_workspace(pallet, pallet.patches[0])
    model = workspace.model(modifier_settings=CODE4)
    chosen = minuit_optimizer(strategy=1) if optimizer == "minuit" else pyhf.optimize.scipy_optimizer()
    pyhf.set_backend("numpy", chosen)
    try:
        return float(pyhf.infer.mle.fixed_poi_fit(0.0, workspace.data(model), model, return_fitted_val=True)[1])
    finally:
        pyhf.set_backend("numpy", pyhf.optimize.scipy_optimizer())


def test_a_minimizer_trapped_in_a_local_minimum_is_certified_out_of_it(stau_low_mass):
    """From the measurement's init 1.0, pyhf's SLSQP and MINUIT both end the background fit in the
    higher minimum, and pyhf's CLs shift; the certified fit finds the lower one, says which start
    found it and where the other ended, and gives the CLs of the same model started in the right
    basin. Built on stau's Region-lowMass; MINUIT checks the background fit that traps (a whole
    MINUIT hypotest of its 118 parameters takes a minute and a half on a slow machine)."""
    stau = stau_low_mass
    name = stau.patches[0].name
    trapped = _derived(stau, name, _trap_channel(1.0), "trap-init-1")
    fair = _derived(stau, name, _trap_channel(0.0), "trap-init-0")
    # The case traps both of pyhf's minimizers (else it tests nothing); started in the right basin,
    # both find the same lower minimum.
    ended = {optimizer: _pyhf_background_fit(trapped, optimizer) for optimizer in ("scipy", "minuit")}
    lowest = {optimizer: _pyhf_background_fit(fair, optimizer) for optimizer in ("scipy", "minuit")}
    assert ended["minuit"] == pytest.approx(ended["scipy"], abs=1e-3)
    assert lowest["minuit"] == pytest.approx(lowest["scipy"], abs=1e-3)
    assert ended["scipy"] - lowest["scipy"] > 0.1
    stopped, right = serial_pyhf(trapped)[name], serial_pyhf(fair)[name]
    assert max(abs(a - b) for a, b in zip([stopped[0], *stopped[1]], [right[0], *right[1]])) > 0.01
    # ... and the certified answer is the lowest minimum's.
    (record,) = pyhf_dist.map_fits(trapped, executor="sequential", backend="jax")
    _assert_certificate(record, stalls=False)
    assert _cls(record) == pytest.approx([right[0], *right[1]], abs=FAST_PATH_TOLERANCE)
    # Started from pyhf's init, the fit ended higher, in pyhf's trap; another start (the
    # constraints' centres) found the lower minimum.
    background = record.fits["observed mu=0"]
    assert background["start"] != "init"
    assert background["other_starts"]["init"] - background["twice_nll"] == pytest.approx(
        ended["scipy"] - lowest["scipy"], abs=1e-2)


def test_a_statistic_at_zero_is_the_converged_one(stau_low_mass):
    """q ~ 0: the tested signal strength is the best fit's (MINUIT's), where CLs moves with
    sqrt(q) and pyhf's SLSQP scatters. The certified fast path agrees with MINUIT and never hands
    the patch to plain pyhf; asked for pyhf's digits, it does (they are its fits' noise). On stau's
    Region-lowMass, with MINUIT's strategy 1 (its CLs there within 2e-7 of strategy 2's, in half
    the time)."""
    import pyhf

    stau = stau_low_mass
    patch = stau.patches[0]
    single = Pallet(stau.workspace, [patch], stau.labels, source=f"{stau.source}#q-zero")
    workspace = patched_workspace(stau, patch)
    model = workspace.model(modifier_settings=CODE4)
    pyhf.set_backend("numpy", minuit_optimizer(strategy=1))
    try:
        muhat = float(pyhf.infer.mle.fit(workspace.data(model), model)[model.config.poi_index])
    finally:
        pyhf.set_backend("numpy", pyhf.optimize.scipy_optimizer())
    assert 0.1 < muhat < 5
    arbiter = serial_pyhf(single, poi_test=muhat, optimizer="minuit", strategy=1)[patch.name]
    (record,) = pyhf_dist.map_fits(single, executor="sequential", backend="jax", poi_test=muhat, require_fast=True)
    _assert_certificate(record, stalls=False, mu=muhat)
    assert _cls(record) == pytest.approx([arbiter[0], *arbiter[1]], abs=MINUIT_TOLERANCE)
    assert record.CLs_obs > 0.4  # q ~ 0: no exclusion
    (matched,) = pyhf_dist.map_fits(single, executor="sequential", backend="jax", poi_test=muhat, match_pyhf=True)
    assert matched.engine == "pyhf" and "zero within fit precision" in matched.fallback_reason


def test_upper_limits_carry_a_certificate(erjr_pallet):
    """3L-eRJR upper limits: on the fast path now (pyhf's stall no longer sends them to plain pyhf)."""
    (record,) = pyhf_dist.map_fits(erjr_pallet, executor="sequential", backend="jax", calculation="upper_limit",
                                   patches=["ERJR_150p0_60p0"])
    assert record.ok and record.engine == "fast" and record.converged is True
    assert record.fits["conditional"]["count"] > 10 and record.fits["conditional"]["converged"] is True
    assert record.pyhf_default["stalls_at_start"] is True
    assert 0 < record.mu_up_obs < 1  # excluded at mu = 1 (CLs_obs 0.0044 there)


def test_a_patch_removing_a_channel_converges_on_the_shared_layout(lbb_pallet):
    """A patch that removes a three-bin signal region (with its own staterror gammas) is fitted on
    the background's layout, warm from the worker's start, with three padded bins. Their Poisson
    terms once passed a NaN gradient (0 * inf through where()) to every fit, and every such patch
    fell back to plain pyhf as "a fit did not converge"."""
    import numpy as np

    from pyhf_dist.runtime.fast import FastHypotest

    workspace = lbb_pallet.workspace
    channel = next(i for i, c in enumerate(workspace["channels"]) if c["name"] == "SRHMEM_mct2")
    observation = next(i for i, o in enumerate(workspace["observations"]) if o["name"] == "SRHMEM_mct2")
    patch = next(p for p in lbb_pallet.patches if p.name == "C1N2_Wh_hbb_1000_0")
    operations = patch.operations + [
        {"op": "remove", "path": f"/channels/{channel}"},
        {"op": "remove", "path": f"/observations/{observation}"},
    ]
    warm = FastHypotest(workspace)
    warm.warm_up()
    problem = warm.problem(operations)
    assert len(problem.main) > int(np.asarray(problem.layout["bin_used"]).sum())  # padded bins present
    gradient = np.asarray(problem.functions.value_and_grad(problem.init, problem.main, problem.aux, problem.layout))
    assert np.all(np.isfinite(gradient))
    shared = warm.hypotest(operations)
    own = FastHypotest(workspace).hypotest(operations)  # a fresh engine: the patch's own layout
    assert shared["converged"] and own["converged"]
    assert [shared["CLs_obs"], *shared["CLs_exp"]] == pytest.approx([own["CLs_obs"], *own["CLs_exp"]], abs=1e-8)
    removed = Pallet(workspace, [Patch(patch.name, patch.values, operations)], lbb_pallet.labels,
                     source=f"{lbb_pallet.source}#without-SRHMEM")
    observed, expected = serial_pyhf(removed)[patch.name]
    assert [shared["CLs_obs"], *shared["CLs_exp"]] == pytest.approx([observed, *expected], abs=FAST_PATH_TOLERANCE)


def test_a_fit_l_bfgs_b_does_not_finish_is_finished_by_minuit(erjr_pallet, monkeypatch):
    """Fitted harder: where L-BFGS-B stops short of a minimum (here held to 3 iterations), MINUIT
    continues on the compiled gradient, and the certificate names it."""
    from pyhf_dist.runtime.fast import FastHypotest, problem as fits

    problem = FastHypotest(erjr_pallet.workspace).problem(erjr_pallet.patches[0].operations)
    reference = problem.minimum(problem.main, problem.aux, {"init": problem.init})
    assert reference.converged
    monkeypatch.setattr(fits, "MAXITER", 3)
    stopped = problem.minimum(problem.main, problem.aux, {"init": problem.init})
    assert not stopped.converged and stopped.value > reference.value + 1e-3
    finished = problem.minimum(problem.main, problem.aux, {"init": problem.init}, harder=True)
    assert finished.converged and finished.start == "init, MINUIT"
    assert finished.value == pytest.approx(reference.value, abs=1e-6)
