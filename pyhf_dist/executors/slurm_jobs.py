"""Slurm jobs that end before their Dask worker joined: handed back to the cluster, or reported.

Dask's ``SpecCluster`` replaces a job whose worker left the scheduler. A job that ends before its
worker ever joined (killed as it starts, a node that fails, an environment where the worker cannot
start) leaves the scheduler nothing to notice: the cluster keeps counting the job as running and
never submits another, and a scan whose every job ended that way waits forever. :class:`JobWatch`
asks Slurm every few seconds which of the cluster's jobs are still queued or running; a job that
ended without its worker joining is taken out of the cluster's running jobs, and Dask's adaptive
scaling (which the Slurm executor always runs) submits a new one within a second. Past a limit of
such jobs, the watch stops replacing them and says why, so that the scan can stop instead of wait.
"""

from __future__ import annotations

import getpass
import logging
import subprocess
import threading
from typing import Callable

__all__ = ["JobWatch"]

#: Seconds between two looks at Slurm's queue (one ``squeue`` of the user's jobs each).
INTERVAL = 5.0
#: Seconds between two looks at the workers that joined.
JOINED_INTERVAL = 0.25


class JobWatch:
    """Watch the jobs of a ``dask_jobqueue`` cluster from a thread of its own.

    Args:
        cluster: The cluster (its ``workers`` are dask-jobqueue ``Job`` objects with a ``job_id``).
        limit: Jobs ended before their worker joined that are replaced; the next one calls ``give_up``.
        give_up: Called once, from the cluster's event loop, with the number of such jobs and the
            ids of the last ones.
        interval: Seconds between two looks.
    """

    def __init__(self, cluster, limit: int, give_up: Callable[[int, list[str]], None], interval: float = INTERVAL):
        self.cluster = cluster
        self.limit = limit
        self.give_up = give_up
        self.interval = interval
        self.replaced = 0
        self._joined: set[str] = set()  # worker names the scheduler has shown
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pyhf-dist-slurm-jobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        # Which workers joined is read often (the cluster's own copy of the scheduler's workers,
        # no request): a worker that joined, fitted and died between two looks at Slurm's queue
        # must not pass for one that never joined. Slurm itself is asked every ``interval``.
        looks = max(1, round(self.interval / JOINED_INTERVAL))
        count = 0
        while not self._stop.wait(self.interval / looks):
            count += 1
            try:
                self._note_joined()
                if count % looks == 0:
                    self._look()
            except Exception as error:  # a watch that fails must not take the scan with it
                logging.getLogger("pyhf_dist").debug("watching the Slurm jobs failed: %s", error)

    def _note_joined(self) -> None:
        info = getattr(self.cluster, "scheduler_info", None) or {}
        self._joined.update(str(worker.get("name")) for worker in list(info.get("workers", {}).values()))

    def _look(self) -> None:
        self._note_joined()
        jobs = {name: job.job_id for name, job in list(self.cluster.workers.items())
                if getattr(job, "job_id", None) and not self._has_joined(str(name))}
        if not jobs:
            return
        active = _active_job_ids()
        if active is None:  # Slurm did not answer this time; look again later
            return
        ended = {name: job_id for name, job_id in jobs.items() if job_id not in active}
        if ended and not self._stop.is_set():
            self.cluster.loop.add_callback(self._hand_back, ended)

    def _has_joined(self, name: str) -> bool:
        # One worker per job carries the job's name; several carry it with a suffix ("name-0", ...).
        return name in self._joined or any(joined.startswith(f"{name}-") for joined in self._joined)

    def _hand_back(self, ended: dict[str, str]) -> None:
        """On the cluster's event loop, where its bookkeeping is changed."""
        workers = self.cluster.workers
        gone = [name for name, job_id in ended.items() if getattr(workers.get(name), "job_id", None) == job_id]
        if not gone or self._stop.is_set():
            return
        self.replaced += len(gone)
        if self.replaced > self.limit:
            self._stop.set()
            self.give_up(self.replaced, [ended[name] for name in gone])
            return
        ids = ", ".join(ended[name] for name in gone)
        for name in gone:
            del workers[name]  # still planned: adaptive scaling submits a job in its place
        logging.getLogger("pyhf_dist").warning(
            "Slurm job%s %s ended before %s worker joined: submitting %s in %s place",
            "s" if len(gone) > 1 else "", ids, "their" if len(gone) > 1 else "its",
            "others" if len(gone) > 1 else "another", "their" if len(gone) > 1 else "its")


def _active_job_ids() -> set[str] | None:
    """Ids of the user's jobs that Slurm still holds (pending, running, completing); ``None`` when
    ``squeue`` does not answer."""
    try:
        run = subprocess.run(["squeue", "-h", "-o", "%i", "--user", getpass.getuser()],
                             capture_output=True, text=True, timeout=30, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if run.returncode != 0:
        return None
    return set(run.stdout.split())
