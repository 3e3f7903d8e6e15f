"""The compiled fast path against plain pyhf: likelihood, parameters, CLs, and its fallbacks."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")

import pyhf  # noqa: E402

from pyhf_dist.runtime.fast import FastHypotest, FastPathUnsupported, for_state, layout, likelihood, parsets, warm_up  # noqa: E402

from helpers import HISTOSYS_CODES, LBB_SAMPLE, NORMSYS_CODES, interp_settings, random_points, small_workspace  # noqa: E402

#: CLs agreement asked of the fast path (the issue's target).
CLS_TOLERANCE = 1e-4


# Plain pyhf on numpy is the reference (conftest.numpy_backend).
pytestmark = pytest.mark.usefixtures("numpy_backend")


def _fast_model(spec, settings, patch=None):
    """The fast path's arrays, device layout and functions for ``spec`` (+ ``patch``)."""
    fast = FastHypotest(spec, settings, verify=False)
    patched, arrays = fast.arrays(patch)
    caps = layout.Caps.around(arrays.sizes)
    padded = layout.pad(arrays, caps)
    params = layout.pad_parameters(arrays, caps)
    codes = (settings["normsys"]["interpcode"], settings["histosys"]["interpcode"])
    return patched, arrays, params, likelihood.device_layout(padded, codes), likelihood.functions(*codes)


@pytest.mark.parametrize("normsys", NORMSYS_CODES)
@pytest.mark.parametrize("histosys", HISTOSYS_CODES)
def test_logpdf_matches_pyhf_at_random_points(normsys, histosys):
    spec = small_workspace()
    settings = interp_settings(normsys, histosys)
    patched, arrays, params, device, functions = _fast_model(spec, settings)
    workspace = pyhf.Workspace(spec)
    model = workspace.model(modifier_settings=settings)
    data = np.asarray(workspace.data(model))
    n = len(arrays.init)
    for point in random_points(arrays, 40, seed=1):
        theta = params["init"].copy()
        theta[:n] = point
        expected = float(model.logpdf(point, data)[0])
        ours = functions.logpdf(theta, arrays.main_data, params["aux"], device)
        assert ours == pytest.approx(expected, rel=1e-10, abs=1e-9)
        main, aux = functions.expected(theta, device)
        np.testing.assert_allclose(np.asarray(main), model.expected_actualdata(point), rtol=1e-12, atol=1e-12)
        constrained = arrays.gauss | arrays.poisson
        np.testing.assert_allclose(np.asarray(aux)[:n][constrained], model.expected_auxdata(point), rtol=1e-12)


def test_parameters_match_pyhf():
    spec = small_workspace()
    _, arrays, _, _, _ = _fast_model(spec, interp_settings("code4", "code4p"))
    config = pyhf.Workspace(spec).model().config
    assert arrays.par_names == config.par_names
    assert arrays.poi_index == config.poi_index
    assert arrays.init.tolist() == config.suggested_init()
    assert np.stack([arrays.lower, arrays.upper], 1).tolist() == [list(b) for b in config.suggested_bounds()]
    assert arrays.fixed.tolist() == config.suggested_fixed()
    assert arrays.aux[arrays.gauss | arrays.poisson].tolist() == pytest.approx(config.auxdata, rel=1e-14)
    # The zero-uncertainty staterror bin and the zero-yield shapesys-free bin are fixed, as in pyhf.
    assert any(arrays.fixed[i] for i, name in enumerate(arrays.par_names) if name.startswith("stat_CR"))


