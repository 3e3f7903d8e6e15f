"""The executor interface every scheduler implements.

An :class:`Executor` wraps a native engine (a process pool, a Dask client, a Parsl or Globus
Compute executor — all ``concurrent.futures.Executor``s) and adds the two things a scan needs:
shipping the :class:`~pyhf_dist.worker.WorkerContext` to each worker once (:meth:`start`), and
telling the death of a worker apart from a failed fit (:meth:`is_worker_lost`), so that the scan
can retry the former.

Subclasses implement :meth:`submit` and usually :meth:`start` and :meth:`shutdown`; they release
only what they started.
"""

from __future__ import annotations

import abc
import concurrent.futures
import os
import threading
import time
from typing import Any, Callable

from pyhf_dist.worker import WorkerContext

__all__ = ["Executor", "NoAnswer", "call_within", "default_workers"]


def default_workers() -> int:
    """The number of cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class NoAnswer(Exception):
    """:func:`call_within` gave up waiting."""


def call_within(seconds: float, function: Callable, *args, name: str = "pyhf-dist call") -> Any:
    """``function(*args)``, but give up after ``seconds``: raises :class:`NoAnswer` then.

    For client libraries whose own timeouts do not bound everything (a peer that accepts a
    connection and never answers, an SDK that retries for minutes). The call runs in a daemon
    thread that is abandoned on timeout; its exception, if any, is raised here.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise NoAnswer(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class Executor(abc.ABC):
    """Runs fit tasks on workers: the whole contract between a scan and a scheduler.

    This class is everything the scan (:func:`pyhf_dist.iter_fits`) and the command line call on
    an executor. A new executor subclasses it, implements :meth:`submit`, and overrides what its
    engine can do better than the neutral defaults here. It releases only what it started.

    The life of an executor in a scan::

        runner.prepare(settings)        # only when the scan created it: start workers early
        runner.start(context)           # ship the context to the workers, once each
        runner.batch_seconds            # fitting time worth sending as one task (0: one patch each)
        future = runner.submit(task)    # many times; at most max_pending unfinished at once
        runner.started_at(future)       # when a worker began it (for per-fit timeouts)
        runner.abandon(future)          # a fit ran past its timeout: give up on it
        runner.is_worker_lost(error)    # the future failed: worker death (retry) or fit failure?
        runner.explain_loss(future, error)  # a worker died: which, of what, with how much memory
        runner.describe()               # facts for the results' metadata
        runner.shutdown()               # however the scan ended

    Use as a context manager, or call :meth:`start` and :meth:`shutdown` yourself::

        with LocalExecutor(workers=2) as executor:
            executor.start(context)
            future = executor.submit(task)

    Args:
        workers: How many tasks may run at once; ``None`` lets the executor choose.
    """

    #: The registered name (``"local"``, ``"dask"``...), recorded in the scan's metadata.
    name: str = "custom"

    def __init__(self, workers: int | None = None):
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
            from pyhf_dist.exceptions import ExecutorOptionError

            raise ExecutorOptionError(f"workers must be a positive integer, got {workers!r}")
        self.workers = workers
        self.context: WorkerContext | None = None

    @property
    def max_pending(self) -> int | None:
        """Most unfinished tasks the scan may have submitted at once; ``None``: no limit.

        An engine that starts a task the moment it is submitted (the local pool) or runs it inside
        :meth:`submit` (the sequential executor) gets tasks one per worker, so that results stream
        back and a retry never waits behind a queue. Schedulers with their own queues (Dask,
        Parsl, Globus Compute) take every task at once.
        """
        return None

    @property
    def batch_seconds(self) -> float:
        """Seconds of fitting the scan may send to a worker as one task, when fits are short.

        ``0`` (the default): one patch per task. An engine that spends milliseconds of scheduler,
        client and worker time on every task (Dask) sets a few tenths of a second: once the first
        fits tell how long a fit takes, the scan packs that many seconds of patches into one task
        (:func:`pyhf_dist.worker.make_batch`), fewer towards the end so that no worker is left
        alone with a long task. Read after :meth:`start`; it needs a known number of
        :attr:`workers`, and a scan with a per-fit ``timeout`` never packs.
        """
        return 0.0

    def prepare(self, settings: dict) -> None:
        """Optionally begin bringing up workers before the context exists.

        A scan that owns its executor calls this first, with the fit settings (a
        :class:`~pyhf_dist.settings.FitSettings` dict), and only then reads the pallet; workers
        that can start early import what those fits need meanwhile. The default does nothing.
        :meth:`start` follows (or :meth:`shutdown`, if the pallet is bad).
        """

    def start(self, context: WorkerContext) -> None:
        """Bring up the workers (if needed) and make ``context`` available to each of them once.

        May be called again with another context on the same executor (one scan after another).
        """
        self.context = context

    @abc.abstractmethod
    def submit(self, task: dict) -> concurrent.futures.Future:
        """Submit one task (:func:`pyhf_dist.worker.make_task`).

        Returns:
            A future whose result is the task's record (:func:`pyhf_dist.worker.run_task`). It
            raises only when the task could not run: :meth:`is_worker_lost` tells whether to retry.
        """

    def started_at(self, future: concurrent.futures.Future) -> float | None:
        """When a worker began the task of ``future`` (Unix time), or ``None`` if not yet.

        The scan counts a task's timeout from the first answer that is not ``None``. The default
        answers "now" once the future is running; an engine that queues tasks on busy or
        starting workers knows better.
        """
        return time.time() if future.running() else None

    def abandon(self, future: concurrent.futures.Future) -> None:
        """Give up on a task that ran past the scan's timeout, freeing its worker if possible.

        The scan records the task as failed whatever happens here. The default cancels the
        future, which stops a task that has not started; an engine that can stop a running
        task, or replace the worker stuck in it, does so.
        """
        future.cancel()

    def shutdown(self, cancel_futures: bool = True) -> None:
        """Release what this executor started. Safe to call more than once."""

    def is_worker_lost(self, error: BaseException) -> bool:
        """Whether ``error`` (raised by a future) means the worker died rather than the fit failed."""
        from concurrent.futures.process import BrokenProcessPool

        from pyhf_dist.exceptions import WorkerLostError

        return isinstance(error, (WorkerLostError, BrokenProcessPool))

    def explain_loss(self, future: concurrent.futures.Future, error: BaseException) -> str:
        """One line on how the worker of ``future`` died (``error`` made :meth:`is_worker_lost` true).

        It goes into the scan's note of the retry and, once retries are used up, into the failed
        record. The default is the error's first line; an engine that knows its worker processes
        says which one, the signal that killed it, and whether the kernel's OOM killer did.
        """
        from pyhf_dist.exceptions import first_line

        return first_line(error, with_type=True)

    def job_script(self) -> str:
        """The batch script a batch-system executor submits (``--show-job-script``), without
        submitting anything.

        Raises:
            ExecutorOptionError: This executor submits no batch jobs (the default).
        """
        from pyhf_dist.exceptions import ExecutorOptionError

        raise ExecutorOptionError(
            f"executor {self.name!r} submits no batch jobs, so it has no job script: "
            "--show-job-script is for batch executors such as slurm"
        )

    def describe(self) -> dict[str, Any]:
        """Facts recorded in the scan's metadata (name, workers, dashboard link...)."""
        return {"executor": self.name, "workers": self.workers}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.shutdown(cancel_futures=True)
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(workers={self.workers!r})"
