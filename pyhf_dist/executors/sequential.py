"""Fit every patch in this process, one after another: for debugging and for reference."""

from __future__ import annotations

import concurrent.futures

from pyhf_dist.executors.base import Executor
from pyhf_dist.protocol import Context, Pack, Task
from pyhf_dist.runtime import initialize, run_task

__all__ = ["SequentialExecutor"]


class SequentialExecutor(Executor):
    """Runs each task in the calling process when it is submitted.

    Exceptions and ``pdb`` breakpoints surface directly here, which makes it the executor to debug
    a patch with.
    """

    name = "sequential"
    #: Submitting runs the task, so the scan submits one at a time to stream results as they come.
    max_pending = 1

    def __init__(self, workers: int | None = None):
        super().__init__(workers=1)

    def launch(self, context: Context) -> None:
        initialize(context)

    def submit(self, task: Task | Pack) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(run_task(task))
        except Exception as error:
            future.set_exception(error)
        return future
