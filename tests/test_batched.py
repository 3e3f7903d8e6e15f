"""The batched fitting engine and toy-based hypotests on it, against one-at-a-time fits and pyhf.

References: the fast path's one-at-a-time likelihood and fits (themselves checked against pyhf in
test_fast.py), and plain pyhf on numpy (``pyhf.infer.test_statistics``, ``ToyCalculator``,
``hypotest(calctype="toybased")``). Models: the all-modifier workspace of test_fast.py (normsys,
histosys, lumi, normfactor, shapefactor, shapesys, staterror, fixed parameters), a 3L-eRJR patch
(where pyhf's minimizer stalls, so the fast path declines) and the two-bin pallet of test_toys.py.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

import pyhf  # noqa: E402

import pyhf_dist  # noqa: E402
from pyhf_dist.runtime import calculations  # noqa: E402
from pyhf_dist.runtime import reference  # noqa: E402
from pyhf_dist import chunks as chunk_plan  # noqa: E402
from pyhf_dist.runtime import toys  # noqa: E402
from pyhf_dist.runtime.fast import FastHypotest, batch_model, batched, for_state, toystats  # noqa: E402
from pyhf_dist.results import FitRecord, ScanResult  # noqa: E402
from pyhf_dist.settings import FitSettings  # noqa: E402
from pyhf_dist.protocol import WorkerContext  # noqa: E402
from pyhf_dist.runtime import initialize  # noqa: E402

from helpers import (  # noqa: E402
    ERJR_MINUIT_CANDIDATES, HISTOSYS_CODES, NORMSYS_CODES, interp_settings, minuit_optimizer, patched_workspace,
    random_points, serial_pyhf_toys, small_workspace, tiny_pallet,
)

SEED = 7
#: Agreement asked of a toy's test statistic with pyhf's fits of that toy.
TEST_STAT_TOLERANCE = 1e-3


# Plain pyhf on numpy is the reference (conftest.numpy_backend).
pytestmark = pytest.mark.usefixtures("numpy_backend")


def _pyhf_model(spec, settings=None):
    workspace = pyhf.Workspace(spec)
    model = workspace.model(modifier_settings=settings or interp_settings("code4", "code4p"))
    return model, workspace.data(model)


@pytest.fixture(scope="module")
def small_problem():
    fast = FastHypotest(small_workspace(), verify=True)
    return fast.problem([])


# ------------------------------------------------------------------------------ the likelihood


@pytest.mark.parametrize("normsys", NORMSYS_CODES)
@pytest.mark.parametrize("histosys", HISTOSYS_CODES)
def test_batch_likelihood_equals_one_at_a_time(normsys, histosys):
    """Values and gradients of whole batches equal the one-at-a-time likelihood's, every branch."""
    import jax

    settings = interp_settings(normsys, histosys)
    problem = FastHypotest(small_workspace(), settings, verify=False).problem([])
    model = batch_model.BatchModel.from_problem(problem)
    n, cap = model.n, model.caps.pars
    arrays = FastHypotest(small_workspace(), settings, verify=False).arrays([])[1]
    points = np.array(random_points(arrays, 12, seed=3))
    rng = np.random.default_rng(4)
    main = rng.poisson(np.asarray(problem.main) + 5.0, (len(points), len(problem.main))).astype(float)
    main[0, 0] = 0.0  # an empty bin: pyhf's -lam term, no floor
    theta = np.zeros((len(points), cap))
    theta[:, :n] = points
    aux = np.zeros((len(points), cap))
    aux[:, :n] = np.asarray(problem.aux)[:n]
    value_and_grad = jax.jit(batch_model.kernels(model.codes)["value_and_grad"])
    values, gradients = value_and_grad(theta, main, aux, model.arrays)
    for i, point in enumerate(points):
        full = np.array(problem.init)
        full[:n] = point
        reference = np.asarray(problem.functions.value_and_grad(full, main[i], problem.aux, problem.layout))
        assert values[i] == pytest.approx(reference[0], rel=1e-11, abs=1e-9)
        np.testing.assert_allclose(gradients[i, :n], reference[1 : n + 1], rtol=1e-9, atol=1e-9)


def test_outside_pyhfs_domain_is_infinite(small_problem):
    """A bin with events whose expected yield is not positive: pyhf's value is not finite, nor ours."""
    model = batch_model.BatchModel.from_problem(small_problem)
    cap = model.caps.pars
    theta = np.zeros((2, cap))
    theta[:, : model.n] = small_problem.init[: model.n]
    theta[1, small_problem.poi_index] = -1e6  # a negative signal larger than every background
    main = np.tile(np.asarray(small_problem.main), (2, 1))
    aux = np.zeros((2, cap))
    values = np.asarray(batch_model.kernels(model.codes)["twice_nll"](theta, main, aux, model.arrays))
    assert np.isfinite(values[0]) and values[1] == np.inf


# ---------------------------------------------------------------------------------- the engine


