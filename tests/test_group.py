"""Patches of different structures fitted together in one loop (``runtime.fast.group``), against
the same patches fitted one at a time by the certified fast path, on the 3L-eRJR pallet.

The group holds published patches and patches built from them the way real records differ: one
channel without signal, extra signal modifiers, a fixed nuisance parameter, and a patch whose
fits fail. Fits of the same data from the same start must give the one-at-a-time minima
(``-2 log L`` within 1e-8), the hypotests and the CLs of an upper-limit search's POI values the
one-at-a-time CLs (within 1e-6), the limits of searches in lockstep the one-at-a-time limits, and
a patch the group cannot answer must leave ``None`` and the others as they are.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from helpers import fitted_together

from pyhf_dist.runtime.fast import fit
from pyhf_dist.runtime.fast.engine import FastHypotest
from pyhf_dist.runtime.fast.errors import FastPathUnsupported
from pyhf_dist.runtime.fast.group import GroupFitter, GroupScan
from pyhf_dist.runtime.fast.group_limits import upper_limits

CLS_TOLERANCE = 1e-6
NLL_TOLERANCE = 1e-8
#: A published 3L-eRJR patch whose fit to the Asimov data at mu = 1 has two minima 0.0057 apart:
#: from pyhf's start L-BFGS-B ends in the lower, the group's loop in the higher.
TWO_MINIMA = "ERJR_110p0_20p0"


def _structures(pallet) -> dict[str, list]:
    """Patches of different structures, by what makes them differ."""
    first, other = pallet.patches[0], pallet.patches[40]
    channel = first.operations[0]["path"].split("/")[2]
    background = pallet.workspace["channels"][int(channel)]["samples"][0]
    configured = {p["name"] for p in pallet.workspace["measurements"][0]["config"]["parameters"]}
    nuisance = next(m["name"] for m in background["modifiers"] if m["type"] == "normsys" and m["name"] not in configured)
    extra = copy.deepcopy(other.operations)
    for operation in extra:
        operation["value"]["modifiers"].append({"name": "sig_theory", "type": "normsys", "data": {"hi": 1.15, "lo": 0.85}})
    failing = copy.deepcopy(other.operations)
    # Negative signal yields: at pyhf's start (mu = 1) a bin with events expects fewer than none.
    failing[0]["value"]["data"] = [-1000.0 - abs(x) for x in failing[0]["value"]["data"]]
    workspace = pallet.workspace
    last = len(workspace["channels"]) - 1
    observation = next(k for k, o in enumerate(workspace["observations"]) if o["name"] == workspace["channels"][last]["name"])
    removed = [op for op in other.operations if not op["path"].startswith(f"/channels/{last}/")]
    removed += [{"op": "remove", "path": f"/channels/{last}"}, {"op": "remove", "path": f"/observations/{observation}"}]
    return {
        "published": first.operations,
        "another published point": other.operations,
        "a channel without signal": [op for k, op in enumerate(first.operations) if k != 1],
        "extra signal modifiers": extra,
        "a channel removed": removed,
        "a fixed nuisance parameter": [
            *first.operations,
            {"op": "add", "path": "/measurements/0/config/parameters/-", "value": {"name": nuisance, "fixed": True}},
        ],
        "two minima": next(p for p in pallet.patches if p.name == TWO_MINIMA).operations,
        "failing": failing,
    }


@pytest.fixture(scope="module")
def group(erjr_pallet):
    engine = FastHypotest(erjr_pallet.workspace)
    structures = _structures(erjr_pallet)
    problems = {name: engine.problem(operations) for name, operations in structures.items()}
    scan = GroupScan(list(problems.values()))
    return engine, structures, problems, scan


def test_the_group_holds_patches_of_different_structures(group):
    _, _, problems, scan = group
    parameters = {name: problem.n_pars for name, problem in problems.items()}
    assert len(set(parameters.values())) >= 3, parameters
    fixed = {name: int(np.sum(problem.fixed[: problem.n_pars])) for name, problem in problems.items()}
    assert fixed["a fixed nuisance parameter"] == fixed["published"] + 1
    assert scan.fitter.pars >= max(parameters.values())


def test_group_fits_equal_the_fits_one_at_a_time(group):
    """The fits of each patch's hypotest, from pyhf's start and to the same data (the Asimov data
    of the one-at-a-time scan), in one loop for the whole group."""
    _, _, problems, scan = group
    names = [name for name in problems if name not in ("failing", "two minima")]
    rows, expected = [], []
    for index, name in enumerate(problems):
        if name not in names:
            continue
        problem = problems[name]
        alone = fit.PoiScan(problem, "qtilde")
        alone.statistics(1.0)
        asimov = alone.asimov_data
        for fit_label, data, mu in (
            ("observed mu=0", (problem.main, problem.aux), 0.0),
            ("observed free", (problem.main, problem.aux), None),
            ("observed mu=1", (problem.main, problem.aux), 1.0),
            ("asimov mu=1", asimov, 1.0),
        ):
            rows.append((index, data, mu))
            expected.append((name, fit_label, alone.fits[fit_label].value))
    together = scan.fitter.fit(
        [index for index, _, _ in rows], np.stack([np.asarray(data[0]) for _, data, _ in rows]),
        [np.asarray(data[1]) for _, data, _ in rows], [np.nan if mu is None else mu for _, _, mu in rows],
    )
    assert together.converged.all()
    for value, (name, fit_label, alone_value) in zip(together.twice_nll, expected):
        assert value == pytest.approx(alone_value, abs=NLL_TOLERANCE), (name, fit_label)


def test_group_hypotests_give_the_answers_of_one_at_a_time(group):
    _, _, problems, scan = group
    answers = dict(zip(problems, scan.hypotests(1.0)))
    assert answers["failing"] is None
    # Its two starts of the Asimov fit end in different minima: left to the one-at-a-time path.
    assert answers["two minima"] is None
    for name, answer in answers.items():
        if name in ("failing", "two minima"):
            continue
        assert answer is not None, name
        alone = fit.hypotest(problems[name], 1.0, "qtilde")
        for ours, theirs in zip([answer["CLs_obs"], *answer["CLs_exp"]], [alone["CLs_obs"], *alone["CLs_exp"]]):
            assert ours == pytest.approx(theirs, abs=CLS_TOLERANCE), name
        assert list(answer["fits"]) == list(alone["fits"])
        for fit_label, certificate in answer["fits"].items():
            assert certificate["converged"] and certificate["gradient"] <= 1e-3
            if fit_label.startswith("observed"):
                assert certificate["twice_nll"] == pytest.approx(alone["fits"][fit_label]["twice_nll"], abs=NLL_TOLERANCE)


def test_group_gives_the_cls_of_an_upper_limit_search(group, monkeypatch):
    """Each patch's POI values as its one-at-a-time search visits them, all in the group at once."""
    engine, structures, problems, scan = group
    visited: dict = {}
    # Each search's problem is kept alive here: a problem collected after its search could hand
    # its id to the next search's, and two searches would be recorded as one.
    problems_seen: list = []
    statistics = fit.PoiScan.statistics

    def recorded(self, mu, observed=True):
        stats = statistics(self, mu, observed)
        observed_fit = self.fits[fit.fit_name("observed", mu)].value if observed else None
        if id(self.problem) not in visited:
            problems_seen.append(self.problem)
        visited.setdefault(id(self.problem), []).append((mu, observed, dict(stats, twice_nll=observed_fit)))
        return stats

    monkeypatch.setattr(fit.PoiScan, "statistics", recorded)
    searched = ["published", "extra signal modifiers", "a channel removed", "a fixed nuisance parameter"]
    for name in searched:
        limits = engine.upper_limit(structures[name])
        assert limits["converged"] and np.isfinite(limits["mu_up_obs"]), name
    monkeypatch.setattr(fit.PoiScan, "statistics", statistics)
    # One scan per search, in order (the engine makes its own problem of each patch: the same numbers).
    assert len(visited) == len(searched)
    by_name = dict(zip(searched, visited))
    mus = [[mu for mu, _, _ in visited[by_name[name]]] if name in by_name else [] for name in problems]
    found = scan.statistics(mus)
    compared = 0
    # At mu = 10 its fit to the observed data has two minima 0.0046 apart: from pyhf's start
    # L-BFGS-B ends in the lower, the loop in the higher, and from the fit at mu = 0 in the lower.
    assert found[list(problems).index("a fixed nuisance parameter")] is None
    for name, values in zip(problems, found):
        if name not in by_name or name == "a fixed nuisance parameter":
            continue
        assert values is not None, name
        assert len(values) == len(visited[by_name[name]]) > 10
        for ours, (mu, observed, theirs) in zip(values, visited[by_name[name]]):
            alone = fit.asymptotic_cls(theirs["qmu"] if observed else ours["qmu"], theirs["qmu_A"], "qtilde", powerless_is_one=True)
            assert ours["CLs_exp"] == pytest.approx(alone["CLs_exp"], abs=CLS_TOLERANCE), (name, mu)
            if observed:
                assert ours["CLs_obs"] == pytest.approx(alone["CLs_obs"], abs=CLS_TOLERANCE), (name, mu)
                ours_fit = ours["fits"][fit.fit_name("observed", mu)]["twice_nll"]
                assert ours_fit == pytest.approx(theirs["twice_nll"], abs=NLL_TOLERANCE), (name, mu)
            compared += 1
    assert compared > 40


