"""The executor contract: everything a scan and the command line ask of a scheduler.

An :class:`Executor` wraps a native engine (a process pool, a Dask client, a Parsl or Globus
Compute executor, each a ``concurrent.futures.Executor``) and adds what a scan needs: shipping
the context (:class:`~pyhf_dist.protocol.Context`) to each worker once (:meth:`Executor.start`),
telling the death of a worker apart from a failed fit (:meth:`Executor.is_worker_lost`) so that
the scan can retry the former, and saying in one line what it cannot run
(:meth:`Executor.supports`). Workers run :func:`pyhf_dist.runtime.run_task` on what
:meth:`Executor.submit` is given: a task, or a pack of tasks (:mod:`pyhf_dist.protocol`).

A new executor subclasses :class:`Executor`, implements :meth:`~Executor.submit`, and overrides
what its engine does better than the neutral defaults; it releases only what it started.
``tests/test_executor_conformance.py`` runs the same checks on every executor, including one
written in the test in about thirty lines.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import os
import threading
import time
from typing import Any, Callable, ClassVar, TypedDict

from pyhf_dist.exceptions import ExecutorOptionError, WorkerLostError
from pyhf_dist.protocol import Context, Pack, Task, first_line

__all__ = ["Executor", "Description", "ExecutorFlag", "NoAnswer", "call_within", "default_workers"]


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


@dataclasses.dataclass(frozen=True)
class ExecutorFlag:
    """A command-line flag of an executor: ``pyhf-dist fit --executor NAME`` offers it.

    Attributes:
        name: The executor's keyword argument (``"jobs"``); the flag is ``--jobs``.
        help: One line for ``--help``.
        type: ``int``, ``float``, ``str``, a tuple of choices, or ``"file"`` (an existing file).
        flag: The flag, when not ``--`` + ``name`` with dashes.
        is_flag: A switch without a value.
    """

    name: str
    help: str
    type: Any = str
    flag: str | None = None
    is_flag: bool = False


class Description(TypedDict, total=False):
    """What :meth:`Executor.describe` returns; the scan records it in the results' metadata and
    the command line prints ``dashboard`` and ``advice``."""

    executor: str  # the registered name
    workers: int | None  # tasks that may run at once, when known
    dashboard: str | None  # a link to the engine's live view (Dask)
    advice: str | None  # one line of advice on the engine's set-up
    endpoint: str | None  # where tasks run, for remote engines


class Executor(abc.ABC):
    """Runs fit tasks on workers: the whole contract between a scan and a scheduler.

    The life of an executor in a scan::

        runner.supports(settings)       # None, or one line on why it cannot run these fits
        runner.prepare(settings)        # only when the scan owns it: start workers early
        runner.start(context)           # ship the context to the workers (calls launch())
        runner.pack_seconds             # fitting time worth sending as one pack (0: one task each)
        future = runner.submit(task)    # a task or a pack; at most max_pending unfinished at once
        runner.started_at(future)       # when a worker began it (for per-fit timeouts)
        runner.held_seconds(future)     # how long its fit's clock stood still (a compilation)
        runner.abandon(future)          # a fit ran past its timeout: give up on it
        runner.is_worker_lost(error)    # the future failed: worker death (retry) or fit failure?
        runner.explain_loss(future, error)  # a worker died: which, of what, with how much memory
        runner.describe()               # facts for the results' metadata (a Description)
        runner.shutdown()               # only when the scan owns it, however the scan ended

    **Ownership.** An executor given to a scan by name (``executor="dask"``) is created by the
    scan, which owns it (:attr:`owned`): the scan calls :meth:`prepare` and :meth:`shutdown`. An
    executor object the caller made (also with :func:`~pyhf_dist.executors.get_executor`) is the
    caller's: the scan only starts it with its context and submits; the caller shuts it down
    (``with`` does).

    **Packs.** When :attr:`pack_seconds` is above 0 the scan sends several tasks as one pack
    (:func:`~pyhf_dist.protocol.make_pack`); whatever runs on the workers must hand packs to
    :func:`pyhf_dist.runtime.run_task`, which answers ``{"pack": [record, ...]}``.

    **Command line.** :attr:`flags` declares the executor's own options; ``pyhf-dist fit
    --executor NAME --help`` lists them.

    Use as a context manager, or call :meth:`start` and :meth:`shutdown` yourself::

        with LocalExecutor(workers=2) as executor:
            executor.start(context)
            future = executor.submit(task)

    Args:
        workers: How many tasks may run at once; ``None`` lets the executor choose.
    """

    #: The registered name (``"local"``, ``"dask"``...), recorded in the scan's metadata.
    name: str = "custom"
    #: The executor's command-line options (beyond ``--option KEY=VALUE``, which takes any).
    flags: ClassVar[tuple[ExecutorFlag, ...]] = ()
    #: Whether a scan owns this executor (created it from a name): see "Ownership" above.
    owned: bool = False

    def __init__(self, workers: int | None = None):
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
            raise ExecutorOptionError(f"workers must be a positive integer, got {workers!r}")
        self.workers = workers
        self.context: Context | None = None

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
    def pack_seconds(self) -> float:
        """Seconds of fitting the scan may send to a worker as one pack, when fits are short.

        ``0`` (the default): one patch per task. An engine that spends milliseconds of scheduler,
        client and worker time on every task (Dask) sets a few tenths of a second: once the first
        fits tell how long a fit takes, the scan packs that many seconds of patches into one task
        (:func:`pyhf_dist.protocol.make_pack`), fewer towards the end so that no worker is left
        alone with a long task. Read after :meth:`start`; it needs a known number of
        :attr:`workers`, and a scan with a per-fit ``timeout`` never packs.
        """
        return 0.0

    def supports(self, settings) -> str | None:
        """``None`` if this executor can run fits with ``settings`` (a
        :class:`~pyhf_dist.settings.FitSettings`), else one line saying why not and what to do.

        The scan asks before it starts anything and refuses the scan with that line.
        """
        return None

    def prepare(self, settings: dict) -> None:
        """Optionally begin bringing up workers before the context exists.

        A scan that owns its executor calls this first, with the fit settings (a
        :class:`~pyhf_dist.settings.FitSettings` dict), and only then reads the pallet; workers
        that can start early import what those fits need meanwhile. The default does nothing.
        :meth:`start` follows (or :meth:`shutdown`, if the pallet is bad).
        """

    def start(self, context: Context) -> None:
        """Make ``context`` the one tasks refer to, and :meth:`launch` the workers with it.

        May be called again with another context on the same executor (one scan after another).
        Subclasses override :meth:`launch`, not this.
        """
        self.context = context
        self.launch(context)

    def launch(self, context: Context) -> None:
        """Bring up the workers (if needed) and make ``context`` available to each of them once.

        The default does nothing: workers then get the context with their tasks
        (``run_task(task, context)``).
        """

    @abc.abstractmethod
    def submit(self, task: Task | Pack) -> concurrent.futures.Future:
        """Submit one task or pack (:func:`pyhf_dist.protocol.make_task`, :func:`~pyhf_dist.protocol.make_pack`).

        Returns:
            A future whose result is the task's record (:func:`pyhf_dist.runtime.run_task`). It
            raises only when the task could not run: :meth:`is_worker_lost` tells whether to retry.
        """

    def started_at(self, future: concurrent.futures.Future) -> float | None:
        """When a worker began the task of ``future`` (Unix time), or ``None`` if not yet.

        The scan counts a task's timeout from the first answer that is not ``None``. The default
        answers "now" once the future is running; an engine that queues tasks on busy or
        starting workers knows better.
        """
        return time.time() if future.running() else None

    def held_seconds(self, future: concurrent.futures.Future) -> float:
        """Seconds the task of ``future`` has held its fit's clock so far, as far as this engine
        can tell: a layout compiled, a structure checked (:func:`pyhf_dist.runtime.timeouts.paused`).

        The scan's backstop for a stuck fit does not count them, as the worker's own timeout does
        not. The default: none known.
        """
        return 0.0

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

        return isinstance(error, (WorkerLostError, BrokenProcessPool))

    def explain_loss(self, future: concurrent.futures.Future, error: BaseException) -> str:
        """One line on how the worker of ``future`` died (``error`` made :meth:`is_worker_lost` true).

        It goes into the scan's note of the retry and, once retries are used up, into the failed
        record. The default is the error's first line; an engine that knows its worker processes
        says which one, the signal that killed it, and whether the kernel's OOM killer did.
        """
        return first_line(error, with_type=True)

    def job_script(self) -> str:
        """The batch script a batch-system executor submits (``--show-job-script``), without
        submitting anything.

        Raises:
            ExecutorOptionError: This executor submits no batch jobs (the default).
        """
        raise ExecutorOptionError(
            f"executor {self.name!r} submits no batch jobs, so it has no job script: "
            "--show-job-script is for batch executors such as slurm"
        )

    def describe(self) -> Description:
        """Facts recorded in the scan's metadata: at least ``executor`` and ``workers``."""
        return {"executor": self.name, "workers": self.workers}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.shutdown(cancel_futures=True)
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(workers={self.workers!r})"
