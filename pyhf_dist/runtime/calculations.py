"""The statistical calculation a task performs on a worker: the fast path, or plain pyhf.

:func:`compute` runs what the scan's settings ask for on one task — an asymptotic hypotest, an
upper limit, or one chunk of a patch's pseudo-experiments — on the compiled fast path
(:mod:`pyhf_dist.runtime.fast`) when the settings choose it and it covers the patch, and on plain pyhf
(:mod:`pyhf_dist.runtime.reference`) otherwise, recording why.
"""

from __future__ import annotations

import logging
from typing import Any

from pyhf_dist.exceptions import FastPathRequired
from pyhf_dist.protocol import SMALLEST_GROUP, first_line
from pyhf_dist.runtime import reference
from pyhf_dist.runtime.reports import ChunkReport

__all__ = ["compute", "compute_together"]

log = logging.getLogger(__name__)


def compute(state, task: dict) -> dict[str, Any]:
    """Run the calculation the scan's settings ask for on one task; returns the record's numbers.

    The numbers come with ``engine``: ``"fast"`` (the compiled fast path) or ``"pyhf"`` (plain pyhf
    on numpy), and, where the scan asked for the fast path and it declined, ``fallback_reason``.

    Raises:
        FastPathRequired: The fast path declined the patch and ``settings.require_fast`` is on.
    """
    settings = state.settings
    reason = None
    if settings.fast_path:
        fast, reason = _fast(state, task)
        if fast is not None:
            return {**fast, "engine": "fast"}
        _check_fallback_allowed(settings, reason)
    reference.use_numpy(settings.optimizer)
    model, data = reference.build_model(state, task["patch"])
    if settings.calculation == "hypotest" and settings.test_stat != "q0":
        _check_tested_value(model, settings.poi_test)
    if settings.calculation == "hypotest" and settings.calctype == "asymptotics":
        values = reference.hypotest(model, data, settings)
    elif settings.calculation == "upper_limit":
        values = reference.upper_limit(model, data, settings)
    else:
        from pyhf_dist.runtime import toys

        # One chunk of the patch's pseudo-experiments (all of them when the task is not split).
        chunk = task.get("chunk") or toys.split(settings.ntoys, 1)[0]
        key = toys.generating_key(reference.workspace_digest(state), task["patch"], settings)
        report = ChunkReport(task.get("progress"))
        if settings.fast_toys:
            values, reason = _fast_toys(state, task, model, data, chunk, key, report)
            if values is not None:
                return values
            _check_fallback_allowed(settings, reason)
        values = toys.run_chunk(model, data, settings, chunk, key, report)
    values["engine"] = "pyhf"
    if reason is not None:
        values["fallback_reason"] = reason
    return values


def compute_together(state, tasks: list[dict]) -> dict[int, dict[str, Any]]:
    """The numbers of the tasks the fast path fits together, by index in ``tasks``.

    Asymptotic hypotests of patches that differ only in the yields they add (signal points of one
    template) are fitted together (:func:`pyhf_dist.runtime.fast.points.hypotests`), and on a GPU
    (:func:`~pyhf_dist.runtime.fast.engine.groups_wanted`) the other patches too, whatever their
    structures (:meth:`~pyhf_dist.runtime.fast.engine.FastHypotest.hypotest_group`); there, upper
    limits too, their searches in lockstep
    (:meth:`~pyhf_dist.runtime.fast.engine.FastHypotest.upper_limit_group`). The tasks missing
    from the result are to be computed one by one (:func:`compute`). Never raises.
    """
    settings = state.settings
    if not settings.fits_together:
        return {}
    from pyhf_dist.runtime import fast

    by_pallet: dict = {}
    for index, task in enumerate(tasks):
        if not task.get("chunk") and not task.get("timeout"):
            by_pallet.setdefault(task.get("pallet"), []).append(index)
    out = {}
    for pallet, indices in by_pallet.items():
        try:
            engine = fast.for_state(state.for_pallet(pallet))
            patches = [tasks[i]["patch"] for i in indices]
            if settings.calculation == "upper_limit":
                answers = [None] * len(patches)
                if len(patches) >= SMALLEST_GROUP and fast.groups_wanted():
                    scan = reference.scan_points(settings.upper_limit_scan)
                    answers = engine.upper_limit_group(patches, settings.test_stat, settings.level, scan)
            else:
                answers = engine.hypotest_points(patches, settings.poi_test, settings.test_stat)
                rest = [i for i, answer in enumerate(answers) if answer is None]
                if len(rest) >= SMALLEST_GROUP and fast.groups_wanted():
                    grouped = engine.hypotest_group([patches[i] for i in rest], settings.poi_test, settings.test_stat)
                    for i, answer in zip(rest, grouped):
                        answers[i] = answer
        except Exception as error:  # noqa: BLE001 - each task is then computed alone, with its own errors
            log.warning("fast path: a pack's patches not fitted together (%s)", first_line(error, with_type=True))
            continue
        out.update({index: {**answer, "engine": "fast"} for index, answer in zip(indices, answers) if answer is not None})
    return out


def _check_tested_value(model, poi_test: float) -> None:
    """Refuse a tested POI value outside the POI's bounds in one line that names them (pyhf's own
    error gives the parameter's index)."""
    low, high = model.config.suggested_bounds()[model.config.poi_index]
    if not low <= poi_test <= high:
        name = model.config.poi_name
        raise ValueError(
            f"the tested POI value {poi_test:g} lies outside the bounds of {name}, [{low:g}, {high:g}]: test a "
            f"value within them (--poi-test), or widen the bounds of {name} in the measurement's parameters"
        )


def _check_fallback_allowed(settings, reason: str | None) -> None:
    """Plain pyhf may fit a patch the fast path declined, unless the scan requires the fast path."""
    if settings.require_fast:
        raise FastPathRequired(f"the fast path declined this patch ({reason}) and require_fast (--require-fast) is on")


def _fast_toys(state, task: dict, model, data, chunk: dict, key: str, report) -> tuple[dict | None, str | None]:
    """``(chunk numbers, None)`` from the batched fast path, or ``(None, why it declined)``."""
    from pyhf_dist.runtime import fast
    from pyhf_dist.runtime.fast import toystats

    try:
        return toystats.run_chunk(fast.for_state(state), task["patch"], model, data, state.settings, chunk, key,
                                  report), None
    except fast.FastPathUnsupported as error:
        return None, first_line(error)


def _fast(state, task: dict) -> tuple[dict | None, str | None]:
    """``(numbers, None)`` from the compiled fast path, or ``(None, why it declined)``."""
    from pyhf_dist.runtime import fast

    settings = state.settings
    try:
        engine = fast.for_state(state)
        if settings.calculation == "upper_limit":
            scan = reference.scan_points(settings.upper_limit_scan)
            return engine.upper_limit(task["patch"], settings.test_stat, settings.level, scan), None
        return engine.hypotest(task["patch"], settings.poi_test, settings.test_stat), None
    except fast.FastPathUnsupported as error:
        return None, first_line(error)