def test_batched_minima_equal_one_at_a_time_fits(small_problem):
    """Observed data and toys, free and conditional fits (POI at and away from its bound)."""
    problem = small_problem
    model, data = _pyhf_model(small_workspace())
    np.random.seed(SEED)
    samples = model.make_pdf(pyhf.tensorlib.astensor(model.config.suggested_init())).sample((20,))
    rows = np.concatenate([np.asarray(data)[None], samples])
    main, aux = toystats.split_samples(problem, rows)
    poi = np.array([np.nan, 0.0, 0.5, 2.0] * 6)[: len(rows)]
    fitter = batched.BatchFitter(problem, fallback=False)
    result = fitter.fit(main, aux, poi)
    assert result.converged.all()
    for i in range(len(rows)):
        full_aux = np.array(problem.aux)
        full_aux[: problem.n_pars] = aux[i]
        theta, value = problem.fit(main[i], full_aux, problem.init, poi_value=None if np.isnan(poi[i]) else poi[i])
        assert result.twice_nll[i] == pytest.approx(value, abs=1e-6)
        assert result.theta[i, problem.poi_index] == pytest.approx(theta[problem.poi_index], abs=1e-3)
    # Free fits whose best POI lies below 0 stop at pyhf's bound.
    assert np.all(result.theta[:, problem.poi_index] >= problem.lower[problem.poi_index])


def test_more_fits_than_slots_and_start_points(small_problem):
    """A stream longer than the batch refills its slots; a start point changes no minimum."""
    problem = small_problem
    model, _ = _pyhf_model(small_workspace())
    np.random.seed(SEED + 1)
    samples = model.make_pdf(pyhf.tensorlib.astensor(model.config.suggested_init())).sample((40,))
    main, aux = toystats.split_samples(problem, samples)
    small = batched.BatchFitter(problem, batch=8, steps=3)
    streamed = small.fit(main, aux)
    whole = batched.BatchFitter(problem, batch=64).fit(main, aux, start=np.tile(problem.init * 1.1, (40, 1)))
    assert streamed.converged.all() and whole.converged.all()
    np.testing.assert_allclose(streamed.twice_nll, whole.twice_nll, atol=1e-6)


def _seeded_toys(pallet, name, ntoys: int = 1000):
    """Patch ``name``, a worker's state, pyhf's model, its ``ntoys`` toys of seed 1, the fast
    path's problem and fitter."""
    patch = next(p for p in pallet.patches if p.name == name)
    settings = FitSettings(backend="jax", calctype="toybased", ntoys=ntoys, seed=1)
    state = initialize(WorkerContext.build(pallet.workspace, settings.to_dict()))
    pyhf.set_backend("numpy")
    model, data = reference.build_model(state, patch.operations)
    problem = for_state(state).problem(patch.operations)
    return patch, state, model, toys.draw(model, data, settings), problem, batched.BatchFitter(problem)


def test_toy_fits_start_again_with_parameters_released_from_their_bounds(erjr_pallet):
    """3L-eRJR ``ERJR_350p0_200p0``, 1,000 toys, seed 1, background-only toy 580: from pyhf's
    starting point the engine's conditional fit pins the gamma of a shapesys with tau = 0.06 at
    zero and settles 8 units of -2 log L above the minimum pyhf's SLSQP reaches (q 5.4 against
    pyhf's 0.54). The fit again from that minimum, with the parameters it holds at bounds back at
    their initial values, finds pyhf's minimum."""
    from pyhf.infer.mle import fixed_poi_fit

    _, _, model, samples, problem, fitter = _seeded_toys(erjr_pallet, "ERJR_350p0_200p0")
    row = np.asarray(samples["background"])[580]
    generating = np.asarray(samples["background_pars"], dtype=float)
    main, aux = toystats.split_samples(problem, row[None])
    pinned = fitter.fit(main, aux, [1.0], None, generating)
    found = toystats.toy_statistics(fitter, row[None], 1.0, "qtilde", metric_at=generating, generating=generating)
    assert found["conditional"][0] < pinned.twice_nll[0] - 5.0
    init, bounds, fixed = model.config.suggested_init(), model.config.suggested_bounds(), model.config.suggested_fixed()
    by_pyhf = float(fixed_poi_fit(1.0, row, model, init, bounds, fixed, return_fitted_val=True)[1])
    ours = float(-2.0 * model.logpdf(found["theta_conditional"][0][: problem.n_pars], row)[0])
    # pyhf's -2 log L resolves to ~0.002 on this model (a shapesys with tau ~ 2e11 in its sum).
    assert ours <= by_pyhf + 0.01


