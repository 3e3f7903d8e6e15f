"""The scan: fit every selected patch of a pallet on the chosen executor.

:func:`iter_fits` yields one :class:`~pyhf_dist.results.FitRecord` per patch as results arrive;
:func:`map_fits` collects them into a :class:`~pyhf_dist.results.ScanResult`. Both take the same
options (:mod:`pyhf_dist.scan.options`). A scan can fit several pallets of one source at once
(``pallet=``): one context holds every chosen pallet's workspace, each task names its pallet, and
records are identified by ``(pallet, name)``; ``combine="best-expected"`` adds their combination
at the end. The scan keeps what it must never lose: every finished record goes to the journal
(when one is given) before anything else happens, tasks whose worker died are resubmitted up to
``retries`` times (:mod:`pyhf_dist.scan.loop`), a fit that raises becomes a failed record, and
executors the scan started are shut down however it ends — normally, on an error, or on Ctrl-C
(or a batch system's SIGTERM, which stops the scan as Ctrl-C does).
"""

from __future__ import annotations

import inspect
import logging
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from pyhf_dist import cache
from pyhf_dist.combine import combine as combine_records
from pyhf_dist.exceptions import ExecutorError, ExecutorOptionError, InputError, SettingsError, StorageWarning
from pyhf_dist.executors import get_executor
from pyhf_dist.journal import Journal, describe_errno
from pyhf_dist.protocol import first_line
from pyhf_dist.results import FitRecord, ScanResult
from pyhf_dist.scan.interrupts import stop_signals_as_interrupt
from pyhf_dist.scan.loop import Loop
from pyhf_dist.scan.options import misspelt, options_doc, signature, split_options
from pyhf_dist.scan.plan import Plan
from pyhf_dist.scan.running_toys import RunningToys

log = logging.getLogger(__name__)

__all__ = ["map_fits", "iter_fits"]


def iter_fits(workspace: Any, patchset: Any = None, *, executor: Any = "local", **options) -> Iterator[FitRecord]:
    """Fit the selected patches and yield each record as it completes.

    Records read back from the journal of a resumed scan come first; with ``combine``, the
    combined records come last, once every fit is in. ``metadata`` (a dict), when given, is
    filled with the scan's metadata as soon as it is known, and ``on_start`` is called with it
    once the executor is up (before the first result).

    Args:
{arguments}
        **executor_options: The chosen executor's own keyword arguments (``workers``; ``jobs``,
            ``memory`` for ``"slurm"``; ``address`` for ``"dask"``...); one it does not take is an
            error. (The options below are keyword arguments too: the signature lists them.)

    Options:
{options}
    """
    settings, scan, executor_options = split_options(options)
    runner = _executor(executor, executor_options)
    reason = runner.supports(settings)
    if reason is not None:
        raise SettingsError(reason)
    if scan.keep_toys is not None:
        _check_keep_toys(scan.keep_toys, settings)
    info = scan.metadata if scan.metadata is not None else {}
    started = time.time()
    book = None
    with stop_signals_as_interrupt():
        try:
            cache.check()
            if runner.owned:
                # Workers that can start early import what the fits need while the pallet is read.
                runner.prepare(settings.to_dict())
            plan = Plan.of(workspace, patchset, scan.pallet, scan.patches, scan.combine, scan.signals, scan.template)
            key = plan.journal_key(settings)  # a digest of the whole workspace: made once
            book = Journal(scan.journal, key) if scan.journal is not None else None
            if book is not None:
                book.acquire()  # before reading it: two scans must never write one journal
                if not scan.resume:
                    book.check_unused()  # a fresh journal must not empty an earlier scan's
            finished = _finished(book, scan.resume, plan, info)
            info.update(plan.describe(), resumed=len(finished), settings=settings.to_dict(),
                        settings_digest=settings.digest(), scan_key=key,
                        journal=str(book.path) if book is not None else None, **_versions())
            info["started"] = started = time.time()
            yield from _scan(runner, plan, settings, scan, book, finished, info)
        finally:
            try:
                if runner.owned:
                    runner.shutdown(cancel_futures=True)
            finally:
                if book is not None:
                    book.close()
                info["wall_seconds"] = time.time() - started


