"""The fast path follows what pyhf can fit: patches of the whole workspace, every record's engine.

Patches apply to the whole workspace (as ``pyhf.PatchSet`` applies them): they may remove or add
channels and observations, change parameter settings in the measurement, change the binning, put
signal in any subset of channels. Each case here is built from a published pallet, fitted on the
fast path (``engine == "fast"`` for every patch) and compared with serial plain pyhf on numpy.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tarfile

import pytest

pytest.importorskip("jax")

import pyhf  # noqa: E402

import pyhf_dist  # noqa: E402
from pyhf_dist.runtime import calculations  # noqa: E402
from pyhf_dist.exceptions import SettingsError  # noqa: E402
from pyhf_dist.executors.funcx.endpoint import pyhf_dist_fit  # noqa: E402
from pyhf_dist.protocol import encode  # noqa: E402
from pyhf_dist.runtime.fast import FastHypotest  # noqa: E402
from pyhf_dist.pallet import Pallet, Patch  # noqa: E402
from pyhf_dist.results import ScanResult  # noqa: E402
from pyhf_dist.settings import FitSettings  # noqa: E402
from pyhf_dist.protocol import WorkerContext  # noqa: E402
from pyhf_dist.runtime import initialize  # noqa: E402

from helpers import DATA, assert_matches_reference, serial_pyhf, small_workspace  # noqa: E402

STAU_TARBALL = DATA / "stau-likelihoods-1911.06660.tar.gz"
#: CLs agreement asked of the fast path.
CLS_TOLERANCE = 1e-4
#: Two points of each stau pallet, one light and one heavy.
STAU_SAMPLE = ["DS_120_40_Staus", "DS_360_80_Staus"]


@pytest.fixture(scope="module")
def stau_dir(tmp_path_factory):
    if not STAU_TARBALL.exists():
        pytest.skip(f"published pallet not found at {STAU_TARBALL}: set PYHF_DIST_DATA")
    directory = tmp_path_factory.mktemp("stau")
    with tarfile.open(STAU_TARBALL) as archive:
        members = [m for m in archive.getmembers() if m.name.endswith(("BkgOnly.json", "patchset.json"))]
        archive.extractall(directory, members=members, filter="data")
    return directory / "1911.06660"


@pytest.fixture(scope="module")
def stau_combined(stau_dir):
    return pyhf_dist.load_pallet(stau_dir / "Region-combined")


def _scan(pallet, names=None, **options):
    return pyhf_dist.map_fits(pallet, executor="sequential", backend="jax", patches=names, **options)


def _assert_all_fast_and_right(result, pallet):
    assert [record.engine for record in result] == ["fast"] * len(result), [
        (record.name, record.engine, record.fallback_reason or record.error) for record in result
    ]
    assert all(record.fallback_reason is None for record in result)
    assert_matches_reference(result, serial_pyhf(pallet, result.names()), tolerance=CLS_TOLERANCE)


# ------------------------------------------------------------------------------- published pallets


@pytest.mark.parametrize("region", ["Region-combined", "Region-lowMass", "Region-highMass"])
def test_stau_pallets_take_the_fast_path(stau_dir, region):
    pallet = pyhf_dist.load_pallet(stau_dir / region)
    assert len(pallet) == 57
    _assert_all_fast_and_right(_scan(pallet, STAU_SAMPLE), pallet)


# ------------------------------------------------------------------ pallets with other patch kinds
# Region-combined channels (and observations), in order: 0 QCR1cut_cuts, 1 QCR2cut_cuts,
# 2 SR1cut_cuts, 3 SR2cut_cuts, 4 WCRcut_cuts. Each published patch adds a signal sample to every
# channel ("add /channels/i/samples/0").


def _signal_ops(patch, channels):
    return [op for op in patch.operations if int(op["path"].split("/")[2]) in channels]


def _parameter(value):
    return {"op": "add", "path": "/measurements/0/config/parameters/-", "value": value}


def _two_bin_channel():
    """A new signal region of two bins: W background with its normfactor and systematics, signal."""
    modifiers = [
        {"name": "mu_W", "type": "normfactor", "data": None},
        {"name": "lumi", "type": "lumi", "data": None},
        {"name": "staterror_SR3bins", "type": "staterror", "data": [0.4, 0.3]},
        {"name": "JET_GroupedNP_2", "type": "normsys", "data": {"hi": 1.08, "lo": 0.93}},
        {"name": "PRW_DATASF", "type": "histosys", "data": {"hi_data": [3.3, 1.6], "lo_data": [2.8, 1.45]}},
    ]
    signal = [
        {"name": "mu_SIG", "type": "normfactor", "data": None},
        {"name": "lumi", "type": "lumi", "data": None},
        {"name": "staterror_SR3bins", "type": "staterror", "data": [0.2, 0.1]},
    ]
    return {
        "name": "SR3bins_cuts",
        "samples": [{"name": "W_Staus", "data": [3.0, 1.5], "modifiers": modifiers},
                    {"name": "signal", "data": [1.5, 0.8], "modifiers": signal}],
    }


#: case name -> function (published patch) -> operations of the derived patch.
CASES = {
    "signal in two channels only": lambda patch: _signal_ops(patch, {2, 3}),
    "control channel and its observation removed": lambda patch: patch.operations + [
        {"op": "remove", "path": "/channels/1"},
        {"op": "remove", "path": "/observations/1"},
    ],
    "lumi and a background normfactor fixed": lambda patch: patch.operations + [
        {"op": "add", "path": "/measurements/0/config/parameters/0/fixed", "value": True},
        _parameter({"name": "mu_QCD", "fixed": True}),
    ],
    "bounds and inits changed": lambda patch: patch.operations + [
        {"op": "replace", "path": "/measurements/0/config/parameters/0/bounds", "value": [[0.9, 1.1]]},
        _parameter({"name": "mu_W", "bounds": [[0.2, 4.0]], "inits": [1.1]}),
        _parameter({"name": "mu_SIG", "bounds": [[0.0, 20.0]]}),
    ],
    "two-bin channel with its observation added": lambda patch: patch.operations + [
        {"op": "add", "path": "/channels/-", "value": _two_bin_channel()},
        {"op": "add", "path": "/observations/-", "value": {"name": "SR3bins_cuts", "data": [6.0, 2.0]}},
    ],
    # A moderate excess in SR1 (10 -> 11 events): with 14, pyhf's own background-only fit stops
    # 2.2 in -2 log L above the minimum (SLSQP ends "successfully" after 22 iterations), which no
    # guard of the fast path detects; see fit.FitProblem.pyhf_stalls.
    "observation, sample and modifiers replaced or removed": lambda patch: [
        {"op": "replace", "path": "/observations/2/data", "value": [11.0]},
        {"op": "replace", "path": "/channels/4/samples/5/data", "value": [2.0]},
        {"op": "remove", "path": "/channels/2/samples/0/modifiers/3"},
        {"op": "remove", "path": "/channels/0/samples/3"},
    ] + patch.operations,
}


@pytest.mark.parametrize("case", list(CASES))
def test_patch_kinds_take_the_fast_path(stau_combined, case):
    patch = next(p for p in stau_combined.patches if p.name == STAU_SAMPLE[0])
    derived = Pallet(
        stau_combined.workspace,
        [Patch(patch.name, patch.values, CASES[case](patch))],
        stau_combined.labels,
        source=f"{stau_combined.source}#{case}",
    )
    _assert_all_fast_and_right(_scan(derived), derived)


def test_patches_removing_a_validation_channel_share_the_background_layout(stau_combined):
    """The reported record: the background ships a validation region, every patch removes it and
    adds signal to two channels. Every patch is fitted on the fast path, on the layout compiled
    for the background (no other compilation)."""
    workspace = copy.deepcopy(stau_combined.workspace)
    validation = copy.deepcopy(workspace["channels"][2])
    validation["name"] = "VRcut_cuts"
    for sample in validation["samples"]:
        sample["data"] = [1.5 * value for value in sample["data"]]
        for modifier in sample["modifiers"]:
            if modifier["type"] == "staterror":
                modifier["name"], modifier["data"] = "staterror_VRcut_cuts", [1.5 * v for v in modifier["data"]]
            elif modifier["type"] == "histosys":
                modifier["data"] = {k: [1.5 * v for v in values] for k, values in modifier["data"].items()}
    workspace["channels"].insert(1, validation)
    workspace["observations"].insert(1, {"name": "VRcut_cuts", "data": [16.0]})
    patches = [
        # Removed first, as in the record: the signal then goes to SR1 and SR2 at their usual places.
        Patch(p.name, p.values, [{"op": "remove", "path": "/channels/1"}] + _signal_ops(p, {2, 3}))
        for p in stau_combined.patches
        if p.name in STAU_SAMPLE
    ]
    derived = Pallet(workspace, patches, stau_combined.labels, source=f"{stau_combined.source}#validation")
    _assert_all_fast_and_right(_scan(derived), derived)

    fast = FastHypotest(workspace)
    fast.warm_up()
    for patch in patches:
        fast.hypotest(patch.operations)
    assert len(fast.layouts) == 1


# ---------------------------------------------------------------------------- layouts, in the small


def _pyhf_cls(spec, operations):
    """Plain pyhf on the whole patched workspace."""
    pyhf.set_backend("numpy")
    patch = pyhf.patchset.Patch({"metadata": {"name": "p", "values": [0]}, "patch": operations})
    workspace = pyhf.Workspace(patch.apply(spec))
    model = workspace.model()
    observed, expected = pyhf.infer.hypotest(1.0, workspace.data(model), model, return_expected_set=True)
    return float(observed), [float(value) for value in expected]


def _assert_close(result, reference):
    assert result["CLs_obs"] == pytest.approx(reference[0], abs=CLS_TOLERANCE)
    assert result["CLs_exp"] == pytest.approx(reference[1], abs=CLS_TOLERANCE)


def test_layouts_follow_the_patched_structure():
    """Fewer bins share a layout; a larger structure grows it; a structure far smaller than the
    grown layout gets one of its own. Every one matches plain pyhf."""
    spec = small_workspace()
    fast = FastHypotest(spec)
    fast.warm_up()
    (background,) = fast.layouts
    # CR (3 bins) and its observation removed: 2 bins, on the background's layout.
    removed = [{"op": "remove", "path": "/channels/1"}, {"op": "remove", "path": "/observations/1"}]
    reference = _pyhf_cls(spec, removed)
    _assert_close(fast.hypotest(removed), reference)
    assert fast.layouts == [background]
    # A 100-bin channel added: the layout grows to take it (and still serves the background's shape).
    wide = {"name": "VR", "samples": [{"name": "bkg1", "data": [20.0 + i for i in range(100)], "modifiers": [
        {"name": "mu_bkg", "type": "normfactor", "data": None},
        {"name": "norm_a", "type": "normsys", "data": {"hi": 1.05, "lo": 0.95}}]}]}
    added = [{"op": "add", "path": "/channels/-", "value": wide},
             {"op": "add", "path": "/observations/-", "value": {"name": "VR", "data": [22.0 + i for i in range(100)]}}]
    _assert_close(fast.hypotest(added), _pyhf_cls(spec, added))
    (grown,) = fast.layouts
    assert grown.bins == 105 and grown.width == 100 and grown.covers(background)
    # Two bins padded to a hundred would cost more than a layout of their own.
    _assert_close(fast.hypotest(removed), reference)
    assert fast.layouts[0] == grown and len(fast.layouts) == 2 and fast.layouts[1].bins == 2


def test_the_structure_check_uses_the_whole_patched_workspace():
    """A patch that changes only an observation changes nothing pyhf's ``Workspace.model(patches=)``
    would see; applied to the whole workspace it changes the CLs, and the fast path agrees."""
    spec = small_workspace()
    operations = [{"op": "replace", "path": "/observations/0/data", "value": [75.0, 50.0]}]
    result = FastHypotest(spec).hypotest(operations)
    _assert_close(result, _pyhf_cls(spec, operations))
    assert abs(result["CLs_obs"] - _pyhf_cls(spec, [])[0]) > 0.01


# ------------------------------------------------------------------- engine, fallback, require_fast


@pytest.fixture(scope="module")
def erjr_two(erjr_pallet):
    return [patch.name for patch in erjr_pallet.patches[:2]]


def test_fallback_reason_on_records_and_in_the_summary(erjr_pallet, erjr_two, tmp_path):
    """pyhf's own fit stalls on 3L-eRJR: asked for pyhf's numbers, the fast path declines, plain
    pyhf fits, the records say why."""
    result = _scan(erjr_pallet, erjr_two, match_pyhf=True)
    assert_matches_reference(result, serial_pyhf(erjr_pallet, erjr_two))
    assert {record.engine for record in result} == {"pyhf"}
    reasons = {record.fallback_reason for record in result}
    assert len(reasons) == 1 and "starting point" in reasons.pop()
    summary = result.summary()
    assert "engine pyhf                 2" in summary
    assert f"{'fast path declined':<28}{result[0].fallback_reason} (2)" in summary
    # Kept in both file formats.
    for path, read in ((tmp_path / "r.json", ScanResult.from_json), (tmp_path / "r.csv", ScanResult.from_csv)):
        result.to_json(path) if path.suffix == ".json" else result.to_csv(path)
        again = read(path)
        assert [(r.engine, r.fallback_reason) for r in again] == [(r.engine, r.fallback_reason) for r in result]
    # A scan that did not ask for the fast path gives no reason.
    plain = pyhf_dist.map_fits(erjr_pallet, executor="sequential", backend="numpy", patches=erjr_two[:1])
    assert plain[0].engine == "pyhf" and plain[0].fallback_reason is None


def test_require_fast_turns_a_fallback_into_a_failure(erjr_pallet, erjr_two):
    result = _scan(erjr_pallet, erjr_two, require_fast=True, match_pyhf=True)
    assert result.counts()["failed"] == 2
    for record in result:
        assert record.engine is None and record.CLs_obs is None
        assert "fast path declined" in record.error and "starting point" in record.error
        assert "--require-fast" in record.error
    with pytest.raises(SettingsError, match="require_fast needs the fast path"):
        pyhf_dist.map_fits(erjr_pallet, executor="sequential", backend="numpy", require_fast=True)


def test_require_fast_on_the_command_line(erjr_dir, erjr_two, tmp_path):
    output = tmp_path / "out.json"
    run = subprocess.run(
        [sys.executable, "-m", "pyhf_dist", "fit", str(erjr_dir), "-p", erjr_two[0], "--backend", "jax",
         "--require-fast", "--match-pyhf", "--executor", "sequential", "-o", str(output), "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    (record,) = json.loads(output.read_text())["results"]
    assert record["status"] == "failed" and "--require-fast" in record["error"]
    assert "failed                      1" in run.stdout
    assert json.loads(output.read_text())["metadata"]["settings"]["require_fast"] is True


def test_require_fast_is_in_the_settings_digest_only_when_on():
    assert FitSettings(backend="jax").digest() == FitSettings(backend="jax", require_fast=False).digest()
    assert FitSettings(backend="jax").digest() != FitSettings(backend="jax", require_fast=True).digest()
    with pytest.raises(SettingsError, match="require_fast"):
        FitSettings(backend="numpy", calctype="toybased", require_fast=True)


def test_plain_pyhf_worker_applies_patches_to_the_whole_workspace():
    """The worker's plain pyhf path and the Globus Compute function patch observations too."""
    spec = small_workspace()
    operations = [{"op": "replace", "path": "/observations/0/data", "value": [75.0, 50.0]},
                  {"op": "add", "path": "/measurements/0/config/parameters/1/fixed", "value": True}]
    reference = _pyhf_cls(spec, operations)
    context = WorkerContext.build(spec, FitSettings(backend="numpy").to_dict())
    task = {"name": "p", "patch": operations, "context": context.key, "chunk": None, "timeout": None}
    values = calculations.compute(initialize(context), task)
    assert values["engine"] == "pyhf" and "fallback_reason" not in values
    _assert_close(values, reference)
    sys.modules.pop("_pyhf_dist_remote_cache", None)
    try:
        record = pyhf_dist_fit(encode(context.payload.decode()), encode(task))
        fast_context = WorkerContext.build(spec, FitSettings(backend="jax").to_dict())
        fast_record = pyhf_dist_fit(encode(fast_context.payload.decode()), encode(dict(task, context=fast_context.key)))
    finally:
        sys.modules.pop("_pyhf_dist_remote_cache", None)
    assert record["status"] == "ok" and record["engine"] == "pyhf" and record.get("fallback_reason") is None
    _assert_close(record, reference)
    assert fast_record["status"] == "ok" and fast_record["engine"] == "fast"
    _assert_close(fast_record, reference)