def test_toy_fits_start_again_with_a_two_basin_parameter_reflected(lbb_pallet, monkeypatch):
    """1Lbb ``C1N2_Wh_hbb_700_150``, seed 1. ``JER_EffectiveNP_1`` is a histosys given on one side
    only, an effect on the yields that is mostly even in its parameter: a toy's likelihood can have
    a minimum on each side of zero. Background-only toy 729 of 1,000: both fits end on the negative
    side, 0.66 and 0.36 above the minima pyhf's SLSQP reaches on the positive side; from their
    minima with that parameter reflected they reach SLSQP's. Background-only toy 42 of 100: only
    the conditional fit's reflection lies near its minimum; the free fit follows it from the new
    conditional minimum. Both statistics are then pyhf's (before: 0.30 and 0.11 above)."""
    from pyhf.infer.mle import fit, fixed_poi_fit

    from pyhf_dist.runtime.fast import reflections

    reflecting = toystats._reflect
    for ntoys, index in ((1000, 729), (100, 42)):
        _, _, model, samples, problem, fitter = _seeded_toys(lbb_pallet, "C1N2_Wh_hbb_700_150", ntoys)
        jer = model.config.par_slice("JER_EffectiveNP_1").start
        assert jer in reflections.even_parameters(fitter)
        generating = np.asarray(samples["background_pars"], dtype=float)
        row = np.asarray(samples["background"])[index]
        monkeypatch.setattr(toystats, "_reflect", lambda *args: (0, 0))
        without = toystats.toy_statistics(fitter, row[None], 1.0, "qtilde", metric_at=generating, generating=generating)
        monkeypatch.setattr(toystats, "_reflect", reflecting)
        found = toystats.toy_statistics(fitter, row[None], 1.0, "qtilde", metric_at=generating, generating=generating)
        init, bounds, fixed = model.config.suggested_init(), model.config.suggested_bounds(), model.config.suggested_fixed()
        slsqp = {"conditional": float(fixed_poi_fit(1.0, row, model, init, bounds, fixed, return_fitted_val=True)[1]),
                 "free": float(fit(row, model, init, bounds, fixed, return_fitted_val=True)[1])}
        for name in ("conditional", "free"):
            before, after = without[f"theta_{name}"][0], found[f"theta_{name}"][0]
            assert before[jer] < -0.2 and after[jer] > 0.2
            # pyhf's own -2 log L at the engine's minima
            assert float(-2.0 * model.logpdf(before[: problem.n_pars], row)[0]) > slsqp[name] + 0.15
            assert float(-2.0 * model.logpdf(after[: problem.n_pars], row)[0]) == pytest.approx(slsqp[name], abs=1e-4)
        assert found["teststat"][0] == pytest.approx(slsqp["conditional"] - slsqp["free"], abs=1e-5)
        assert without["teststat"][0] > found["teststat"][0] + 0.1


def test_probes_never_stop_above_a_lower_minimum(small_problem):
    """A fit given a known minimum may stop once within the probe radius of it (joined), never below
    it; given a claimed minimum higher than the real one, it goes on to the real one. (On this
    small model a step from outside the radius lands on the minimum: probes converge. That they
    stop early on 1Lbb toys is checked in test_toy_fits_also_start_where_the_toys_were_drawn.)"""
    problem = small_problem
    model, _ = _pyhf_model(small_workspace())
    np.random.seed(SEED + 2)
    samples = model.make_pdf(pyhf.tensorlib.astensor(model.config.suggested_init())).sample((12,))
    main, aux = toystats.split_samples(problem, samples)
    fitter = batched.BatchFitter(problem, fallback=False)
    plain = fitter.fit(main, aux)
    assert plain.converged.all()
    start = np.tile(problem.init * 1.3, (12, 1))
    again = fitter.fit(main, aux, start=start)
    probe = fitter.fit(main, aux, start=start, known=(plain.theta, plain.twice_nll))
    assert np.all(probe.joined | probe.converged) and not np.any(probe.joined & probe.converged)
    assert probe.fallbacks == 0 and np.all(probe.evaluations <= again.evaluations)
    assert np.all(probe.twice_nll[probe.joined] >= plain.twice_nll[probe.joined] - 1e-7)
    np.testing.assert_allclose(probe.twice_nll[probe.converged], plain.twice_nll[probe.converged], atol=1e-6)
    claimed = fitter.fit(main, aux, start=start, known=(plain.theta, plain.twice_nll + 1.0))
    assert claimed.converged.all() and not claimed.joined.any()
    np.testing.assert_allclose(claimed.twice_nll, plain.twice_nll, atol=1e-6)


def test_plain_fits_and_probes_share_one_compiled_loop(small_problem):
    """Each compilation of the loop takes seconds (1Lbb: 4): plain fits run in the probes' loop,
    as probes of a minimum at +inf that none joins, with the same minima."""
    from pyhf_dist.runtime.fast import loop

    problem = small_problem
    model, _ = _pyhf_model(small_workspace())
    np.random.seed(SEED + 3)
    samples = model.make_pdf(pyhf.tensorlib.astensor(model.config.suggested_init())).sample((6,))
    main, aux = toystats.split_samples(problem, samples)
    fitter = batched.BatchFitter(problem, fallback=False, batch=8)  # a batch size no other test compiles
    before = loop.compiled.cache_info().misses
    plain = fitter.fit(main, aux)
    probe = fitter.fit(main, aux, start=np.tile(problem.init * 1.3, (6, 1)), known=(plain.theta, plain.twice_nll))
    assert loop.compiled.cache_info().misses == before + 1
    advance = loop.compiled(fitter.model.codes, 8, fitter.steps, False)[0]
    assert advance._cache_size() == 1, "plain fits and probes traced the loop apart"
    assert plain.converged.all() and not plain.joined.any()
    assert np.all(probe.joined | probe.converged)


