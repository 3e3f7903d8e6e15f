"""The scan: fit every selected patch of a pallet on the chosen executor.

:func:`iter_fits` yields one :class:`~pyhf_dist.results.FitRecord` per patch as results arrive;
:func:`map_fits` collects them into a :class:`~pyhf_dist.results.ScanResult`. Both take the same
arguments. The loop keeps what a scan must never lose: every finished record goes to the journal
(when one is given) before anything else happens, tasks whose worker died are resubmitted up to
``retries`` times, a fit that raises becomes a failed record, and clusters or pools the scan
started are shut down however it ends — normally, on an error, or on Ctrl-C.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import platform
import signal
import threading
import time
from typing import Any, Callable, Iterator

from pyhf_dist.calculations import merge_chunks, plan_chunks
from pyhf_dist.exceptions import ExecutorError, ExecutorOptionError, InputError, SettingsError, first_line
from pyhf_dist.executors import get_executor
from pyhf_dist.journal import Journal, scan_key
from pyhf_dist.pallet import (
    Pallet, Patch, check_workspace, is_pyhf, load_pallet, load_patches, load_workspace, select_patches,
)
from pyhf_dist.results import FitRecord, ScanResult
from pyhf_dist.settings import FitSettings
from pyhf_dist.worker import WorkerContext, failed_record, make_task

__all__ = ["map_fits", "iter_fits", "prepare_pallet"]

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


@dataclasses.dataclass
class _Job:
    """One task of a patch: the patch, which chunk of it, and how often it was submitted."""

    patch: Patch
    chunk: Any
    attempt: int = 1
    submitted: float = 0.0
    running_since: float | None = None


def iter_fits(
    workspace: Any,
    patchset: Any = None,
    *,
    executor: Any = "local",
    patches: Any = None,
    poi_test: float = 1.0,
    test_stat: str = "qtilde",
    backend: str | None = None,
    modifier_settings: dict | None = None,
    calculation: str = "hypotest",
    calctype: str = "asymptotics",
    ntoys: int = 1000,
    seed: int = 0,
    upper_limit_scan: tuple | None = None,
    journal: str | os.PathLike | None = None,
    resume: bool = False,
    retries: int = 2,
    timeout: float | None = None,
    metadata: dict | None = None,
    on_start: Callable[[dict], None] | None = None,
    **executor_options,
) -> Iterator[FitRecord]:
    """Fit the selected patches and yield each record as it completes.

    Arguments are those of :func:`map_fits` (without ``callback`` and ``progress``; ``workers``
    goes with the executor options). Records read back from the journal of a resumed scan come
    first. When given, ``metadata`` (a dict) is
    filled with the scan's metadata as soon as it is known, and ``on_start`` is called with it once
    the executor is up (before the first result).
    """
    settings = FitSettings(
        poi_test=poi_test, test_stat=test_stat, backend=backend, modifier_settings=modifier_settings,
        calculation=calculation, calctype=calctype, ntoys=ntoys, seed=seed,
        upper_limit_scan=upper_limit_scan,
    )
    if not isinstance(retries, int) or retries < 0:
        raise InputError(f"retries must be a non-negative integer, got {retries!r}")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")
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
        pallet = prepare_pallet(workspace, patchset, validate=False)
        selected = select_patches(pallet.patches, patches)
        values_by_name = {patch.name: list(patch.values) for patch in selected}

        book = Journal(journal, scan_key(pallet.workspace, settings)) if journal is not None else None
        if book is not None:
            book.acquire()  # before reading it: two scans must never write one journal
        finished = book.load() if (book is not None and resume) else {}
        # Only fits that succeeded are kept: a resumed scan fits the failed ones again.
        finished = {name: record for name, record in finished.items() if name in values_by_name and record.ok}
        todo = [patch for patch in selected if patch.name not in finished]

        context = WorkerContext.build(pallet.workspace, settings.to_dict())
        info.update(
            source=pallet.source,
            labels=pallet.labels,
            patches=len(selected),
            order=[patch.name for patch in selected],
            resumed=len(finished),
            settings=settings.to_dict(),
            settings_digest=settings.digest(),
            scan_key=book.key if book is not None else scan_key(pallet.workspace, settings),
            journal=str(book.path) if book is not None else None,
            **_versions(),
        )
        started = time.time()
        info["started"] = started
        if not todo:
            info.update(runner.describe())
            if on_start is not None:
                on_start(info)
            yield from finished.values()
            return
        try:
            runner.start(context)
        except InputError:
            raise
        except Exception as error:
            # An invalid workspace must be refused as bad input (naming the JSON path), not
            # surface as a worker that cannot start.
            check_workspace(pallet.workspace, pallet.source)
            if isinstance(error, ExecutorError):
                raise
            raise ExecutorError(f"executor {runner.name!r} could not start: {first_line(error, with_type=True)}") from error
        # Full schema validation takes about a second for a large workspace: it runs while the
        # workers start, and before any result is taken.
        check_workspace(pallet.workspace, pallet.source)
        info.update(runner.describe())
        if on_start is not None:
            on_start(info)
        yield from finished.values()
        if book is not None:
            # Opened only now, once the executor is up: a scan that cannot start leaves an earlier
            # journal as it was (and creates no file).
            book.open(append=resume)
        for record in _run(runner, context, todo, settings, retries, timeout, values_by_name):
            if book is not None:
                book.write(record)
            yield record
    finally:
        try:
            if owned:
                runner.shutdown(cancel_futures=True)
        finally:
            if book is not None:
                book.close()
            info["wall_seconds"] = time.time() - started
            _restore_sigterm(sigterm)


def _run(runner, context, todo, settings, retries, timeout, values_by_name) -> Iterator[FitRecord]:
    workers = runner.workers or 1
    queue: collections.deque[_Job] = collections.deque(
        _Job(patch, chunk) for patch in todo for chunk in plan_chunks(settings, workers)
    )
    expected = {patch.name: 0 for patch in todo}
    for job in queue:
        expected[job.patch.name] += 1
    partial: dict[str, list[dict]] = collections.defaultdict(list)
    first_submitted: dict[str, float] = {}
    attempts: dict[str, int] = collections.defaultdict(int)
    in_flight: dict[concurrent.futures.Future, _Job] = {}
    limit = runner.max_pending or len(queue)

    def submit(job: _Job) -> None:
        job.submitted = time.time()
        job.running_since = None
        first_submitted.setdefault(job.patch.name, job.submitted)
        attempts[job.patch.name] = max(attempts[job.patch.name], job.attempt)
        task = make_task(job.patch.name, job.patch.operations, context.key, chunk=job.chunk, timeout=timeout)
        in_flight[runner.submit(task)] = job

    while queue or in_flight:
        while queue and len(in_flight) < limit:
            submit(queue.popleft())
        if timeout:  # checked with every worker busy, before waiting for the next result
            _expire(runner, in_flight, timeout)
        done, _ = concurrent.futures.wait(list(in_flight), timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in [future for future in in_flight if future in done]:  # in submission order
            job = in_flight.pop(future)
            try:
                outcome = future.result()
            except concurrent.futures.CancelledError:
                outcome = _failed(job, "cancelled by the executor")
            except Exception as error:
                lost = runner.is_worker_lost(error)
                if lost and job.attempt <= retries:
                    job.attempt += 1
                    queue.appendleft(job)
                    continue
                reason = f"worker lost {job.attempt} times" if lost else "task failed"
                outcome = _failed(job, f"{reason}: {first_line(error, with_type=True)}")
            partial[job.patch.name].append(outcome)
            if len(partial[job.patch.name]) == expected[job.patch.name]:
                name = job.patch.name
                record = merge_chunks(partial.pop(name), settings)
                record.pop("chunk", None)
                record.update(values=values_by_name[name], submitted=first_submitted[name], attempts=attempts[name])
                yield FitRecord.from_dict(record)


def _expire(runner, in_flight, timeout) -> None:
    # The worker stops a fit at ``timeout`` by itself where it can; this is the client's backstop
    # for workers that cannot (tasks run in threads, a fit stuck in C code), measured from when a
    # worker began the task.
    now = time.time()
    for future, job in list(in_flight.items()):
        if job.running_since is None:
            job.running_since = runner.started_at(future)
        if job.running_since is not None and now - job.running_since > timeout + TIMEOUT_GRACE:
            replacement: concurrent.futures.Future = concurrent.futures.Future()
            replacement.set_result(_failed(job, f"timed out after {timeout} s (worker did not respond)"))
            in_flight[replacement] = in_flight.pop(future)
            runner.abandon(future)


def _failed(job: _Job, message: str) -> dict:
    return failed_record(make_task(job.patch.name, job.patch.operations, "", chunk=job.chunk), message)


def _executor(executor: Any, options: dict):
    """The executor object, or one line naming the misspelt fit setting among ``options``."""
    try:
        return get_executor(executor, **options)
    except ExecutorOptionError as error:
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
    poi_test: float = 1.0,
    test_stat: str = "qtilde",
    backend: str | None = None,
    modifier_settings: dict | None = None,
    calculation: str = "hypotest",
    calctype: str = "asymptotics",
    ntoys: int = 1000,
    seed: int = 0,
    upper_limit_scan: tuple | None = None,
    journal: str | os.PathLike | None = None,
    resume: bool = False,
    retries: int = 2,
    timeout: float | None = None,
    callback: Callable[[FitRecord], None] | None = None,
    progress: bool = False,
    on_start: Callable[[dict], None] | None = None,
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
        journal: A JSON-lines file every finished record is appended to as it arrives.
        resume: Skip the patches whose record in ``journal`` is ok (failed ones are fit again).
        retries: Resubmissions of a task whose worker died.
        timeout: Seconds per fit, after which it is recorded as failed.
        callback: Called with each :class:`FitRecord` as it arrives.
        progress: Show a progress bar on standard error.
        on_start: Called with the scan's metadata once the executor is up.
        **executor_options: The chosen executor's own keyword arguments (``jobs``, ``memory`` for
            ``"slurm"``, ``address`` for ``"dask"``...); one it does not take is an error.

    Returns:
        A :class:`ScanResult` with one record per selected patch, in the pallet's order.

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
    records: dict[str, FitRecord] = {}
    bar = None

    def started(info: dict) -> None:
        nonlocal bar
        if progress:
            from pyhf_dist.progress import ProgressBar

            bar = ProgressBar(total=info["patches"])
        if on_start is not None:
            on_start(info)

    stream = iter_fits(
        workspace, patchset, executor=executor, patches=patches, poi_test=poi_test, test_stat=test_stat,
        backend=backend, modifier_settings=modifier_settings, calculation=calculation, calctype=calctype,
        ntoys=ntoys, seed=seed, upper_limit_scan=upper_limit_scan, journal=journal, resume=resume,
        retries=retries, timeout=timeout, metadata=metadata, on_start=started, **executor_options,
    )
    try:
        for record in stream:
            records[record.name] = record
            if bar is not None:
                bar.update(record)
            if callback is not None:
                callback(record)
    finally:
        stream.close()
        if bar is not None:
            bar.close()
    order = metadata.pop("order")
    return ScanResult([records[name] for name in order if name in records], metadata)
