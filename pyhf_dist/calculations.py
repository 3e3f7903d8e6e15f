"""The statistical calculations a task performs on a worker, and how a patch's chunks combine.

A patch is normally one task. Pseudo-experiments of one patch can be split into several chunk
tasks (:func:`plan_chunks`); the scan merges their partial results into the patch's record with
:func:`merge_chunks`.
"""

from __future__ import annotations

from typing import Any

from pyhf_dist.exceptions import FastPathRequired, first_line

__all__ = ["compute", "build_model", "hypotest", "plan_chunks", "merge_chunks", "use_numpy"]


def use_numpy(optimizer: str = "scipy") -> None:
    """Plain pyhf on numpy with ``optimizer`` (``"scipy"``, pyhf's default, or ``"minuit"``)."""
    # Plain pyhf always runs on numpy, the reference: "jax" names the compiled fast path, and what
    # it does not cover is fitted exactly as serial pyhf would fit it. (pyhf on its jax backend
    # stops its fits at different points on stiff likelihoods such as 3L-eRJR and gives CLs that
    # differ from numpy's by up to 4e-4.)
    import pyhf

    if pyhf.tensorlib.name != "numpy" or pyhf.optimizer.name != optimizer:
        if optimizer == "minuit":
            import logging

            # MIGRAD with strategy 2, as physicists run MINUIT. A fit MINUIT fails becomes a
            # failed record that says so; pyhf would also log the whole fit state (a table of
            # every parameter and its covariance) as an error.
            logging.getLogger("pyhf.optimize.mixins").setLevel(logging.CRITICAL)
            pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-4, strategy=2))
        else:
            pyhf.set_backend("numpy", pyhf.optimize.scipy_optimizer())


def build_model(state, patch_operations: list):
    """The patched model and its observed data, built exactly as plain pyhf builds them.

    The patch applies to the whole workspace, as ``pyhf.PatchSet.apply`` and
    ``jsonpatch BkgOnly.json patch.json | pyhf cls`` apply it: it may change channels,
    observations and the measurement (POI, parameter bounds, inits, fixed parameters), not only
    the ``{"channels", "parameters"}`` that ``Workspace.model(patches=...)`` patches.
    """
    import jsonpatch

    spec = jsonpatch.apply_patch(state.workspace_spec, patch_operations)
    return pyhf_model(spec, state.settings.modifier_settings)


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


def compute(state, task: dict) -> dict[str, Any]:
    """Run the calculation the scan's settings ask for on one task; returns the record's numbers.

    The numbers come with ``engine``: ``"fast"`` (the compiled fast path) or ``"pyhf"`` (plain pyhf
    on numpy), and, where the scan asked for the fast path and it declined, ``fallback_reason``.

    Raises:
        FastPathRequired: The fast path declined the patch and ``settings.require_fast`` is on.
    """
    settings = state.settings
    if task.get("kind") == "noop":  # measures an executor's own per-task cost (benchmarks)
        return {}
    reason = None
    if settings.fast_path:
        fast, reason = _fast(state, task)
        if fast is not None:
            return {**fast, "engine": "fast"}
        _check_fallback_allowed(settings, reason)
    use_numpy(settings.optimizer)
    model, data = build_model(state, task["patch"])
    if settings.calculation == "hypotest" and settings.calctype == "asymptotics":
        values = hypotest(model, data, settings)
    elif settings.calculation == "upper_limit":
        from pyhf_dist import limits

        values = limits.upper_limit(model, data, settings)
    else:
        from pyhf_dist import toys

        # One chunk of the patch's pseudo-experiments (all of them when the task is not split).
        chunk = task.get("chunk") or toys.split(settings.ntoys, 1)[0]
        key = toys.generating_key(_workspace_digest(state), task["patch"], settings)
        if settings.fast_toys:
            values, reason = _fast_toys(state, task, model, data, chunk, key)
            if values is not None:
                return values
            _check_fallback_allowed(settings, reason)
        values = toys.run_chunk(model, data, settings, chunk, key)
    values["engine"] = "pyhf"
    if reason is not None:
        values["fallback_reason"] = reason
    return values


def _check_fallback_allowed(settings, reason: str | None) -> None:
    """Plain pyhf may fit a patch the fast path declined, unless the scan requires the fast path."""
    if settings.require_fast:
        raise FastPathRequired(f"the fast path declined this patch ({reason}) and require_fast (--require-fast) is on")


def _fast_toys(state, task: dict, model, data, chunk: dict, key: str) -> tuple[dict | None, str | None]:
    """``(chunk numbers, None)`` from the batched fast path, or ``(None, why it declined)``."""
    from pyhf_dist import fast
    from pyhf_dist.fast import toystats

    try:
        return toystats.run_chunk(fast.for_state(state), task["patch"], model, data, state.settings, chunk, key), None
    except fast.FastPathUnsupported as error:
        return None, first_line(error)


def _workspace_digest(state) -> str:
    """A digest of the worker's background workspace (computed once per worker)."""
    found = state.cache.get("workspace_digest")
    if found is None:
        import json

        from pyhf_dist import cache

        text = json.dumps(state.workspace_spec, sort_keys=True, separators=(",", ":"))
        found = state.cache["workspace_digest"] = cache.digest("workspace", text)
    return found


def _fast(state, task: dict) -> tuple[dict | None, str | None]:
    """``(numbers, None)`` from the compiled fast path, or ``(None, why it declined)``."""
    from pyhf_dist import fast

    settings = state.settings
    try:
        engine = fast.for_state(state)
        if settings.calculation == "upper_limit":
            from pyhf_dist.limits import scan_points

            scan = scan_points(settings.upper_limit_scan)
            return engine.upper_limit(task["patch"], settings.test_stat, settings.level, scan), None
        return engine.hypotest(task["patch"], settings.poi_test, settings.test_stat), None
    except fast.FastPathUnsupported as error:
        return None, first_line(error)


def plan_chunks(settings, workers: int, patches: int = 1) -> list:
    """How a patch's work is split: a list with one entry per task (``None``: not split).

    Toy-based hypotests split their ``ntoys`` pseudo-experiments into up to ``workers`` chunks
    (:func:`pyhf_dist.toys.plan`); on the fast path only as far as the scan's ``patches`` leave
    workers idle (:func:`pyhf_dist.toys.plan_fast`); beyond :data:`pyhf_dist.toys.PYHF_STREAM_MAX`
    toys, one chunk per block of toys (:func:`pyhf_dist.toys.plan_blocks`). Everything else is one
    task per patch.
    """
    if settings.calctype == "toybased" and settings.calculation == "hypotest":
        from pyhf_dist import toys

        if toys.block_stream(settings.ntoys):
            return toys.plan_blocks(settings.ntoys)
        if settings.fast_toys:
            return toys.plan_fast(settings.ntoys, workers, patches)
        return toys.plan(settings.ntoys, workers)
    return [None]


def merge_chunks(records: list[dict], settings) -> dict:
    """Combine the records of one patch's chunks into the patch's record."""
    if settings.calctype == "toybased" and settings.calculation == "hypotest":
        from pyhf_dist import toys

        # Also for a single chunk: its record holds samples, and CLs come from the merge (which
        # also sets the patch's engine from its chunks').
        return toys.merge(records, settings)
    if len(records) == 1:
        return records[0]
    raise NotImplementedError("merging chunked results is not available for this calculation")
