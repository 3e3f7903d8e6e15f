"""Plain pyhf, the reference: its model of a patched workspace, its hypotest, its upper limits.

What the fast path does not cover is fitted here exactly as serial pyhf fits it, on numpy
(:func:`use_numpy`): :func:`build_model` applies the patch to the whole workspace and builds
pyhf's model, :func:`hypotest` and :func:`upper_limit` call pyhf's own functions.

Upper limits are those of ``pyhf.infer.intervals.upper_limits.upper_limit`` called serially with
the same arguments: root-finding (``scan=None``, pyhf's TOMS 748 search between the POI bounds)
by default, or interpolation on the grid ``numpy.linspace(start, stop, points)`` when the
settings give ``upper_limit_scan=(start, stop, points)``. The compiled fast path
(:mod:`pyhf_dist.runtime.fast.limits`) runs the same two searches, :func:`toms748_scan` and
:func:`grid_scan`, pyhf 0.7.6's algorithms with the hypotest as an argument: the same
tolerances, bounds, bracket extension, choice of brackets for the expected band and
interpolation, so the same limits come out of CLs values that agree with pyhf's.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = [
    "use_numpy", "build_model", "pyhf_model", "workspace_digest", "hypotest", "upper_limit", "scan_points",
    "toms748_scan", "grid_scan",
    "ATOL", "RTOL",
]

#: pyhf's tolerances of the TOMS 748 search (``toms748_scan``'s defaults, used by ``upper_limit``).
ATOL = 2e-12
RTOL = 1e-4
#: Halvings of a lower bound that does not bracket the level before giving up (pyhf halves for
#: ever, and from a lower bound of 0 never gets anywhere).
_MAX_HALVINGS = 64


def use_numpy(optimizer: str = "scipy") -> None:
    """Plain pyhf on numpy with ``optimizer`` (``"scipy"``, pyhf's default, or ``"minuit"``)."""
    # Plain pyhf always runs on numpy, the reference: "jax" names the compiled fast path, and what
    # it does not cover is fitted exactly as serial pyhf would fit it. (pyhf on its jax backend
    # stops its fits at different points on stiff likelihoods such as 3L-eRJR and gives CLs that
    # differ from numpy's by up to 4e-4.)
    import logging

    import pyhf

    # A fit the minimizer fails becomes a failed record that says so; pyhf would also log the whole
    # fit state as an error, with a traceback (SLSQP's result, or MINUIT's table of every parameter
    # and its covariance), on the standard error of every worker.
    logging.getLogger("pyhf.optimize.mixins").setLevel(logging.CRITICAL)
    if pyhf.tensorlib.name != "numpy" or pyhf.optimizer.name != optimizer:
        if optimizer == "minuit":
            # MIGRAD with strategy 2, as physicists run MINUIT.
            pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-4, strategy=2))
        else:
            pyhf.set_backend("numpy", pyhf.optimize.scipy_optimizer())


def build_model(state, patch_operations: list):
    """The patched model and its observed data, built exactly as plain pyhf builds them.

    The patch applies to the whole workspace, as ``pyhf.PatchSet.apply`` and
    ``jsonpatch BkgOnly.json patch.json | pyhf cls`` apply it: it may change channels,
    observations and the measurement (POI, parameter bounds, inits, fixed parameters), not only
    the ``{"channels", "parameters"}`` that ``Workspace.model(patches=...)`` patches.

    Validating a patched model against pyhf's schema takes most of its build (1Lbb: 1.3 s of
    1.7 s), more than drawing a chunk of toys: a model that passed is remembered on this machine
    (:mod:`pyhf_dist.cache`, by workspace, patch and versions), and later chunks and scans of the
    patch build it without validating it again.
    """
    import json

    import jsonpatch

    from pyhf_dist import cache

    spec = jsonpatch.apply_patch(state.workspace_spec, patch_operations)
    described = json.dumps(patch_operations, sort_keys=True, separators=(",", ":"))
    key = cache.digest("model", workspace_digest(state), described, cache.versions("pyhf", "jsonschema"))
    validated = cache.recall("valid-model", key) == "valid"
    built = pyhf_model(spec, state.settings.modifier_settings, validate=not validated)
    if not validated:
        cache.remember("valid-model", key, "valid")
    return built