#: A limit from searches in lockstep against the same search one patch at a time: the CLs agree
#: within ~1e-7, so the roots within about as much.
LIMIT_TOLERANCE = 1e-6


@pytest.mark.parametrize("grid", [None, (0.0, 5.0, 11)], ids=["root-finding", "grid"])
def test_limits_searched_in_lockstep_equal_the_limits_one_at_a_time(group, grid):
    """Every patch's search asks for its POI values in turn, each round fitted in one loop: each
    limit is the one-at-a-time limit, with its certificate. Where the group's starts find two
    minima at a value ("two minima"), that value is fitted as one patch at a time and the search
    goes on; a patch whose fits fail ("failing") is left ``None``."""
    from pyhf_dist.runtime.reference import scan_points

    engine, structures, _, _ = group
    names = list(structures)
    scan = scan_points(grid)
    together = dict(zip(names, upper_limits(engine.problem, [structures[name] for name in names], scan=scan)))
    assert together["failing"] is None
    answered = [name for name, limit in together.items() if limit is not None]
    assert set(answered) == set(names) - {"failing"}
    for name in answered:
        limit, alone = together[name], engine.upper_limit(structures[name], scan=scan)
        assert limit["mu_up_obs"] == pytest.approx(alone["mu_up_obs"], rel=LIMIT_TOLERANCE), name
        assert limit["mu_up_exp"] == pytest.approx(alone["mu_up_exp"], rel=LIMIT_TOLERANCE), name
        assert limit["converged"] is True and list(limit["fits"]) == list(alone["fits"]), name
        for fit_label in ("observed free", "observed mu=0"):
            ours, theirs = limit["fits"][fit_label]["twice_nll"], alone["fits"][fit_label]["twice_nll"]
            assert ours == pytest.approx(theirs, abs=NLL_TOLERANCE), (name, fit_label)
        conditional = limit["fits"]["conditional"]
        assert conditional["converged"] and conditional["gradient"] <= 1e-3
        # The group fits both datasets at each value the search asks for.
        assert conditional["count"] >= alone["fits"]["conditional"]["count"], name