# ------------------------------------------------------------------------- toys against pyhf


@pytest.fixture(scope="module")
def small_toys():
    """Toys of the all-modifier workspace, drawn as pyhf's ToyCalculator, and pyhf's statistics."""
    pyhf.set_backend("numpy")
    model, data = _pyhf_model(small_workspace())
    settings = FitSettings(backend="jax", calctype="toybased", ntoys=20, seed=SEED, poi_test=1.0)
    samples = toys.draw(model, data, settings)
    reference = {
        key: np.array([toys.pyhf_statistic(model, row, settings) for row in samples[key]])
        for key in ("signal", "background")
    }
    observed = toys.pyhf_statistic(model, data, settings)
    return model, data, settings, samples, reference, observed


def test_toy_statistics_agree_with_pyhf_per_toy(small_problem, small_toys):
    model, data, settings, samples, reference, observed = small_toys
    fitter = batched.BatchFitter(small_problem)
    for key, pars in (("signal", "signal_pars"), ("background", "background_pars")):
        ours = toystats.toy_statistics(fitter, samples[key], 1.0, "qtilde", metric_at=samples[pars], start=samples[pars])
        assert not ours["runaway"].any()
        np.testing.assert_allclose(ours["teststat"], reference[key], rtol=0, atol=TEST_STAT_TOLERANCE)
    mine = toystats.toy_statistics(fitter, np.asarray(data)[None], 1.0, "qtilde")
    assert mine["teststat"][0] == pytest.approx(observed, abs=TEST_STAT_TOLERANCE)


def test_cls_on_shared_toys_equals_pyhf_except_near_ties(small_toys):
    """Through the worker: the same toys give pyhf's CLs unless a statistic ties with the observed."""
    model, data, settings, samples, reference, observed = small_toys
    state = initialize(WorkerContext.build(small_workspace(), settings.to_dict()))
    record = calculations.compute(state, {"patch": [], "chunk": toys.split(settings.ntoys, 1)[0]})
    assert record["engine"] == "fast" and record["fallback_reason"] is None
    part = record["toys"]
    np.testing.assert_allclose(part["sb"], reference["signal"], atol=TEST_STAT_TOLERANCE)
    np.testing.assert_allclose(part["b"], reference["background"], atol=TEST_STAT_TOLERANCE)
    near = sum(abs(q - observed) < TEST_STAT_TOLERANCE for q in [*reference["signal"], *reference["background"]])
    ours = toys.cls_from_distributions(part["teststat"], part["sb"], part["b"])
    theirs = toys.cls_from_distributions(observed, reference["signal"], reference["background"])
    if near == 0:
        assert ours == theirs
    else:  # each near tie can move CLs+b or CLb by one toy
        assert abs(ours["CLsb_obs"] - theirs["CLsb_obs"]) <= near / settings.ntoys


def test_tiny_pallet_fast_toys_equal_serial_pyhf(pyhf_percentile_fix):
    """Through map_fits: the records say what fitted them and equal serial pyhf's ToyCalculator."""
    pallet = tiny_pallet()
    result = pyhf_dist.map_fits(pallet, executor="sequential", backend="jax", calctype="toybased", ntoys=60, seed=SEED)
    settings = FitSettings(backend="numpy", calctype="toybased", ntoys=60, seed=SEED)
    for record in result:
        assert record.ok, record.error
        assert (record.engine, record.fallback_reason, record.ntoys, record.seed) == ("fast", None, 60, SEED)
        # pyhf's fits of the observed data converge here: its toys, drawn from its own fits.
        assert record.converged is True and record.pyhf_default is None
        assert set(record.fits) == {"observed free", "observed mu=0", "observed mu=1"}
        state = initialize(WorkerContext.build(pallet.workspace, settings.to_dict()))
        patch = next(p for p in pallet.patches if p.name == record.name)
        model, data = reference.build_model(state, patch.operations)
        expected = serial_pyhf_toys(model, data, settings, samples=False)
        assert (record.CLs_obs, record.CLs_exp) == (expected["CLs_obs"], expected["CLs_exp"])


def test_chunked_fast_toys_merge_to_the_unchunked_result():
    settings = FitSettings(backend="jax", calctype="toybased", ntoys=45, seed=SEED)
    state = initialize(WorkerContext.build(small_workspace(), settings.to_dict()))
    merged = {}
    for chunks in (1, 3):
        records = []
        for chunk in toys.split(settings.ntoys, chunks):
            record = {"name": "small", "status": "ok", "error": None, "chunk": chunk}
            record.update(calculations.compute(state, {"patch": [], "chunk": chunk}))
            records.append(record)
        merged[chunks] = chunk_plan.merge_chunks(records[::-1], settings)
        assert merged[chunks]["toys"]["chunks"] == chunks
    one, three = merged[1], merged[3]
    np.testing.assert_allclose(three["toys"]["sb"], one["toys"]["sb"], atol=1e-9)
    np.testing.assert_allclose(three["toys"]["b"], one["toys"]["b"], atol=1e-9)
    assert (three["CLs_obs"], three["CLs_exp"]) == (one["CLs_obs"], one["CLs_exp"])
    assert three["engine"] == "fast" and (three["ntoys"], three["seed"]) == (45, SEED)