def workspace_digest(state) -> str:
    """A digest of the worker's background workspace (computed once per worker)."""
    found = state.memo.get("workspace_digest")
    if found is None:
        import json

        from pyhf_dist import cache

        text = json.dumps(state.workspace_spec, sort_keys=True, separators=(",", ":"))
        found = state.memo["workspace_digest"] = cache.digest("workspace", text)
    return found


def pyhf_model(spec: dict, modifier_settings: dict | None, *, validate: bool = True):
    """pyhf's own model of a (patched) workspace spec and its observed data:
    ``pyhf.Workspace(spec).model(modifier_settings=...)`` and ``Workspace.data(model)``.

    The workspace is not validated again (the client validated the background); the model is,
    unless ``validate`` is off.
    """
    import pyhf

    workspace = pyhf.Workspace(spec, validate=False)
    model = workspace.model(modifier_settings=modifier_settings, validate=validate)
    return model, workspace.data(model)


def hypotest(model, data, settings) -> dict:
    """Observed CLs and the expected CLs band (-2σ..+2σ) at ``settings.poi_test``."""
    import pyhf

    cls_obs, cls_exp = pyhf.infer.hypotest(
        settings.poi_test, data, model, test_stat=settings.test_stat, return_expected_set=True
    )
    return {"CLs_obs": float(cls_obs), "CLs_exp": [float(value) for value in cls_exp]}


