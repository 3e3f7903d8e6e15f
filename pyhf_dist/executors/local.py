"""Fit on worker processes of this machine: the default executor.

Each worker is the single process of its own loky executor (loky is joblib's process pool).
loky starts a worker as a fresh interpreter (fork and exec) that never re-runs the caller's
``__main__``, so a scan works the same from a script without ``if __name__ == "__main__":``, from
code piped to ``python -``, from ``python -c``, IPython and Jupyter. Thread limits reach a worker
through its environment, before any library is imported. One executor per worker means a worker
that dies (killed, out of memory, a crash in compiled code) takes down only the task it was
running: the scan retries that task, and no other task in flight is touched. The same holds for
a worker stuck in a fit past the scan's timeout: :meth:`LocalExecutor.abandon` replaces that one
worker.

The worker context (background workspace and settings) is written once to a file in a private
temporary directory; each worker reads it on its first task (and workers replacing dead ones do
the same), so a task carries only its patch.

A worker that dies is named in one line (:meth:`LocalExecutor.explain_loss`,
:mod:`~pyhf_dist.executors.deaths`): its process id, the signal or exit code, whether the kernel's
OOM killer killed it, and its resident memory last seen.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from pyhf_dist import collector, scratch
from pyhf_dist.exceptions import MissingDependencyError
from pyhf_dist.executors.base import Executor, ExecutorFlag, default_workers
from pyhf_dist.executors.deaths import MemoryWatch, describe_death, running
from pyhf_dist.protocol import PACK, Context, Pack, Task
from pyhf_dist.runtime import initialize, preload, prepared, run_task, thread_limits, timeouts

try:
    import loky
    from loky import BrokenProcessPool
except ImportError as error:  # a core dependency; only a broken installation lacks it
    raise MissingDependencyError("loky", "local", 'executor="local"') from error

__all__ = ["LocalExecutor", "FileContext"]

#: What stops a scan (Ctrl-C, a batch system's SIGTERM, a closed terminal's SIGHUP): handled by the
#: scan, ignored by workers.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
#: Seconds of short fits sent to a worker as one pack (see :attr:`LocalExecutor.pack_seconds`).
PACK_SECONDS = 0.25
#: Bytes a worker's memory may grow after its first task before loky replaces it as leaking.
WORKER_MEMORY_GROWTH = 4 * 1024**3


class FileContext:
    """A context (:class:`~pyhf_dist.protocol.Context`) whose payload is read from a file when needed.

    What a local task carries instead of the workspace: :func:`pyhf_dist.runtime.run_task` reads
    ``payload`` only on a worker's first task of this context.
    """

    __slots__ = ("key", "path")

    def __init__(self, key: str, path: str):
        self.key = key
        self.path = path

    @property
    def payload(self) -> bytes:
        return Path(self.path).read_bytes()

    def __getstate__(self):
        return (self.key, self.path)

    def __setstate__(self, state):
        self.key, self.path = state


def _worker_setup(settings: dict | None, pid_directory: str, initializer: Callable | None, parent: int) -> None:
    """What a worker runs once, when it starts."""
    # Ctrl-C reaches the whole process group, and so does SIGTERM from a batch system; the scan in
    # the parent decides what happens (it stops its workers with SIGKILL), so a worker must not die
    # of either on its own, with a traceback or leaving its pool's semaphores half cleaned up.
    # (Workers start with both blocked, see _uninterrupted; from here on they are ignored.)
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if initializer is not None:  # first: threads started below inherit what it sets (signal masks)
        initializer()
    _exit_with_parent(parent)
    Path(pid_directory, str(os.getpid())).touch()
    if settings is not None:  # started by prepare(): import now, while the client reads the pallet
        preload(settings)
    collector.settle()  # the libraries live as long as the worker: no collection walks them again


def _prepared(context: FileContext) -> None:
    # The worker's state for the context, prepared once; what it holds (the workspace, the
    # compiled likelihood) lives as long as the worker, and no collection walks it again.
    if prepared(context.key) is None:
        initialize(context)
        collector.settle()


def _exit_with_parent(parent: int) -> None:
    # A parent killed with SIGKILL cannot stop its workers, which would wait for tasks forever:
    # each worker leaves as soon as its parent (the scan's process, ``parent``) is gone. Named by
    # the parent, not read here: a worker still starting when its scan was killed would read the
    # process it was handed to instead, and wait for that one (seen: workers left for good).
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="pyhf-dist-parent-watch", daemon=True).start()


def _warm_up(context: FileContext) -> None:
    # Prepares the worker (parses the workspace, compiles the fast path's likelihood) as soon as
    # the context exists, before its first task arrives.
    _prepared(context)


def _run_tracked(task: Task | Pack, context: FileContext, mark: str) -> dict:
    # Set up first (a no-op after the first task): a worker that replaces a dead one prepares
    # itself here, and that is not part of the fit the scan's timeout is about.
    _prepared(context)
    # A mark "<pid> <patch>" for as long as the task runs: its modification time says when the
    # worker began the fit. (A packed task lists its patches.)
    names = [each["name"] for each in task["tasks"]] if task.get("kind") == PACK else [task["name"]]
    try:
        Path(mark).write_text(f"{os.getpid()} {', '.join(names)}")
    except OSError:
        pass
    try:
        with timeouts.reporting(functools.partial(_report_hold, mark)):
            return run_task(task, context)
    finally:
        for path in (mark, mark + _HELD):
            with contextlib.suppress(OSError):
                os.unlink(path)


#: Beside a task's mark: "<seconds held> <Unix time held since, or ->" (see :meth:`LocalExecutor.held_seconds`).
_HELD = ".held"


def _report_hold(mark: str, held: float, since: float | None) -> None:
    # Replaced whole: the client never reads half a line.
    written = f"{mark}{_HELD}.{os.getpid()}"
    with contextlib.suppress(OSError):
        Path(written).write_text(f"{held!r} {'-' if since is None else repr(since)}")
        os.replace(written, mark + _HELD)


@contextlib.contextmanager
def _uninterrupted():
    """Run the block without being interrupted by Ctrl-C or SIGTERM; handle them right after it.

    loky starts a worker inside submit(), and a KeyboardInterrupt landing in the middle of that
    (or of a shutdown) can leave a pool half started or half stopped, with threads that cannot be
    joined. For the block, the stop signals are recorded instead of raised, and blocked, so that
    processes started in it inherit them blocked (a signal mask survives fork and exec: a worker
    still importing cannot die of a Ctrl-C meant for the scan; its setup then ignores them).
    Only the main thread can change handlers; elsewhere the block just runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    handlers = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    handlers = {number: handler for number, handler in handlers.items() if callable(handler)}
    for number in handlers:
        signal.signal(number, lambda number, frame: caught.append((number, frame)))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    _start_resource_trackers()
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # delivers what was held, to the recorder
        for number, handler in handlers.items():
            signal.signal(number, handler)
        if caught:
            number, frame = caught[0]
            handlers[number](number, frame)  # e.g. raises KeyboardInterrupt, now that the block is done