def _minuit_statistic(pallet) -> tuple[str, float]:
    """The first 3L-eRJR candidate on which MINUIT (strategy 2, through pyhf) converges here, and its
    observed ``qmu_tilde`` at mu = 1."""
    import pyhf

    pyhf.set_backend("numpy", minuit_optimizer())
    try:
        for name in ERJR_MINUIT_CANDIDATES:
            workspace = patched_workspace(pallet, next(p for p in pallet.patches if p.name == name))
            model = workspace.model()
            try:
                return name, float(pyhf.infer.test_statistics.qmu_tilde(
                    1.0, workspace.data(model), model, model.config.suggested_init(),
                    model.config.suggested_bounds(), model.config.suggested_fixed()))
            except pyhf.exceptions.FailedMinimization:
                continue
    finally:
        pyhf.set_backend("numpy", pyhf.optimize.scipy_optimizer())
    raise AssertionError(f"MINUIT converges on none of {ERJR_MINUIT_CANDIDATES} here")


def test_erjr_toys_are_drawn_from_converged_fits(erjr_pallet):
    """pyhf's minimizer stalls at its start on 3L-eRJR, so pyhf draws its toys from unconverged
    fits. The default path draws them from the converged fits, says so, and its observed statistic
    is MINUIT's; ``match_pyhf`` leaves the patch to plain pyhf, as the numpy backend."""
    name, q_minuit = _minuit_statistic(erjr_pallet)
    options = dict(executor="sequential", patches=[name], calctype="toybased", ntoys=4, seed=SEED)
    fast = pyhf_dist.map_fits(erjr_pallet, backend="jax", **options)[name]
    assert fast.ok and fast.engine == "fast" and fast.fallback_reason is None, (fast.error, fast.fallback_reason)
    assert fast.converged is True and all(fit["converged"] for fit in fast.fits.values())
    default = fast.pyhf_default
    assert default["stalls_at_start"] is True and default["toys_drawn_from"] == "converged fits"
    drawn = default["generating_fits_stop_above_minimum"]
    assert drawn["sb"] > 1.0 and drawn["b"] > 1.0
    # The background hypothesis's generating fit is the fit whose stall the record reports (one
    # SLSQP iteration there; pyhf's whole fit ends a little further on).
    assert drawn["b"] == pytest.approx(default["stops_above_minimum"], rel=1e-3)
    # The observed statistic from the certified fits against MINUIT's (strategy 2, through pyhf).
    fits = fast.fits
    q_fast = max(fits["observed mu=1"]["twice_nll"] - fits["observed free"]["twice_nll"], 0.0)
    assert q_fast == pytest.approx(q_minuit, abs=2e-3)
    matched = pyhf_dist.map_fits(erjr_pallet, backend="jax", match_pyhf=True, **options)[name]
    plain = pyhf_dist.map_fits(erjr_pallet, backend="numpy", **options)[name]
    assert matched.ok and plain.ok, (matched.error, plain.error)
    assert matched.engine == "pyhf" and "stops at its starting point" in matched.fallback_reason
    assert (plain.engine, plain.fallback_reason, plain.converged) == ("pyhf", None, None)
    assert (matched.CLs_obs, matched.CLs_exp) == (plain.CLs_obs, plain.CLs_exp)


def test_toy_record_fields_survive_json_and_csv(tmp_path):
    record = FitRecord("p", [1.0, 2.0], CLs_obs=0.2, CLs_exp=[0.1] * 5, engine="pyhf",
                       fallback_reason="pyhf's minimizer stops", ntoys=500, seed=3)
    result = ScanResult([record])
    result.to_json(tmp_path / "r.json")
    result.to_csv(tmp_path / "r.csv")
    for back in (ScanResult.from_json(tmp_path / "r.json"), ScanResult.from_csv(tmp_path / "r.csv")):
        got = back["p"]
        assert (got.engine, got.fallback_reason, got.ntoys, got.seed) == ("pyhf", "pyhf's minimizer stops", 500, 3)


def test_plan_fast_splits_only_for_idle_workers():
    assert len(chunk_plan.plan_chunks(FitSettings(backend="jax", calctype="toybased", ntoys=10000), 2, 1)) == 2
    assert len(chunk_plan.plan_chunks(FitSettings(backend="jax", calctype="toybased", ntoys=10000), 2, 125)) == 1
    assert len(chunk_plan.plan_chunks(FitSettings(backend="numpy", calctype="toybased", ntoys=1000), 2, 125)) == 2


# ------------------------------------------------------------------- toys without a minimum


