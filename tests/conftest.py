"""Shared fixtures: the published pallets, and plain serial pyhf as the reference.

The pallets are read from ``$PYHF_DIST_DATA`` or from ``../shared/data`` beside the repository.
The reference is computed here, in the test session, with nothing but pyhf (each patch applied
to the whole workspace as ``pyhf.PatchSet`` applies it, then ``Workspace.model`` + ``infer.hypotest``
on the numpy backend), once per patch and settings, and shared by every test.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

# The reference runs with one BLAS thread, like every worker: threaded OpenBLAS sums in another
# order and moves CLs by ~1e-5 on 1Lbb. Set before anything imports numpy.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
# A cache of this session only (compiled likelihoods, checks passed), inherited by every worker and
# subprocess: each session runs the checks itself, as on a fresh machine, whatever ~/.cache holds.
if "PYHF_DIST_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PYHF_DIST_CACHE"] = tempfile.mkdtemp(prefix="pyhf-dist-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PYHF_DIST_CACHE"], ignore_errors=True)

import pytest  # noqa: E402

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
#: The interpolation codes of the 2021 study (also pyhf's defaults).
CODE4 = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
#: Agreement asked of every executor on the numpy backend.
TOLERANCE = 1e-6
#: The compiled fast path (jax) against plain pyhf: the agreement the README states for it.
FAST_PATH_TOLERANCE = 1e-4


@pytest.fixture
def numpy_backend():
    """Plain pyhf on numpy is the reference; leave pyhf's backend as found."""
    import pyhf

    previous = pyhf.tensorlib.name
    pyhf.set_backend("numpy")
    yield
    if pyhf.tensorlib.name != previous:
        pyhf.set_backend(previous)


@pytest.fixture
def pyhf_percentile_fix(monkeypatch):
    """Let pyhf 0.7.6's own ToyCalculator.expected_pvalues run on numpy >= 2.4.

    pyhf calls ``np.percentile(..., interpolation="linear")``; numpy 2.4 removed that keyword in
    favour of ``method`` (same meaning). The reference needs pyhf's function, so it is given the
    renamed keyword; pyhf_dist itself never calls it.
    """
    from pyhf.tensor.numpy_backend import numpy_backend

    def percentile(self, tensor_in, q, axis=None, interpolation="linear"):
        import numpy as np

        return np.percentile(tensor_in, q, axis=axis, method=interpolation)

    monkeypatch.setattr(numpy_backend, "percentile", percentile)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"published pallet not found at {path}: set PYHF_DIST_DATA")
    return path


@pytest.fixture(scope="session")
def erjr_dir() -> Path:
    return _require(ERJR_DIR)


@pytest.fixture(scope="session")
def lbb_tarball() -> Path:
    return _require(LBB_TARBALL)


@pytest.fixture(scope="session")
def stau_tarball() -> Path:
    return _require(STAU_TARBALL)


@pytest.fixture(scope="session")
def erjr_pallet(erjr_dir):
    import pyhf_dist

    return pyhf_dist.load_pallet(erjr_dir)


@pytest.fixture(scope="session")
def lbb_pallet(lbb_tarball):
    import pyhf_dist

    return pyhf_dist.load_pallet(lbb_tarball)


_REFERENCE_CACHE: dict = {}


def serial_pyhf(pallet, names=None, poi_test=1.0, test_stat="qtilde", modifier_settings=None, optimizer="scipy") -> dict:
    """Plain pyhf, one patch after another, on numpy: ``{name: (CLs_obs, [CLs_exp x5])}``.

    ``optimizer="minuit"`` fits with MINUIT (``pyhf.optimize.minuit_optimizer``, strategy 2), the
    field's standard minimizer: the arbiter where pyhf's default SLSQP stalls. A patch MINUIT
    cannot fit gives ``None``.

    Each patch is applied to the whole background workspace, as ``pyhf.PatchSet.apply`` (and
    ``jsonpatch BkgOnly.json patch.json | pyhf cls``) applies it. Cached for the session by pallet
    source and name, patch and settings: a pallet built in a test needs a source of its own.
    """
    import logging

    import pyhf

    if optimizer == "minuit":
        logging.getLogger("pyhf.optimize.mixins").setLevel(logging.CRITICAL)  # its failures print the fit state
        pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-4, strategy=2))
    else:
        pyhf.set_backend("numpy")
    modifier_settings = modifier_settings or CODE4
    validated = False
    selected = [p for p in pallet.patches if names is None or p.name in names]
    results = {}
    for patch in selected:
        key = (pallet.source, getattr(pallet, "name", None), patch.name, poi_test, test_stat,
               json.dumps(modifier_settings, sort_keys=True), optimizer)
        if key not in _REFERENCE_CACHE:
            if not validated:
                pyhf.Workspace(pallet.workspace)  # the background, against pyhf's schema
                validated = True
            # What PatchSet.apply returns, without validating every patched copy again (it changes
            # no number; the model itself is validated by Workspace.model).
            patched = pyhf.patchset.Patch({"metadata": {"name": patch.name, "values": list(patch.values)},
                                           "patch": patch.operations}).apply(pallet.workspace)
            workspace = pyhf.Workspace(patched, validate=False)
            model = workspace.model(modifier_settings=modifier_settings)
            try:
                observed, expected = pyhf.infer.hypotest(
                    poi_test, workspace.data(model), model, test_stat=test_stat, return_expected_set=True
                )
            except pyhf.exceptions.FailedMinimization:
                if optimizer == "scipy":
                    raise
                _REFERENCE_CACHE[key] = None
            else:
                _REFERENCE_CACHE[key] = (float(observed), [float(value) for value in expected])
        results[patch.name] = _REFERENCE_CACHE[key]
    if optimizer != "scipy":
        pyhf.set_backend("numpy", pyhf.optimize.scipy_optimizer())
    return results


@pytest.fixture(scope="session")
def erjr_reference(erjr_pallet):
    return serial_pyhf(erjr_pallet)


@pytest.fixture(scope="session")
def lbb_reference(lbb_pallet):
    return serial_pyhf(lbb_pallet, LBB_SAMPLE)


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


def parsl_processes() -> set[int]:
    """Parsl interchange and worker-pool processes now running on this machine (Parsl renames
    them, e.g. "parsl: HTEX interchange")."""
    import psutil

    found = set()
    for process in psutil.process_iter(["cmdline"]):
        try:
            command = " ".join(process.info["cmdline"] or [])
        except psutil.Error:
            continue
        if command.startswith("parsl:") or "process_worker_pool" in command or "interchange" in command:
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
