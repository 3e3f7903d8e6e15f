"""The loop of a scan: submit tasks, collect records, retry what a lost worker took with it.

:class:`Loop` keeps a queue of jobs (:class:`Job`: one per patch, or per chunk of a patch's toys),
submits them to the executor (several to a pack where the executor asks for it,
:class:`Packing`), and turns every finished future into records: a fit that raised is a failed
record, a task whose worker died goes back to the queue up to ``retries`` times, a task past its
timeout is given up on (:func:`expire`). A patch's record is yielded once all its chunks are in.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import statistics
import time
from typing import Any, Callable, Iterator

from pyhf_dist.chunks import merge_chunks, missing_chunks, plan_chunks
from pyhf_dist.specs import patch_digest
from pyhf_dist.pallet import Patch
from pyhf_dist.protocol import SMALLEST_GROUP, failed_record, first_line, make_pack, make_task, records_of
from pyhf_dist.results import FitRecord

__all__ = ["Job", "JobQueue", "Loop", "Packing", "expire", "HELD_LIMIT", "TIMEOUT_GRACE"]

log = logging.getLogger("pyhf_dist.scan")

#: Extra seconds the client waits past ``timeout`` before it gives up on a task itself (the worker
#: normally stops the fit on time; this covers workers that cannot).
TIMEOUT_GRACE = 10.0
#: The most seconds of a task's held clock (a compilation, :meth:`~pyhf_dist.executors.base.Executor.held_seconds`)
#: the client leaves out: a compilation that hangs is given up like a fit that does.
HELD_LIMIT = 600.0


@dataclasses.dataclass
class Job:
    """One task of a patch: the patch, its pallet, which chunk of it, and how often it was submitted."""

    patch: Patch
    chunk: Any
    pallet: str | None = None
    attempt: int = 1
    losses: int = 0  # workers lost running it, each a retry used up
    submitted: float = 0.0
    running_since: float | None = None
    progress: str | None = None  # where the worker of a chunk reports how far it is

    @property
    def key(self) -> tuple:
        """``(pallet, patch name)``: a patch name can be in several pallets of a scan."""
        return (self.pallet, self.patch.name)

    def failed(self, message: str) -> dict:
        """The record of this job when it produced nothing."""
        return failed_record(make_task(self.patch.name, self.patch.operations, "", chunk=self.chunk), message)


class Packing:
    """How many patches go into one task: one, unless the executor asks for packs
    (:attr:`~pyhf_dist.executors.base.Executor.pack_seconds`) and the fits so far were short.

    The size is the executor's seconds over the median fit so far, but at least
    :data:`~pyhf_dist.protocol.SMALLEST_GROUP` while fits are shorter than those seconds, and at
    most the queue over four times the workers (guided self-scheduling: tasks shrink as the queue
    empties, so the last ones are single fits and the workers finish together). Never with a
    per-fit timeout: a task given up on would take its finished fits with it.

    The floor is for signal points: a scan's first fits are one at a time, and on a loaded machine
    they can take long enough that a pack sized from them holds fewer points than a worker fits
    together. Those packs would be fitted one at a time too, so the median would never fall.

    Once a worker's record says it fits the patches of any pack together (``fits_together`` in
    its ``worker``: a GPU), and the settings allow it, a pack is the queue shared out between the
    workers: a whole pallet in one batch on one GPU, whatever its fits took one at a time.

    >>> class Runner:
    ...     pack_seconds, workers = 0.25, 2
    >>> packing = Packing(Runner(), timeout=None)
    >>> packing.fit_seconds.extend([0.1, 0.1, 0.1])
    >>> packing.size(queued=1000, workers=2)
    4
    >>> packing.fit_seconds.extend([0.0002] * 10)
    >>> packing.size(queued=1000, workers=2), packing.size(queued=20, workers=2)
    (125, 2)
    >>> packing.fit_seconds.clear(); packing.fit_seconds.extend([0.5, 0.5])
    >>> packing.size(queued=1000, workers=2)
    1
    >>> on_a_gpu = Packing(Runner(), timeout=None, fits_together=True)
    >>> on_a_gpu.measured({"status": "ok", "fit_seconds": 0.5, "worker": {"fits_together": True}})
    >>> on_a_gpu.size(queued=123, workers=1), on_a_gpu.size(queued=123, workers=2), on_a_gpu.size(queued=3, workers=2)
    (123, 61, 3)
    """

    def __init__(self, runner, timeout: float | None, fits_together: bool = False):
        self.seconds = runner.pack_seconds if runner.workers and not timeout else 0.0
        self.fit_seconds: collections.deque[float] = collections.deque(maxlen=64)  # the latest only
        #: The settings let workers fit a pack's patches together (:attr:`FitSettings.fits_together`).
        self.fits_together = fits_together
        #: A worker said it fits any pack's patches together (a GPU): packs as large as the queue allows.
        self.grouping = False

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def measured(self, outcome: dict) -> None:
        if self.enabled and outcome.get("status") == "ok" and outcome.get("fit_seconds"):
            self.fit_seconds.append(outcome["fit_seconds"])
            if self.fits_together and (outcome.get("worker") or {}).get("fits_together"):
                self.grouping = True

    def size(self, queued: int, workers: int) -> int:
        if not self.enabled or not self.fit_seconds:
            return 1
        if self.grouping:
            # One loop fits a whole pack at once: the queue shared out between the workers, one
            # pack each (a whole pallet in one batch on one GPU); none smaller than a group.
            return max(1, min(queued, max(SMALLEST_GROUP, queued // workers)))
        # Signal points fitted together take ~0.2 ms each: packs of up to a few thousand.
        typical = max(statistics.median(self.fit_seconds), 1e-4)
        wanted = int(self.seconds / typical)
        if wanted >= 1:
            wanted = max(wanted, SMALLEST_GROUP)
        return max(1, min(wanted, queued // (4 * workers)))


def expire(runner, in_flight: dict, timeout: float) -> None:
    """Give up on tasks that ran past ``timeout`` (plus :data:`TIMEOUT_GRACE`): each becomes a
    failed record, and the executor frees its worker (:meth:`~pyhf_dist.executors.base.Executor.abandon`).

    The worker stops a fit at ``timeout`` by itself where it can; this is the client's backstop
    for workers that cannot (tasks run in threads, a fit stuck in C code), measured from when a
    worker began the task, less the time its clock was held (a compilation) where the executor
    knows it. (A scan with a timeout sends one patch per task.)
    """
    now, wall = time.monotonic(), time.time()
    limit = timeout + TIMEOUT_GRACE
    for future, jobs in list(in_flight.items()):
        job = jobs[0]
        if job.running_since is None:
            began = runner.started_at(future)  # Unix time, as executors know it
            if began is not None:
                # From here on the task's age is counted on the monotonic clock: a wall clock set
                # forward (NTP, an operator) must not time out every task in flight at once, nor
                # one set back keep a stuck task for ever.
                job.running_since = now - max(0.0, wall - began)
        if job.running_since is not None and now - job.running_since > limit and (
                now - job.running_since - min(runner.held_seconds(future), HELD_LIMIT) > limit):
            replacement: concurrent.futures.Future = concurrent.futures.Future()
            replacement.set_result(job.failed(f"timed out after {timeout} s (worker did not respond)"))
            in_flight[replacement] = in_flight.pop(future)
            runner.abandon(future)


class JobQueue:
    """The queue of a scan with one task per patch: the jobs still to be made (from a lazy
    ``todo``), behind those put back for a retry. What the loop needs of a deque, sized."""

    def __init__(self, jobs: Iterator[Job], count: int):
        self.jobs, self.count = iter(jobs), count
        self.retried: collections.deque[Job] = collections.deque()

    def __len__(self) -> int:
        return len(self.retried) + self.count

    def popleft(self) -> Job:
        if self.retried:
            return self.retried.popleft()
        self.count -= 1
        return next(self.jobs)

    def appendleft(self, job: Job) -> None:
        self.retried.appendleft(job)


def _patches(names: list[str]) -> str:
    """``"fitting A"``, ``"fitting A, B and 3 more"``: the patches a retry submits again."""
    shown = ", ".join(names[:2])
    return f"fitting {shown}" + (f" and {len(names) - 2} more" if len(names) > 2 else "")


class Loop:
    """Fits the patches ``todo`` (``[(pallet name, Patch)]``) on a started executor.

    Args:
        runner: The executor, started with ``context``.
        context: The scan's context (its key goes with every task).
        settings: The scan's :class:`~pyhf_dist.settings.FitSettings`.
        retries: Resubmissions of a task whose worker died.
        timeout: Seconds per fit, or ``None``.
        values_by_key: ``(pallet, patch name)`` -> the patch's parameter values.
        chunks_done: Chunks of toys a resumed scan's journal holds, by key.
        chunk_finished: Called with ``(pallet, outcome, patch digest)`` for each finished chunk of toys.
        on_merged: Called with ``(key, record dict)`` for each patch whose toys are merged.
        running: A :class:`~pyhf_dist.scan.running_toys.RunningToys` that counts the toys fitted
            while chunks run, or ``None``.
        journaled: Whether the records go to a journal, with the digest of their patch
            (:meth:`take_digest`); ``False``: no digest is made.
    """

    def __init__(self, runner, context, settings, retries: int, timeout: float | None, values_by_key: dict,
                 chunks_done: dict | None = None, chunk_finished: Callable | None = None,
                 on_merged: Callable | None = None, running=None, journaled: bool = True):
        self.runner, self.context, self.settings = runner, context, settings
        self.journaled = journaled
        self.retries, self.timeout, self.values_by_key = retries, timeout, values_by_key
        self.chunks_done = chunks_done or {}
        self.chunk_finished, self.on_merged, self.running = chunk_finished, on_merged, running
        self.toy_based = settings.calctype == "toybased" and settings.calculation == "hypotest"
        self.workers = runner.workers or 1
        self.queue: collections.deque[Job] = collections.deque()
        self.partial: dict[tuple, list[dict]] = collections.defaultdict(list)
        self.expected: dict[tuple, int] = {}  # outcomes each patch waits for (its chunks)
        self.first_submitted: dict[tuple, float] = {}
        self.attempts: dict[tuple, int] = collections.defaultdict(int)
        self.in_flight: dict[concurrent.futures.Future, list[Job]] = {}
        self.packing = Packing(runner, timeout, settings.fits_together)
        # The patch digest of every patch submitted and not merged yet, then of every record
        # yielded and not taken yet (take_digest): the journal keeps it beside the record.
        self.digests: dict[tuple, str] = {}
        self.merged_digests: dict[tuple, str | None] = {}
        self._retry_notes: dict[tuple, list[str]] = {}  # (detail, attempt, bystander) -> patches sent again

    def take_digest(self, key: tuple) -> str | None:
        """The :func:`~pyhf_dist.specs.patch_digest` of the patch of a record yielded (once)."""
        return self.merged_digests.pop(key, None)

    def _digest(self, job: Job) -> str | None:
        if not self.journaled:  # nothing keeps it: no digest to make
            return None
        if job.key not in self.digests:
            self.digests[job.key] = patch_digest(job.patch.operations)
        return self.digests[job.key]

    def groups(self, todo) -> Iterator[list[FitRecord]]:
        """Yield the records of the patches of ``todo`` as they complete, a group per round of
        waiting (the scan journals a group with one write)."""
        yield from self._plan(todo)
        # A scan that packs patches keeps only a few tasks ahead of the workers, so that each one
        # is sized with what the fits so far took.
        limit = self.runner.max_pending or (2 * self.workers if self.packing.enabled else len(self.queue))
        while self.queue or self.in_flight:
            while self.queue and len(self.in_flight) < limit:
                size = self.packing.size(len(self.queue), self.workers)
                self._submit([self.queue.popleft() for _ in range(min(size, len(self.queue)))])
            if self.timeout:  # checked with every worker busy, before waiting for the next result
                expire(self.runner, self.in_flight, self.timeout)
            done, _ = concurrent.futures.wait(list(self.in_flight), timeout=1.0,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            if self.running is not None:
                self.running.poll()
            group = []
            for future in [future for future in self.in_flight if future in done]:  # in submission order
                jobs = self.in_flight.pop(future)
                jobs, outcomes = self._outcomes(future, jobs)
                for job, outcome in zip(jobs, outcomes):
                    group.extend(self._finished(job, outcome))
            self._note_retries()
            if group:
                yield group

    def _plan(self, todo) -> Iterator[list[FitRecord]]:
        if not self.toy_based:
            # One task per patch: jobs are made as they are submitted, never all held at once.
            self.queue = JobQueue((Job(patch, None, pallet) for pallet, patch in todo), len(todo))
            return
        planned = plan_chunks(self.settings, self.workers, len(todo))
        for pallet, patch in todo:
            key = (pallet, patch.name)
            done = self.chunks_done.get(key, [])
            # A resumed toy scan fits only the toys its journal's chunks do not cover.
            chunks = missing_chunks(self.settings.ntoys, done, planned) if done else planned
            self.partial[key].extend(done)
            self.expected[key] = len(done) + len(chunks)
            self.queue.extend(Job(patch, chunk, pallet) for chunk in chunks)
        for pallet, patch in todo:  # every chunk already in the journal (a kill before its merge)
            key = (pallet, patch.name)
            if self.partial.get(key) and len(self.partial[key]) == self.expected[key]:
                del self.expected[key]
                self._digest(Job(patch, None, pallet))
                yield [self._merged(key, pallet, self.partial.pop(key))]

    def _submit(self, jobs: list[Job]) -> None:
        jobs = self._reject_invalid(jobs)  # rows of a signals file that cannot be fitted
        if not jobs:
            return
        now = time.time()
        tasks = []
        for job in jobs:
            self._digest(job)
            job.submitted, job.running_since = now, None
            self.first_submitted.setdefault(job.key, now)
            self.attempts[job.key] = max(self.attempts[job.key], job.attempt)
            if self.running is not None and job.chunk is not None:
                self.running.forget(job.progress)  # a chunk submitted again reports afresh
                job.progress = self.running.path_for(job.chunk)
            tasks.append(make_task(job.patch.name, job.patch.operations, self.context.key, pallet=job.pallet,
                                   chunk=job.chunk, timeout=self.timeout, progress=job.progress))
        self.in_flight[self.runner.submit(tasks[0] if len(tasks) == 1 else make_pack(tasks))] = jobs

    def _reject_invalid(self, jobs: list[Job]) -> list[Job]:
        """Jobs whose patch says it cannot be fitted (a malformed row of a signals file) get a
        failed record at once, with the row's reason; the others are returned, to be submitted."""
        kept = []
        for job in jobs:
            error = getattr(job.patch, "error", None)
            if error:
                resolved: concurrent.futures.Future = concurrent.futures.Future()
                resolved.set_result(job.failed(error))
                self.in_flight[resolved] = [job]
            else:
                kept.append(job)
        return kept

    def _outcomes(self, future, jobs: list[Job]) -> tuple[list[Job], list[dict]]:
        """The records of a finished future's jobs; jobs whose worker died go back to the queue."""
        try:
            return jobs, records_of(future.result(), len(jobs))
        except concurrent.futures.CancelledError:
            return jobs, [job.failed("cancelled by the executor") for job in jobs]
        except Exception as error:
            lost = self.runner.is_worker_lost(error)
            # A task lost with workers that were not its own (a Parsl started afresh) is sent
            # again without using up a retry: its patch did not kill anything.
            bystander = lost and getattr(error, "bystander", False)
            retried = [job for job in jobs if lost and (bystander or job.losses < self.retries)]
            for job in reversed(retried):
                job.attempt += 1
                job.losses += 0 if bystander else 1
                self.queue.appendleft(job)
            jobs = [job for job in jobs if job not in retried]
            detail = self.runner.explain_loss(future, error) if lost else first_line(error, with_type=True)
            if retried:
                self._retry_notes.setdefault((detail, retried[0].losses + 1, bystander), []).extend(
                    job.patch.name for job in retried)
            return jobs, [job.failed(f"worker lost {job.losses + 1} times: {detail}" if lost
                                     else f"task failed: {detail}") for job in jobs]

    def _note_retries(self) -> None:
        """One note per loss of this round, naming every patch it sends again (a pool started
        afresh loses all its tasks at once: one line, not one per task)."""
        for (detail, attempt, bystander), names in self._retry_notes.items():
            if bystander:
                log.warning("%s: %s again (no retry used up: their own workers did not fail)", detail, _patches(names))
            else:
                log.warning("%s: %s again (attempt %d of %d)", detail, _patches(names), attempt, self.retries + 1)
        self._retry_notes.clear()

    def _finished(self, job: Job, outcome: dict) -> list[FitRecord]:
        self.packing.measured(outcome)
        key = job.key
        if not self.toy_based:
            # One task per patch: its one outcome is its record. Nothing is kept by patch here (a
            # lookup of a default-dict would add an entry per patch that nothing removes: ~85
            # bytes a point over a whole scan).
            return [self._merged(key, job.pallet, [outcome])]
        self.partial[key].append(outcome)
        fitted = outcome.get("status") == "ok" and "toys" in outcome
        if fitted and self.chunk_finished is not None:
            self.chunk_finished(job.pallet, outcome, self.digests.get(key))
        if self.running is not None and job.chunk is not None:
            self.running.done(job.progress, job.chunk, fitted)
        if len(self.partial[key]) == self.expected[key]:
            del self.expected[key]
            return [self._merged(key, job.pallet, self.partial.pop(key))]
        return []

    def _merged(self, key: tuple, pallet, outcomes: list[dict]) -> FitRecord:
        record = merge_chunks(outcomes, self.settings)
        record.pop("chunk", None)
        if self.on_merged is not None and record.get("status") == "ok" and "toys" in record:
            self.on_merged(key, record)
        # Popped: what the loop keeps per patch must not grow with the scan.
        record.update(submitted=self.first_submitted.pop(key, None), attempts=self.attempts.pop(key, 0) or 1,
                      pallet=pallet)
        self.merged_digests[key] = self.digests.pop(key, None)
        # The record's name and values are the plan's own objects, not the copies a worker sent
        # back or from_dict would make (it copies the values it is given): the plan holds them for
        # the whole scan anyway, and a copy in every record cost ~130 bytes a point (a name
        # string, a list of values). Records are for reading; nothing of the scan changes them.
        record["name"] = key[1]
        record.pop("values", None)
        merged = FitRecord.from_dict(record)
        merged.values = self.values_by_key[key]
        return merged