def test_gradient_is_the_derivative_of_the_objective():
    spec = small_workspace()
    _, arrays, params, device, functions = _fast_model(spec, interp_settings("code4", "code4p"))
    n = len(arrays.init)
    theta = params["init"].copy()
    theta[:n] = random_points(arrays, 1, seed=3)[1]
    value, *gradient = functions.value_and_grad(theta, arrays.main_data, params["aux"], device)
    step = 1e-6
    for i in range(n):
        shifted = theta.copy()
        shifted[i] += step
        numeric = (float(functions.twice_nll(shifted, arrays.main_data, params["aux"], device)) - float(value)) / step
        assert float(gradient[i]) == pytest.approx(numeric, rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("test_stat", ["qtilde", "q", "q0"])
@pytest.mark.parametrize("poi_test", [1.0, 0.5])
def test_hypotest_matches_pyhf_on_a_small_workspace(test_stat, poi_test):
    spec = small_workspace()
    if test_stat == "q0":
        # An excess, so that q0 is clearly above zero (at zero only pyhf reproduces pyhf).
        spec["observations"][0]["data"] = [80.0, 52.0]
    settings = interp_settings("code4", "code4p")
    workspace = pyhf.Workspace(spec)
    model = workspace.model(modifier_settings=settings)
    observed, expected = pyhf.infer.hypotest(
        poi_test, workspace.data(model), model, test_stat=test_stat, return_expected_set=True
    )
    result = FastHypotest(spec, settings).hypotest(None, poi_test, test_stat)
    assert result["CLs_obs"] == pytest.approx(float(observed), abs=CLS_TOLERANCE)
    assert result["CLs_exp"] == pytest.approx([float(v) for v in expected], abs=CLS_TOLERANCE)


def test_apply_patch_is_jsonpatch_without_touching_the_input():
    import jsonpatch

    spec = small_workspace()
    base = {"channels": spec["channels"], "parameters": spec["measurements"][0]["config"]["parameters"]}
    before = copy.deepcopy(base)
    operations = [
        {"op": "add", "path": "/channels/0/samples/-", "value": {"name": "extra", "data": [1.0, 1.0], "modifiers": []}},
        {"op": "replace", "path": "/channels/1/samples/0/data", "value": [99.0, 80.0, 60.0]},
        {"op": "remove", "path": "/channels/0/samples/1/modifiers/2"},
        {"op": "add", "path": "/parameters/0", "value": {"name": "norm_a", "bounds": [[-3.0, 3.0]]}},
        {"op": "test", "path": "/channels/0/name", "value": "SR"},
    ]
    assert layout.apply_patch(base, operations) == jsonpatch.apply_patch(copy.deepcopy(base), operations)
    assert base == before
    with pytest.raises(FastPathUnsupported):
        layout.apply_patch(base, [{"op": "remove", "path": "/channels/7"}])


def test_unsupported_feature_falls_back_to_pyhf():
    """A shapefactor first met in a narrower channel: pyhf indexes the wider channel's extra bins
    into parameter 0 (a quirk, not reproduced). The worker falls back and reports pyhf's CLs."""
    from pyhf_dist.runtime import calculations
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.protocol import WorkerContext
    from pyhf_dist.runtime import initialize

    spec = small_workspace()
    # Rename CR (3 bins) to TR so that it sorts after SR (2 bins).
    spec["channels"][1]["name"] = spec["observations"][1]["name"] = "TR"
    operation = {
        "op": "add",
        "path": "/channels/0/samples/1/modifiers/-",
        "value": {"name": "sf_CR", "type": "shapefactor", "data": None},
    }
    with pytest.raises(FastPathUnsupported, match="shapefactor"):
        FastHypotest(spec).hypotest([operation])
    context = WorkerContext.build(spec, FitSettings(backend="jax").to_dict())
    record = calculations.compute(initialize(context), {"name": "odd", "patch": [operation]})
    pyhf.set_backend("numpy")
    workspace = pyhf.Workspace(spec)
    model = workspace.model(patches=[[operation]])
    observed, expected = pyhf.infer.hypotest(1.0, workspace.data(model), model, return_expected_set=True)
    assert record["CLs_obs"] == pytest.approx(float(observed), abs=CLS_TOLERANCE)
    assert record["CLs_exp"] == pytest.approx([float(v) for v in expected], abs=CLS_TOLERANCE)


def test_worker_hooks_build_once_and_compile():
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.protocol import WorkerContext
    from pyhf_dist.runtime import initialize

    state = initialize(WorkerContext.build(small_workspace(), FitSettings(backend="jax").to_dict()))
    warm_up(state)
    assert for_state(state) is for_state(state)
    assert for_state(state).hypotest(None)["CLs_obs"] > 0


def test_importing_the_package_does_not_import_jax():
    code = "import sys, pyhf_dist, pyhf_dist.runtime.fast, pyhf_dist.runtime.calculations; print('jax' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


def test_erjr_agrees_with_pyhf_or_declines_when_matching_pyhf(erjr_pallet, erjr_reference):
    """3L-eRJR: pyhf's SLSQP stops at its starting point on these models (a shapesys constraint
    factor of ~1e11); asked for pyhf's own numbers (``match_pyhf``), the fast path detects that and
    declines, so the worker returns pyhf's own (unconverged) numbers. Whatever it does return
    agrees with pyhf. (By default the answers are the converged fits: tests/test_certified.py.)"""
    fast = FastHypotest(erjr_pallet.workspace, match_pyhf=True)
    declined = []
    for patch in erjr_pallet.patches:
        try:
            result = fast.hypotest(patch.operations)
        except FastPathUnsupported as error:
            declined.append((patch.name, str(error)))
            continue
        observed, expected = erjr_reference[patch.name]
        assert result["CLs_obs"] == pytest.approx(observed, abs=CLS_TOLERANCE, nan_ok=True), patch.name
        assert result["CLs_exp"] == pytest.approx(expected, abs=CLS_TOLERANCE), patch.name
    assert all("starting point" in reason for _, reason in declined), declined[:3]


def test_erjr_fallback_through_the_worker_gives_pyhf(erjr_pallet, erjr_reference):
    from pyhf_dist.runtime import calculations
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.protocol import WorkerContext
    from pyhf_dist.runtime import initialize

    settings = FitSettings(backend="jax", match_pyhf=True)
    state = initialize(WorkerContext.build(erjr_pallet.workspace, settings.to_dict()))
    for patch in erjr_pallet.patches[:2]:
        record = calculations.compute(state, {"name": patch.name, "patch": patch.operations})
        observed, expected = erjr_reference[patch.name]
        assert record["CLs_obs"] == pytest.approx(observed, abs=CLS_TOLERANCE, nan_ok=True)
        assert record["CLs_exp"] == pytest.approx(expected, abs=CLS_TOLERANCE)


@pytest.mark.slow
def test_1lbb_sample_agrees_with_serial_pyhf(lbb_pallet, lbb_reference):
    fast = FastHypotest(lbb_pallet.workspace)
    by_name = {patch.name: patch for patch in lbb_pallet.patches}
    for name in LBB_SAMPLE:
        result = fast.hypotest(by_name[name].operations)
        observed, expected = lbb_reference[name]
        assert result["CLs_obs"] == pytest.approx(observed, abs=CLS_TOLERANCE), name
        assert result["CLs_exp"] == pytest.approx(expected, abs=CLS_TOLERANCE), name


def test_1lbb_patch_arrays_are_one_layout(lbb_pallet):
    """Every 1Lbb patch fits the layout of the first: one compilation serves the pallet."""
    fast = FastHypotest(lbb_pallet.workspace, verify=False)
    caps = None
    for patch in lbb_pallet.patches:
        sizes = fast.arrays(patch.operations)[1].sizes
        caps = caps or layout.Caps.around(sizes)
        assert caps.covers(sizes), (patch.name, sizes)
    json.dumps(caps.__dict__)


def test_structure_check_outcome_is_remembered_per_workspace(tmp_path, monkeypatch):
    """The check against pyhf.Model runs once per structure and machine; a remembered failure
    keeps the structure off the fast path in a later process too."""
    from pyhf_dist import cache

    monkeypatch.setenv("PYHF_DIST_CACHE", str(tmp_path))
    spec = small_workspace()
    assert FastHypotest(spec).hypotest(None)["CLs_obs"] > 0
    assert not list((tmp_path / "checks").glob("structure-*"))  # no key: not kept
    FastHypotest(spec, key="workspace-a").hypotest(None)
    (remembered,) = (tmp_path / "checks").glob("structure-*")
    key = remembered.name[len("structure-"):]
    assert cache.recall("structure", key) == "same"
    cache.remember("structure", key, "different")
    with pytest.raises(FastPathUnsupported, match="did not reproduce"):
        FastHypotest(spec, key="workspace-a").hypotest(None)
    assert FastHypotest(spec, key="workspace-b").hypotest(None)["CLs_obs"] > 0  # another workspace: checked anew


def test_parameter_requirements_are_pyhfs():
    """The restated requirement helpers give what pyhf's own give, for every modifier type."""
    nominal, data = [5.0, 0.0, 3.0], [1.0, 2.0, 0.0]
    for mtype, ours in parsets.REQUIRED_PARSET.items():
        assert ours(nominal, data) == getattr(pyhf.modifiers, mtype).required_parset(nominal, data), mtype
    assert parsets.staterror_parset([0.1, 0.2], [False, True]) == pyhf.modifiers.staterror.required_parset(
        [0.1, 0.2], [False, True]
    )
    requirements = {
        "lumi": [parsets.REQUIRED_PARSET["lumi"](nominal, None)],
        "mu": [parsets.REQUIRED_PARSET["normfactor"](nominal, None)],
        "shape": [parsets.REQUIRED_PARSET["shapefactor"](nominal, None)] * 2,
    }
    user = {
        "lumi": {"name": "lumi", "auxdata": [1.0], "sigmas": [0.02], "bounds": [[0.9, 1.1]], "inits": [1.0]},
        "mu": {"name": "mu", "bounds": [[0.0, 5.0]], "fixed": True},
    }
    theirs = pyhf.parameters.reduce_paramsets_requirements(requirements, user)
    # pyhf leaves an empty set under the keys a type does not define; they are never read.
    theirs = {name: {k: v for k, v in req.items() if v != set()} for name, req in theirs.items()}
    assert parsets.reduce_configured(requirements, user) == theirs
    for bad in ({"mu": {"bounds": [[0, 1], [0, 2]]}}, {"mu": {"sigmas": [0.1]}}):
        with pytest.raises(pyhf.exceptions.InvalidModel):
            pyhf.parameters.reduce_paramsets_requirements(requirements, bad)
        with pytest.raises(FastPathUnsupported):
            parsets.reduce_configured(requirements, bad)


_XLA_THREADS = """
import json, os
from pyhf_dist.runtime.fast.likelihood import configure_jax
cpus = os.sched_getaffinity(0)
configure_jax()
import jax.numpy as jnp
float(jnp.ones((64, 64)).sum())
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(json.dumps({"pool": names.count("tf_XLAEigen"), "cpus": len(cpus),
                  "pinned": sum(os.sched_getaffinity(int(t)) != cpus for t in os.listdir("/proc/self/task"))}))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="thread affinity is Linux's")
def test_a_worker_starts_xla_with_one_pool_thread_and_leaves_every_thread_all_cpus():
    """XLA's CPU client sizes its spinning thread pool by the CPUs, whatever XLA_FLAGS say: a
    worker (one thread per library) starts it with one, and no thread stays pinned."""
    import os

    from pyhf_dist.runtime.threads import thread_limits

    environment = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    environment.update(thread_limits(environment), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _XLA_THREADS], capture_output=True, text=True, env=environment,
                         timeout=120, check=True)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    if facts["cpus"] < 2:
        pytest.skip("one CPU: XLA's pool has one thread anyway")
    assert facts["pool"] == 1, facts
    assert facts["pinned"] == 0, facts
    # Without the one-thread flags (the user's own process), jax's defaults stay.
    environment.pop("XLA_FLAGS")
    out = subprocess.run([sys.executable, "-c", _XLA_THREADS], capture_output=True, text=True, env=environment,
                         timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["pool"] > 1


def test_xla_is_left_as_jax_starts_it_where_a_gpu_plugin_is_installed(tmp_path, monkeypatch):
    from pyhf_dist.runtime import threads

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert not threads._accelerator_plugins()
    (tmp_path / "jax_cuda12_plugin").mkdir()
    assert threads._accelerator_plugins()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not threads._accelerator_plugins()


def _staterror_widths_one_carrier_at_a_time(name, carriers, geometry):
    """The pooled widths as a loop over the carriers, each adding its bins in turn."""
    channels, offsets, n_bins = geometry.channels, geometry.offsets, geometry.n_bins
    nominal_sum, squares = np.zeros(n_bins), np.zeros(n_bins)
    for c, _, parsed in carriers:
        nominal_sum[offsets[c] : offsets[c] + channels[c][0]] += parsed.nominal
    for c, _, parsed in carriers:
        bins = slice(offsets[c], offsets[c] + channels[c][0])
        total = nominal_sum[bins]
        positive = total > 0
        unc = dict(parsed.staterrors)[name]
        squares[bins] += np.where(positive, (unc / np.where(positive, total, 1.0)) ** 2, 0.0)
    return squares


def test_pooled_staterror_widths_add_carrier_after_carrier(lbb_pallet):
    """Widths pooled over a staterror's carriers are those of adding them one after another, to the
    last bit: on 1Lbb patches (8 staterrors of ~10 samples each), and on carriers spanning two
    channels with an empty bin."""
    engine = FastHypotest(lbb_pallet.workspace)
    spec = small_workspace()
    # One staterror on the bkg1 samples of both channels, one of its bins without yield.
    for channel, uncertainties in zip(spec["channels"], ([1.5, 1.0], [2.0, 1.0, 0.5])):
        bkg1 = next(sample for sample in channel["samples"] if sample["name"] == "bkg1")
        bkg1["modifiers"].append({"name": "stat_both", "type": "staterror", "data": uncertainties})
        if len(uncertainties) == 3:
            bkg1["data"][2] = 0.0
    cases = [layout.apply_patch(engine._workspace, patch.operations) for patch in lbb_pallet.patches[::25]]
    cases.append(spec)
    compared = 0
    for workspace in cases:
        model = {"channels": workspace["channels"], "parameters": workspace["measurements"][0]["config"].get("parameters", [])}
        geometry = layout.Channels.read(model, layout._parse_sample)
        carriers: dict = {}
        for c, s, parsed in geometry.slots:
            for name, _ in parsed.staterrors:
                carriers.setdefault(name, []).append((c, s, parsed))
        for name, carrying in carriers.items():
            sigmas, fixed, rank = parsets.staterror_widths(name, carrying, geometry)
            squares = _staterror_widths_one_carrier_at_a_time(name, carrying, geometry)
            expected = np.sqrt(squares[rank >= 0])
            assert fixed == [bool(v == 0) for v in expected]
            expected[expected == 0] = 1.0
            assert np.array_equal(sigmas, expected), name
            compared += 1
    assert compared == 8 * 5 + 3
    assert len(parsets.staterror_widths("stat_both", carriers["stat_both"], geometry)[0]) == 5
