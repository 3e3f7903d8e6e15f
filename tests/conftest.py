"""Shared fixtures: the published pallets, and plain serial pyhf as the reference.

The pallets are read from ``$PYHF_DIST_DATA`` or from ``../shared/data`` beside the repository.
The reference is computed in the test session, with nothing but pyhf (``helpers.serial_pyhf``),
once per patch and settings, and shared by every test. Tests import helpers from ``helpers``,
never from this file.
"""

from __future__ import annotations

import os
from pathlib import Path

# The reference runs with one BLAS thread, like every worker: threaded OpenBLAS sums in another
# order and moves CLs by ~1e-5 on 1Lbb. Set before anything imports numpy.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
# Folders of this run only, inherited by every test process (the suite runs on two, pytest-xdist),
# worker and subprocess, and removed at its end:
# - PYHF_DIST_CACHE, the cache (compiled likelihoods, checks passed): each run makes the checks
#   itself, as on a fresh machine, whatever ~/.cache holds;
# - PYHF_DIST_TEST_REFERENCES, plain pyhf's references (``helpers.serial_pyhf``): one takes plain
#   pyhf minutes, so it is computed once, by whichever process needs it first.
# Set here, before the test processes start.
for _name, _prefix in (("PYHF_DIST_CACHE", "pyhf-dist-test-cache-"), ("PYHF_DIST_TEST_REFERENCES", "pyhf-dist-test-references-")):
    if _name not in os.environ:
        import atexit
        import shutil
        import tempfile

        os.environ[_name] = tempfile.mkdtemp(prefix=_prefix)
        atexit.register(shutil.rmtree, os.environ[_name], ignore_errors=True)

import pytest  # noqa: E402

from helpers import ERJR_DIR, LBB_FEW, LBB_SAMPLE, LBB_TARBALL, STAU_TARBALL, serial_pyhf  # noqa: E402


#: Test files that start Parsl or Globus Compute worker pools or Slurm jobs: they run one after
#: another in one test process. Their checks look for pools left behind anywhere on the machine,
#: and the single-node Slurm has the machine's cores for one scan at a time.
EXCLUSIVE_FILES = {"test_funcx.py", "test_funcx_engines.py", "test_parsl.py", "test_slurm.py"}


def pytest_xdist_make_scheduler(config, log):
    """Test files go to the two test processes whole (their module fixtures are made once), the
    files of :data:`EXCLUSIVE_FILES` all to one."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "exclusive" if Path(path).name in EXCLUSIVE_FILES else path

    return ByFile(config, log)


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


@pytest.fixture(scope="session")
def stau_low_mass(stau_tarball):
    """stau's ``Region-lowMass`` pallet: 3 channels and 118 parameters, where plain pyhf's hypotest
    takes seconds and MINUIT's about a minute (strategy 2) on a slow core."""
    import pyhf_dist

    return pyhf_dist.load_pallet(stau_tarball, pallet="Region-lowMass")


@pytest.fixture(scope="session")
def erjr_reference(erjr_pallet):
    return serial_pyhf(erjr_pallet)


@pytest.fixture(scope="session")
def erjr_sample_names(erjr_pallet) -> list[str]:
    """Every third 3L-eRJR patch, 22 of 66 across the mass plane: what the tests of executors that
    run plain pyhf on their workers fit (the local executor's test fits all 66 once)."""
    return [patch.name for patch in erjr_pallet.patches[::3]]


@pytest.fixture(scope="session")
def erjr_sample_reference(erjr_pallet, erjr_sample_names):
    return serial_pyhf(erjr_pallet, erjr_sample_names)


@pytest.fixture(scope="session")
def lbb_reference(lbb_pallet):
    return serial_pyhf(lbb_pallet, LBB_SAMPLE)


@pytest.fixture(scope="session")
def lbb_few_reference(lbb_pallet):
    return serial_pyhf(lbb_pallet, LBB_FEW)


