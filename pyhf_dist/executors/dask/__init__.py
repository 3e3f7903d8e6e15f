"""Fit on a Dask cluster: a local one we start, or one the user already runs.

The workspace reaches each worker once, through a worker plugin that calls
:func:`pyhf_dist.runtime.initialize` when the worker joins (also for workers that join later,
e.g. new Slurm jobs); a task carries only its patch (on the clusters we start, several patches
when fits are short: :attr:`DaskExecutor.pack_seconds`). Tasks go through Dask's own
``concurrent.futures`` adapter (``Client.get_executor``), so results stream back as they finish.

Dask reruns the task of a worker that dies on another worker by itself; the scan only sees an
error when Dask gives up on a task (``KilledWorker``) or loses the connection, and
:meth:`DaskExecutor.is_worker_lost` tells it to retry those.

The cluster started for a scan (no ``address``, ``client`` or ``cluster`` given) is a scheduler in
this process and one ``python -m distributed.cli.dask_spec`` process per worker, started with an
environment and a Dask configuration of our own (:mod:`~pyhf_dist.executors.dask.tuning`): glibc's default
malloc (no ``MALLOC_TRIM_THRESHOLD_``), one thread per numerical library, no statistical profiler,
slower housekeeping ticks. Worker processes of their own also never re-run the caller's
``__main__`` (a script without a main guard, code piped to ``python -``), and end with a kill at
shutdown, as the local pool's do. A cluster or client the user gives is never reconfigured.
"""

try:
    import distributed  # noqa: F401
except ImportError as error:  # the registry imports this package only when "dask" is asked for
    from pyhf_dist.exceptions import MissingDependencyError

    raise MissingDependencyError("distributed", "dask", 'executor="dask"') from error

from pyhf_dist.executors.dask.executor import WORKER_START_TIMEOUT, ContextPlugin, DaskExecutor, run_pickled_task
from pyhf_dist.executors.dask.processes import MAX_WORKER_RESTARTS, WorkerProcess
from pyhf_dist.executors.dask.tuning import MESSAGE_LOGS, TUNING, own_cluster_tuning, tuning_exports, worker_facts

__all__ = [
    "DaskExecutor", "ContextPlugin", "run_pickled_task", "WorkerProcess", "TUNING", "MESSAGE_LOGS",
    "own_cluster_tuning", "tuning_exports", "worker_facts", "WORKER_START_TIMEOUT", "MAX_WORKER_RESTARTS",
]
