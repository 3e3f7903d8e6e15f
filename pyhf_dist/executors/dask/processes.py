"""The worker processes of the Dask clusters pyhf-dist starts: one interpreter per worker."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface

__all__ = ["WorkerProcess", "MAX_WORKER_RESTARTS", "stop_restarts"]

log = logging.getLogger(__name__)

#: How often a worker process of ours that dies is started again during a scan.
MAX_WORKER_RESTARTS = 10


class WorkerProcess(ProcessInterface):
    """One Dask worker in a ``python -m distributed.cli.dask_spec`` process of its own.

    For the clusters pyhf-dist starts (a ``SpecCluster`` worker, as dask-jobqueue's jobs are).
    A fresh interpreter, not a ``multiprocessing`` child: it never re-runs the caller's
    ``__main__``, and its environment is set before any library loads. Started in a session of
    its own, so that a Ctrl-C at the terminal reaches only the scan, which then stops it; it also
    closes itself when the scheduler goes away. A worker that dies after it joined is started
    again (a Nanny's job in a ``LocalCluster``), up to :data:`MAX_WORKER_RESTARTS` times.

    Args:
        scheduler: The scheduler's address (given by the ``SpecCluster``).
        name: The worker's name.
        environment: The process's environment.
        log_path: File that receives the worker's output.
        options: Keyword arguments of ``distributed.Worker``.
    """

    def __init__(self, scheduler: str, name: Any = None, *, environment: dict, log_path: str,
                 options: dict | None = None):
        super().__init__(scheduler, name)
        self.scheduler_address = scheduler
        self.name = name
        self.environment = environment
        self.log_path = log_path
        self.options = dict(options or {}, name=name)
        self.process: asyncio.subprocess.Process | None = None
        #: Set by the executor once the worker joined: from then on, a death means a restart.
        self.joined = False
        self.restarts = 0
        self._watcher: asyncio.Future | None = None

    async def start(self) -> None:
        await self._launch()
        self._watcher = asyncio.ensure_future(self._keep_running())
        await super().start()

    async def _launch(self) -> None:
        spec = json.dumps({"cls": "distributed.Worker", "opts": self.options})
        with open(self.log_path, "ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "distributed.cli.dask_spec", self.scheduler_address, "--spec", spec,
                env=self.environment, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                start_new_session=True,
            )

    async def _keep_running(self) -> None:
        while self.process is not None:
            await self.process.wait()
            if self.status != Status.running or not self.joined or self.restarts >= MAX_WORKER_RESTARTS:
                return
            self.restarts += 1
            log.warning("Dask worker %s died (exit code %s): starting it again", self.name, self.process.returncode)
            await self._launch()

    def failure(self) -> str | None:
        """Why the process ended before it joined the scheduler, or ``None`` while it runs."""
        if self.process is None or self.process.returncode is None:
            return None
        try:
            with open(self.log_path, errors="replace") as output:
                lines = [line.strip() for line in output if line.strip()]
        except OSError:
            lines = []
        code = self.process.returncode
        if code < 0:  # not a failure of its own: something (an operator, the OOM killer) stopped it
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"killed by {name} while starting, before any fit"
        last = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "Traceback"))), "")
        return f"exit code {code}" + (f": {last}" if last else "")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        process = self.process
        if process is not None and process.returncode is None:
            # Like the local pool's: the results are in, and a worker the scheduler retired
            # does not end by itself for seconds.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                process.kill()
            await process.wait()
        await super().close()


def stop_restarts(cluster) -> None:
    """Workers of ours that stop from now on stay stopped (the cluster is being closed).

    A function of its own: a loop variable left holding a dask-jobqueue ``Job`` would keep it
    in the cluster's weak set of created workers, and ``SpecCluster.close`` asserts that every
    worker there was closed (a ``Job`` never marks itself closed).
    """
    for process in list(getattr(cluster, "workers", {}).values()):
        if isinstance(process, WorkerProcess):
            process.joined = False
