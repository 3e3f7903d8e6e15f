"""Signal points of one template fitted together on the batched engine (``runtime.fast.points``),
against the same points fitted one at a time by the certified fast path, on published backgrounds.

A point is a patch that adds a signal sample (a normfactor and a normsys, as a reinterpretation
template writes it) with its own yields. Points fitted together must give the one-at-a-time
answers (CLs to 1e-6, every fit's ``-2 log L``, the same certificate); points that cannot be fitted
together (yields that set an uncertainty, too few of one structure, another kind of patch) must be
left to the one-at-a-time path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import fitted_together

import pyhf_dist
from pyhf_dist.demo import demo_workspace
from pyhf_dist.runtime.fast.engine import FastHypotest

TOLERANCE = 1e-6


def _points(operations, scales, *, normsys=(1.1, 0.9), staterror=False) -> list:
    """Patches adding the signal samples of ``operations`` with their yields times each of
    ``scales``, with a template's modifiers: the POI's normfactor and one normsys (and, with
    ``staterror``, MC statistics of 10% of the yields)."""
    points = []
    for scale in scales:
        patch = []
        for operation in operations:
            value = operation["value"]
            data = [float(entry) * scale for entry in value["data"]]
            modifiers = [m for m in value["modifiers"] if m["type"] == "normfactor"]
            modifiers.append({"name": "sig_theory", "type": "normsys", "data": {"hi": normsys[0], "lo": normsys[1]}})
            if staterror:
                channel = operation["path"].split("/")[2]
                modifiers.append({"name": f"staterror_sig{channel}", "type": "staterror", "data": [0.1 * d for d in data]})
            patch.append({"op": "add", "path": operation["path"], "value": {"name": value["name"], "data": data, "modifiers": modifiers}})
        points.append(patch)
    return points


def _signal_adds(patch) -> list:
    return [op for op in patch.operations if op["op"] == "add" and "/samples/" in op["path"]]


def _assert_same_answer(together: dict, alone: dict) -> None:
    for ours, theirs in zip([together["CLs_obs"], *together["CLs_exp"]], [alone["CLs_obs"], *alone["CLs_exp"]]):
        assert ours == pytest.approx(theirs, abs=TOLERANCE)
    assert list(together["fits"]) == list(alone["fits"])
    for name, fit in together["fits"].items():
        assert fit["converged"] and fit["gradient"] <= 1e-3
        # The Asimov data are made once for all points, one at a time once per point: the two
        # background fits agree to the minimizers' precision, the Asimov data to ~1e-6 per bin.
        precision = 1e-5 if name.startswith("asimov") else 1e-6
        assert fit["twice_nll"] == pytest.approx(alone["fits"][name]["twice_nll"], abs=precision), name
        assert fit["start"] == alone["fits"][name]["start"]
    assert together["converged"] is True
    assert ("pyhf_default" in together) == ("pyhf_default" in alone)


def _backgrounds(name, lbb_pallet, stau_tarball, erjr_pallet):
    if name == "1Lbb":
        return lbb_pallet.workspace, _signal_adds(next(p for p in lbb_pallet.patches if p.name == "C1N2_Wh_hbb_700_150"))
    if name == "stau":
        pallet = pyhf_dist.load_pallet(stau_tarball, pallet="Region-combined", validate=False)
        return pallet.workspace, _signal_adds(pallet.patches[len(pallet.patches) // 2])
    return erjr_pallet.workspace, _signal_adds(next(p for p in erjr_pallet.patches if p.name == "ERJR_150p0_60p0"))


@pytest.mark.parametrize("background", ["1Lbb", "stau", "3L-eRJR"])
def test_points_fitted_together_give_the_answers_of_one_at_a_time(background, request):
    fixtures = [request.getfixturevalue(name) for name in ("lbb_pallet", "stau_tarball", "erjr_pallet")]
    workspace, adds = _backgrounds(background, *fixtures)
    points = _points(adds, np.geomspace(0.2, 4.0, 6))
    together = FastHypotest(workspace).hypotest_points(points)
    assert all(answer is not None for answer in together), "every point of a clean group is fitted together"
    alone = FastHypotest(workspace)
    for point, answer in zip(points, together):
        _assert_same_answer(answer, alone.hypotest(point))
    # More signal, smaller CLs: each point got its own answer.
    values = [answer["CLs_obs"] for answer in together]
    assert values == sorted(values, reverse=True) and values[0] - values[-1] > 0.1


def test_3l_erjr_points_say_where_pyhfs_minimizer_stalls(erjr_pallet):
    """pyhf's default fits stall on this background: every point fitted together says so, as one at a time."""
    adds = _signal_adds(next(p for p in erjr_pallet.patches if p.name == "ERJR_150p0_60p0"))
    together = FastHypotest(erjr_pallet.workspace).hypotest_points(_points(adds, [0.5, 1.0, 1.5, 2.0]))
    assert all(answer["pyhf_default"]["stalls_at_start"] for answer in together)