def empty_bin_pallet():
    """A signal region whose second bin expects under one event, and a background ("fake") whose
    histosys extrapolates that bin far below zero: for a toy with no event there, -2 log L falls
    (pyhf allows negative yields in empty bins) until the nuisance parameter reaches its bound,
    thousands below zero, as it does on about 3% of 1Lbb's toys."""
    from pyhf_dist.pallet import Pallet, Patch

    workspace = {
        "channels": [
            {"name": "SR", "samples": [
                {"name": "bkg", "data": [20.0, 0.6], "modifiers": [{"name": "norm", "type": "normfactor", "data": None}]},
                {"name": "fake", "data": [1.0, 0.3], "modifiers": [
                    {"name": "shape", "type": "histosys", "data": {"hi_data": [1.0, 1.0], "lo_data": [1.0, -300.0]}}]}]},
            {"name": "CR", "samples": [
                {"name": "bkg", "data": [100.0], "modifiers": [{"name": "norm", "type": "normfactor", "data": None}]}]},
        ],
        "observations": [{"name": "SR", "data": [21.0, 1.0]}, {"name": "CR", "data": [100.0]}],
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }
    operations = [{"op": "add", "path": "/channels/0/samples/2", "value": {
        "name": "signal", "data": [5.0, 0.5], "modifiers": [{"name": "mu", "type": "normfactor", "data": None}]}}]
    return Pallet(workspace, [Patch("empty_1_0", (1, 0), operations)], ["m1", "m2"], "empty-bin", "")


def test_toys_without_a_minimum_are_counted_and_set_to_zero(pyhf_percentile_fix):
    """Per toy against pyhf's own fits: a toy the record counts as having no minimum is one whose
    pyhf fits also end with an empty bin expecting fewer than zero events; every other toy's
    statistic is pyhf's; the record's CLs are those of its statistics with the others at 0."""
    from pyhf.infer.mle import fit, fixed_poi_fit

    pallet = empty_bin_pallet()
    patch = pallet.patches[0]
    settings = FitSettings(backend="jax", calctype="toybased", ntoys=40, seed=SEED)
    state = initialize(WorkerContext.build(pallet.workspace, settings.to_dict()))
    chunk = calculations.compute(state, {"patch": patch.operations, "chunk": toys.split(40, 1)[0]})
    assert chunk["engine"] == "fast"
    part = chunk["toys"]
    model, data = reference.build_model(state, patch.operations)
    samples = toys.draw(model, data, settings)
    init, bounds, fixed = model.config.suggested_init(), model.config.suggested_bounds(), model.config.suggested_fixed()
    for key, sample in (("sb", "signal"), ("b", "background")):
        flagged = {index for index, _ in part["no_minimum"][key]}
        assert 0 < len(flagged) < 40  # the model makes both kinds of toy
        for index, row in enumerate(samples[sample]):
            main = np.asarray(row[: model.config.nmaindata])
            if index in flagged:
                assert part[key][index] == toys.NO_MINIMUM_STATISTIC
                pars = fixed_poi_fit(1.0, row, model, init, bounds, fixed)
                expected = model.expected_actualdata(pars)
                assert np.any((main == 0) & (expected < 0)), "pyhf's fit of a toy without a minimum stays physical"
            else:
                assert part[key][index] == pytest.approx(toys.pyhf_statistic(model, row, settings), abs=TEST_STAT_TOLERANCE)
                free = fit(row, model, init, bounds, fixed)
                assert np.all(model.expected_actualdata(free)[main == 0] >= -1e-9)
    merged = chunk_plan.merge_chunks([{"name": patch.name, "status": "ok", "error": None, "chunk": toys.split(40, 1)[0],
                                         **chunk}], settings)
    summary = merged["toy_summary"]
    assert summary["no_minimum"] == {key: len(part["no_minimum"][key]) for key in ("sb", "b")}
    assert summary["statistic"] == 0.0
    assert summary["by_pyhf"] == 0  # every other toy's fits converged on the engine
    # The alternatives are the CLs of the distributions changed as they say.
    sb, b = np.asarray(part["sb"]), np.asarray(part["b"])
    keep = {key: np.ones(40, bool) for key in ("sb", "b")}
    for key in keep:
        keep[key][[index for index, _ in part["no_minimum"][key]]] = False
    dropped = toys.cls_from_distributions(part["teststat"], sb[keep["sb"]], b[keep["b"]])
    infinite = toys.cls_from_distributions(part["teststat"], np.where(keep["sb"], sb, np.inf), np.where(keep["b"], b, np.inf))
    assert summary["if_dropped"] == {"CLs_obs": dropped["CLs_obs"], "CLs_exp": dropped["CLs_exp"]}
    assert summary["if_infinite"] == {"CLs_obs": infinite["CLs_obs"], "CLs_exp": infinite["CLs_exp"]}
    assert summary["if_infinite"]["CLs_obs"] != merged["CLs_obs"]  # the choice matters on this model
    # ... and the scan's record carries the summary, through JSON.
    result = pyhf_dist.map_fits(pallet, executor="sequential", backend="jax", calctype="toybased", ntoys=40, seed=SEED)
    record = FitRecord.from_dict(result[patch.name].to_dict())
    assert record.toy_summary["no_minimum"] == summary["no_minimum"]
    assert (record.CLs_obs, record.CLs_exp) == (merged["CLs_obs"], merged["CLs_exp"])
    # Plain pyhf counts the same toys, keeping its own statistics for them.
    plain = pyhf_dist.map_fits(pallet, executor="sequential", backend="numpy", calctype="toybased", ntoys=40,
                               seed=SEED)[patch.name]
    assert plain.toy_summary["no_minimum"] == summary["no_minimum"] and plain.toy_summary["statistic"] == "pyhf"


