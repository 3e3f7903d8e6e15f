"""Helpers shared by the tests: the published pallets' locations, plain pyhf as the reference,
the comparisons, small models, and probes of the machine (Slurm, Parsl processes).

Tests import them from here (``from helpers import ...``); fixtures stay in ``conftest.py``.
Plain serial pyhf is computed once per patch and settings in a test session and shared.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PYHF_DIST_DATA", REPOSITORY.parent / "shared" / "data"))
ERJR_DIR = DATA / "3L-eRJR"
LBB_TARBALL = DATA / "1Lbb-likelihoods-hepdata.tar.gz"
#: Three pallets (Region-combined, Region-highMass, Region-lowMass) in one archive, as packed.
STAU_TARBALL = DATA / "stau-likelihoods-1911.06660.tar.gz"

#: Eight 1Lbb points across the plane: excluded, boundary and allowed regions.
LBB_SAMPLE = [
    "C1N2_Wh_hbb_300_150",
    "C1N2_Wh_hbb_400_0",
    "C1N2_Wh_hbb_550_200",
    "C1N2_Wh_hbb_650_50",
    "C1N2_Wh_hbb_700_400",
    "C1N2_Wh_hbb_750_100",
    "C1N2_Wh_hbb_800_250",
    "C1N2_Wh_hbb_1000_0",
]
#: Two of them, for the executors' runs of plain pyhf (~10 s a 1Lbb patch on a fast core, ~35 s on a
#: slow one): enough for a real 1Lbb task on each worker; the whole sample is for the slow tests.
LBB_FEW = LBB_SAMPLE[:2]
#: The interpolation codes of the 2021 study (also pyhf's defaults).
CODE4 = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
#: Agreement asked of every executor on the numpy backend.
TOLERANCE = 1e-6
#: The compiled fast path (jax) against plain pyhf: the agreement the README states for it.
FAST_PATH_TOLERANCE = 1e-4
_REFERENCE_CACHE: dict = {}


#: 3L-eRJR points where MINUIT (through pyhf, strategy 2) has converged (of 66; it fails on most),
#: with allowed and excluded CLs. Which of them it converges on depends on the machine's floating
#: point (its CPU's vector instructions and BLAS kernels): on the slower kind of machine the first
#: two, on the faster kind the last two. Tests take the first where it converges here; the slower
#: machine's come first, because a failing MINUIT fit costs 20-40 s there.
ERJR_MINUIT_CANDIDATES = ["ERJR_100p0_40p0", "ERJR_110p0_30p0", "ERJR_150p0_60p0", "ERJR_100p0_20p0"]
#: 3L-eRJR points where MINUIT has failed: the first on the slower kind of machine, the second on
#: the faster kind.
ERJR_MINUIT_FAILS = ["ERJR_100p0_20p0", "ERJR_250p0_1p0", "ERJR_100p0_30p0"]


def patched_workspace(pallet, patch):
    """The ``pyhf.Workspace`` of ``patch`` applied to the whole background, as ``PatchSet.apply``
    gives it, without validating every patched copy again (it changes no number; the model itself
    is validated by ``Workspace.model``)."""
    import pyhf

    patched = pyhf.patchset.Patch({"metadata": {"name": patch.name, "values": list(patch.values)},
                                   "patch": patch.operations}).apply(pallet.workspace)
    return pyhf.Workspace(patched, validate=False)


def minuit_optimizer(strategy: int = 2):
    """pyhf's MINUIT optimizer (through iminuit) as the tests' arbiter runs it: tolerance 1e-4,
    ``strategy`` 2 unless told (1, MINUIT's default, when only the minimum is wanted)."""
    import pyhf

    return pyhf.optimize.minuit_optimizer(tolerance=1e-4, strategy=strategy)


def serial_pyhf(pallet, names=None, poi_test=1.0, test_stat="qtilde", modifier_settings=None, optimizer="scipy",
                strategy=2) -> dict:
    """Plain pyhf, one patch after another, on numpy: ``{name: (CLs_obs, [CLs_exp x5])}``.

    ``optimizer="minuit"`` fits with MINUIT (``pyhf.optimize.minuit_optimizer``, ``strategy`` 2 unless
    told), the field's standard minimizer: the arbiter where pyhf's default SLSQP stalls. A patch
    MINUIT cannot fit gives ``None``. Strategy 1 (MINUIT's default) halves the time of a model with
    a hundred parameters and moves its CLs by ~2e-7 there.

    Each patch is applied to the whole background workspace, as ``pyhf.PatchSet.apply`` (and
    ``jsonpatch BkgOnly.json patch.json | pyhf cls``) applies it. Cached for the session by pallet
    source and name, patch and settings: a pallet built in a test needs a source of its own.
    """
    import logging

    import pyhf

    if optimizer == "minuit":
        logging.getLogger("pyhf.optimize.mixins").setLevel(logging.CRITICAL)  # its failures print the fit state
        pyhf.set_backend("numpy", minuit_optimizer(strategy))
    else:
        pyhf.set_backend("numpy")
    modifier_settings = modifier_settings or CODE4
    validated = False
    selected = [p for p in pallet.patches if names is None or p.name in names]
    results = {}
    for patch in selected:
        key = (pallet.source, getattr(pallet, "name", None), patch.name, poi_test, test_stat,
               json.dumps(modifier_settings, sort_keys=True), optimizer,
               strategy if optimizer == "minuit" else None)
        if key not in _REFERENCE_CACHE:

            def reference(patch=patch):
                nonlocal validated
                if not validated:
                    pyhf.Workspace(pallet.workspace)  # the background, against pyhf's schema
                    validated = True
                workspace = patched_workspace(pallet, patch)
                model = workspace.model(modifier_settings=modifier_settings)
                try:
                    observed, expected = pyhf.infer.hypotest(
                        poi_test, workspace.data(model), model, test_stat=test_stat, return_expected_set=True
                    )
                except pyhf.exceptions.FailedMinimization:
                    if optimizer == "scipy":
                        raise
                    return None
                return float(observed), [float(value) for value in expected]

            _REFERENCE_CACHE[key] = _shared_reference(key, reference)
        results[patch.name] = _REFERENCE_CACHE[key]
    if optimizer != "scipy":
        pyhf.set_backend("numpy", pyhf.optimize.scipy_optimizer())
    return results


def _shared_reference(key: tuple, compute):
    """``compute()``, or what another test process of this run computed for ``key``.

    The folder is the run's (``$PYHF_DIST_TEST_REFERENCES``, made by ``conftest.py``); a lock per
    key makes a process that needs a reference being computed wait for it instead of fitting it
    again. Without the folder, ``compute()``.
    """
    folder = os.environ.get("PYHF_DIST_TEST_REFERENCES")
    if not folder or not os.path.isdir(folder):
        return compute()
    import hashlib

    from filelock import FileLock

    path = Path(folder) / hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()
    with FileLock(f"{path}.lock"):
        if path.exists():
            value = json.loads(path.read_text())
            return None if value is None else (value[0], value[1])
        value = compute()
        path.write_text(json.dumps(value))
        return value


def fitted_together(records) -> list[list[str]]:
    """The names of records fitted together in one loop, by group: those share their start and end
    times (a worker stamps a pack's fits together with one pair)."""
    groups: dict = {}
    for record in records:
        groups.setdefault((record.started, record.finished), []).append(record.name)
    return list(groups.values())


def assert_matches_reference(records, reference: dict, tolerance: float = TOLERANCE) -> None:
    """Every reference patch appears exactly once, ok, with CLs_obs and all CLs_exp within tolerance.

    ``records`` is a ScanResult, a list of FitRecords, or a list of record dicts (e.g. read from JSON).
    """
    rows = [r if isinstance(r, dict) else r.to_dict() for r in records]
    names = [row["name"] for row in rows]
    assert sorted(names) == sorted(reference), f"patches differ: {sorted(set(names) ^ set(reference))}"
    worst = 0.0
    for row in rows:
        assert row["status"] == "ok", f"{row['name']} failed: {row.get('error')}"
        observed, expected = reference[row["name"]]
        assert len(row["CLs_exp"]) == 5
        differences = [_difference(row["CLs_obs"], observed)]
        differences += [_difference(a, b) for a, b in zip(row["CLs_exp"], expected)]
        worst = max(worst, *differences)
        assert max(differences) <= tolerance, (
            f"{row['name']}: CLs differ from serial pyhf by {max(differences):.3g} > {tolerance}"
        )
    return worst


def _difference(value, reference) -> float:
    """|value - reference|, where an undefined CLs (NaN; null in JSON) agrees only with another.

    Plain pyhf returns NaN for CLs = 0/0 (seen on three 3L-eRJR patches): the fit succeeded but
    both tail probabilities underflow. A NaN on one side only is an infinite difference.
    """
    undefined = [x is None or math.isnan(x) for x in (value, reference)]
    if all(undefined):
        return 0.0
    if any(undefined):
        return math.inf
    return abs(value - reference)


def slurm_partition() -> str | None:
    """The name of an up Slurm partition on this machine, or ``None`` when no Slurm answers."""
    import shutil
    import subprocess

    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.split("\n"):
        parts = line.split()
        if out.returncode == 0 and len(parts) == 2 and parts[1] == "up":
            return parts[0].rstrip("*")
    return None


def command_line(process) -> str:
    """A process's command line; empty for one that has just ended (a zombie not yet reaped, e.g.
    a short-lived helper or a worker being stopped)."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def parsl_processes() -> set[int]:
    """Parsl interchange and worker-pool processes now running on this machine (Parsl renames
    them, e.g. "parsl: HTEX interchange"), started by this pytest worker: under pytest-xdist the
    other worker's tests start Parsl too, and its processes would count as left behind here.
    They inherit the worker's ``PYTEST_XDIST_WORKER``, also once orphaned."""
    import psutil

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    found = set()
    for process in psutil.process_iter(["cmdline"]):
        try:
            command = " ".join(process.info["cmdline"] or [])
            if not (command.startswith("parsl:") or "process_worker_pool" in command or "interchange" in command):
                continue
        except psutil.Error:
            continue
        try:
            if worker is not None and process.environ().get("PYTEST_XDIST_WORKER", worker) != worker:
                continue
        except psutil.AccessDenied:  # unreadable: counted, so that a leftover is never missed
            pass
        except psutil.Error:
            continue
        found.add(process.pid)
    return found


class TaskSizes:
    """Mixin for an executor under test: notes how many patches each task it is given holds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    def submit(self, task):
        self.sizes.append(len(task["tasks"]) if task.get("kind") == "pack" else 1)
        return super().submit(task)


# ------------------------------------------------------------- scans run as users run them

#: The 3L-eRJR patches the entry-point tests scan.
NAMES = ["ERJR_100p0_20p0", "ERJR_200p0_50p0", "ERJR_350p0_100p0"]
#: Generous for a loaded 2-core machine; a hang is what this bounds.
LIMIT = 240


def scan_code(erjr_dir: Path, output: Path, executor: str = "local") -> str:
    """The user's code: no main guard, no functions, as it would be pasted."""
    return textwrap.dedent(f"""\
        import pyhf_dist
        results = pyhf_dist.map_fits({str(erjr_dir)!r}, executor={executor!r}, workers=2,
                                     backend="numpy", patches={NAMES!r})
        results.to_json({str(output)!r})
        print("fitted", len(results))
    """)


def last_json_line(code: str, *arguments, cache) -> dict:
    """The JSON line ``code`` prints last, run with ``arguments`` in a fresh ``python`` process whose
    pyhf-dist cache is the folder ``cache``."""
    completed = subprocess.run(
        [sys.executable, "-c", code, *map(str, arguments)], env=dict(os.environ, PYHF_DIST_CACHE=str(cache)),
        capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(command: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=LIMIT)


def assert_clean_run(run_: subprocess.CompletedProcess, output: Path, erjr_pallet) -> None:
    assert run_.returncode == 0, run_.stderr
    noise = [marker for marker in ("Traceback", "Exception ignored", "leaked semaphore", "resource_tracker")
             if marker in run_.stderr]
    assert not noise, f"{noise} in stderr:\n{run_.stderr}"
    assert "fitted 3" in run_.stdout
    assert_matches_reference(json.loads(output.read_text())["results"], serial_pyhf(erjr_pallet, NAMES))


# ---------------------------------------------------------------------- small models

NORMSYS_CODES = ("code1", "code4")
HISTOSYS_CODES = ("code0", "code2", "code4p")


def _histosys(nominal, up, down):
    return {"hi_data": [n * up for n in nominal], "lo_data": [n * down for n in nominal]}


def small_workspace() -> dict:
    """Two channels (listed unsorted, of different widths) exercising every modifier type.

    Covers: normfactor (POI and a shared background one with configured bounds), lumi with its
    measurement configuration, normsys and histosys (one name as both: a single parameter),
    staterror pooled over samples (one bin without uncertainty: fixed), shapesys (one bin without
    yield: fixed), shapefactor, a fixed normsys, samples listed unsorted.
    """
    sr_signal = [5.0, 3.0]
    sr_bkg1 = [50.0, 30.0]
    sr_bkg2 = [20.0, 10.0]
    cr_bkg1 = [100.0, 80.0, 60.0]
    cr_bkg2 = [30.0, 20.0, 0.0]
    cr_signal = [0.5, 0.3, 0.1]
    channels = [
        {
            "name": "SR",
            "samples": [
                {
                    "name": "signal",
                    "data": sr_signal,
                    "modifiers": [
                        {"name": "mu", "type": "normfactor", "data": None},
                        {"name": "lumi", "type": "lumi", "data": None},
                        {"name": "norm_a", "type": "normsys", "data": {"hi": 1.1, "lo": 0.85}},
                        {"name": "shape_b", "type": "histosys", "data": _histosys(sr_signal, 1.12, 0.9)},
                        {"name": "stat_SR", "type": "staterror", "data": [0.5, 0.4]},
                    ],
                },
                {
                    "name": "bkg2",
                    "data": sr_bkg2,
                    "modifiers": [
                        {"name": "bkg2_shape_SR", "type": "shapesys", "data": [2.0, 1.5]},
                        {"name": "mu_bkg", "type": "normfactor", "data": None},
                        {"name": "norm_fixed", "type": "normsys", "data": {"hi": 1.2, "lo": 0.8}},
                    ],
                },
                {
                    "name": "bkg1",
                    "data": sr_bkg1,
                    "modifiers": [
                        {"name": "norm_a", "type": "normsys", "data": {"hi": 1.05, "lo": 0.93}},
                        {"name": "shape_b", "type": "histosys", "data": _histosys(sr_bkg1, 1.04, 0.95)},
                        {"name": "shape_b", "type": "normsys", "data": {"hi": 1.03, "lo": 0.96}},
                        {"name": "stat_SR", "type": "staterror", "data": [3.0, 2.5]},
                        {"name": "lumi", "type": "lumi", "data": None},
                    ],
                },
            ],
        },
        {
            "name": "CR",
            "samples": [
                {
                    "name": "bkg1",
                    "data": cr_bkg1,
                    "modifiers": [
                        {"name": "mu_bkg", "type": "normfactor", "data": None},
                        {"name": "stat_CR", "type": "staterror", "data": [5.0, 4.0, 0.0]},
                        {"name": "shape_c", "type": "histosys", "data": _histosys(cr_bkg1, 1.08, 0.97)},
                        {"name": "norm_a", "type": "normsys", "data": {"hi": 1.02, "lo": 0.99}},
                    ],
                },
                {
                    "name": "bkg2",
                    "data": cr_bkg2,
                    "modifiers": [
                        {"name": "stat_CR", "type": "staterror", "data": [2.0, 1.5, 0.0]},
                        {"name": "sf_CR", "type": "shapefactor", "data": None},
                        {"name": "cr_shapesys", "type": "shapesys", "data": [3.0, 2.0, 1.0]},
                    ],
                },
                {
                    "name": "signal",
                    "data": cr_signal,
                    "modifiers": [
                        {"name": "mu", "type": "normfactor", "data": None},
                        {"name": "lumi", "type": "lumi", "data": None},
                    ],
                },
            ],
        },
    ]
    return {
        "channels": channels,
        "observations": [{"name": "SR", "data": [57.0, 41.0]}, {"name": "CR", "data": [131.0, 99.0, 62.0]}],
        "measurements": [
            {
                "name": "meas",
                "config": {
                    "poi": "mu",
                    "parameters": [
                        {"name": "lumi", "auxdata": [1.0], "sigmas": [0.02], "bounds": [[0.9, 1.1]], "inits": [1.0]},
                        {"name": "mu_bkg", "bounds": [[0.1, 5.0]]},
                        {"name": "norm_fixed", "fixed": True},
                    ],
                },
            }
        ],
        "version": "1.0.0",
    }


def interp_settings(normsys: str, histosys: str) -> dict:
    """Modifier settings with these normsys and histosys interpolation codes."""
    return {"normsys": {"interpcode": normsys}, "histosys": {"interpcode": histosys}}


def random_points(arrays, count: int, seed: int) -> list:
    """The initial point and ``count`` random points inside the bounds (every interpolation branch)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(arrays.init)
    points = [arrays.init.copy()]
    for _ in range(count):
        # Nuisance parameters around 0 reach |alpha| > 1 (every interpolation branch).
        shifted = np.where(arrays.init == 0, rng.uniform(-2.5, 2.5, n), arrays.init * rng.uniform(0.6, 1.4, n))
        points.append(np.clip(shifted, arrays.lower, arrays.upper))
    return points


def tiny_pallet():
    """Two bins, one shapesys background, two signal points: fits take a few milliseconds."""
    from pyhf_dist.pallet import Pallet, Patch

    workspace = {
        "channels": [{"name": "SR", "samples": [{"name": "bkg", "data": [50.0, 52.0], "modifiers": [
            {"name": "uncorr_bkguncrt", "type": "shapesys", "data": [3.0, 7.0]}]}]}],
        "observations": [{"name": "SR", "data": [51.0, 48.0]}],
        "measurements": [{"name": "m", "config": {"poi": "mu", "parameters": []}}],
        "version": "1.0.0",
    }
    patches = []
    for m1, signal in ((100, [12.0, 11.0]), (200, [6.0, 5.0])):
        operations = [{"op": "add", "path": "/channels/0/samples/1", "value": {
            "name": "signal", "data": signal, "modifiers": [{"name": "mu", "type": "normfactor", "data": None}]}}]
        patches.append(Patch(f"tiny_{m1}_0", (m1, 0), operations))
    return Pallet(workspace, patches, ["m1", "m2"], "tiny", "")


def serial_pyhf_toys(model, data, settings, samples: bool = True):
    """Plain pyhf, seeded like a serial user would: hypotest's CLs, and (unless ``samples`` is
    False, which halves the cost) the toys' statistics from its ToyCalculator."""
    import numpy as np
    import pyhf

    pyhf.set_backend("numpy")
    drawn = {}
    if samples:
        np.random.seed(settings.seed)
        calculator = pyhf.infer.calculators.ToyCalculator(
            data, model, test_stat=settings.test_stat, ntoys=settings.ntoys, track_progress=False
        )
        sb, b = calculator.distributions(settings.poi_test)
        drawn = {"sb": np.asarray(sb.samples), "b": np.asarray(b.samples)}
    np.random.seed(settings.seed)
    observed, expected = pyhf.infer.hypotest(
        settings.poi_test, data, model, test_stat=settings.test_stat, calctype="toybased",
        ntoys=settings.ntoys, track_progress=False, return_expected_set=True,
    )
    return {**drawn, "CLs_obs": float(observed), "CLs_exp": [float(value) for value in expected]}
