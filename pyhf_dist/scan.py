"""The scan: fit every selected patch of a pallet on the chosen executor.

:func:`iter_fits` yields one :class:`~pyhf_dist.results.FitRecord` per patch as results arrive;
:func:`map_fits` collects them into a :class:`~pyhf_dist.results.ScanResult`. Both take the same
arguments. A scan can fit several pallets of one source at once (``pallet=``): one context holds
every chosen pallet's workspace, each task names its pallet, and records are identified by
``(pallet, name)``; ``combine="best-expected"`` adds their combination at the end. The loop keeps
what a scan must never lose: every finished record goes to the journal
(when one is given) before anything else happens, tasks whose worker died are resubmitted up to
``retries`` times, a fit that raises becomes a failed record, and clusters or pools the scan
started are shut down however it ends — normally, on an error, or on Ctrl-C. On executors whose
every task costs milliseconds of scheduling (the Dask clusters it starts), short fits travel
several to a task (:class:`_Batching`); each still gets its own record.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import platform
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pyhf_dist import discovery, signals as signal_points
from pyhf_dist.calculations import merge_chunks, plan_chunks
from pyhf_dist.toys import missing_chunks
from pyhf_dist.combine import check_method, combine as combine_records
from pyhf_dist.exceptions import ExecutorError, ExecutorOptionError, InputError, SettingsError, first_line
from pyhf_dist.executors import get_executor
from pyhf_dist.journal import Journal, scan_key
from pyhf_dist.pallet import (
    Pallet, Patch, check_workspace, is_pyhf, load_pallet, load_patches, load_workspace,
)
from pyhf_dist.results import FitRecord, ScanResult
from pyhf_dist.settings import FitSettings
from pyhf_dist.worker import WorkerContext, failed_record, make_batch, make_task

__all__ = ["map_fits", "iter_fits", "prepare_pallet", "prepare_pallets"]

log = logging.getLogger(__name__)

#: Extra seconds the client waits past ``timeout`` before it gives up on a task itself (the worker
#: normally stops the fit on time; this covers workers that cannot).
TIMEOUT_GRACE = 10.0


def prepare_pallet(workspace: Any, patchset: Any = None, *, validate: bool = True) -> Pallet:
    """Turn the ``workspace``/``patchset`` arguments of :func:`map_fits` into a :class:`Pallet`."""
    if isinstance(workspace, Pallet):
        return workspace
    if patchset is None:
        if isinstance(workspace, dict) or is_pyhf(workspace, "Workspace") or str(workspace).lower().endswith(".json"):
            raise InputError(
                "a background workspace alone has no signal patches: also give the patchset "
                "(patchset.json, a directory of patch files) or a whole pallet"
            )
        return load_pallet(workspace, validate=validate)
    spec = load_workspace(workspace, validate=validate)
    patches, labels, description = load_patches(patchset, spec)
    return Pallet(spec, patches, labels, str(workspace) if isinstance(workspace, (str, os.PathLike)) else "<memory>", description)


def prepare_pallets(workspace: Any, patchset: Any = None, pallet: Any = None, *, validate: bool = True) -> list[Pallet]:
    """The pallets a scan fits: :func:`prepare_pallet`, or the ones ``pallet`` chooses in a source
    (or in a list of :class:`Pallet` objects) that holds several."""
    if isinstance(workspace, (list, tuple)) and workspace and all(isinstance(p, Pallet) for p in workspace):
        names = [p.name for p in workspace]
        if len(workspace) > 1 and (None in names or len(set(names)) < len(names)):
            raise InputError("pallets fitted together need distinct names: set each Pallet's name")
        if pallet is None:
            return list(workspace)
        indices = discovery.select_names([name or discovery.TOP for name in names], pallet, "the pallets given")
        return [workspace[index] for index in indices]
    if patchset is not None:
        if pallet is not None:
            raise InputError(
                "pallet= chooses among the pallets of one source; a workspace given with its patchset is one "
                "pallet: drop the pallet choice"
            )
        return [prepare_pallet(workspace, patchset, validate=validate)]
    single_json = isinstance(workspace, dict) or is_pyhf(workspace, "Workspace") or (
        not isinstance(workspace, Pallet) and str(workspace).lower().endswith(".json"))
    if single_json:
        return [prepare_pallet(workspace, validate=validate)]  # says the patches are missing
    loaded = load_pallet(workspace, pallet=pallet, validate=validate)
    return loaded if isinstance(loaded, list) else [loaded]


@dataclasses.dataclass
class _Job:
    """One task of a patch: the patch, its pallet, which chunk of it, and how often it was submitted."""

    patch: Patch
    chunk: Any
    pallet: str | None = None
    attempt: int = 1
    submitted: float = 0.0
    running_since: float | None = None

    @property
    def key(self) -> tuple:
        """``(pallet, patch name)``: a patch name can be in several pallets of a scan."""
        return (self.pallet, self.patch.name)


def iter_fits(
    workspace: Any,
    patchset: Any = None,
    *,
    executor: Any = "local",
    patches: Any = None,
    pallet: Any = None,
    combine: str | None = None,
    poi_test: float = 1.0,
    test_stat: str = "qtilde",
    backend: str | None = None,
    modifier_settings: dict | None = None,
    calculation: str = "hypotest",
    calctype: str = "asymptotics",
    ntoys: int = 1000,
    seed: int = 0,
    upper_limit_scan: tuple | None = None,
    require_fast: bool = False,
    match_pyhf: bool = False,
    optimizer: str = "scipy",
    journal: str | os.PathLike | None = None,
    resume: bool = False,
    retries: int = 2,
    timeout: float | None = None,
    metadata: dict | None = None,
    on_start: Callable[[dict], None] | None = None,
    keep_toys: str | os.PathLike | None = None,
    on_chunk: Callable[[dict], None] | None = None,
    signals: Any = None,
    template: Any = None,
    **executor_options,
) -> Iterator[FitRecord]:
    """Fit the selected patches and yield each record as it completes.

    Arguments are those of :func:`map_fits` (without ``callback`` and ``progress``; ``workers``
    goes with the executor options). Records read back from the journal of a resumed scan come
    first; with ``combine``, the combined records come last, once every fit is in. When given,
    ``metadata`` (a dict) is
    filled with the scan's metadata as soon as it is known, and ``on_start`` is called with it once
    the executor is up (before the first result); ``on_chunk`` is called with every finished
    chunk of toys (its record as the worker returned it).
    """
    settings = FitSettings(
        poi_test=poi_test, test_stat=test_stat, backend=backend, modifier_settings=modifier_settings,
        calculation=calculation, calctype=calctype, ntoys=ntoys, seed=seed,
        upper_limit_scan=upper_limit_scan, require_fast=require_fast, match_pyhf=match_pyhf, optimizer=optimizer,
    )
    if not isinstance(retries, int) or retries < 0:
        raise InputError(f"retries must be a non-negative integer, got {retries!r}")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if keep_toys is not None:
        _check_keep_toys(keep_toys, settings)
    runner = _executor(executor, executor_options)
    owned = isinstance(executor, str)
    info = metadata if metadata is not None else {}
    book = None
    started = time.time()
    sigterm = _sigterm_as_interrupt()
    try:
        if owned:
            # Workers that can start early import what the fits need while the pallet is read.
            runner.prepare(settings.to_dict())
        # Full schema validation is deferred (see below) until the patch selection and settings
        # are known to be right.
        if signals is not None or template is not None:  # points as data: one lazily read pallet
            workspace = _signals_pallet(workspace, patchset, pallet, signals, template)
        pallets = prepare_pallets(workspace, patchset, pallet, validate=False)
        combine = check_method(combine, pallets)
        chosen = signal_points.select(pallets, patches)
        values_by_key = {
            (each.name, name): list(values) for each, selected in zip(pallets, chosen)
            for name, values in signal_points.named_values(selected)
        }
        # Single-pallet scans keep the key they always had (their journals resume across versions).
        key_spec = pallets[0].workspace if len(pallets) == 1 and pallets[0].name is None else {
            each.name: each.workspace for each in pallets}

        book = Journal(journal, scan_key(key_spec, settings)) if journal is not None else None
        if book is not None:
            book.acquire()  # before reading it: two scans must never write one journal
        finished = book.load() if (book is not None and resume) else {}
        if book is not None and book.skipped:
            info["journal_skipped"] = list(book.skipped)
        # Only fits that succeeded are kept: a resumed scan fits the failed ones again.
        finished = {key: record for key, record in finished.items() if key in values_by_key and record.ok}
        # A list, or for a signals file a stream that makes each patch as the scan submits it.
        todo = signal_points.pending(pallets, chosen, finished)

        if len(pallets) == 1:
            context = WorkerContext.build(pallets[0].workspace, settings.to_dict())
        else:
            context = WorkerContext.build_pallets({each.name: each.workspace for each in pallets}, settings.to_dict())
        info.update(
            source=pallets[0].source,
            labels=pallets[0].labels,
            patches=len(values_by_key),
            pallets={each.name: len(selected) for each, selected in zip(pallets, chosen)}
            if pallets[0].name is not None else None,
            combine=combine,
            order=list(values_by_key),
            resumed=len(finished),
            settings=settings.to_dict(),
            settings_digest=settings.digest(),
            scan_key=book.key if book is not None else scan_key(key_spec, settings),
            journal=str(book.path) if book is not None else None,
            **_versions(),
        )
        started = time.time()
        info["started"] = started
        done = list(finished.values())
        kept: dict = {}
        if keep_toys is not None and book is not None:
            # Patches finished by an earlier run of this scan: their toys are the journal's chunks.
            for key in finished:
                chunks = book.chunks.get(key)
                if chunks:
                    merged = merge_chunks(list(chunks), settings)
                    if merged["status"] == "ok":
                        kept[key] = merged["toys"]
        if not todo:
            info.update(runner.describe())
            if on_start is not None:
                on_start(info)
            yield from done
            _write_kept(keep_toys, kept, settings)
            yield from _combination(done, combine, pallets, values_by_key)
            return
        try:
            runner.start(context)
        except InputError:
            raise
        except Exception as error:
            # An invalid workspace must be refused as bad input (naming the JSON path), not
            # surface as a worker that cannot start.
            _check_workspaces(pallets)
            if isinstance(error, ExecutorError):
                raise
            raise ExecutorError(f"executor {runner.name!r} could not start: {first_line(error, with_type=True)}") from error
        # Full schema validation takes about a second for a large workspace: it runs while the
        # workers start, and before any result is taken.
        _check_workspaces(pallets)
        info.update(runner.describe())
        if on_start is not None:
            on_start(info)
        yield from done
        if book is not None:
            # Opened only now, once the executor is up: a scan that cannot start leaves an earlier
            # journal as it was (and creates no file).
            book.open(append=resume)
        chunks_done = book.chunks if (book is not None and resume) else {}

        def chunk_finished(pallet, outcome: dict) -> None:
            if book is not None:
                book.write_chunk(pallet, outcome)
            if on_chunk is not None:
                on_chunk(outcome)

        def on_merged(key: tuple, record: dict) -> None:
            if keep_toys is not None:
                kept[key] = record["toys"]

        for group in _run(runner, context, todo, settings, retries, timeout, values_by_key, chunks_done,
                          chunk_finished, on_merged):
            # One write and flush per group: every record is on disk before it is yielded.
            if book is not None:
                book.write_many(group)
            if combine is not None:  # only a combination needs them all: a stream keeps none
                done.extend(group)
            yield from group
        _write_kept(keep_toys, kept, settings)
        yield from _combination(done, combine, pallets, values_by_key)
    finally:
        try:
            if owned:
                runner.shutdown(cancel_futures=True)
        finally:
            if book is not None:
                book.close()
            info["wall_seconds"] = time.time() - started
            _restore_sigterm(sigterm)


def _signals_pallet(workspace, patchset, pallet, signals, template) -> Pallet:
    """The pallet of a ``signals=`` scan (see :mod:`pyhf_dist.signals`)."""
    if signals is None:
        raise InputError("template= (--template) describes the rows of a signals file: also give signals=")
    if patchset is not None or pallet is not None:
        raise InputError("signals= (--signals) replaces the patchset: give the background workspace and the signals file")
    return signal_points.load_signals(workspace, signals, template)


def _check_keep_toys(path, settings) -> None:
    """``keep_toys`` needs a toy-based hypotest and a ``.npz`` file in a folder that exists."""
    if settings.calctype != "toybased" or settings.calculation != "hypotest":
        raise SettingsError("keep_toys (--keep-toys) needs toy-based hypotests (--toys N)")
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"--keep-toys writes a .npz file, not {path.name!r}")
    if not path.parent.is_dir():
        raise InputError(f"--keep-toys: no folder {str(path.parent)!r} to write {path.name} in")


def _write_kept(path, kept: dict, settings) -> None:
    """The kept toys of the scan's patches (in the order of their keys), when asked for."""
    if path is not None and kept:
        from pyhf_dist.toys import write_kept

        write_kept(path, dict(sorted(kept.items(), key=lambda item: (item[0][0] or "", item[0][1]))), settings)


