"""Fit on a pool of local worker processes: the default executor."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal

from pyhf_dist.executors.base import Executor, default_workers
from pyhf_dist.worker import initialize, run_task

__all__ = ["LocalExecutor"]


def _worker_setup(context) -> None:
    # Ctrl-C goes to the whole process group; the parent decides what happens to the scan, so a
    # worker must not die of it with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    initialize(context)


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

    # A pool whose worker died rejects every later task; keeping at most one task per worker in
    # flight means only the task that was running on the dead worker has to be retried.
    @property
    def max_pending(self) -> int:
        return self.workers

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context(self.start_method),
            initializer=_worker_setup,
            initargs=(self.context,),
        )

    def start(self, context) -> None:
        super().start(context)
        self._pool = self._new_pool()

    def submit(self, task: dict) -> concurrent.futures.Future:
        if self._pool is None:
            raise RuntimeError("LocalExecutor.start(context) must be called before submit()")
        if getattr(self._pool, "_broken", False):
            self._discard_pool()
            self._pool = self._new_pool()
        return self._pool.submit(run_task, task)

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

    def describe(self) -> dict:
        return {"executor": self.name, "workers": self.workers, "start_method": self.start_method}
