"""A patch's pseudo-experiments as chunk tasks, planned and merged on the client.

A patch is normally one task. The toys of one patch can be split into several chunk tasks
(:func:`plan_chunks`: :func:`plan` for plain pyhf, :func:`plan_fast` on the fast path, blocks of
:data:`~pyhf_dist.runtime.toys.BLOCK` beyond :data:`~pyhf_dist.runtime.toys.PYHF_STREAM_MAX`);
each runs on a worker (:func:`pyhf_dist.runtime.toys.run_chunk`), the journal keeps each finished
chunk (:func:`compact_chunk`), a resumed scan fits only what is missing (:func:`missing_chunks`),
and :func:`merge_chunks` combines them into the patch's record with CLs from the merged
distributions (:func:`merge`; the module :mod:`pyhf_dist.runtime.toys` says how toys are seeded
and what a toy without a minimum counts as).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from pyhf_dist.runtime.toys import (
    NO_MINIMUM_STATISTIC, block_count, block_pieces, block_stream, cls_from_distributions, cut_at_blocks, plan_blocks,
    split,
)

__all__ = [
    "MIN_FAST_TOYS_PER_CHUNK", "MIN_TOYS_PER_CHUNK", "compact_chunk", "expand_chunk", "merge", "merge_chunks",
    "missing_chunks", "no_minimum_summary", "plan", "plan_chunks", "plan_fast", "statistics_text",
    "statistics_from_text",
]

#: Smallest chunk worth a task: a chunk pays two fixed-POI fits (and re-draws the sample) before
#: its toys, each of which costs about four fits; 25 toys keep that overhead near 2%.
MIN_TOYS_PER_CHUNK = 25


def plan(ntoys: int, workers: int, min_chunk: int | None = None) -> list[dict]:
    """The chunks of one patch: as many as workers, none smaller than ``min_chunk`` toys.

    ``min_chunk`` defaults to :data:`MIN_TOYS_PER_CHUNK` (read at call time).

    One chunk per worker is enough: a scan has many patches, whose chunks fill the queue.

    >>> len(plan(1000, 4)), len(plan(60, 4)), len(plan(10, 4))
    (4, 2, 1)
    """
    min_chunk = MIN_TOYS_PER_CHUNK if min_chunk is None else min_chunk
    return split(ntoys, max(1, min(int(workers or 1), int(ntoys) // max(1, int(min_chunk)))))


#: Smallest chunk of the fast path: a chunk pays pyhf's two generating fits and a pyhf model
#: (seconds on 1Lbb) before its toys, which take about a millisecond each.
MIN_FAST_TOYS_PER_CHUNK = 1000


def plan_fast(ntoys: int, workers: int, patches: int = 1, min_chunk: int | None = None) -> list[dict]:
    """The chunks of one patch on the fast path: split only where patches leave workers idle.

    Every chunk repeats pyhf's generating fits, which cost more than a thousand fast toys; with
    at least as many patches as workers each patch is one task.

    >>> len(plan_fast(10000, 2, 1)), len(plan_fast(10000, 2, 125)), len(plan_fast(1500, 4, 1))
    (2, 1, 1)
    """
    min_chunk = MIN_FAST_TOYS_PER_CHUNK if min_chunk is None else min_chunk
    idle = max(1, int(workers or 1) // max(1, int(patches)))
    return split(ntoys, max(1, min(idle, int(ntoys) // max(1, int(min_chunk)))))


def missing_chunks(ntoys: int, done: list[dict], planned: list[dict]) -> list[dict]:
    """The chunks still to fit of a patch whose ``done`` chunk records a journal kept.

    Toys no finished chunk covers, cut as ``planned`` cuts them where a planned chunk lies
    wholly among them, else as the gaps themselves (a resumed scan may plan for other workers),
    cut at the blocks of a block-drawn scan. No toy is fitted twice.

    >>> done = [{"toys": {"start": 0, "stop": 40}}]
    >>> [(c["start"], c["stop"]) for c in missing_chunks(100, done, split(100, 4))]
    [(50, 75), (75, 100), (40, 50)]
    >>> done = [{"toys": {"start": 0, "stop": 15_000}}]  # half of the second block
    >>> [(c["start"], c["stop"]) for c in missing_chunks(30_000, done, plan_blocks(30_000))]
    [(20000, 30000), (15000, 20000)]
    """
    covered = sorted((r["toys"]["start"], r["toys"]["stop"]) for r in done)
    gaps, position = [], 0
    for start, stop in covered:
        if start > position:
            gaps.append((position, start))
        position = max(position, stop)
    if position < ntoys:
        gaps.append((position, int(ntoys)))
    if block_stream(ntoys):  # a chunk of a block-drawn scan draws whole blocks: none spans two
        gaps = cut_at_blocks(gaps)
    chunks = [c for c in planned if any(a <= c["start"] and c["stop"] <= b for a, b in gaps)]
    rest = [(a, b) for a, b in gaps]
    for c in chunks:  # what the planned chunks leave of each gap
        rest = [piece for a, b in rest
                for piece in (((a, min(b, c["start"])), (max(a, c["stop"]), b)) if a < c["stop"] and c["start"] < b
                              else ((a, b),))
                if piece[0] < piece[1]]
    chunks += [{"index": -1, "of": 0, "start": a, "stop": b, "ntoys": int(ntoys)} for a, b in rest]
    return chunks


def merge(records: list[dict], settings) -> dict:
    """One patch's record from the records of its toy chunks.

    A failed chunk fails the patch (its reason is kept); otherwise the chunks' samples are
    concatenated in toy order and CLs computed by :func:`cls_from_distributions`. Timing fields
    combine as the scan expects: ``fit_seconds`` summed, ``started`` the earliest, ``finished`` the
    latest, ``worker`` that of the first chunk (``workers`` lists them all).

    The returned record keeps the merged samples under ``"toys"`` (``teststat``, ``sb``, ``b``) for
    callers that want the distributions; the scan's :class:`~pyhf_dist.results.FitRecord` drops them.
    """
    # In toy order: a resumed scan's chunks come from plans of different sizes.
    ordered = sorted(records, key=lambda r: ((r.get("toys") or r.get("chunk") or {}).get("start", 0)))
    first = ordered[0]
    merged: dict[str, Any] = {"name": first["name"], "status": "ok", "error": None, "ntoys": settings.ntoys,
                              "seed": settings.seed}
    times = [r for r in ordered if r.get("started") is not None]
    seconds = [r["fit_seconds"] for r in ordered if r.get("fit_seconds") is not None]
    merged.update(
        fit_seconds=sum(seconds) if seconds else None,
        started=min(r["started"] for r in times) if times else None,
        finished=max(r["finished"] for r in times if r.get("finished") is not None) if times else None,
        worker=next((r.get("worker") for r in ordered if r.get("worker")), None),
        workers=[r.get("worker") for r in ordered],
    )
    failed = [r for r in ordered if r.get("status") != "ok"]
    if failed:
        reasons = "; ".join(f"{_describe(r.get('chunk'))}: {r.get('error')}" for r in failed)
        merged.update(status="failed", error=f"{len(failed)} of {len(ordered)} toy chunks failed: {reasons}")
        return merged
    parts = [r["toys"] for r in ordered]
    expected_start = 0
    for part in parts:
        if part["start"] != expected_start:
            merged.update(status="failed", error=f"toy chunks do not cover the toys: gap at toy {expected_start}")
            return merged
        expected_start = part["stop"]
    if expected_start != parts[0]["ntoys"] or parts[0]["teststat"] is None:
        merged.update(status="failed", error=f"toy chunks incomplete: {expected_start} of {parts[0]['ntoys']} toys")
        return merged
    sb = [value for part in parts for value in part["sb"]]
    b = [value for part in parts for value in part["b"]]
    teststat = parts[0]["teststat"]
    result = cls_from_distributions(teststat, sb, b, settings.test_stat)
    merged.update(CLs_obs=result["CLs_obs"], CLs_exp=result["CLs_exp"], **_engine(ordered), **_certificate(ordered))
    merged["toys"] = {"teststat": teststat, "sb": sb, "b": b, "chunks": len(parts)}
    if any("fallbacks" in part for part in parts):  # the fast path's fits redone one at a time
        merged["toys"]["fallbacks"] = sum(part.get("fallbacks", 0) for part in parts)
    no_minimum = {key: [entry for part in parts for entry in (part.get("no_minimum") or {}).get(key, [])]
                  for key in ("sb", "b")}
    merged["toy_summary"] = no_minimum_summary(teststat, sb, b, no_minimum, settings.test_stat,
                                               kept=merged.get("engine") == "pyhf")
    if any("by_pyhf" in part for part in parts):  # fast path: toys whose fits it lost, fitted by pyhf
        merged["toy_summary"]["by_pyhf"] = sum(part.get("by_pyhf", 0) for part in parts)
    merged["toys"]["no_minimum"] = no_minimum
    return merged


def no_minimum_summary(teststat: float, sb, b, no_minimum: dict, test_stat: str = "qtilde", kept: bool = False) -> dict:
    """What a record says about its toys without a minimum (the module's "Toys whose likelihood has no minimum").

    Args:
        teststat: The observed statistic.
        sb, b: The statistics of all toys, those without a minimum at :data:`NO_MINIMUM_STATISTIC`.
        no_minimum: ``{"sb": [[toy index, q where the fits stopped], ...], "b": [...]}``.
        test_stat: As :func:`cls_from_distributions`.
        kept: The statistics are plain pyhf's where its fits stopped, not
            :data:`NO_MINIMUM_STATISTIC` (records of plain pyhf).

    Returns:
        ``{"no_minimum": {"sb": n, "b": n}, "statistic": 0.0}`` (``"statistic": "pyhf"`` with
        ``kept``) and, where there are such toys,
        ``"if_dropped"`` and ``"if_infinite"``: ``{"CLs_obs", "CLs_exp"}`` with those toys left
        out, and with their statistic at +inf.

    >>> summary = no_minimum_summary(1.0, [0.0, 2.0, 0.0], [0.5, 3.0, 0.0], {"sb": [[2, 9.0]], "b": []})
    >>> summary["no_minimum"], summary["if_dropped"]["CLs_obs"], summary["if_infinite"]["CLs_obs"]
    ({'sb': 1, 'b': 0}, 1.5, 2.0)
    """
    summary: dict[str, Any] = {
        "no_minimum": {key: len(no_minimum.get(key, [])) for key in ("sb", "b")},
        "statistic": "pyhf" if kept else NO_MINIMUM_STATISTIC,
    }
    if not any(summary["no_minimum"].values()):
        return summary
    samples = {"sb": np.asarray(sb, dtype=float), "b": np.asarray(b, dtype=float)}
    away = {key: np.zeros(len(values), dtype=bool) for key, values in samples.items()}
    for key, entries in no_minimum.items():
        away[key][[int(index) for index, _ in entries]] = True
    for name, alternative in (
        ("if_dropped", {key: samples[key][~away[key]] for key in samples}),
        ("if_infinite", {key: np.where(away[key], np.inf, samples[key]) for key in samples}),
    ):
        if len(alternative["sb"]) and len(alternative["b"]):
            result = cls_from_distributions(teststat, alternative["sb"], alternative["b"], test_stat)
            summary[name] = {"CLs_obs": result["CLs_obs"], "CLs_exp": result["CLs_exp"]}
    return summary


def _certificate(records: list[dict]) -> dict:
    """``converged``, ``fits`` and ``pyhf_default`` of a patch from its chunks' (the fast path's
    certified toys, :func:`pyhf_dist.runtime.fast.toystats.run_chunk`): converged when every chunk's
    fits are; the observed data's certificates are every chunk's, the first one's kept. Empty where
    a chunk's fits were not checked (plain pyhf, ``match_pyhf``)."""
    checked = [record.get("converged") for record in records]
    if not records or any(value is None for value in checked):
        return {}
    first = records[0]
    return {"converged": all(checked), "fits": first.get("fits"), "pyhf_default": first.get("pyhf_default")}