def _scan(runner, plan: Plan, settings, scan, book, finished: dict, info: dict) -> Iterator[FitRecord]:
    """Start the executor, yield the journal's records, then every new one, then the combination."""
    done = list(finished.values())
    kept = _kept_from_journal(book, finished, settings) if scan.keep_toys is not None else {}
    todo = plan.todo(finished)
    if todo:
        context = plan.context(settings)
        _start(runner, context, plan)
    info.update(runner.describe())
    if book is not None and scan.resume:
        # Toys of the unfinished patches a resumed scan's journal holds (fitted no more).
        info["toys_resumed"] = sum(chunk["toys"]["stop"] - chunk["toys"]["start"] for key, chunks in book.chunks.items()
                                   if key not in finished and key in plan.values_by_key for chunk in chunks)
    if scan.on_start is not None:
        scan.on_start(info)
    yield from done
    if todo:
        if book is not None:
            # Opened only now, once the executor is up: a scan that cannot start leaves an earlier
            # journal as it was (and creates no file).
            book.open(append=scan.resume)

        def chunk_finished(pallet, outcome: dict, digest: str | None) -> None:
            if book is not None:
                book.write_chunk(pallet, outcome, digest)
            if scan.on_chunk is not None:
                scan.on_chunk(outcome)

        toy_based = settings.calctype == "toybased" and settings.calculation == "hypotest"
        running = RunningToys(scan.on_toy_progress) if (toy_based and scan.on_toy_progress) else None
        loop = Loop(runner, context, settings, scan.retries, scan.timeout, plan.values_by_key,
                    book.chunks if (book is not None and scan.resume) else {}, chunk_finished,
                    lambda key, record: kept.__setitem__(key, record["toys"]), running, journaled=book is not None)
        try:
            for group in loop.groups(todo):
                # One write and flush per group: every record is on disk before it is yielded.
                digests = [loop.take_digest(record.key) for record in group]
                if book is not None:
                    book.write_many(group, digests)
                if plan.combine is not None:  # only a combination needs them all: a stream keeps none
                    done.extend(group)
                yield from group
        finally:
            if running is not None:
                running.close()
    _write_kept(scan.keep_toys, kept, settings, book, info)
    yield from _combination(done, plan)


def _start(runner, context, plan: Plan) -> None:
    """Start the executor with ``context``; then check the workspaces (while the workers start)."""
    try:
        runner.start(context)
    except InputError:
        raise
    except Exception as error:
        # An invalid workspace must be refused as bad input (naming the JSON path), not surface
        # as a worker that cannot start.
        plan.check()
        if isinstance(error, ExecutorError):
            raise
        raise ExecutorError(f"executor {runner.name!r} could not start: {first_line(error, with_type=True)}") from error
    # Full schema validation takes about a second for a large workspace: it runs while the
    # workers start, and before any result is taken.
    plan.check()


def _finished(book, resume: bool, plan: Plan, info: dict) -> dict:
    """The ok records a resumed scan's journal holds for the plan's patches (none otherwise).

    A patch that changed since the journal's record or chunks of it were written (another patch
    file under its name, a row of signals with other yields, another template) is fitted again.
    """
    finished = book.load() if (book is not None and resume) else {}
    if book is not None and book.skipped:
        info["journal_skipped"] = list(book.skipped)
    if book is not None and (book.record_digests or book.chunk_digests):
        kept = {key for key in (*book.record_digests, *book.chunk_digests) if key in plan.values_by_key}
        stale, changed = book.drop_changed(plan.patch_digests(kept))
        if changed:
            log.warning("%d patch%s changed since %s was written (%s): fitted again", len(changed),
                        "es" if len(changed) > 1 else "", book.path, _named(sorted(changed, key=str)))
        for key in stale:
            finished.pop(key, None)
    # Only fits that succeeded are kept: a resumed scan fits the failed ones again.
    return {key: record for key, record in finished.items() if key in plan.values_by_key and record.ok}


