"""Run a scan on any ``concurrent.futures.Executor`` the user already has."""

from __future__ import annotations

import concurrent.futures

from pyhf_dist.executors.base import Description, Executor
from pyhf_dist.protocol import Pack, Task
from pyhf_dist.runtime import run_task

__all__ = ["FuturesExecutor"]


class FuturesExecutor(Executor):
    """Wraps a user's ``concurrent.futures.Executor`` (thread pool, process pool, ...).

    We cannot run a setup hook on the workers of a pool we did not create, so each task carries
    the context; a worker parses it on its first task only and keeps the result. The pool is the
    user's: it is never shut down here.

    Args:
        pool: The ``concurrent.futures.Executor`` to run on.
        workers: How many tasks it runs at once (splits a patch's toys into as many chunks;
            recorded in the metadata). By default, the ``max_workers`` of the standard library's
            thread and process pools; unknown for other executors.
    """

    name = "futures"

    def __init__(self, pool: concurrent.futures.Executor, workers: int | None = None):
        super().__init__(workers=_pool_size(pool) if workers is None else workers)
        self.pool = pool

    def submit(self, task: Task | Pack) -> concurrent.futures.Future:
        return self.pool.submit(run_task, task, self.context)

    def describe(self) -> Description:
        return {"executor": f"{type(self.pool).__module__}.{type(self.pool).__qualname__}", "workers": self.workers}


def _pool_size(pool: concurrent.futures.Executor) -> int | None:
    # The standard library's pools keep max_workers only as _max_workers (since Python 3.2, for
    # both); it is read here as a hint and nothing depends on it.
    if isinstance(pool, (concurrent.futures.ThreadPoolExecutor, concurrent.futures.ProcessPoolExecutor)):
        return getattr(pool, "_max_workers", None)
    return None
