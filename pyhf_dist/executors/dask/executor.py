"""The Dask executor: a scan's tasks on a Dask cluster, through Dask's ``concurrent.futures`` adapter."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
from typing import Any

import distributed

from pyhf_dist import collector
from pyhf_dist.exceptions import ExecutorError, ExecutorOptionError
from pyhf_dist.executors.base import Description, Executor, ExecutorFlag, NoAnswer, call_within, default_workers
from pyhf_dist.executors.dask.processes import WorkerProcess, stop_restarts
from pyhf_dist.executors.dask.support import (
    check_reachable, drop_lost_connection_reports, hold_gc_diagnosis, killed_while_starting, lost_worker_errors,
    quiet_dask_logs, transfer,
)
from pyhf_dist.executors.dask.tuning import MESSAGE_LOGS, advice, own_cluster_tuning, worker_environment, worker_facts
from pyhf_dist.protocol import Context, Pack, Task, first_line
from pyhf_dist.runtime import initialize, preload, release, run_task

__all__ = ["DaskExecutor", "ContextPlugin", "run_pickled_task", "WORKER_START_TIMEOUT"]

#: How long the workers of a cluster we start may take to connect.
WORKER_START_TIMEOUT = 120.0
#: Seconds of fitting per task on the clusters we start (see :attr:`DaskExecutor.pack_seconds`).
PACK_SECONDS = 0.25


class ContextPlugin(distributed.WorkerPlugin):
    """Sets a worker up for one scan when it joins, and forgets the scan when removed.

    Args:
        context: The scan's context (:class:`~pyhf_dist.protocol.Context`); pickled once per worker.
        freeze: After the setup, leave every object alive out of later collections
            (:func:`pyhf_dist.collector.settle`): the parsed workspace and the compiled
            likelihood are never walked again by a collection, nor by the interpreter's exit
            (about 2 s for a 1Lbb worker otherwise). Only for worker processes pyhf-dist started itself.
    """

    def __init__(self, context: Context, freeze: bool = False):
        self.context = context
        self.freeze = freeze

    def setup(self, worker=None):
        initialize(self.context)
        if self.freeze:
            collector.settle()

    def teardown(self, worker=None):
        # A long-lived cluster of the user's sees many scans: drop this one's parsed workspace.
        release(self.context.key)


def run_pickled_task(task: bytes) -> dict:
    """:func:`~pyhf_dist.runtime.run_task` of a pickled task (what the scan submits to Dask)."""
    return run_task(pickle.loads(task))


#: Errors of a future that mean its worker (or our link to the workers) went away, not the fit.
#: Starts of a cluster of our own, when a worker is killed while it starts (an operator, the OOM
#: killer, a job cancelled): a worker lost later is the scan's to retry, this is before any fit.
START_ATTEMPTS = 3


def _check_address(address: str) -> None:
    """Refuse an address no Dask client can use, before a client is made: a half-made one keeps
    the interpreter from exiting for ten seconds, then prints a traceback."""
    from distributed.comm.registry import backends

    if not address.strip():
        raise ExecutorOptionError("address is empty: give the scheduler's address, e.g. tcp://host:8786")
    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    if scheme not in backends:
        raise ExecutorOptionError(f"address {address!r}: a Dask scheduler is not reached over {scheme}://; "
                                  f"give its address as tcp://host:8786 "
                                  f"(or {', '.join(scheme for scheme in backends if scheme != 'tcp')})")


class DaskExecutor(Executor):
    """Runs fits on Dask workers.

    With no ``address``, ``client`` or ``cluster``, starts a cluster of ``workers``
    single-threaded worker processes on this machine (a scheduler in this process, a process per
    worker, tuned as :func:`own_cluster_tuning` says) and closes it at shutdown. Whatever the user
    passes in stays open and keeps its configuration: only our tasks and our worker plugin are
    removed from it.

    Args:
        workers: Worker processes of the local cluster (default: the cores we may use).
        address: ``"tcp://host:port"`` of a running Dask scheduler.
        client: A connected ``distributed.Client``.
        cluster: Any Dask cluster object (``LocalCluster``, ``SLURMCluster``, ...).
        connect_timeout: Seconds to wait for the scheduler at ``address``.
        dashboard_address: Where the local cluster serves its dashboard (``":0"``: any free port;
            the dashboard needs ``bokeh``).

    Example:
        >>> with DaskExecutor(address="tcp://scheduler.example.org:8786") as executor:  # doctest: +SKIP
        ...     executor.start(context)
    """

    name = "dask"
    flags = (
        ExecutorFlag("workers", "Worker processes of the cluster started here [default: the cores we may use].", int),
        ExecutorFlag("address", "Address of a running Dask scheduler, e.g. tcp://host:8786."),
    )

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        client: Any = None,
        cluster: Any = None,
        connect_timeout: float = 5.0,
        dashboard_address: str | None = ":8787",
    ):
        super().__init__(workers=workers)
        given = [label for label, value in (("address", address), ("client", client), ("cluster", cluster))
                 if value is not None]
        if len(given) > 1:
            raise ExecutorOptionError(f"give at most one of address, client, cluster (got {', '.join(given)})")
        if address is not None and not isinstance(address, str):
            raise ExecutorOptionError(
                f"address must be a scheduler address like 'tcp://host:8786', got {type(address).__name__}; "
                "pass a Client as client= and a cluster object as cluster="
            )
        if address is not None:
            _check_address(address)
        number = isinstance(connect_timeout, (int, float)) and not isinstance(connect_timeout, bool)
        if not number or not connect_timeout > 0:
            raise ExecutorOptionError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")
        if client is not None and not isinstance(client, distributed.Client):
            raise ExecutorOptionError(f"client must be a distributed.Client, got {type(client).__name__}")
        if given and workers is not None:
            raise ExecutorOptionError(
                f"workers applies to the cluster pyhf-dist starts; size the one given as {given[0]} yourself"
            )
        if not given and workers is None:
            self.workers = default_workers()
        self.address = address
        self.connect_timeout = connect_timeout
        self.dashboard_address = dashboard_address
        self._user_client = client
        self._user_cluster = cluster
        self._given = bool(given)
        self.client: distributed.Client | None = client
        self.cluster: Any = cluster
        self._own_client = False
        self._own_cluster = False
        self._launched = False  # the context is shipped: tasks may be submitted
        # The Dask future of each future handed to the scan, and when its task was seen running.
        self._inner: dict[concurrent.futures.Future, distributed.Future] = {}
        self._began: dict[concurrent.futures.Future, float] = {}
        self._processing: set = set()
        self._processing_checked = 0.0
        self._plugin_name: str | None = None
        self._bringing_up: threading.Thread | None = None
        self._bring_up_error: BaseException | None = None
        self._stop_bringing_up = threading.Event()
        self._log_directory: str | None = None
        self._keep_logs = False
        #: One line for the user about their own cluster's settings (``None``: nothing to say).
        self.advice: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def make_cluster(self):
        """The cluster this executor starts when the user gave none: a hook that executors for
        other cluster types override (:class:`~pyhf_dist.executors.slurm.SlurmExecutor` starts a
        ``SLURMCluster``)."""
        import dask
        from distributed.deploy.spec import SpecCluster

        tuning = own_cluster_tuning()
        with dask.config.set(tuning):  # for the scheduler in this process, while it is built
            config = dask.config.config
            environment = worker_environment(config, tuning)
            self._log_directory = tempfile.mkdtemp(prefix="pyhf-dist-dask-")
            workers = {
                index: {"cls": WorkerProcess, "options": {
                    "environment": environment,
                    "log_path": os.path.join(self._log_directory, f"worker-{index}.log"),
                    # One fit per process: pyhf's and scipy's fitting loops hold the GIL.
                    "options": {"nthreads": 1},
                }}
                for index in range(self.workers)
            }
            scheduler = {"cls": distributed.Scheduler, "options": {
                "host": "127.0.0.1", "port": 0, "dashboard": self.dashboard_address is not None,
                "dashboard_address": self.dashboard_address,
            }}
            return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR, name="pyhf-dist")

    def _own_local_cluster(self) -> bool:
        workers = getattr(self.cluster, "workers", None)
        return self._own_cluster and isinstance(workers, dict) and bool(workers) and all(
            isinstance(worker, WorkerProcess) for worker in workers.values())

    def _connect(self) -> distributed.Client:
        if self.client is not None:
            return self.client
        drop_lost_connection_reports()
        if self.address is not None:
            check_reachable(self.address, self.connect_timeout)
            client = self._connect_bounded()
        else:
            if self.cluster is None:
                hold_gc_diagnosis()
                self._own_cluster = True
                self.cluster = self.make_cluster()
            client = distributed.Client(self.cluster, set_as_default=False)
        self._own_client = True
        return client

    def _connect_bounded(self) -> distributed.Client:
        # Client(timeout=...) bounds the TCP connection, not the handshake: a peer that accepts the
        # connection and never answers would keep us waiting forever.
        try:
            connect = functools.partial(
                distributed.Client, self.address, timeout=self.connect_timeout, set_as_default=False
            )
            return call_within(self.connect_timeout + 2, connect, name="pyhf-dist-dask-connect")
        except NoAnswer:
            reason = f"no answer within {self.connect_timeout:g} s (is it a Dask scheduler?)"
        except Exception as error:  # timeouts, refused connections, something else on that port
            reason = first_line(error)
        raise ExecutorError(f"cannot connect to the Dask scheduler at {self.address}: {reason}")

    def _wait_for_own_workers(self) -> None:
        """Until every worker process we started has joined; one clear line if one cannot."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        processes = list(self.cluster.workers.values())
        while True:
            try:
                self.client.wait_for_workers(len(processes), timeout=0.5)
                break
            except (TimeoutError, asyncio.TimeoutError, distributed.TimeoutError):
                pass
            if self._stop_bringing_up.is_set():
                return
            for process in processes:
                reason = process.failure()
                if reason is not None:
                    self._keep_logs = True  # the message points to them
                    raise ExecutorError(
                        f"a Dask worker process of pyhf-dist could not start ({reason}); its log: {process.log_path}"
                    )
            if time.monotonic() > deadline:
                raise ExecutorError(f"the Dask workers did not join within {WORKER_START_TIMEOUT:g} s")
        for process in processes:
            process.joined = True

    def _bring_up(self, settings: dict | None) -> None:
        """Connect (starting our cluster when we own one); with ``settings``, import what the
        fits will need on our workers while the client is busy elsewhere."""
        import dask

        # Short message logs (MESSAGE_LOGS) for the streams made now: our client's, and those of
        # our own scheduler to its workers as they join. (A worker joining later, a replacement,
        # gets Dask's default.)
        with dask.config.set(own_cluster_tuning(MESSAGE_LOGS)):
            self.client = self._connect()
            if self._own_local_cluster():
                self._wait_for_own_workers()
        if self._own_local_cluster() and settings is not None and not self._stop_bringing_up.is_set():
            self.client.run(preload, settings)

    def prepare(self, settings: dict) -> None:
        """Start the cluster we own in the background: its workers start and import jax and
        scipy while the scan reads the pallet. Does nothing for a cluster the user gave."""
        if self._given or self._bringing_up is not None or self.client is not None:
            return
        hold_gc_diagnosis()

        def bring_up() -> None:
            try:
                self._bring_up(settings)
            except BaseException as error:  # raised again by start()
                self._bring_up_error = error

        self._bringing_up = threading.Thread(target=bring_up, name="pyhf-dist-dask-start", daemon=True)
        self._bringing_up.start()

    def _finish_bringing_up(self) -> None:
        thread, self._bringing_up = self._bringing_up, None
        if thread is not None:
            thread.join()
        error, self._bring_up_error = self._bring_up_error, None
        if error is not None:
            raise error

    def launch(self, context: Context) -> None:
        """Bring the workers up and ship ``context``; a cluster of our own whose worker (or job)
        was killed while it started is started afresh, up to :data:`START_ATTEMPTS` times."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                # A worker of our own cluster killed while it starts makes Dask log the closed
                # stream with a traceback; what happened is said in one line here or by the scan.
                with quiet_dask_logs(not self._given, logging.CRITICAL):
                    return self._launch_once(context)
            except Exception as error:
                if self._given or attempt == START_ATTEMPTS or not killed_while_starting(error, self):
                    raise
                logging.getLogger("pyhf_dist").warning(
                    "a worker was lost while the %s cluster started (%s): starting it again (attempt %d of %d)",
                    self.name, first_line(error), attempt + 1, START_ATTEMPTS)

    def _launch_once(self, context: Context) -> None:
        try:
            if self._bringing_up is not None:
                self._finish_bringing_up()
            else:
                self._bring_up(None)
            if not self._own_cluster:
                self.advice = self._advise()
            # Workers that join later (adaptive scaling, a replaced Slurm job) get it on joining.
            self._plugin_name = f"pyhf-dist-{context.key}"
            self.client.register_plugin(ContextPlugin(context, freeze=self._own_cluster), name=self._plugin_name)
        except BaseException:
            self.shutdown()
            raise
        self._launched = True

    def _advise(self) -> str | None:
        try:
            return advice(self.client.run(worker_facts))
        except Exception:  # advice only: a worker that cannot answer has nothing to tell
            return None

    @property
    def pack_seconds(self) -> float:
        """A quarter of a second of fits per task on the clusters we start, none on the user's.

        Each task costs a few milliseconds of client, scheduler and worker time (messages, state
        transitions, fetching the result), while a 1Lbb fit takes ~50 ms: one patch per task
        made the scan ~10% slower on two cores. A cluster of the user's may scale with the number
        of tasks waiting, which packing would hide from it.
        """
        return PACK_SECONDS if self._own_cluster else 0.0

    def submit(self, task: Task | Pack) -> concurrent.futures.Future:
        if not self._launched:
            raise RuntimeError(f"{type(self).__name__}.start(context) must be called before submit()")
        # As bytes: Dask walks every list and dict of a task's arguments looking for keys and
        # futures, and a 1Lbb patch is ~115 kB of nested JSON (22 ms per submit; 1.3 ms pickled).
        inner = self.client.submit(run_pickled_task, pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL), pure=False)
        outer: concurrent.futures.Future = concurrent.futures.Future()
        self._inner[outer] = inner
        outer.add_done_callback(self._forget)
        inner.add_done_callback(functools.partial(transfer, outer))
        return outer

    def _forget(self, outer: concurrent.futures.Future) -> None:
        inner = self._inner.pop(outer, None)
        self._began.pop(outer, None)
        if inner is not None and outer.cancelled():
            inner.cancel()  # abandoned by the scan (past its timeout), or cancelled at shutdown

    def started_at(self, future: concurrent.futures.Future) -> float | None:
        """When the scheduler first showed the task processing on a worker (checked at most twice
        a second for all tasks at once): Dask's futures do not say when their task began."""
        inner = self._inner.get(future)
        if inner is None:
            return None
        now = time.monotonic()
        if now - self._processing_checked > 0.5:
            self._processing_checked = now
            try:
                self._processing = {key for keys in self.client.processing().values() for key in keys}
            except Exception:  # the scheduler is away: timeouts wait until it answers again
                self._processing = set()
        if future not in self._began and inner.key in self._processing:
            self._began[future] = time.time()
        return self._began.get(future)

    def shutdown(self, cancel_futures: bool = True) -> None:
        self._stop_bringing_up.set()  # a scan that ends before it started (bad pallet, Ctrl-C)
        try:
            self._finish_bringing_up()
        except BaseException:  # start() reports it; here only what was started must go
            pass
        # Closing a client and a cluster of our own makes Dask log, at INFO and with a traceback,
        # the streams it finds closed; a SpecCluster hides its INFO lines until the end of its
        # close, but not while it stops its event loop. Quiet until that loop has stopped.
        with quiet_dask_logs(self._own_cluster):
            self._shutdown(cancel_futures)

    def _shutdown(self, cancel_futures: bool) -> None:
        launched, self._launched = self._launched, False
        client = self.client
        try:
            if launched and cancel_futures:
                for outer in list(self._inner):
                    outer.cancel()
            if self._plugin_name is not None and not self._own_cluster and client is not None:
                # On the user's cluster, take our plugin (and with it the parsed workspace) back out.
                try:
                    if client.status == "running":
                        client.unregister_worker_plugin(self._plugin_name)
                except Exception:  # the scheduler may be gone already; nothing left to clean
                    pass
            self._plugin_name = None
            if self._own_client and client is not None:
                self._own_client = False
                self.client = self._user_client
                client.close()
        finally:
            # Whatever failed above, a cluster we started must go (for Slurm: its jobs cancelled).
            try:
                if self._own_cluster and self.cluster is not None:
                    cluster, self._own_cluster = self.cluster, False
                    self.cluster = self._user_cluster
                    stop_restarts(cluster)
                    self.close_cluster(cluster)
            finally:
                self._own_cluster = False
                self._stop_bringing_up.clear()
                if self._log_directory is not None and not self._keep_logs:
                    shutil.rmtree(self._log_directory, ignore_errors=True)
                self._log_directory = None

    def close_cluster(self, cluster) -> None:
        """Close a cluster :meth:`make_cluster` started (a hook, as :meth:`make_cluster`)."""
        cluster.close()

    # --- what the scan asks ------------------------------------------------------------------

    def is_worker_lost(self, error: BaseException) -> bool:
        return super().is_worker_lost(error) or isinstance(error, lost_worker_errors())

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard's address, when the scheduler serves one (it needs ``bokeh``)."""
        if self.client is None:
            return None
        try:
            if "dashboard" not in self.client.scheduler_info().get("services", {}):
                return None
            return self.client.dashboard_link
        except Exception:
            return None

    def describe(self) -> Description:
        info: Description = {"executor": self.name, "workers": self.workers}
        if self.client is not None:
            info["scheduler"] = self.client.scheduler.address
            info["dashboard"] = self.dashboard_link
            if self.workers is None:
                info["workers"] = len(self.client.scheduler_info().get("workers", {}))
        if self.advice is not None:
            info["advice"] = self.advice
        if info["workers"] == 0:
            # A scheduler of the user's without workers: the scan waits for them, and says so.
            info["advice"] = (f"the Dask scheduler at {info.get('scheduler')} has no workers yet: the scan waits for "
                              f"them to join (start them with 'dask worker {info.get('scheduler')}')")
        return info

    def __repr__(self) -> str:
        if self.address is not None:
            return f"{type(self).__name__}(address={self.address!r})"
        return f"{type(self).__name__}(workers={self.workers!r})"
