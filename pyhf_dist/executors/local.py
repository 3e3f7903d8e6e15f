"""Fit on a pool of local worker processes: the default executor."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures.process import BrokenProcessPool

from pyhf_dist.executors.base import Executor, default_workers
from pyhf_dist.worker import initialize, preload, run_task

__all__ = ["LocalExecutor"]


def _worker_setup(context, pending=None, settings=None) -> None:
    # Ctrl-C goes to the whole process group; the parent decides what happens to the scan, so a
    # worker must not die of it with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    if context is None:  # started by prepare(): import now, the context follows from start()
        preload(settings)
        context = pending.get()
    initialize(context)


@contextlib.contextmanager
def _children_ignore_sigint():
    # A pool starts its processes inside submit(). Started while SIGINT is ignored, a worker ignores
    # it from its first instruction (an ignored signal stays ignored across exec), so a Ctrl-C that
    # reaches the whole process group while workers still import cannot print their tracebacks.
    # Only the main thread may change handlers; elsewhere the workers ignore it from their setup on.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_with_parent() -> None:
    # A parent killed with SIGKILL cannot stop its pool, and spawned workers would wait for tasks
    # forever: each worker leaves as soon as its parent is gone.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="pyhf-dist-parent-watch", daemon=True).start()


def _run_tracked(task: dict, mark: str):
    # Leave a mark "<pid> <patch>" for as long as the task runs: if the process dies, the
    # executor can tell the task that was running on it from the tasks merely in the same pool.
    try:
        with open(mark, "w") as stream:
            stream.write(f"{os.getpid()} {task.get('name')}")
    except OSError:
        pass
    try:
        return run_task(task)
    finally:
        try:
            os.unlink(mark)
        except OSError:
            pass


class _PoolTasks:
    """The tasks submitted to one pool: their marks, and which of them were on a dead worker."""

    def __init__(self, processes: dict):
        self.processes = processes  # the pool's own pid -> process dict (kept after shutdown)
        self.marks: dict[concurrent.futures.Future, str] = {}
        self.culprits: set[concurrent.futures.Future] | None = None

    def settle(self) -> None:
        """Once, before we kill anything ourselves: find the tasks whose process died on its own."""
        if self.culprits is not None:
            return
        # Workers the pool itself stops after a break exit with -SIGTERM; a worker that was killed
        # (SIGKILL, out of memory, a crash) exits otherwise.
        dead = {pid for pid, process in list(self.processes.items())
                if process.exitcode is not None and process.exitcode != -signal.SIGTERM}
        self.culprits = set()
        for future, mark in list(self.marks.items()):
            try:
                with open(mark) as stream:
                    pid = int(stream.read().split(" ", 1)[0] or 0)
            except (OSError, ValueError):
                continue
            if pid in dead:
                self.culprits.add(future)


class LocalExecutor(Executor):
    """A pool of ``workers`` processes on this machine, each set up once.

    Workers are started with ``spawn`` (a fork of a parent that already imported jax or a BLAS
    thread pool is not safe), receive the worker context once through the pool initializer, and
    keep their parsed workspace and compiled state between tasks. When a worker process dies the
    pool is rebuilt on the next submit, and the scan resubmits the tasks that were running.

    Args:
        workers: Number of processes; default: the cores this process may use.
        start_method: ``"spawn"`` (default), ``"forkserver"`` or ``"fork"``.
    """

    name = "local"

    def __init__(self, workers: int | None = None, start_method: str = "spawn"):
        super().__init__(workers=workers or default_workers())
        if start_method not in multiprocessing.get_all_start_methods():
            from pyhf_dist.exceptions import ExecutorOptionError

            raise ExecutorOptionError(
                f"start_method {start_method!r} is not available here: choose one of "
                f"{', '.join(multiprocessing.get_all_start_methods())}"
            )
        self.start_method = start_method
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._marks_dir: str | None = None
        self._serial = itertools.count()
        self._tasks: dict[concurrent.futures.Future, _PoolTasks] = {}
        self._current: _PoolTasks | None = None
        self._pending = None  # the queue that workers spawned by prepare() take the context from

    # A pool whose worker died rejects every later task; keeping at most one task per worker in
    # flight means only the task that was running on the dead worker has to be retried.
    @property
    def max_pending(self) -> int:
        return self.workers

    def _new_pool(self, initargs: tuple | None = None) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context(self.start_method),
            initializer=_worker_setup,
            initargs=initargs or (self.context,),
        )

    def _spawn_all(self) -> None:
        # A pool spawns its processes on submit; start them all now so that they import, parse
        # and compile while the client still reads the pallet and queues the tasks.
        with _children_ignore_sigint():
            for _ in range(self.workers):
                self._pool.submit(os.getpid)

    def prepare(self, settings: dict) -> None:
        """Spawn the workers now: they import their libraries while the pallet is read, then
        wait for the context that :meth:`start` sends them."""
        if self._pool is not None:
            return
        self._pending = multiprocessing.get_context(self.start_method).Queue()
        # Should a worker die before it read the context, exiting must not wait to flush it.
        self._pending.cancel_join_thread()
        self._pool = self._new_pool(initargs=(None, self._pending, settings))
        self._spawn_all()

    def start(self, context) -> None:
        super().start(context)
        if self._marks_dir is None:
            self._marks_dir = tempfile.mkdtemp(prefix="pyhf-dist-local-")
        if self._pending is not None:  # workers spawned by prepare() wait for it
            for _ in range(self.workers):
                self._pending.put(context)
            self._pending = None
            return
        self._pool = self._new_pool()
        self._spawn_all()

    def submit(self, task: dict) -> concurrent.futures.Future:
        if self._pool is None:
            raise RuntimeError("LocalExecutor.start(context) must be called before submit()")
        for _ in range(2):
            if getattr(self._pool, "_broken", False):
                self._discard_pool()
                self._pool = self._new_pool()
            if self._current is None or self._current.processes is not self._pool._processes:
                self._current = _PoolTasks(self._pool._processes)
            mark = os.path.join(self._marks_dir, f"{next(self._serial)}.running")
            try:
                with _children_ignore_sigint():
                    future = self._pool.submit(_run_tracked, task, mark)
            except BrokenProcessPool:  # a worker died since the check above: start a new pool
                continue
            self._current.marks[future] = mark
            self._tasks[future] = self._current
            future.add_done_callback(self._forget_finished)
            return future
        raise BrokenProcessPool("the local worker pool broke twice while a task was submitted")

    def _forget_finished(self, future: concurrent.futures.Future) -> None:
        # Only tasks lost with a broken pool are asked about later.
        if future.cancelled() or future.exception() is None:
            tasks = self._tasks.pop(future, None)
            if tasks is not None:
                tasks.marks.pop(future, None)

    def started_at(self, future: concurrent.futures.Future) -> float | None:
        """When a worker began the task (``None``: not yet). A pool calls a queued task "running"
        before any worker takes it, e.g. while the workers still start up."""
        tasks = self._tasks.get(future)
        mark = tasks.marks.get(future) if tasks is not None else None
        try:
            return os.stat(mark).st_mtime if mark is not None else None
        except OSError:
            return None

    def was_bystander(self, future: concurrent.futures.Future) -> bool:
        """Whether ``future`` failed only because another task's worker died and broke the pool.

        ``False`` when its own worker died, or when the dead worker's task cannot be told (the scan
        then counts the loss against every task that was in the pool).
        """
        tasks = self._tasks.pop(future, None)
        if tasks is None:
            return False
        tasks.settle()
        mark = tasks.marks.pop(future, None)
        if mark is not None:
            try:
                os.unlink(mark)
            except OSError:
                pass
        return bool(tasks.culprits) and future not in tasks.culprits

    def worker_pids(self) -> list[int]:
        """Process ids of the current worker processes."""
        processes = getattr(self._pool, "_processes", None) or {}
        return [pid for pid, process in processes.items() if process.is_alive()]

    def _discard_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # Stop the workers hard: a worker busy with a fit would otherwise keep its core (and the
        # interpreter alive at exit) until the fit ends.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        if self._current is not None:
            self._current.settle()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join(timeout=5)

    def restart_workers(self) -> None:
        """Kill the worker processes and start fresh ones (used to free a worker stuck in a fit)."""
        self._discard_pool()
        self._pool = self._new_pool()

    def shutdown(self, cancel_futures: bool = True) -> None:
        if cancel_futures:
            self._discard_pool()
        elif self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._tasks.clear()
        self._current = None
        if self._marks_dir is not None:
            shutil.rmtree(self._marks_dir, ignore_errors=True)
            self._marks_dir = None

    def describe(self) -> dict:
        return {"executor": self.name, "workers": self.workers, "start_method": self.start_method}