def test_a_pack_of_upper_limits_is_searched_together_where_groups_are_wanted(group, erjr_pallet, monkeypatch):
    """A worker's pack of upper limits (``PYHF_DIST_GROUPS=on``, as on a GPU): the patches the group
    answers share one start and end time, the failing one is searched one at a time, all to the
    one-at-a-time limits."""
    from pyhf_dist.runtime.fast import GROUPS_ENV
    from pyhf_dist.settings import FitSettings

    engine, structures, _, _ = group
    monkeypatch.setenv(GROUPS_ENV, "on")
    grid = (0.0, 5.0, 11)
    settings = FitSettings(backend="jax", calculation="upper_limit", upper_limit_scan=grid)
    records, together = _run_pack(erjr_pallet, settings, structures)
    names = list(structures)
    assert together == set(names) - {"failing"}
    for name in names:
        record = records[name]
        assert record["status"] == "ok" and record["engine"] == "fast", (name, record.get("error"))
        alone = engine.upper_limit(structures[name], scan=np.linspace(*grid))
        assert record["mu_up_obs"] == pytest.approx(alone["mu_up_obs"], rel=LIMIT_TOLERANCE), name
        assert record["mu_up_exp"] == pytest.approx(alone["mu_up_exp"], rel=LIMIT_TOLERANCE), name
        assert record["converged"] is True, name


def test_a_patch_that_fails_leaves_the_others_as_they_were(group):
    _, _, problems, scan = group
    names = list(problems)
    without = [problem for name, problem in problems.items() if name != "failing"]
    alone = GroupScan(without, fitter=GroupFitter(without)).hypotests(1.0)
    together = dict(zip(names, scan.hypotests(1.0)))
    assert together["failing"] is None
    assert not scan.answerable[names.index("failing")]
    for name, answer in zip([n for n in names if n != "failing"], alone):
        if answer is None:
            assert together[name] is None
            continue
        assert together[name]["CLs_obs"] == pytest.approx(answer["CLs_obs"], abs=1e-12), name
        assert together[name]["CLs_exp"] == pytest.approx(answer["CLs_exp"], abs=1e-12), name


