"""The statistical calculations a task performs on a worker, and how a patch's chunks combine.

A patch is normally one task. Pseudo-experiments of one patch can be split into several chunk
tasks (:func:`plan_chunks`); the scan merges their partial results into the patch's record with
:func:`merge_chunks`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compute", "build_model", "hypotest", "plan_chunks", "merge_chunks"]


def _use_numpy() -> None:
    # Plain pyhf always runs on numpy, the reference: "jax" names the compiled fast path, and what
    # it does not cover is fitted exactly as serial pyhf would fit it. (pyhf on its jax backend
    # stops its fits at different points on stiff likelihoods such as 3L-eRJR and gives CLs that
    # differ from numpy's by up to 4e-4.)
    import pyhf

    if pyhf.tensorlib.name != "numpy":
        pyhf.set_backend("numpy")


def build_model(state, patch_operations: list):
    """The patched model and its observed data, built exactly as plain pyhf builds them."""
    model = state.workspace.model(
        patches=[patch_operations], modifier_settings=state.settings.modifier_settings
    )
    return model, state.workspace.data(model)


def hypotest(model, data, settings) -> dict:
    """Observed CLs and the expected CLs band (-2σ..+2σ) at ``settings.poi_test``."""
    import pyhf

    cls_obs, cls_exp = pyhf.infer.hypotest(
        settings.poi_test, data, model, test_stat=settings.test_stat, return_expected_set=True
    )
    return {"CLs_obs": float(cls_obs), "CLs_exp": [float(value) for value in cls_exp]}


def compute(state, task: dict) -> dict[str, Any]:
    """Run the calculation the scan's settings ask for on one task; returns the record's numbers."""
    settings = state.settings
    if task.get("kind") == "noop":  # measures an executor's own per-task cost (benchmarks)
        return {}
    if settings.fast_path:
        fast = _fast_hypotest(state, task)
        if fast is not None:
            return fast
    _use_numpy()
    model, data = build_model(state, task["patch"])
    if settings.calculation == "hypotest" and settings.calctype == "asymptotics":
        return hypotest(model, data, settings)
    if settings.calculation == "upper_limit":
        from pyhf_dist import limits

        return limits.upper_limit(model, data, settings)
    from pyhf_dist import toys

    # One chunk of the patch's pseudo-experiments (all of them when the task is not split).
    chunk = task.get("chunk") or toys.split(settings.ntoys, 1)[0]
    key = toys.generating_key(_workspace_digest(state), task["patch"], settings)
    reason = None
    if settings.fast_toys:
        from pyhf_dist import fast
        from pyhf_dist.fast import toystats

        try:
            return toystats.run_chunk(fast.for_state(state), task["patch"], model, data, settings, chunk, key)
        except fast.FastPathUnsupported as error:
            reason = str(error)
    record = toys.run_chunk(model, data, settings, chunk, key)
    record["fallback_reason"] = reason
    return record


def _workspace_digest(state) -> str:
    """A digest of the worker's background workspace (computed once per worker)."""
    found = state.cache.get("workspace_digest")
    if found is None:
        import json

        from pyhf_dist import cache

        text = json.dumps(state.workspace_spec, sort_keys=True, separators=(",", ":"))
        found = state.cache["workspace_digest"] = cache.digest("workspace", text)
    return found


def _fast_hypotest(state, task: dict) -> dict | None:
    """The compiled fast path, or ``None`` when it does not cover this patch (plain pyhf then)."""
    from pyhf_dist import fast

    try:
        return fast.for_state(state).hypotest(task["patch"], state.settings.poi_test, state.settings.test_stat)
    except fast.FastPathUnsupported:
        return None


def plan_chunks(settings, workers: int, patches: int = 1) -> list:
    """How a patch's work is split: a list with one entry per task (``None``: not split).

    Toy-based hypotests split their ``ntoys`` pseudo-experiments into up to ``workers`` chunks
    (:func:`pyhf_dist.toys.plan`); on the fast path only as far as the scan's ``patches`` leave
    workers idle (:func:`pyhf_dist.toys.plan_fast`). Everything else is one task per patch.
    """
    if settings.calctype == "toybased" and settings.calculation == "hypotest":
        from pyhf_dist import toys

        if settings.fast_toys:
            return toys.plan_fast(settings.ntoys, workers, patches)
        return toys.plan(settings.ntoys, workers)
    return [None]


def merge_chunks(records: list[dict], settings) -> dict:
    """Combine the records of one patch's chunks into the patch's record."""
    if settings.calctype == "toybased" and settings.calculation == "hypotest":
        from pyhf_dist import toys

        # Also for a single chunk: its record holds samples, and CLs come from the merge.
        return toys.merge(records, settings)
    if len(records) == 1:
        return records[0]
    raise NotImplementedError("merging chunked results is not available for this calculation")