def _named(keys: list) -> str:
    names = [name if pallet is None else f"{pallet}/{name}" for pallet, name in keys]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _kept_from_journal(book, finished: dict, settings) -> dict:
    """The toys of patches an earlier run of this scan finished: the journal's chunks."""
    from pyhf_dist.chunks import merge_chunks

    kept = {}
    for key in finished if book is not None else ():
        chunks = book.chunks.get(key)
        if chunks:
            merged = merge_chunks(list(chunks), settings)
            if merged["status"] == "ok":
                kept[key] = merged["toys"]
    return kept


def _check_keep_toys(path, settings) -> None:
    """``keep_toys`` needs a toy-based hypotest and a ``.npz`` file in a folder that exists."""
    if settings.calctype != "toybased" or settings.calculation != "hypotest":
        raise SettingsError("keep_toys (--keep-toys) needs toy-based hypotests (--toys N)")
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"--keep-toys writes a .npz file, not {path.name!r}")
    if not path.parent.is_dir():
        raise InputError(f"--keep-toys: no folder {str(path.parent)!r} to write {path.name} in")


def _write_kept(path, kept: dict, settings, book, info: dict) -> None:
    """The kept toys of the scan's patches (in the order of their keys), when asked for.

    A file that cannot be written (a full disk, a folder removed) costs that file, not the scan:
    its records are out already. It is said in a :class:`~pyhf_dist.exceptions.StorageWarning`
    and in the metadata (``keep_toys_error``); a journal holds the toys, from which the same scan
    resumed writes the file without fitting again.
    """
    if path is None or not kept:
        return
    from pyhf_dist.kept_toys import write_kept

    try:
        write_kept(path, dict(sorted(kept.items(), key=lambda item: (item[0][0] or "", item[0][1]))), settings)
    except OSError as error:
        info["keep_toys_error"] = f"cannot write the kept toys {path}: {describe_errno(error)}"
        info["keep_toys_errno"] = error.errno
        where = (f"their toys are in the journal {book.path}: the same scan with resume=True (--resume) writes "
                 "the file without fitting again" if book is not None
                 else "the records are returned, their toys are not kept (a journal= would keep them)")
        warnings.warn(StorageWarning(f"{info['keep_toys_error']}; {where}", path=path, errno=error.errno),
                      stacklevel=2)


def _combination(done: list[FitRecord], plan: Plan) -> list:
    """The combined records of a scan (none without ``combine``): derived from its records, never
    journaled (a resumed scan combines afresh), in the pallets' order, not the order fits finished."""
    if plan.combine is None:
        return []
    position = {key: index for index, key in enumerate(plan.values_by_key)}
    return combine_records(sorted(done, key=lambda record: position[record.key]), plan.combine,
                           [each.name for each in plan.pallets])


def _executor(executor: Any, options: dict):
    """The executor object, or one line naming the misspelt option among ``options``. One made
    here from a name is the scan's own (:attr:`~pyhf_dist.executors.base.Executor.owned`)."""
    try:
        runner = get_executor(executor, **options)
    except ExecutorOptionError:
        misspelt(options)
        raise
    if isinstance(executor, str):
        runner.owned = True
    return runner


def _versions() -> dict:
    from importlib import metadata

    from pyhf_dist import __version__

    # From the installed metadata: the client need not import pyhf itself.
    return {"pyhf_version": metadata.version("pyhf"), "pyhf_dist_version": __version__,
            "python": platform.python_version(), "host": platform.node()}


