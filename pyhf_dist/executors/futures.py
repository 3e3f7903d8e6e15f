"""Run a scan on any ``concurrent.futures.Executor`` the user already has."""

from __future__ import annotations

import concurrent.futures

from pyhf_dist.executors.base import Executor
from pyhf_dist.worker import run_task

__all__ = ["FuturesExecutor"]


class FuturesExecutor(Executor):
    """Wraps a user's ``concurrent.futures.Executor`` (thread pool, process pool, ...).

    We cannot run a setup hook on the workers of a pool we did not create, so each task carries
    the context; a worker parses it on its first task only and keeps the result. The pool is the
    user's: it is never shut down here.

    Args:
        pool: The ``concurrent.futures.Executor`` to run on.
        workers: How many tasks it runs at once, if known (splits a patch's toys into as many
            chunks; recorded in the metadata).
    """

    name = "futures"

    def __init__(self, pool: concurrent.futures.Executor, workers: int | None = None):
        super().__init__(workers=workers)
        self.pool = pool

    def submit(self, task: dict) -> concurrent.futures.Future:
        return self.pool.submit(run_task, task, self.context)

    def describe(self) -> dict:
        return {"executor": f"{type(self.pool).__module__}.{type(self.pool).__qualname__}", "workers": self.workers}