def _combination(done: list[FitRecord], combine: str | None, pallets: list[Pallet], order: dict) -> list:
    """The combined records of a scan (none without ``combine``): derived from its records, never
    journaled (a resumed scan combines afresh), in the pallets' order, not the order fits finished."""
    if combine is None:
        return []
    position = {key: index for index, key in enumerate(order)}
    return combine_records(sorted(done, key=lambda record: position[record.key]), combine,
                           [each.name for each in pallets])


def _check_workspaces(pallets: list[Pallet]) -> None:
    for each in pallets:
        check_workspace(each.workspace, each.source if each.name is None else f"{each.source}:{each.name}")


def _run(runner, context, todo, settings, retries, timeout, values_by_key, chunks_done=None, chunk_finished=None,
         on_merged=None) -> Iterator[FitRecord]:
    workers = runner.workers or 1
    planned = plan_chunks(settings, workers, len(todo))
    toy_based = settings.calctype == "toybased" and settings.calculation == "hypotest"
    chunks_done = chunks_done or {}
    partial: dict[tuple, list[dict]] = collections.defaultdict(list)
    queue, expected = _plan_jobs(todo, settings, planned, chunks_done, partial, toy_based)

    def merged(key: tuple, pallet) -> FitRecord:
        record = merge_chunks(partial.pop(key), settings)
        record.pop("chunk", None)
        if on_merged is not None and record.get("status") == "ok" and "toys" in record:
            on_merged(key, record)
        # Popped: what the loop keeps per patch must not grow with the scan.
        record.update(values=values_by_key[key], submitted=first_submitted.pop(key, None),
                      attempts=attempts.pop(key, 0) or 1, pallet=pallet)
        return FitRecord.from_dict(record)

    first_submitted: dict[tuple, float] = {}
    attempts: dict[tuple, int] = collections.defaultdict(int)
    in_flight: dict[concurrent.futures.Future, list[_Job]] = {}
    for pallet, patch in todo if toy_based else ():  # every chunk already in the journal (a kill before its merge)
        key = (pallet, patch.name)
        if partial.get(key) and len(partial[key]) == expected[key]:
            yield [merged(key, pallet)]
    batching = _Batching(runner, timeout)
    # A scan that packs patches keeps only a few tasks ahead of the workers, so that each one is
    # sized with what the fits so far took.
    limit = runner.max_pending or (2 * workers if batching.enabled else len(queue))

    def submit(jobs: list[_Job]) -> None:
        now = time.time()
        jobs = _reject_invalid(jobs, in_flight)  # rows of a signals file that cannot be fitted
        if not jobs:
            return
        tasks = []
        for job in jobs:
            job.submitted = now
            job.running_since = None
            first_submitted.setdefault(job.key, now)
            attempts[job.key] = max(attempts[job.key], job.attempt)
            tasks.append(make_task(job.patch.name, job.patch.operations, context.key, pallet=job.pallet,
                                   chunk=job.chunk, timeout=timeout))
        in_flight[runner.submit(tasks[0] if len(tasks) == 1 else make_batch(tasks))] = jobs

    while queue or in_flight:
        while queue and len(in_flight) < limit:
            size = batching.size(len(queue), workers)
            submit([queue.popleft() for _ in range(min(size, len(queue)))])
        if timeout:  # checked with every worker busy, before waiting for the next result
            _expire(runner, in_flight, timeout)
        done, _ = concurrent.futures.wait(list(in_flight), timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
        group = []  # every record of this round: journaled with one write
        for future in [future for future in in_flight if future in done]:  # in submission order
            jobs = in_flight.pop(future)
            try:
                result = future.result()
                outcomes = [result] if len(jobs) == 1 else result["batch"]
            except concurrent.futures.CancelledError:
                outcomes = [_failed(job, "cancelled by the executor") for job in jobs]
            except Exception as error:
                lost = runner.is_worker_lost(error)
                retried = [job for job in jobs if lost and job.attempt <= retries]
                for job in reversed(retried):
                    job.attempt += 1
                    queue.appendleft(job)
                jobs = [job for job in jobs if job not in retried]
                detail = runner.explain_loss(future, error) if lost else first_line(error, with_type=True)
                if retried:
                    log.warning("%s: %s again (attempt %d of %d)", detail,
                                _patches([job.patch.name for job in retried]), retried[0].attempt, retries + 1)
                outcomes = [_failed(job, f"worker lost {job.attempt} times: {detail}" if lost else f"task failed: {detail}")
                            for job in jobs]
            for job, outcome in zip(jobs, outcomes):
                batching.measured(outcome)
                partial[job.key].append(outcome)
                if toy_based and outcome.get("status") == "ok" and "toys" in outcome and chunk_finished is not None:
                    chunk_finished(job.pallet, outcome)
                if len(partial[job.key]) == expected[job.key]:
                    group.append(merged(job.key, job.pallet))
        if group:
            yield group


def _plan_jobs(todo, settings, planned, chunks_done, partial, toy_based) -> tuple:
    """The scan's queue of jobs and how many outcomes each patch waits for."""
    if not toy_based:
        # One task per patch: jobs are made as they are submitted, never all held at once.
        return _JobQueue((_Job(patch, None, pallet) for pallet, patch in todo), len(todo)), _OnePerPatch()
    queue: collections.deque[_Job] = collections.deque()
    expected = {(pallet, patch.name): 0 for pallet, patch in todo}
    for pallet, patch in todo:
        done = chunks_done.get((pallet, patch.name), [])
        # A resumed toy scan fits only the toys its journal's chunks do not cover.
        chunks = missing_chunks(settings.ntoys, done, planned) if done else planned
        partial[(pallet, patch.name)].extend(done)
        expected[(pallet, patch.name)] = len(done) + len(chunks)
        queue.extend(_Job(patch, chunk, pallet) for chunk in chunks)
    return queue, expected


class _JobQueue:
    """The queue of a scan with one task per patch: the jobs still to be made (from a lazy
    ``todo``), behind those put back for a retry. What the loop needs of a deque, sized."""

    def __init__(self, jobs: Iterator[_Job], count: int):
        self.jobs, self.count = iter(jobs), count
        self.retried: collections.deque[_Job] = collections.deque()

    def __len__(self) -> int:
        return len(self.retried) + self.count

    def popleft(self) -> _Job:
        if self.retried:
            return self.retried.popleft()
        self.count -= 1
        return next(self.jobs)

    def appendleft(self, job: _Job) -> None:
        self.retried.appendleft(job)


class _OnePerPatch:
    """``expected`` of a scan with one task per patch: every patch waits for one outcome."""

    def __getitem__(self, key) -> int:
        return 1


def _reject_invalid(jobs: list[_Job], in_flight: dict) -> list[_Job]:
    """Jobs whose patch says it cannot be fitted (a malformed row of a signals file) get a failed
    record at once, with the row's reason; the others are returned, to be submitted."""
    if not any(getattr(job.patch, "error", None) for job in jobs):
        return jobs
    kept = []
    for job in jobs:
        if getattr(job.patch, "error", None):
            resolved: concurrent.futures.Future = concurrent.futures.Future()
            resolved.set_result(_failed(job, job.patch.error))
            in_flight[resolved] = [job]
        else:
            kept.append(job)
    return kept


class _Batching:
    """How many patches go into one task: one, unless the executor asks for packing
    (:attr:`~pyhf_dist.executors.base.Executor.batch_seconds`) and the fits so far were short.

    The size is the executor's seconds over the median fit so far, and at most the queue over
    four times the workers (guided self-scheduling: tasks shrink as the queue empties, so the last
    ones are single fits and the workers finish together). Never with a per-fit timeout: a task
    given up on would take its finished fits with it.
    """

    def __init__(self, runner, timeout: float | None):
        self.seconds = runner.batch_seconds if runner.workers and not timeout else 0.0
        self.fit_seconds: collections.deque[float] = collections.deque(maxlen=64)  # the latest only

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def measured(self, outcome: dict) -> None:
        if self.enabled and outcome.get("status") == "ok" and outcome.get("fit_seconds"):
            self.fit_seconds.append(outcome["fit_seconds"])

    def size(self, queued: int, workers: int) -> int:
        if not self.enabled or not self.fit_seconds:
            return 1
        typical = max(statistics.median(self.fit_seconds), 1e-3)
        return max(1, min(int(self.seconds / typical), queued // (4 * workers)))


def _expire(runner, in_flight, timeout) -> None:
    # The worker stops a fit at ``timeout`` by itself where it can; this is the client's backstop
    # for workers that cannot (tasks run in threads, a fit stuck in C code), measured from when a
    # worker began the task. (A scan with a timeout sends one patch per task.)
    now, wall = time.monotonic(), time.time()
    for future, jobs in list(in_flight.items()):
        job = jobs[0]
        if job.running_since is None:
            began = runner.started_at(future)  # Unix time, as executors know it
            if began is not None:
                # From here on the task's age is counted on the monotonic clock: a wall clock set
                # forward (NTP, an operator) must not time out every task in flight at once, nor
                # one set back keep a stuck task for ever.
                job.running_since = now - max(0.0, wall - began)
        if job.running_since is not None and now - job.running_since > timeout + TIMEOUT_GRACE:
            replacement: concurrent.futures.Future = concurrent.futures.Future()
            replacement.set_result(_failed(job, f"timed out after {timeout} s (worker did not respond)"))
            in_flight[replacement] = in_flight.pop(future)
            runner.abandon(future)


def _patches(names: list[str]) -> str:
    """``"fitting A"``, ``"fitting A, B and 3 more"``: the patches a retry submits again."""
    shown = ", ".join(names[:2])
    return f"fitting {shown}" + (f" and {len(names) - 2} more" if len(names) > 2 else "")


def _failed(job: _Job, message: str) -> dict:
    return failed_record(make_task(job.patch.name, job.patch.operations, "", chunk=job.chunk), message)


def _executor(executor: Any, options: dict):
    """The executor object, or one line naming the misspelt fit setting among ``options``."""
    try:
        return get_executor(executor, **options)
    except ExecutorOptionError:
        import difflib
        import inspect

        settings = [name for name in inspect.signature(map_fits).parameters if name not in ("workspace", "patchset")]
        for option in options:
            if option in settings:  # a real argument, just not one this executor takes
                continue
            close = difflib.get_close_matches(option, settings, n=1, cutoff=0.75)
            if close:
                raise SettingsError(f"unknown argument {option!r}: did you mean {close[0]}?") from None
        raise


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


def _sigterm_as_interrupt():
    """Make SIGTERM stop the scan as Ctrl-C does, while it runs.

    A batch job at its time limit gets SIGTERM; by default Python dies of it on the spot, leaving
    the workers and clusters it started to notice by themselves. Only where nobody chose a
    handler (the default), and only in the main thread, where handlers can be set. Returns what
    to restore.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    signal.signal(signal.SIGTERM, _interrupt)
    return signal.SIG_DFL


def _restore_sigterm(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def _versions() -> dict:
    from importlib import metadata

    from pyhf_dist import __version__

    # From the installed metadata: the client need not import pyhf itself.
    return {"pyhf_version": metadata.version("pyhf"), "pyhf_dist_version": __version__,
            "python": platform.python_version(), "host": platform.node()}


def map_fits(
    workspace: Any,
    patchset: Any = None,
    *,
    executor: Any = "local",
    workers: int | None = None,
    patches: Any = None,
    pallet: Any = None,
    combine: str | None = None,
    poi_test: float = 1.0,
    test_stat: str = "qtilde",
    backend: str | None = None,
    modifier_settings: dict | None = None,
    calculation: str = "hypotest",
    calctype: str = "asymptotics",
    ntoys: int = 1000,
    seed: int = 0,
    upper_limit_scan: tuple | None = None,
    require_fast: bool = False,
    match_pyhf: bool = False,
    optimizer: str = "scipy",
    journal: str | os.PathLike | None = None,
    resume: bool = False,
    retries: int = 2,
    timeout: float | None = None,
    callback: Callable[[FitRecord], None] | None = None,
    progress: bool = False,
    on_start: Callable[[dict], None] | None = None,
    keep_toys: str | os.PathLike | None = None,
    signals: Any = None,
    template: Any = None,
    **executor_options,
) -> ScanResult:
    """Fit every selected patch of a pallet and return all results.

    Args:
        workspace: The background workspace (``pyhf.Workspace``, dict or JSON path), or a whole
            pallet (directory, HEPData ``.tar.gz``, DOI) when ``patchset`` is ``None``.
        patchset: ``pyhf.PatchSet``, dict, ``patchset.json`` path, or a directory of
            ``patch.<name>.json`` files.
        executor: ``"local"``, ``"sequential"``, ``"dask"``, ``"slurm"``, ``"funcx"``, ``"parsl"``,
            an executor object of this library, or any ``concurrent.futures.Executor``.
        workers: Number of workers for executors that start their own.
        patches: Patch names or shell-style patterns to fit; ``None`` fits all.
        pallet: Which pallets of a source that holds several (e.g. an archive with
            ``Region-combined/``, ``Region-lowMass/``... folders): a name, a list of names, a
            shell-style pattern, or ``"all"``. Required when there are several; ``None`` for a
            source with one. Records carry their pallet's name (``None`` for a single-pallet source).
        combine: ``"best-expected"``: also, per signal point, the record of the pallet with the
            smallest median expected CLs, as ``pallet="best-expected"`` records naming the
            ``chosen_pallet`` (rules in :mod:`pyhf_dist.combine`); needs two pallets or more.
        poi_test: Signal strength tested.
        test_stat: ``"qtilde"``, ``"q"`` or ``"q0"``.
        backend: ``"numpy"`` (plain pyhf) or ``"jax"`` (compiled fast path); ``None`` is jax when
            installed, else numpy.
        modifier_settings: Passed to ``pyhf.Workspace.model`` (interpolation codes).
        calculation: ``"hypotest"`` (CLs at ``poi_test``) or ``"upper_limit"`` (95% CL limits on mu).
        calctype: ``"asymptotics"`` or ``"toybased"`` (pseudo-experiments, split across workers).
        ntoys: Pseudo-experiments per patch with ``calctype="toybased"``.
        seed: Random seed of the pseudo-experiments.
        upper_limit_scan: ``(start, stop, points)`` of a grid of mu values for upper limits;
            ``None`` finds them by root-finding.
        require_fast: A patch the compiled fast path declines becomes a failed record saying why,
            instead of being fitted by plain pyhf (for benchmarks and CI).
        match_pyhf: On the fast path, reproduce pyhf's own numbers instead of the converged,
            certified fits (the default): pyhf's fits' starting points, and plain pyhf where its
            minimizer stalls at its start or the noise of its fits decides a CLs value.
        optimizer: Plain pyhf's minimizer: ``"scipy"`` (SLSQP, pyhf's default) or ``"minuit"``
            (MINUIT via iminuit).
        journal: A JSON-lines file every finished record is appended to as it arrives.
        resume: Skip the patches whose record in ``journal`` is ok (failed ones are fit again).
        retries: Resubmissions of a task whose worker died.
        timeout: Seconds per fit, after which it is recorded as failed.
        callback: Called with each :class:`FitRecord` as it arrives.
        progress: Show a progress bar on standard error (for toys, with toys per second).
        keep_toys: Write every patch's toy distributions to this ``.npz`` file
            (:func:`pyhf_dist.toys.write_kept`; files of runs with different seeds merge with
            :func:`pyhf_dist.toys.merge_kept`).
        on_start: Called with the scan's metadata once the executor is up.
        signals: A ``.csv`` or ``.parquet`` file of signal points, one row each (name, model
            parameters, yields per channel bin): fitted instead of a patchset, each row made into
            a patch by ``template`` as the scan goes (:mod:`pyhf_dist.signals`). ``workspace`` is
            then the background workspace; records' ``values`` are the row's parameters.
        template: How a row becomes a patch: a :class:`pyhf_dist.signals.Template`, its dict, or a
            JSON file (channels, sample name, normsys, staterror or shapesys); ``None``: defaults.
        **executor_options: The chosen executor's own keyword arguments (``jobs``, ``memory`` for
            ``"slurm"``, ``address`` for ``"dask"``...); one it does not take is an error.

    Returns:
        A :class:`ScanResult` with one record per selected patch and pallet, in the pallets'
        order, then the combined records.

    Raises:
        InputError: Something given is wrong (the one-line message says how to fix it).
        ExecutorError: The executor could not start or run the tasks.

    Example:
        >>> import pyhf_dist
        >>> pallet = pyhf_dist.demo_pallet(points=4)
        >>> result = pyhf_dist.map_fits(pallet, executor="sequential", backend="numpy")
        >>> len(result), result.counts()["failed"]
        (4, 0)
    """
    if workers is not None:
        executor_options["workers"] = workers
    metadata: dict = {}
    records: dict[tuple, FitRecord] = {}
    combined: list[FitRecord] = []
    bar = None

    def started(info: dict) -> None:
        nonlocal bar
        if progress:
            from pyhf_dist.progress import ProgressBar

            toy_based = calctype == "toybased"
            bar = ProgressBar(total=info["patches"], toys=ntoys * (info["patches"] - info["resumed"]) if toy_based else 0)
        if on_start is not None:
            on_start(info)

    stream = iter_fits(
        workspace, patchset, executor=executor, patches=patches, pallet=pallet, combine=combine,
        poi_test=poi_test, test_stat=test_stat, backend=backend, modifier_settings=modifier_settings,
        calculation=calculation, calctype=calctype, ntoys=ntoys, seed=seed, upper_limit_scan=upper_limit_scan,
        require_fast=require_fast, match_pyhf=match_pyhf, optimizer=optimizer, journal=journal, resume=resume,
        retries=retries, timeout=timeout, metadata=metadata, on_start=started,
        keep_toys=keep_toys, on_chunk=lambda outcome: bar.chunk(outcome) if bar is not None else None,
        signals=signals, template=template, **executor_options,
    )
    try:
        for record in stream:
            if record.combined:
                combined.append(record)
            else:
                records[record.key] = record
                if bar is not None:
                    bar.update(record)
            if callback is not None:
                callback(record)
    finally:
        stream.close()
        if bar is not None:
            bar.close()
    order = metadata.pop("order")
    return ScanResult([records[key] for key in order if key in records] + combined, metadata)