#: ``hypotest(mu, observed) -> (CLs_obs, [CLs_exp x5])``; with ``observed=False`` only the expected
#: band is needed (``CLs_obs`` may then be ``None``).
Hypotest = Callable[[float, bool], tuple]


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
    (:func:`pyhf_dist.chunks.plan_chunks`).

    Returns:
        ``{"mu_up_obs": float, "mu_up_exp": [5 floats]}``.
    """
    from pyhf.infer.intervals.upper_limits import upper_limit as pyhf_upper_limit

    if settings.calctype != "asymptotics":
        raise NotImplementedError("toy-based upper limits are not supported; use calctype='asymptotics'")
    scan = scan_points(settings.upper_limit_scan)
    observed, expected = pyhf_upper_limit(data, model, scan, level=settings.level, test_stat=settings.test_stat)
    return {"mu_up_obs": float(observed), "mu_up_exp": [float(value) for value in expected]}


def toms748_scan(
    hypotest: Hypotest, bounds_low: float, bounds_up: float, level: float = 0.05, atol: float = ATOL, rtol: float = RTOL
) -> tuple[float, list[float]]:
    """pyhf's ``toms748_scan``: limits by root-finding, with ``hypotest`` giving the CLs values.

    Step for step pyhf 0.7.6's: CLs values are cached by POI value and shared by the six
    searches; the bounds are halved (lower) or doubled (upper) until every CLs lies above
    ``level`` at the lower and below it at the upper one; the observed limit is searched
    between them, each expected one in the tightest bracket among the values already computed.
    The one difference: the values first met in the searches of the expected limits are asked
    for without the observed CLs, which no later step reads.

    Args:
        hypotest: ``(mu, observed) -> (CLs_obs, [CLs_exp x5])`` (:data:`Hypotest`).
        bounds_low, bounds_up: The search interval (pyhf: the POI's bounds).
        level: The CLs value sought (0.05 for 95% CL).
        atol, rtol: TOMS 748 tolerances (pyhf's defaults).

    Returns:
        ``(observed, [expected x5])``.

    Raises:
        ValueError: ``CLs`` stays below ``level`` at the lower bound (where pyhf would halve
            it for ever), or TOMS 748 cannot search a bracket (as in pyhf).

    >>> from scipy.stats import norm
    >>> def hypotest(mu, observed=True):  # CLs falling like a Gaussian tail, band shifted by 0.2 per sigma
    ...     return norm.sf(mu), [norm.sf(mu - 0.2 * n) for n in (-2, -1, 0, 1, 2)]
    >>> observed, expected = toms748_scan(hypotest, 0.0, 5.0)
    >>> round(observed, 4), [round(e, 4) for e in expected]
    (1.6449, [1.2449, 1.4449, 1.6449, 1.8449, 2.0449])
    """
    import numpy as np
    from scipy.optimize import toms748

    cache: dict = {}

    def f_cached(poi, observed=True):
        if poi not in cache or (observed and cache[poi][0] is None):
            obs, expected = hypotest(poi, observed)
            cache[poi] = (None if obs is None else float(obs), [float(value) for value in expected])
        return cache[poi]

    def f(poi, level, limit=0):
        # limit 0: observed; 1..5: the expected band, -2σ..+2σ
        return f_cached(poi)[0] - level if limit == 0 else f_cached(poi, False)[1][limit - 1] - level

    def best_bracket(limit):
        ks = np.asarray(list(cache.keys()))
        vals = np.asarray(
            [value[0] - level if limit == 0 else value[1][limit - 1] - level for value in cache.values()]
        )
        pos = vals >= 0
        neg = vals < 0
        return ks[pos][np.argmin(vals[pos])], ks[neg][np.argmax(vals[neg])]

    lower_results = f_cached(bounds_low)
    halvings = 0
    while np.any(np.asarray([lower_results[0]] + lower_results[1]) < level):
        if bounds_low == 0 or halvings >= _MAX_HALVINGS:
            raise ValueError(
                f"CLs lies below {level} already at mu = {bounds_low}: no upper limit above it to search for"
            )
        bounds_low /= 2
        halvings += 1
        lower_results = f_cached(bounds_low)
    upper_results = f_cached(bounds_up)
    while np.any(np.asarray([upper_results[0]] + upper_results[1]) > level):
        bounds_up *= 2
        upper_results = f_cached(bounds_up)

    observed = toms748(f, bounds_low, bounds_up, args=(level, 0), k=2, xtol=atol, rtol=rtol)
    expected = [
        toms748(f, *best_bracket(index), args=(level, index), k=2, xtol=atol, rtol=rtol) for index in range(1, 6)
    ]
    return float(observed), [float(value) for value in expected]


def grid_scan(
    hypotests: Callable[[Sequence[float]], list], scan, level: float = 0.05
) -> tuple[float, list[float]]:
    """pyhf's ``linear_grid_scan``: limits interpolated on a grid of POI values.

    Args:
        hypotests: ``[mu, ...] -> [(CLs_obs, [CLs_exp x5]), ...]``: all grid points at once, so
            that an engine may fit them together.
        scan: The POI values, increasing (:func:`scan_points`).
        level: The CLs value sought.

    Returns:
        ``(observed, [expected x5])``: for each, ``numpy.interp(level, CLs[::-1], scan[::-1])``.

    >>> from scipy.stats import norm
    >>> observed, expected = grid_scan(lambda mus: [(norm.sf(m), [norm.sf(m)] * 5) for m in mus], [0, 1, 2, 3])
    >>> round(observed, 4)  # between mu = 1 (CLs 0.159) and mu = 2 (CLs 0.023)
    1.7995
    """
    import numpy as np

    scan = np.asarray(scan, dtype=float)
    results = hypotests([float(mu) for mu in scan])
    table = np.array([[float(observed), *(float(value) for value in expected)] for observed, expected in results]).T
    limits = [float(np.interp(level, row[::-1].tolist(), scan[::-1].tolist())) for row in table]
    return limits[0], limits[1:]
