"""What runs on a worker: one task, a pack of tasks, or nothing, and its record.

Every executor runs :func:`run_task`. It fits one patch (or one chunk of its toys) and returns a
plain-dict record (:class:`~pyhf_dist.protocol.Record`); a pack of tasks gives
``{"pack": [record, ...]}``. A fit that raises becomes a record with ``status="failed"`` and the
error's first line; only the death of the worker itself escapes as an exception.

Executors that can run a setup hook per worker (process-pool initializers, Dask worker plugins,
Parsl/Globus Compute warm workers) call :func:`~pyhf_dist.runtime.state.initialize` there and
submit ``run_task(task)``; any other executor submits ``run_task(task, context)`` and the worker
sets itself up on its first task.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from pyhf_dist.protocol import FIT, NOOP, PACK, Context, Record, Task, first_line, new_record
from pyhf_dist.runtime import calculations
from pyhf_dist.runtime.state import initialize, prepared
from pyhf_dist.runtime.timeouts import FitTimeout, call_with_timeout, timed_out

__all__ = ["run_task", "worker_info", "FitTimeout"]


def worker_info() -> dict:
    """Where a task ran: host, process id, and the Slurm job id (``None`` outside Slurm); with
    ``fits_together: True`` where the worker fits a pack's patches of any structures together (a
    GPU, :func:`~pyhf_dist.runtime.fast.engine.groups_wanted`), so that the scan sends it large packs."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    # Only where the fast path runs (its engine imported): other workers never import jax for this.
    engine = sys.modules.get("pyhf_dist.runtime.fast.engine")
    if engine is not None and engine.groups_wanted():
        info["fits_together"] = True
    return info


def run_task(task: Task, context: Context | None = None) -> Record | dict:
    """Run one task (one patch, or one chunk of a patch's toys), or a pack of them; return the record.

    Args:
        task: A task (:func:`~pyhf_dist.protocol.make_task`) or a pack
            (:func:`~pyhf_dist.protocol.make_pack`).
        context: Given by executors without a per-worker setup hook; used on the first task only.

    Returns:
        The record: ``name``, ``status`` (``"ok"``/``"failed"``), ``error``, the calculation's
        numbers (``CLs_obs``, ``CLs_exp``...), ``fit_seconds``, ``started``, ``finished``, ``worker``;
        for a pack, ``{"pack": [record, ...]}`` in the order of its tasks.
    """
    kind = task.get("kind", FIT)
    if kind == PACK:
        return {"pack": _run_pack(task["tasks"], context)}
    if kind not in (FIT, NOOP):
        raise ValueError(f"unknown task kind {kind!r}: this worker runs {FIT!r}, {NOOP!r} and {PACK!r}")
    state = _state(task, context)
    started = time.time()
    # Durations on the monotonic clock: a clock set forward or back mid-fit (NTP, an operator) must
    # not give a fit a negative or hour-long duration.
    began = time.monotonic()
    record = new_record(task)
    if kind == FIT:
        try:
            part = state.for_pallet(task.get("pallet"))
            record.update(call_with_timeout(lambda: calculations.compute(part, task), task.get("timeout")))
        except (Exception, FitTimeout) as error:  # a failed fit is a result, not a crash of the scan
            if timed_out(error):
                record.update(status="failed", error=f"timed out after {task.get('timeout')} s")
            else:
                record.update(status="failed", error=first_line(error, with_type=True))
    record.update(started=started, finished=time.time(), fit_seconds=time.monotonic() - began, worker=worker_info())
    return record


def _state(task: Task, context: Context | None):
    """The worker's prepared state for the task's context (prepared now from ``context`` if needed)."""
    state = prepared(task["context"])
    if state is None:
        if context is None or context.key != task["context"]:
            raise RuntimeError(
                f"worker has no context {task['context']!r}: the executor must call "
                "pyhf_dist.runtime.initialize(context) or pass the context with the task"
            )
        state = initialize(context)
    return state


def _run_pack(tasks: list[Task], context: Context | None) -> list[Record]:
    """The records of a pack's tasks, in order: those the fast path fits together first
    (:func:`~pyhf_dist.runtime.calculations.compute_together`), then each of the others alone."""
    together: dict = {}
    if len(tasks) > 1 and all(task.get("kind", FIT) == FIT for task in tasks):
        started, began = time.time(), time.monotonic()
        together = calculations.compute_together(_state(tasks[0], context), tasks)
        finished, share = time.time(), (time.monotonic() - began) / max(1, len(together))
    where = worker_info() if together else None
    records = []
    for index, task in enumerate(tasks):
        if index not in together:
            records.append(run_task(task, context))
            continue
        record = new_record(task)
        record.update(together[index])
        record.update(started=started, finished=finished, fit_seconds=share, worker=where)
        records.append(record)
    return records
