"""Upper limits per patch through the scan agree with serial pyhf's ``upper_limit``.

The reference is plain pyhf on numpy, one patch after another:
``pyhf.infer.intervals.upper_limits.upper_limit(data, model, scan, level=0.05, test_stat="qtilde")``
with the same scan (``None``: root-finding; or the same ``numpy.linspace`` grid).

Costs on a quiet core: an upper limit by root-finding is ~20-40 hypotests (3L-eRJR: 2-6 s per
patch; 1Lbb: minutes), so the full 3L-eRJR set and the 1Lbb patches are marked ``slow``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import pyhf_dist
from pyhf_dist.limits import scan_points

from conftest import CODE4

#: The agreement the issue asks for; the worker calls the same pyhf function, so it is usually exact.
RELATIVE = 1e-3

#: 3L-eRJR points across the plane (light, heavy, compressed), for the quick test.
ERJR_SAMPLE = ["ERJR_100p0_20p0", "ERJR_350p0_250p0", "ERJR_500p0_0p0"]
#: 1Lbb points inside and just outside the observed exclusion, and the grid their limits lie in.
LBB_LIMIT_SAMPLE = ["C1N2_Wh_hbb_650_50", "C1N2_Wh_hbb_750_100"]
LBB_SCAN = (0.0, 2.0, 5)

_CACHE: dict = {}


def serial_upper_limits(pallet, names, scan=None) -> dict:
    """``{name: (mu_up_obs, [mu_up_exp x5])}`` from plain serial pyhf (cached for the session).

    Where serial pyhf itself raises (a few 3L-eRJR patches: a NaN CLs stops the root-finding, or
    an init value outside its bounds), the entry is the exception: the scan must fail that patch
    with the same message.
    """
    import pyhf

    pyhf.set_backend("numpy")
    workspace = pyhf.Workspace(pallet.workspace)
    results = {}
    for patch in (p for p in pallet.patches if p.name in names):
        key = (pallet.source, patch.name, scan)
        if key not in _CACHE:
            try:
                model = workspace.model(patches=[patch.operations], modifier_settings=CODE4)
                observed, expected = pyhf.infer.intervals.upper_limits.upper_limit(
                    workspace.data(model), model, scan_points(scan), level=0.05, test_stat="qtilde"
                )
                _CACHE[key] = (float(observed), [float(value) for value in expected])
            except Exception as error:  # the reference outcome of this patch
                _CACHE[key] = error
        results[patch.name] = _CACHE[key]
    return results


def _masked(message: str) -> str:
    return re.sub(r"\d[\d.eE+-]*", "#", message.strip())


def assert_limits_match(result, reference) -> float:
    assert sorted(r.name for r in result) == sorted(reference)
    worst = 0.0
    for record in result:
        if isinstance(reference[record.name], Exception):
            # Same failure; the numbers in the message (where the root-finding met a NaN) may
            # differ in the 5th digit: the workers run single-threaded BLAS, this process may not.
            error = reference[record.name]
            assert not record.ok and record.mu_up_obs is None
            assert _masked(record.error) == _masked(f"{type(error).__name__}: {error}")
            continue
        assert record.ok, f"{record.name}: {record.error}"
        assert record.CLs_obs is None and record.CLs_exp is None
        assert len(record.mu_up_exp) == 5
        observed, expected = reference[record.name]
        for ours, theirs in zip([record.mu_up_obs, *record.mu_up_exp], [observed, *expected]):
            assert math.isfinite(ours)
            relative = abs(ours - theirs) / abs(theirs)
            worst = max(worst, relative)
            assert relative <= RELATIVE, f"{record.name}: {ours} vs serial pyhf {theirs}"
    print(f"{len(reference)} patches: worst relative difference to serial pyhf {worst:.3g}")
    return worst


def test_demo_grid_scan_matches_serial_pyhf():
    pallet = pyhf_dist.demo_pallet()
    names = ["demo_600_300", "demo_700_150", "demo_800_0"]
    scan = (0.0, 3.0, 7)
    result = pyhf_dist.map_fits(pallet, executor="sequential", patches=names, backend="numpy",
                                calculation="upper_limit", upper_limit_scan=scan)
    assert_limits_match(result, serial_upper_limits(pallet, names, scan))
    # Limits are ordered like the band, and the scan's summary counts mu_up < 1 as excluded.
    for record in result:
        assert record.mu_up_exp == sorted(record.mu_up_exp)
    assert "excluded (mu_up_obs < 1)" in result.summary()
    assert result.metadata["settings"]["upper_limit_scan"] == list(scan)


def test_erjr_sample_root_finding_matches_serial_pyhf(erjr_pallet):
    result = pyhf_dist.map_fits(erjr_pallet, executor="local", workers=2, patches=ERJR_SAMPLE, backend="numpy",
                                calculation="upper_limit")
    assert_limits_match(result, serial_upper_limits(erjr_pallet, ERJR_SAMPLE))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_erjr_all_patches_root_finding_match_serial_pyhf(erjr_pallet):
    names = [patch.name for patch in erjr_pallet.patches]
    result = pyhf_dist.map_fits(erjr_pallet, executor="local", workers=2, backend="numpy",
                                calculation="upper_limit")
    assert len(result) == 66
    reference = serial_upper_limits(erjr_pallet, names)
    assert_limits_match(result, reference)
    # Most patches have a limit; those serial pyhf cannot do (12 of 66 with pyhf 0.7.6: NaN CLs in
    # the root-finding, or an init value outside its bounds) are failed records, not a crash.
    assert sum(isinstance(value, Exception) for value in reference.values()) <= 15


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_lbb_sample_grid_scan_matches_serial_pyhf(lbb_pallet):
    result = pyhf_dist.map_fits(lbb_pallet, executor="local", workers=2, patches=LBB_LIMIT_SAMPLE,
                                backend="numpy", calculation="upper_limit", upper_limit_scan=LBB_SCAN)
    assert_limits_match(result, serial_upper_limits(lbb_pallet, LBB_LIMIT_SAMPLE, LBB_SCAN))
    # The published exclusion: 650/50 is excluded, 750/100 just is not (observed reach ~740 GeV).
    assert result["C1N2_Wh_hbb_650_50"].mu_up_obs < 1 < result["C1N2_Wh_hbb_750_100"].mu_up_obs


def test_scan_points_are_the_linspace_grid():
    assert np.array_equal(scan_points((0, 5, 11)), np.linspace(0, 5, 11))