def _engine(records: list[dict]) -> dict:
    """``engine`` and ``fallback_reason`` of a patch from those of its chunks.

    The fast path takes or declines a whole patch (its checks look at the patch, not at a chunk),
    so the chunks agree; if they ever do not, the record says ``pyhf`` and why.
    """
    engines = {r.get("engine") for r in records}
    reasons = [r.get("fallback_reason") for r in records if r.get("fallback_reason")]
    if len(engines) == 1:
        return {"engine": engines.pop(), "fallback_reason": reasons[0] if reasons else None}
    return {"engine": "pyhf", "fallback_reason": "some toy chunks fell back to plain pyhf: " + (reasons[0] if reasons else "")}


def _describe(chunk: dict | None) -> str:
    if not chunk:
        return "toys"
    if chunk.get("index", -1) < 0:
        return f"toys {chunk['start']}-{chunk['stop'] - 1}"
    return f"chunk {chunk['index'] + 1}/{chunk['of']} (toys {chunk['start']}-{chunk['stop'] - 1})"


def statistics_text(values) -> str:
    """Test statistics as text, exactly: base64 of little-endian float64 (a third of JSON's size)."""
    return base64.b64encode(np.asarray(values, dtype="<f8").tobytes()).decode("ascii")


def statistics_from_text(text: str) -> list[float]:
    """The statistics :func:`statistics_text` wrote, bit for bit."""
    return np.frombuffer(base64.b64decode(text), dtype="<f8").tolist()


