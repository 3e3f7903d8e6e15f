"""Upper limits on the signal strength of one patch, with pyhf's ``upper_limit``.

A worker calls :func:`upper_limit` with the patched model; the numbers are those of
``pyhf.infer.intervals.upper_limits.upper_limit`` called serially with the same arguments:
root-finding (``scan=None``, pyhf's TOMS 748 search between the POI bounds) by default, or
interpolation on the grid ``numpy.linspace(start, stop, points)`` when the settings give
``upper_limit_scan=(start, stop, points)``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["upper_limit", "scan_points"]


def scan_points(upper_limit_scan: tuple | None):
    """The POI grid of an ``upper_limit_scan`` setting (``None``: root-finding).

    >>> scan_points((0, 2, 5)).tolist()
    [0.0, 0.5, 1.0, 1.5, 2.0]
    >>> scan_points(None) is None
    True
    """
    if upper_limit_scan is None:
        return None
    import numpy as np

    start, stop, points = upper_limit_scan
    return np.linspace(float(start), float(stop), int(points))


def upper_limit(model, data, settings) -> dict[str, Any]:
    """Observed and expected (-2σ..+2σ) upper limits on the POI at ``1 - settings.level`` CL.

    Asymptotic calculator only: toy-based limits would draw fresh toys at every POI value of the
    search, which does not split into chunks like one hypotest (and pyhf 0.7.6's serial toy
    hypotest fails on numpy >= 2.4, which dropped ``percentile(interpolation=)``, so there is no
    reference either); they are refused before the scan starts
    (:func:`pyhf_dist.calculations.plan_chunks`).

    Returns:
        ``{"mu_up_obs": float, "mu_up_exp": [5 floats]}``.
    """
    from pyhf.infer.intervals.upper_limits import upper_limit as pyhf_upper_limit

    if settings.calctype != "asymptotics":
        raise NotImplementedError("toy-based upper limits are not supported; use calctype='asymptotics'")
    scan = scan_points(settings.upper_limit_scan)
    observed, expected = pyhf_upper_limit(data, model, scan, level=settings.level, test_stat=settings.test_stat)
    return {"mu_up_obs": float(observed), "mu_up_exp": [float(value) for value in expected]}
