"""Fit on a Dask cluster: a local one we start, or one the user already runs.

The workspace reaches each worker once, through a worker plugin that calls
:func:`pyhf_dist.worker.initialize` when the worker joins (also for workers that join later,
e.g. new Slurm jobs); a task carries only its patch. Tasks go through Dask's own
``concurrent.futures`` adapter (``Client.get_executor``), so results stream back as they finish.

Dask reruns the task of a worker that dies on another worker by itself; the scan only sees an
error when Dask gives up on a task (``KilledWorker``) or loses the connection, and
:meth:`DaskExecutor.is_worker_lost` tells it to retry those.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
from typing import Any

from pyhf_dist.exceptions import ExecutorError, ExecutorOptionError, MissingDependencyError
from pyhf_dist.executors.base import Executor, NoAnswer, call_within, default_workers
from pyhf_dist.worker import WorkerContext, run_task

try:
    import distributed
except ImportError as error:  # the registry imports this module only when "dask" is asked for
    raise MissingDependencyError("distributed", "dask", 'executor="dask"') from error

__all__ = ["DaskExecutor", "ContextPlugin"]


class ContextPlugin(distributed.WorkerPlugin):
    """Sets a worker up for one scan when it joins, and forgets the scan when removed.

    Args:
        context: The scan's :class:`~pyhf_dist.worker.WorkerContext`; pickled once per worker.
    """

    def __init__(self, context: WorkerContext):
        self.context = context

    def setup(self, worker=None):
        from pyhf_dist.worker import initialize

        initialize(self.context)

    def teardown(self, worker=None):
        # A long-lived cluster of the user's sees many scans: drop this one's parsed workspace.
        from pyhf_dist.worker import release

        release(self.context.key)


#: Errors of a future that mean its worker (or our link to the workers) went away, not the fit.
def _lost_worker_errors() -> tuple[type[BaseException], ...]:
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    return (KilledWorker, CommClosedError)


class DaskExecutor(Executor):
    """Runs fits on Dask workers.

    With no ``address``, ``client`` or ``cluster``, starts a ``distributed.LocalCluster`` of
    ``workers`` single-threaded worker processes and closes it at shutdown. Whatever the user
    passes in stays open: only our tasks and our worker plugin are removed from it.

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
        self.client: distributed.Client | None = client
        self.cluster: Any = cluster
        self._own_client = False
        self._own_cluster = False
        self._pool: concurrent.futures.Executor | None = None
        self._plugin_name: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def _make_cluster(self):
        """The cluster we start when the user gave none (SlurmExecutor starts a SLURMCluster)."""
        return distributed.LocalCluster(
            n_workers=self.workers,
            threads_per_worker=1,  # pyhf fits hold the GIL: one fit per process
            processes=True,
            dashboard_address=self.dashboard_address,
            silence_logs=logging.ERROR,
        )

    def _connect(self) -> distributed.Client:
        if self.client is not None:
            return self.client
        if self.address is not None:
            _check_reachable(self.address, self.connect_timeout)
            client = self._connect_bounded()
        else:
            if self.cluster is None:
                self.cluster = self._make_cluster()
                self._own_cluster = True
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
            reason = _first_line(error)
        raise ExecutorError(f"cannot connect to the Dask scheduler at {self.address}: {reason}")

    def start(self, context: WorkerContext) -> None:
        super().start(context)
        try:
            self.client = self._connect()
            # Workers that join later (adaptive scaling, a replaced Slurm job) get it on joining.
            self._plugin_name = f"pyhf-dist-{context.key}"
            self.client.register_plugin(ContextPlugin(context), name=self._plugin_name)
        except BaseException:
            self.shutdown()
            raise
        self._pool = self.client.get_executor(pure=False)

    def submit(self, task: dict) -> concurrent.futures.Future:
        if self._pool is None:
            raise RuntimeError(f"{type(self).__name__}.start(context) must be called before submit()")
        return self._pool.submit(run_task, task)

    def shutdown(self, cancel_futures: bool = True) -> None:
        pool, self._pool = self._pool, None
        client = self.client
        try:
            if pool is not None and client is not None and client.status == "running":
                pool.shutdown(wait=not cancel_futures)
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
            if self._own_cluster and self.cluster is not None:
                cluster, self._own_cluster = self.cluster, False
                self.cluster = self._user_cluster
                self._close_cluster(cluster)

    def _close_cluster(self, cluster) -> None:
        cluster.close()

    # --- what the scan asks ------------------------------------------------------------------

    def is_worker_lost(self, error: BaseException) -> bool:
        return super().is_worker_lost(error) or isinstance(error, _lost_worker_errors())

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

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"executor": self.name, "workers": self.workers}
        if self.client is not None:
            info["scheduler"] = self.client.scheduler.address
            info["dashboard"] = self.dashboard_link
            if self.workers is None:
                info["workers"] = len(self.client.scheduler_info().get("workers", {})) or None
        return info

    def __repr__(self) -> str:
        if self.address is not None:
            return f"{type(self).__name__}(address={self.address!r})"
        return f"{type(self).__name__}(workers={self.workers!r})"


def _check_reachable(address: str, timeout: float) -> None:
    """Fail at once, in one line, when nothing listens at a ``tcp://host:port`` address.

    Without this, a ``Client`` retries a refused connection until its timeout and leaves behind
    a half-built client that blocks the interpreter's exit for another ten seconds.
    """
    import socket
    import urllib.parse

    parsed = urllib.parse.urlsplit(address if "://" in address else f"tcp://{address}")
    if parsed.scheme != "tcp" or parsed.hostname is None:
        return  # tls://, ws://, inproc://: let the Client handle them
    try:
        port = parsed.port or 8786
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except (OSError, ValueError) as error:
        raise ExecutorError(
            f"cannot reach the Dask scheduler at {address} ({_first_line(error)}): "
            "is it running, and is the address right?"
        ) from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