def _start_resource_trackers() -> None:
    """Start multiprocessing's and loky's resource trackers now, inside a block, and block the stop
    signals again.

    Python's tracker unblocks SIGINT and SIGTERM in the calling thread after starting its process
    (``SIG_UNBLOCK``, not the mask it found). Started lazily in the middle of a block, it would let
    the workers spawned after it inherit the signals unblocked, and a Ctrl-C landing while such a
    worker imports ``site`` killed it with a "Fatal Python error" traceback (one start in five).
    Once per process: blocks are entered on every submit, and a running tracker needs nothing.
    """
    global _TRACKERS_STARTED
    if _TRACKERS_STARTED:
        return
    import multiprocessing.resource_tracker

    from loky.backend import resource_tracker

    multiprocessing.resource_tracker.ensure_running()
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    _TRACKERS_STARTED = True


_TRACKERS_STARTED = False


class _Slot:
    """One worker: a loky executor of one process, and the futures submitted to it."""

    def __init__(self, make_pool: Callable[[], "loky.ProcessPoolExecutor"]):
        self._make_pool = make_pool
        self.pool = make_pool()
        self.futures: set[concurrent.futures.Future] = set()

    @property
    def load(self) -> int:
        """Tasks submitted to this worker and not done (its start and warm-up not counted)."""
        # A copy: done-callbacks remove futures from loky's thread meanwhile.
        return sum(1 for future in list(self.futures) if not future.done())

    def submit(self, function, *args, task: bool = True) -> concurrent.futures.Future:
        """Submit ``function(*args)``; ``task=False`` for the worker's start and warm-up, which
        do not count in :attr:`load`: a worker still warming up takes a task as soon as it is
        ready, where counting them sent both of a scan's first two tasks to the worker that had
        warmed up first, one after the other (a 10,000-toy scan took twice as long)."""
        with _uninterrupted():
            try:
                future = self.pool.submit(function, *args)
            except BrokenProcessPool:  # its worker died: this slot gets a fresh one
                self.replace()
                future = self.pool.submit(function, *args)
        if task:
            self.futures.add(future)
            future.add_done_callback(self.futures.discard)
        return future

    @property
    def process(self):
        """The worker process (loky starts it on the first submit), or ``None``."""
        processes = getattr(self.pool, "_processes", None) or {}
        return next(iter(list(processes.values())), None)

    def replace(self) -> None:
        with _uninterrupted():
            self.stop()
            self.pool = self._make_pool()

    def stop(self, kill: bool = True) -> None:
        # kill_workers: a worker busy with a fit would otherwise keep its core (and this
        # interpreter alive at exit) until the fit ends.
        self.pool.shutdown(wait=True, kill_workers=kill)


