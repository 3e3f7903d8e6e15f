"""Parsl worker pools on this machine: found by their run directory, watched for the one death
Parsl cannot recover from, and stopped.

A pool (Parsl's ``process_worker_pool``) hands tasks to its worker processes through a
``multiprocessing`` queue. A worker that waits for a task holds the queue's read lock while it
waits; killed there (the OOM killer, a ``kill -9``), it takes the lock with it, and no worker of
that pool, the one Parsl starts in its place included, can take a task again. Parsl reports
nothing: the tasks in flight never end. (A worker killed while it fits is another matter: Parsl
reports it lost, and the scan resubmits its task.) :class:`PoolWatch` recognises the stalled pool
from outside, so that the executor can start Parsl afresh and the scan resubmit what was in flight.
"""

from __future__ import annotations

import os
import time

import psutil

__all__ = ["PoolWatch", "pool_processes", "stop_pools_of"]


def pool_processes(run_dir: str) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The worker pools started for ``run_dir`` on this machine, and their worker processes.

    The pools carry the run directory in their command line (``--logdir``), which no other
    process does; their workers are their children.
    """
    marker = os.path.join(run_dir, "")
    pools, workers = [], []
    for process in psutil.process_iter(["cmdline"]):
        try:
            command = " ".join(process.info["cmdline"] or [])
            if marker in command and "process_worker_pool" in command:
                pools.append(process)
                workers.extend(process.children(recursive=True))
        except psutil.Error:
            continue
    return pools, workers


def stop_pools_of(run_dir: str, grace: float = 5.0) -> None:
    """Stop what is left of worker pools started for ``run_dir`` on this machine: SIGTERM, then
    SIGKILL after ``grace`` seconds (at once for ``grace=0``).

    Parsl cancels a block with SIGTERM only; a worker pool whose internals broke (e.g. its
    multiprocessing manager died) can hang on its way out and outlive the scan.
    """
    pools, workers = pool_processes(run_dir)
    alive = pools + workers
    if grace > 0:
        for process in alive:
            try:
                process.terminate()
            except psutil.Error:
                pass
        alive = _running_after(alive, grace)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    _running_after(alive, max(grace, 1.0))


def _running_after(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """Those of ``processes`` still running after up to ``seconds``. A zombie counts as ended:
    the shell Parsl starts a pool with is this process's child, reaped only when Parsl polls it."""
    deadline = time.monotonic() + seconds
    while True:
        running = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
            except psutil.Error:
                continue
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.02)


class PoolWatch:
    """Tells when the worker pools of a run directory have stalled after one of their workers died.

    Stalled means: a worker died, tasks are waiting for their results, and for :attr:`STALL`
    seconds since, the pools' workers together have used less than :attr:`IDLE_SHARE` of a core.
    A worker that fits uses a whole core, and Parsl reports a worker killed mid-fit within its
    5 s heartbeat; so this is the stalled task queue, not a slow fit. :meth:`check` is meant to
    be called about once a second: it reads the pools' workers, and walks the whole process table
    for the pools only every :attr:`RESCAN` seconds.

    Args:
        run_dir: The run directory the pools were started for.
    """

    #: Seconds without work, after a worker died, before the pools count as stalled.
    STALL = 15.0
    #: Share of one core the pools' workers may use together and still count as idle.
    IDLE_SHARE = 0.2
    #: Seconds between walks of the process table for the pools (their workers are read each time).
    RESCAN = 10.0

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.pools: list[psutil.Process] = []
        self.found_at = 0.0
        self.workers: dict[int, psutil.Process] = {}
        self.cpu: dict[int, float] = {}
        self.died: list[int] = []
        self.died_at: float | None = None
        self.busy_at = time.monotonic()
        self.sampled_at = time.monotonic()

    def check(self, waiting: bool) -> str | None:
        """Sample the workers; one line saying what stalled, or ``None``.

        Args:
            waiting: Whether tasks are waiting for their results.
        """
        now = time.monotonic()
        if not self.pools or now - self.found_at > self.RESCAN or not all(pool.is_running() for pool in self.pools):
            # A walk of the whole process table (thousands of processes on a login node) only now and then.
            self.pools, self.found_at = pool_processes(self.run_dir)[0], now
        found = []
        for pool in self.pools:
            try:
                found.extend(pool.children(recursive=True))
            except psutil.Error:
                continue
        alive = {process.pid: process for process in _running_after(found, 0.0)}
        for pid in set(self.workers) - set(alive):
            self.died.append(pid)
            self.died_at = now
        used = 0.0
        for pid, process in alive.items():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total = times.user + times.system
            used += total - self.cpu.get(pid, total)
            self.cpu[pid] = total
        self.cpu = {pid: value for pid, value in self.cpu.items() if pid in alive}
        self.workers = alive
        elapsed, self.sampled_at = now - self.sampled_at, now
        if not waiting or used > self.IDLE_SHARE * elapsed:
            self.busy_at = now
        if self.died_at is None or now - max(self.busy_at, self.died_at) < self.STALL:
            return None
        who = (f"a Parsl worker (pid {self.died[0]})" if len(self.died) == 1
               else f"Parsl workers (pids {', '.join(map(str, self.died))})")
        return (f"{who} died while waiting for a task, which leaves Parsl's worker pool unable to hand out "
                f"tasks (the lock of its task queue died with it); none ran for {self.STALL:.0f} s")