@pytest.mark.slow  # plain pyhf fits 16 stau toys of 120 parameters: minutes on a slow core
def test_stau_toys_are_pyhfs_fits_toy_by_toy(stau_tarball):
    """A stau Region-combined patch, 8 toys of each hypothesis through the worker: each statistic is
    pyhf's to 1e-5, or pyhf's own fit of that toy stopped above the minimum the fast path found
    (pyhf's -2 log L at the fast path's parameters is lower than where SLSQP stopped); never the
    other way round."""
    from pyhf.infer.mle import fit, fixed_poi_fit

    pallet = pyhf_dist.load_pallet(stau_tarball, pallet="Region-combined", validate=False)
    patch = next(p for p in pallet.patches if p.name == "DS_240_40_Staus")
    settings = FitSettings(backend="jax", calctype="toybased", ntoys=8, seed=SEED)
    state = initialize(WorkerContext.build(pallet.workspace, settings.to_dict()))
    chunk = calculations.compute(state, {"patch": patch.operations, "chunk": toys.split(8, 1)[0]})
    assert chunk["engine"] == "fast"
    model, data = reference.build_model(state, patch.operations)
    samples = toys.draw(model, data, settings)
    fitter = batched.BatchFitter(pyhf_dist.runtime.fast.for_state(state).problem(patch.operations))
    init, bounds, fixed = model.config.suggested_init(), model.config.suggested_bounds(), model.config.suggested_fixed()
    agree = 0
    for key, sample, generating in (("sb", "signal", "signal_pars"), ("b", "background", "background_pars")):
        ours = toystats.toy_statistics(fitter, samples[sample], 1.0, "qtilde", metric_at=samples[generating],
                                       generating=samples[generating])
        assert list(ours["teststat"]) == chunk["toys"][key]  # the fits behind the worker's statistics
        for index, row in enumerate(samples[sample]):
            conditional, conditional_value = fixed_poi_fit(1.0, row, model, init, bounds, fixed, return_fitted_val=True)
            free, free_value = fit(row, model, init, bounds, fixed, return_fitted_val=True)
            theirs = 0.0 if free[model.config.poi_index] > 1.0 else max(float(conditional_value - free_value), 0.0)
            if abs(ours["teststat"][index] - theirs) <= 1e-5:
                agree += 1
                continue
            gaps = [float(value) - float(-2 * model.logpdf(theta, row)[0])
                    for value, theta in ((conditional_value, ours["theta_conditional"][index]),
                                         (free_value, ours["theta_free"][index]))]
            assert min(gaps) > -1e-4 and max(gaps) > 1e-4, (key, index, ours["teststat"][index], theirs, gaps)
    assert agree >= 12


@pytest.mark.slow  # plain pyhf draws 1,000 1Lbb toys and fits four of them: minutes on a slow core
def test_toy_fits_also_start_where_the_toys_were_drawn(lbb_pallet):
    """1Lbb ``C1N2_Wh_hbb_700_150``, 1,000 toys, seed 1: the likelihood of a toy can have minima
    several units of -2 log L apart. On background-only toy 308 the free fit from pyhf's starting
    point (and from the conditional minimum) ends 4.4 above the minimum pyhf's SLSQP reaches; the
    start from the point the toys were drawn from finds it, and the statistic is pyhf's. On
    signal-plus-background toy 329 that start goes lower than pyhf's fits (q 3.67, not pyhf's 0.75),
    every expected yield positive: the lowest minimum found is the answer."""
    from pyhf.infer.mle import fit, fixed_poi_fit

    patch, state, model, samples, problem, fitter = _seeded_toys(lbb_pallet, "C1N2_Wh_hbb_700_150")
    init, bounds, fixed = model.config.suggested_init(), model.config.suggested_bounds(), model.config.suggested_fixed()
    found = {}
    for key, sample, index in (("b", "background", 308), ("sb", "signal", 329)):
        row = np.asarray(samples[sample])[index]
        generating = np.asarray(samples[f"{sample}_pars"], dtype=float)
        from_init = toystats.toy_statistics(fitter, row[None], 1.0, "qtilde", metric_at=generating)
        both = toystats.toy_statistics(fitter, row[None], 1.0, "qtilde", metric_at=generating, generating=generating)
        for name in ("conditional", "free"):
            assert both[name][0] <= from_init[name][0] + 1e-9  # a further start never raises a minimum
        conditional = float(fixed_poi_fit(1.0, row, model, init, bounds, fixed, return_fitted_val=True)[1])
        free = float(fit(row, model, init, bounds, fixed, return_fitted_val=True)[1])
        found[key] = (from_init, both, max(conditional - free, 0.0), row)
    from_init, both, q_pyhf, _ = found["b"]
    assert q_pyhf - from_init["teststat"][0] > 4.0 and both["teststat"][0] == pytest.approx(q_pyhf, abs=1e-3)
    from_init, both, q_pyhf, row = found["sb"]
    assert from_init["teststat"][0] == pytest.approx(q_pyhf, abs=1e-3) and both["teststat"][0] > q_pyhf + 2.0
    for name in ("conditional", "free"):
        theta = both[f"theta_{name}"][0][: problem.n_pars]
        assert np.all(model.expected_actualdata(theta) > 0)
    # Starts from the generating point are probes of the minimum found: most stop once in its
    # basin, at about half the evaluations of a fit.
    rows = np.asarray(samples["background"])[300:316]
    generating = np.asarray(samples["background_pars"], dtype=float)
    main, aux = toystats.split_samples(problem, rows)
    known = fitter.fit(main, aux, np.ones(16), None, generating)
    full = fitter.fit(main, aux, np.ones(16), np.tile(generating, (16, 1)), generating)
    probe = fitter.fit(main, aux, np.ones(16), np.tile(generating, (16, 1)), generating,
                       known=(known.theta, known.twice_nll))
    assert probe.joined.sum() >= 12 and probe.evaluations.sum() < 0.6 * full.evaluations.sum()
    assert np.all(probe.twice_nll[probe.joined] >= known.twice_nll[probe.joined] - 1e-7)
    # The scan's own statistics of those toys are these (a chunk holding them).
    chunk = {"index": 0, "of": 1, "start": 300, "stop": 332, "ntoys": 1000}
    part = calculations.compute(state, {"patch": patch.operations, "chunk": chunk})
    assert part["engine"] == "fast"
    assert part["toys"]["b"][8] == pytest.approx(found["b"][1]["teststat"][0], abs=1e-6)
    assert part["toys"]["sb"][29] == pytest.approx(found["sb"][1]["teststat"][0], abs=1e-6)