def map_fits(workspace: Any, patchset: Any = None, *, executor: Any = "local", workers: int | None = None,
             callback=None, progress: bool = False, **options) -> ScanResult:
    """Fit every selected patch of a pallet and return all results.

    Args:
{arguments}
        workers: Number of workers for executors that start their own.
        callback: Called with each :class:`~pyhf_dist.results.FitRecord` as it arrives.
        progress: Show a progress bar on standard error (for toys, with toys per second).
        **executor_options: The chosen executor's own keyword arguments (``jobs``, ``memory``
            for ``"slurm"``, ``address`` for ``"dask"``...); one it does not take is an error. (The
            options below are keyword arguments too: the signature lists them.)

    Returns:
        A :class:`~pyhf_dist.results.ScanResult` with one record per selected patch and pallet, in
        the pallets' order, then the combined records.

    Raises:
        InputError: Something given is wrong (the one-line message says how to fix it).
        ExecutorError: The executor could not start or run the tasks.

    Example:
        >>> import pyhf_dist
        >>> pallet = pyhf_dist.demo_pallet(points=4)
        >>> result = pyhf_dist.map_fits(pallet, executor="sequential", backend="numpy")
        >>> len(result), result.counts()["failed"]
        (4, 0)

    Options:
{options}
    """
    if workers is not None:
        options["workers"] = workers
    metadata: dict = {}
    # By name for the records of a lone unnamed pallet (pallet None), by (pallet, name) otherwise:
    # a record's key is a tuple made anew on each access (56 bytes a point kept as a dict key),
    # its name the string it holds already.
    records: dict[Any, FitRecord] = {}
    combined: list[FitRecord] = []
    bar = None
    on_start = options.pop("on_start", None)

    def started(info: dict) -> None:
        nonlocal bar
        if on_start is not None:  # first: what it prints goes above the bar, not into its line
            on_start(info)
        if progress:
            from pyhf_dist.progress import ProgressBar

            toy_based = options.get("calctype") == "toybased"
            toys = options.get("ntoys", 1000) * (info["patches"] - info["resumed"]) if toy_based else 0
            bar = ProgressBar(total=info["patches"], toys=toys, toys_done=info.get("toys_resumed", 0))

    on_toy_progress = options.pop("on_toy_progress", None)

    def toys_fitted(count: int) -> None:
        if bar is not None:
            bar.toys_fitted(count)
        if on_toy_progress is not None:
            on_toy_progress(count)

    stream = iter_fits(workspace, patchset, executor=executor, metadata=metadata, on_start=started,
                       on_toy_progress=toys_fitted if (progress or on_toy_progress) else None, **options)
    try:
        for record in stream:
            if record.combined:
                combined.append(record)
            else:
                records[record.name if record.pallet is None else record.key] = record
                if bar is not None:
                    bar.update(record)
            if callback is not None:
                callback(record)
    finally:
        stream.close()
        if bar is not None:
            bar.close()
    ordered = []
    for pallet, name in metadata.pop("order"):
        record = records.get(name if pallet is None else (pallet, name))
        if record is not None:
            ordered.append(record)
    records.clear()  # before the result's own copy of the list: not both at the peak
    ordered.extend(combined)
    return ScanResult(ordered, metadata)


_LEADING = [
    inspect.Parameter("workspace", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("patchset", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
    inspect.Parameter("executor", inspect.Parameter.KEYWORD_ONLY, default="local"),
]
iter_fits.__signature__ = signature(*_LEADING)
map_fits.__signature__ = signature(*_LEADING, inspect.Parameter("workers", inspect.Parameter.KEYWORD_ONLY, default=None),
                                   collector=True)
_ARGUMENTS = """\
        workspace: The background workspace (``pyhf.Workspace``, dict or JSON path), or a whole
            pallet (directory, HEPData ``.tar.gz``, DOI, :class:`~pyhf_dist.pallet.Pallet`) when
            ``patchset`` is ``None``.
        patchset: ``pyhf.PatchSet``, dict, ``patchset.json`` path, a directory of
            ``patch.<name>.json`` files, or a list of patches (patch files, pyhf's ``Patch``
            objects or patchset entries).
        executor: ``"local"``, ``"sequential"``, ``"dask"``, ``"slurm"``, ``"funcx"``, ``"parsl"``,
            an executor object of this library, or any ``concurrent.futures.Executor``."""
for _function in (iter_fits, map_fits):
    _function.__doc__ = _function.__doc__.replace("{arguments}", _ARGUMENTS).replace("{options}", options_doc())