class LocalExecutor(Executor):
    """``workers`` processes on this machine, each set up once and kept for the whole scan.

    Workers keep their parsed workspace and compiled state between tasks. A worker that dies is
    replaced on the next submit; the scan resubmits the task it was running.

    Args:
        workers: Number of processes; default: the cores this process may use.
        initializer: A function each worker calls once when it starts, before it imports the
            libraries the fits need (e.g. to configure logging). It must be picklable.
    """

    name = "local"
    flags = (ExecutorFlag("workers", "Worker processes [default: the cores this process may use].", int),)

    def __init__(self, workers: int | None = None, initializer: Callable[[], None] | None = None):
        super().__init__(workers=default_workers() if workers is None else workers)
        self.initializer = initializer
        self._slots: list[_Slot] = []
        self._directory: str | None = None
        self._contexts: dict[str, FileContext] = {}
        self._marks: dict[concurrent.futures.Future, str] = {}
        self._serial = 0
        # The worker process of each unfinished (or failed) task, to say how it died.
        self._processes: dict[concurrent.futures.Future, object] = {}
        self._memory = MemoryWatch()

    @property
    def pack_seconds(self) -> float:
        # Short fits travel several to a task (as on the Dask clusters pyhf-dist starts): per task
        # the client pickles, sends, receives and journals, a millisecond that would otherwise
        # bound a scan of many quick points. A record still comes per fit.
        return PACK_SECONDS

    @property
    def max_pending(self) -> int:
        # One task per worker in flight: a task then starts the moment it is submitted, and a
        # queued task never waits behind a long fit while another worker is idle.
        return self.workers

    def _workspace(self) -> Path:
        if self._directory is None:
            self._directory = scratch.make("local")
            (Path(self._directory) / "workers").mkdir()
        return Path(self._directory)

    def _spawn(self, settings: dict | None) -> None:
        directory = self._workspace()
        # In force before the worker imports anything (values the user set explicitly, which the
        # worker inherits, are kept).
        environment = thread_limits(os.environ)
        # loky restarts a worker whose memory grew by 300 MB since its first task, taking it for a
        # leak; ours grow by design (compiled likelihoods, batched toy engines: ~500 MB for 1Lbb
        # toys), and a restart would throw that away and warn. Only growth past this limit counts.
        environment["LOKY_MAX_MEMORY_LEAK_SIZE"] = os.environ.get("LOKY_MAX_MEMORY_LEAK_SIZE", str(WORKER_MEMORY_GROWTH))

        def make_pool():
            return loky.ProcessPoolExecutor(
                max_workers=1,
                initializer=_worker_setup,
                initargs=(settings, str(directory / "workers"), self.initializer, os.getpid()),
                env=environment,
            )

        with _uninterrupted():
            self._slots = [_Slot(make_pool) for _ in range(self.workers)]
            for slot in self._slots:  # loky starts a worker on its first submit: start them all now
                slot.submit(os.getpid, task=False)

    def describe(self) -> dict:
        facts = super().describe()
        cores = default_workers()
        if self.workers > cores:
            # Each worker runs its fits on one thread: more workers than cores only take turns.
            facts["advice"] = (f"{self.workers} workers on {cores} cores take turns on them, and every fit takes "
                               f"longer; --workers {cores} (the default) is as fast")
        return facts

    def prepare(self, settings: dict) -> None:
        """Start the workers now: they import their libraries while the client reads the pallet."""
        if not self._slots:
            self._spawn(settings)

    def launch(self, context: Context) -> None:
        if not self._slots:
            self._spawn(None)
        if context.key not in self._contexts:
            path = self._workspace() / f"context-{context.key}.json"
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(context.payload)
            os.replace(temporary, path)
            self._contexts[context.key] = FileContext(context.key, str(path))
        for slot in self._slots:
            slot.submit(_warm_up, self._contexts[context.key], task=False)

    def submit(self, task: Task | Pack) -> concurrent.futures.Future:
        context = self._contexts.get(task["context"])
        if context is None:
            raise RuntimeError("LocalExecutor.start(context) must be called before submit()")
        self._serial += 1
        mark = str(self._workspace() / f"{self._serial}.running")
        slot = min(self._slots, key=lambda slot: slot.load)
        future = slot.submit(_run_tracked, task, context, mark)
        self._marks[future] = mark
        future.add_done_callback(lambda done: self._marks.pop(done, None))
        process = slot.process
        if process is not None:
            self._processes[future] = process
            self._memory.watch(process.pid)
            future.add_done_callback(self._forget_if_fine)
        return future

    def _forget_if_fine(self, future: concurrent.futures.Future) -> None:
        if future.cancelled() or future.exception() is None:
            self._processes.pop(future, None)

    def explain_loss(self, future: concurrent.futures.Future, error: BaseException) -> str:
        """Which worker died, of what, and with how much memory, in one line.

        ``worker 4242 was killed by the kernel's OOM killer (kernel log: anon-rss 2.1 GB at the
        kill; memory cgroup limit 2.0 GB); its memory last seen 1.9 GB``. A SIGKILL with no trace
        of the OOM killer says so: something else killed it, or the kernel log and cgroup could
        not be read here.
        """
        process = self._processes.pop(future, None)
        if process is None:
            return super().explain_loss(future, error)
        with contextlib.suppress(Exception):
            process.join(1.0)  # reaped, so that its exit code is known
        code = getattr(process, "exitcode", None)
        return describe_death(process.pid, code, self._memory)

    def started_at(self, future: concurrent.futures.Future) -> float | None:
        """When a worker began the task (``None``: not yet, e.g. while the workers start up)."""
        mark = self._marks.get(future)
        try:
            return os.stat(mark).st_mtime if mark is not None else None
        except OSError:
            return None

    def held_seconds(self, future: concurrent.futures.Future) -> float:
        """What the task's worker said of its holds (:func:`_report_hold`), a hold under way counted to now."""
        mark = self._marks.get(future)
        if mark is None:
            return 0.0
        try:
            held, since = Path(mark + _HELD).read_text().split()
            return float(held) + (max(0.0, time.time() - float(since)) if since != "-" else 0.0)
        except (OSError, ValueError):  # no hold yet, or a worker of another version
            return 0.0

    def abandon(self, future: concurrent.futures.Future) -> None:
        """Stop the worker running ``future`` (stuck past the timeout) and start a fresh one.

        Only that worker is replaced: the tasks of the other workers go on undisturbed.
        """
        for slot in self._slots:
            if future in slot.futures:
                slot.replace()
                return
        future.cancel()

    def running_tasks(self) -> dict[int, tuple[str, float]]:
        """The tasks running now: ``{worker pid: (patch name, Unix time it began)}``."""
        running = {}
        for mark in list(self._marks.values()):
            try:
                pid, name = Path(mark).read_text().split(" ", 1)
                running[int(pid)] = (name, os.stat(mark).st_mtime)
            except (OSError, ValueError):
                continue
        return running

    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes alive now (started by this executor)."""
        if self._directory is None:
            return []
        alive = []
        for entry in (Path(self._directory) / "workers").iterdir():
            pid = int(entry.name)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass
            if running(pid):
                alive.append(pid)
        return alive

    def shutdown(self, cancel_futures: bool = True) -> None:
        slots, self._slots = self._slots, []
        with _uninterrupted():  # a second Ctrl-C must not cut the stopping of the workers short
            for slot in slots:
                slot.stop(kill=cancel_futures)
        self._contexts.clear()
        self._marks.clear()
        self._processes.clear()
        self._memory.stop()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