def test_yields_that_set_an_uncertainty_are_fitted_one_at_a_time():
    """MC statistics of the signal make the constraint widths depend on the yields: not one model."""
    adds = [{"op": "add", "path": f"/channels/{i}/samples/1", "value": {"name": "signal", "data": data,
             "modifiers": [{"name": "mu_SIG", "type": "normfactor", "data": None}]}}
            for i, data in enumerate([[0.4], [5.0, 7.0, 8.0], [9.0, 6.0]])]
    points = _points(adds, [0.5, 1.0, 1.5, 2.0, 3.0], staterror=True)
    engine = FastHypotest(demo_workspace())
    assert engine.hypotest_points(points) == [None] * len(points)
    # The same points without the uncertainties are one model.
    assert all(answer is not None for answer in engine.hypotest_points(_points(adds, [0.5, 1.0, 1.5, 2.0, 3.0])))


def test_a_mixed_pack_fits_each_structure_together_and_leaves_the_rest():
    adds = [{"op": "add", "path": f"/channels/{i}/samples/1", "value": {"name": "signal", "data": data,
             "modifiers": [{"name": "mu_SIG", "type": "normfactor", "data": None}]}}
            for i, data in enumerate([[0.4], [5.0, 7.0, 8.0], [9.0, 6.0]])]
    first = _points(adds, [0.3, 0.6, 1.2, 2.4, 4.8])
    second = _points(adds, [0.5, 1.5], normsys=(1.3, 0.8))  # another structure, too few to batch
    replace = [{"op": "replace", "path": "/observations/0/data", "value": [60.0]}]
    pack = [first[0], second[0], replace, *first[1:], second[1]]
    answers = FastHypotest(demo_workspace()).hypotest_points(pack)
    assert [answer is not None for answer in answers] == [True, False, False, True, True, True, True, False]
    alone = FastHypotest(demo_workspace())
    for point, answer in zip(pack, answers):
        if answer is not None:
            _assert_same_answer(answer, alone.hypotest(point))


def test_a_signals_scan_fits_packs_of_points_together(tmp_path):
    """End to end on the local executor: packs of points fitted together, answers as one at a time.

    The scan's first fits are one at a time; packs sized from them hold at least the points a
    worker fits together, however loaded the machine (the suite runs on two processes)."""
    workspace = demo_workspace()
    (tmp_path / "BkgOnly.json").write_text(json.dumps(workspace))
    rows = ["name,m1,m2,CR[0],SRhigh[0],SRhigh[1],SRhigh[2],SRlow[0],SRlow[1]"]
    for index in range(64):
        scale = 0.2 + index / 16
        rows.append(f"p{index},{100 + index},{index % 8},{0.4 * scale},{5 * scale},{7 * scale},{8 * scale},{9 * scale},{6 * scale}")
    (tmp_path / "yields.csv").write_text("\n".join(rows) + "\n")
    template = {"normsys": {"name": "signal_theory", "hi": 1.1, "lo": 0.9}}
    result = pyhf_dist.map_fits(
        str(tmp_path / "BkgOnly.json"), signals=str(tmp_path / "yields.csv"), template=template,
        executor="local", workers=2, progress=False,
    )
    assert result.failed() == [] and len(result) == 64
    assert {record.engine for record in result} == {"fast"}
    assert max(len(names) for names in fitted_together(result)) >= 4
    from pyhf_dist.signals import load_signals

    pallet = load_signals(workspace, str(tmp_path / "yields.csv"), template)
    alone = FastHypotest(workspace)
    by_name = {record.name: record for record in result}
    for patch in list(pallet.patches)[::9]:
        expected = alone.hypotest(patch.operations)
        record = by_name[patch.name]
        assert record.CLs_obs == pytest.approx(expected["CLs_obs"], abs=TOLERANCE)
        assert record.CLs_exp == pytest.approx(expected["CLs_exp"], abs=TOLERANCE)