def compact_chunk(outcome: dict) -> dict:
    """A finished chunk's record as the journal keeps it: its statistics packed (:func:`statistics_text`)."""
    part = dict(outcome["toys"])
    part["sb"], part["b"] = statistics_text(part["sb"]), statistics_text(part["b"])
    return {**{k: v for k, v in outcome.items() if k != "toys"}, "toys": part, "packed": True}


def expand_chunk(entry: dict) -> dict:
    """The chunk record :func:`compact_chunk` wrote, as the worker returned it."""
    outcome = {k: v for k, v in entry.items() if k != "packed"}
    part = dict(entry["toys"])
    part["sb"], part["b"] = statistics_from_text(part["sb"]), statistics_from_text(part["b"])
    outcome["toys"] = part
    return outcome



def plan_chunks(settings, workers: int, patches: int = 1) -> list:
    """How a patch's work is split: a list with one entry per task (``None``: not split).

    Toy-based hypotests split their ``ntoys`` pseudo-experiments into up to ``workers`` chunks
    (:func:`plan`); on the fast path only as far as the scan's ``patches`` leave
    workers idle (:func:`pyhf_dist.plan_fast`); beyond :data:`~pyhf_dist.runtime.toys.PYHF_STREAM_MAX`
    toys, one chunk per block of toys, or several where whole blocks would leave workers idle
    (:func:`~pyhf_dist.runtime.toys.plan_blocks`, :func:`~pyhf_dist.runtime.toys.block_pieces`).
    Everything else is one task per patch.
    """
    if settings.calctype == "toybased" and settings.calculation == "hypotest":
        if block_stream(settings.ntoys):
            blocks = block_count(settings.ntoys) * max(1, int(patches))
            return plan_blocks(settings.ntoys, block_pieces(blocks, workers))
        if settings.fast_toys:
            return plan_fast(settings.ntoys, workers, patches)
        return plan(settings.ntoys, workers)
    return [None]


def merge_chunks(records: list[dict], settings) -> dict:
    """Combine the records of one patch's chunks into the patch's record."""
    if settings.calctype == "toybased" and settings.calculation == "hypotest":
        # Also for a single chunk: its record holds samples, and CLs come from the merge (which
        # also sets the patch's engine from its chunks').
        return merge(records, settings)
    if len(records) == 1:
        return records[0]
    raise NotImplementedError("merging chunked results is not available for this calculation")