def test_a_fit_both_minimizers_lose_on_data_without_a_minimum_runs_away(lbb_pallet):
    """1Lbb ``C1N2_Wh_hbb_700_150``, 5,000 toys, seed 1, background-only toys 2545, 3792 and 3889:
    the conditional fit leaves the batched engine unconverged and the one-at-a-time minimizer
    stalls on the way (toy 3889 at -2 log L = 29 with a projected gradient of 4). Continued, each
    ends where an empty bin expects hundreds to millions of events below zero: the toy has no
    minimum and counts as such, rather than being lost and handed to pyhf's own fits (5-13 s of
    SLSQP with numerical gradients each, ending wherever SLSQP gives up)."""
    _, _, model, samples, problem, fitter = _seeded_toys(lbb_pallet, "C1N2_Wh_hbb_700_150", 5000)
    generating = np.asarray(samples["background_pars"], dtype=float)
    rows = np.asarray(samples["background"])[[2545, 3792, 3889]]
    main, aux = toystats.split_samples(problem, rows)
    result = fitter.fit(main, aux, [1.0] * len(rows), None, generating)
    assert result.runaway.all() and not result.converged.any()
    for row, theta, value in zip(rows, result.theta, result.twice_nll):
        # pyhf's own model at the point the fit stopped: an empty bin far below zero.
        expected = np.asarray(model.expected_actualdata(theta[: problem.n_pars]))
        observed = row[: model.config.nmaindata]
        assert np.isfinite(value) and np.min(expected[observed == 0]) < toys.NO_MINIMUM_YIELD
    found = toystats.toy_statistics(fitter, rows, 1.0, "qtilde", metric_at=generating, generating=generating)
    assert found["runaway"].all()


@pytest.mark.parametrize("per_slot", [False, True])
def test_the_step_with_parameters_held_is_the_newton_step_of_the_others(per_slot):
    """``held_solve``: with up to MAX_HELD parameters held, the step is zero on them and
    ``H[F, F]^-1 q[F]`` on the free ones (H the inverse of the metric given); more are unsolvable."""
    import jax.numpy as jnp

    from pyhf_dist.runtime.fast.likelihood import configure_jax
    from pyhf_dist.runtime.fast.quasi_newton import MAX_HELD, held_solve

    configure_jax()  # double precision, as the engine runs
    rng = np.random.default_rng(7)
    slots, n = 7, 11
    metrics = []
    for _ in range(slots if per_slot else 1):
        root = rng.normal(size=(n, n))
        metrics.append(root @ root.T + n * np.eye(n))
    held = np.zeros((slots, n), dtype=bool)
    for slot, count in enumerate([0, 1, 2, 3, 4, 4, 5]):
        held[slot, rng.choice(n, size=count, replace=False)] = True
    q = np.where(held, 0.0, rng.normal(size=(slots, n)))
    h0inv = np.stack(metrics) if per_slot else metrics[0]
    step, solvable = held_solve(jnp.asarray(q), jnp.asarray(held), jnp.asarray(h0inv))
    step, solvable = np.asarray(step), np.asarray(solvable)
    assert solvable.tolist() == [count <= MAX_HELD for count in held.sum(1)]
    for slot in np.flatnonzero(solvable):
        hessian = np.linalg.inv(metrics[slot if per_slot else 0])
        free = ~held[slot]
        expected = np.zeros(n)
        expected[free] = np.linalg.solve(hessian[np.ix_(free, free)], q[slot, free])
        np.testing.assert_allclose(step[slot], expected, rtol=1e-10, atol=1e-12)