def test_patches_of_other_interpolation_codes_are_refused_in_one_line(erjr_pallet, group):
    _, structures, problems, _ = group
    other_codes = FastHypotest(erjr_pallet.workspace, {"normsys": {"interpcode": "code1"}, "histosys": {"interpcode": "code0"}})
    with pytest.raises(FastPathUnsupported, match="cannot be fitted in one group") as raised:
        GroupFitter([problems["published"], other_codes.problem(structures["published"])])
    assert "\n" not in str(raised.value)


def _run_pack(pallet, settings, structures: dict) -> tuple[dict, set]:
    """One pack of every structure through a worker's runtime: ``(records by name, the names
    fitted together with "published": one shared start and end time)``."""
    from pyhf_dist.protocol import WorkerContext, make_pack, make_task, records_of
    from pyhf_dist.runtime import initialize, run_task

    context = WorkerContext.build(pallet.workspace, settings.to_dict())
    initialize(context)
    names = list(structures)
    pack = make_pack([make_task(name, structures[name], context.key) for name in names])
    records = dict(zip(names, records_of(run_task(pack, context), len(names))))
    together = {name for name, record in records.items() if (record["started"], record["finished"])
                == (records["published"]["started"], records["published"]["finished"])}
    return records, together


@pytest.mark.parametrize("groups", ["on", "off"])
def test_a_pack_of_patches_is_fitted_in_one_group_where_groups_are_wanted(group, erjr_pallet, monkeypatch, groups):
    """A worker's pack of patches of different structures (as a scan sends on a GPU) goes through
    one group with ``PYHF_DIST_GROUPS=on`` and one at a time with ``off``, to the same records."""
    from pyhf_dist.runtime.fast import GROUPS_ENV
    from pyhf_dist.settings import FitSettings

    engine, structures, _, _ = group
    monkeypatch.setenv(GROUPS_ENV, groups)
    records, together = _run_pack(erjr_pallet, FitSettings(backend="jax"), structures)
    names = list(structures)
    if groups == "on":
        # The group answers every patch whose checks pass (as GroupScan.hypotests above); the
        # others are fitted one at a time, after it.
        assert together == set(names) - {"two minima", "failing"}
    else:
        assert together == {"published"}
    for name in names:
        record, alone = records[name], engine.hypotest(structures[name])
        assert record["status"] == "ok" and record["engine"] == "fast", (name, record.get("error"))
        assert record["CLs_obs"] == pytest.approx(alone["CLs_obs"], abs=CLS_TOLERANCE), name
        assert record["CLs_exp"] == pytest.approx(alone["CLs_exp"], abs=CLS_TOLERANCE), name
        assert set(record["fits"]) == set(alone["fits"]) and record["converged"] is True, name


def test_a_scan_sends_whole_packs_to_workers_that_fit_patches_together(group, erjr_pallet, monkeypatch):
    """End to end on the local executor, as on a GPU (forced with ``PYHF_DIST_GROUPS=on``): once a
    worker's record says it fits patches together, the scan shares the queue out in a few large
    packs, each fitted in one loop, to the answers of one patch at a time."""
    import pyhf_dist
    from pyhf_dist.runtime.fast import GROUPS_ENV

    engine = group[0]
    monkeypatch.setenv(GROUPS_ENV, "on")  # the local workers inherit it
    names = erjr_pallet.names()[:24]
    result = pyhf_dist.map_fits(erjr_pallet, executor="local", workers=2, patches=names, progress=False)
    assert result.failed() == [] and {record.engine for record in result} == {"fast"}
    assert all(record.worker.get("fits_together") for record in result)
    together = fitted_together(result)
    assert max(len(members) for members in together) >= 8, together
    by_name = {patch.name: patch for patch in erjr_pallet.patches}
    for record in result:
        alone = engine.hypotest(by_name[record.name].operations)
        assert record.CLs_obs == pytest.approx(alone["CLs_obs"], abs=CLS_TOLERANCE), record.name
        assert record.CLs_exp == pytest.approx(alone["CLs_exp"], abs=CLS_TOLERANCE), record.name
        assert record.converged is True and set(record.fits) == set(alone["fits"]), record.name
