"""Fit on Parsl's HighThroughputExecutor: ``executor="parsl"``.

The HighThroughputExecutor (HTEX) is the engine inside Globus Compute endpoints: an interchange
process hands tasks to long-lived worker pools, started on this machine (``provider="local"``,
the default) or as Slurm jobs (``provider="slurm"``), or however a user's ``parsl.Config`` says.

HTEX workers are long-lived processes, so each one keeps its parsed workspace between tasks
(:func:`pyhf_dist.runtime.run_task` caches it per process). HTEX has no hook that runs Python once
per worker, so the context still travels with every task; it is zlib-compressed once on the
client (a workspace shrinks about 6x) and decompressed only by a worker's first task.

Parsl's DataFlowKernel is created and cleaned up by this executor in every path — a finished scan,
a failed one, Ctrl-C, a script that ends without :meth:`~ParslExecutor.shutdown` — so no
interchange or worker-pool process outlives the scan. Worker pools on this machine are watched for
the one death Parsl does not recover from (a worker killed while it waits for a task:
:mod:`pyhf_dist.executors.parsl_pools`); Parsl is then started afresh and the tasks in flight are
submitted again.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from pyhf_dist.exceptions import ExecutorError, ExecutorOptionError, MissingDependencyError, WorkerLostError
from pyhf_dist.executors.base import Description, Executor, ExecutorFlag, default_workers
from pyhf_dist.executors.parsl_pools import PoolWatch, stop_pools_of
from pyhf_dist.protocol import CompressedContext, Context, Pack, Task
from pyhf_dist.runtime.threads import thread_limit_exports

try:
    import parsl
    from parsl.executors import HighThroughputExecutor
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD
except ImportError as error:  # the registry imports this module only when "parsl" is asked for
    raise MissingDependencyError("parsl", "parsl", 'executor="parsl"') from error

__all__ = ["ParslExecutor", "run_parsl_task", "preload_parsl_worker", "PROVIDERS"]

PROVIDERS = ("local", "slurm")
LABEL = "pyhf_dist"
#: Parsl's interchange, deaf to SIGINT: Ctrl-C in a terminal signals its whole process group, and an
#: interchange killed by it leaves Parsl's cleanup waiting for ever for its answer. The scan stops
#: it (SIGTERM) once the workers are shut down. (The worker pools run in a process group of their own.)
INTERCHANGE_IGNORING_CTRL_C = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "runpy.run_module('parsl.executors.high_throughput.interchange', run_name='__main__', alter_sys=True)"
)
#: Seconds Parsl's cleanup may take; and once its interchange is seen dead (see _clean_up).
CLEANUP_SECONDS, CLEANUP_AFTER_INTERCHANGE = 60.0, 0.5


def run_parsl_task(task: Task | Pack, context: CompressedContext) -> dict:
    """What an HTEX worker runs: one task or pack, the context set up on the worker's first task."""
    from pyhf_dist.runtime import run_task

    return run_task(task, context)


def preload_parsl_worker(settings: dict) -> None:
    """What a worker runs while the scan still reads the pallet: import what the fits need."""
    from pyhf_dist.runtime import preload

    preload(settings)


def lost_worker_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    try:
        from parsl.executors.high_throughput.errors import WorkerLost

        errors.append(WorkerLost)
    except ImportError:
        pass
    try:
        from parsl.executors.high_throughput.errors import ManagerLost

        errors.append(ManagerLost)
    except ImportError:
        pass
    return tuple(errors)


def _shutdown_at_exit(executor: weakref.ref) -> Callable[[], None]:
    def shutdown() -> None:
        if (alive := executor()) is not None:
            alive.shutdown()

    return shutdown


def _clean_up(dfk: Any) -> bool:
    """Parsl's cleanup: it stops the interchange and cancels the blocks (local worker pools are
    killed, Slurm jobs scancel'ed); tasks still running are abandoned.

    It first asks the interchange which pools are connected, and waits for ever for the answer of
    an interchange that has died (the end of a Slurm job signals every process of the job). So it
    runs in a thread, given up :data:`CLEANUP_AFTER_INTERCHANGE` seconds after an interchange is
    seen dead (the caller then kills the pools), and after :data:`CLEANUP_SECONDS` in any case.
    (Its normal run ends as the interchange ends.)

    Returns:
        Whether Parsl's cleanup ended.
    """
    interchanges = [executor.interchange_proc for executor in dfk.executors.values()
                    if getattr(executor, "interchange_proc", None) is not None]
    failed: list[BaseException] = []

    def clean_up() -> None:
        try:
            dfk.cleanup()
        except Exception as error:
            failed.append(error)

    thread = threading.Thread(target=clean_up, name="pyhf-dist-parsl-cleanup", daemon=True)
    thread.start()
    now = time.monotonic()
    deadline, died_at = now + CLEANUP_SECONDS, None
    while thread.is_alive() and now < deadline:
        thread.join(0.1)
        now = time.monotonic()
        if died_at is None and any(process.poll() is not None for process in interchanges):
            died_at = now
            deadline = min(deadline, now + CLEANUP_AFTER_INTERCHANGE)
    if thread.is_alive():
        atexit.unregister(dfk.atexit_cleanup)  # it would only warn at exit that Parsl still runs
        for process in interchanges:
            if process.poll() is None:
                process.kill()
        logging.getLogger(__name__).info("Parsl's cleanup gave no answer: its processes are stopped instead")
        return False
    if failed:  # never hide the scan's own error behind a cleanup one
        logging.getLogger(__name__).warning("Parsl cleanup failed: %s", failed[0])
    return True


class ParslExecutor(Executor):
    """Runs fits on a Parsl HighThroughputExecutor.

    Args:
        workers: Worker processes per node (per block); default: the cores we may use.
        provider: ``"local"`` (worker pools on this machine) or ``"slurm"`` (worker pools in
            Slurm jobs, started with ``srun``).
        config: A ready ``parsl.Config``; the other options are then not used. Its DataFlowKernel
            is started and cleaned up by this executor.
        init_blocks, min_blocks, max_blocks, nodes_per_block: Parsl block settings (a block is
            one batch job, or one local worker pool).
        partition, account, qos, walltime, scheduler_options, exclusive, mem_per_node: Slurm
            job settings (``provider="slurm"``).
        worker_init: Shell commands run before the worker pool starts (e.g. activating the
            environment with pyhf and pyhf-dist).
        strategy_period: Seconds between Parsl's scaling decisions; small means a fast start.
        address: Address the workers connect to (default: ``127.0.0.1`` for local workers, the
            machine's address for Slurm).
        run_dir: Parsl's run directory (logs, job scripts); default: a temporary directory for
            local workers, ``./pyhf-dist-parsl`` for Slurm (it must be visible to the nodes).
        queue: Another name for ``partition`` (the command line's ``--queue``).

    Example:
        >>> pyhf_dist.map_fits("pallet/", executor="parsl", provider="slurm",
        ...                    partition="compute", max_blocks=4, workers=32)  # doctest: +SKIP
    """

    name = "parsl"
    flags = (
        ExecutorFlag("workers", "Workers of the worker pools [default: the cores we may use].", int),
        ExecutorFlag("provider", "Where worker pools run.", PROVIDERS),
        ExecutorFlag("max_blocks", "Most blocks (batch jobs, or local worker pools).", int),
    )

    def __init__(
        self,
        workers: int | None = None,
        provider: str = "local",
        config: Any = None,
        init_blocks: int = 1,
        min_blocks: int = 0,
        max_blocks: int = 1,
        nodes_per_block: int = 1,
        partition: str | None = None,
        account: str | None = None,
        qos: str | None = None,
        walltime: str = "00:30:00",
        scheduler_options: str = "",
        exclusive: bool = False,
        mem_per_node: int | None = None,
        worker_init: str = "",
        strategy_period: float = 0.2,
        address: str | None = None,
        run_dir: str | os.PathLike | None = None,
        queue: str | None = None,
    ):
        super().__init__(workers=workers)
        if queue is not None:
            if partition is not None and partition != queue:
                raise ExecutorOptionError(f"give partition= or queue= (the same thing), not both: {partition!r}, {queue!r}")
            partition = queue
        if config is None and provider not in PROVIDERS:
            raise ExecutorOptionError(f"unknown Parsl provider {provider!r}: choose one of {', '.join(PROVIDERS)} or pass config=")
        if config is not None and not isinstance(config, parsl.Config):
            raise ExecutorOptionError(f"config must be a parsl.Config, got {type(config).__name__}")
        for label, value in (("init_blocks", init_blocks), ("min_blocks", min_blocks)):
            if not isinstance(value, int) or value < 0:
                raise ExecutorOptionError(f"{label} must be a non-negative integer, got {value!r}")
        for label, value in (("max_blocks", max_blocks), ("nodes_per_block", nodes_per_block)):
            if not isinstance(value, int) or value < 1:
                raise ExecutorOptionError(f"{label} must be a positive integer, got {value!r}")
        if not (min_blocks <= max_blocks and init_blocks <= max_blocks):
            raise ExecutorOptionError(
                f"need min_blocks <= max_blocks and init_blocks <= max_blocks, got {min_blocks}, {init_blocks}, {max_blocks}"
            )
        if not isinstance(strategy_period, (int, float)) or strategy_period <= 0:
            raise ExecutorOptionError(f"strategy_period must be a positive number of seconds, got {strategy_period!r}")
        self.provider = "custom" if config is not None else provider
        self.config = config
        self.options = dict(
            init_blocks=init_blocks, min_blocks=min_blocks, max_blocks=max_blocks, nodes_per_block=nodes_per_block,
            partition=partition, account=account, qos=qos, walltime=walltime, scheduler_options=scheduler_options,
            exclusive=exclusive, mem_per_node=mem_per_node, worker_init=worker_init,
        )
        self.strategy_period = strategy_period
        self.address = address
        self.run_dir = os.fspath(run_dir) if run_dir is not None else None
        self._own_run_dir: str | None = None
        self._active_run_dir: str | None = None
        self._dfk: Any = None
        self._pool: Any = None
        self._compressed: CompressedContext | None = None
        # The scan's futures -> Parsl's; and the watch of local pools (see parsl_pools).
        self._inner: dict[concurrent.futures.Future, concurrent.futures.Future] = {}
        self._lock = threading.RLock()
        self._watch: PoolWatch | None = None
        self._watch_thread: threading.Thread | None = None
        self._watching = threading.Event()
        self._restart_failed: str | None = None
        self._at_exit: Callable[[], None] | None = None
        if self.workers is None and config is None:
            self.workers = default_workers()

    # ---------------------------------------------------------------------------------- config
    def build_config(self) -> "parsl.Config":
        """The ``parsl.Config`` this executor runs (the user's, when one was given)."""
        if self.config is not None:
            return self.config
        options = self.options
        python = sys.executable
        # Start the interchange and worker pools with this very Python (the scripts Parsl puts on
        # PATH may belong to another installation, or not be on PATH at all).
        launch_cmd = DEFAULT_LAUNCH_CMD.replace(
            "process_worker_pool.py", f"{python} -m parsl.executors.high_throughput.process_worker_pool", 1
        )
        # The pools inherit this process's environment (both providers).
        worker_init = "\n".join([*thread_limit_exports(dict(os.environ)), options["worker_init"]]).strip()
        if self.provider == "local":
            from parsl.providers import LocalProvider

            provider = LocalProvider(
                init_blocks=options["init_blocks"], min_blocks=options["min_blocks"],
                max_blocks=options["max_blocks"], nodes_per_block=1, worker_init=worker_init,
            )
            address = self.address or "127.0.0.1"
            run_dir = self.run_dir or self._temporary_run_dir()
        else:
            from parsl.launchers import SrunLauncher
            from parsl.providers import SlurmProvider

            provider = SlurmProvider(
                partition=options["partition"], account=options["account"], qos=options["qos"],
                nodes_per_block=options["nodes_per_block"], init_blocks=options["init_blocks"],
                min_blocks=options["min_blocks"], max_blocks=options["max_blocks"],
                walltime=options["walltime"], scheduler_options=options["scheduler_options"],
                exclusive=options["exclusive"], mem_per_node=options["mem_per_node"],
                worker_init=worker_init, launcher=SrunLauncher(),
            )
            address = self.address
            if address is None:
                from parsl.addresses import address_by_hostname

                address = address_by_hostname()
            run_dir = self.run_dir or os.path.abspath("pyhf-dist-parsl")
        executor = HighThroughputExecutor(
            label=LABEL,
            address=address,
            max_workers_per_node=self.workers,
            provider=provider,
            launch_cmd=launch_cmd,
            interchange_launch_cmd=[python, "-c", INTERCHANGE_IGNORING_CTRL_C],
            heartbeat_period=5,
            heartbeat_threshold=30,
            poll_period=10,
        )
        return parsl.Config(
            executors=[executor],
            strategy_period=self.strategy_period,
            run_dir=run_dir,
            initialize_logging=False,
            usage_tracking=0,
            retries=0,
            exit_mode="cleanup",
        )

    def _temporary_run_dir(self) -> str:
        if self._own_run_dir is None:
            self._own_run_dir = tempfile.mkdtemp(prefix="pyhf-dist-parsl-")
        return self._own_run_dir

    # ------------------------------------------------------------------------------- lifecycle
    def prepare(self, settings: dict) -> None:
        """Start Parsl now (interchange, worker pools), and have each worker import what the fits
        need, while the scan reads the pallet: the pools take seconds to start, and a worker's
        first task would otherwise import jax and scipy too."""
        if self._dfk is not None:
            return
        self._start_parsl()
        for _ in range(self.workers or 1):
            self._pool.submit(preload_parsl_worker, settings)  # nothing waits for these

    def _start_parsl(self) -> None:
        from parsl.concurrent import ParslPoolExecutor
        from parsl.dataflow.dflow import DataFlowKernel

        self._restart_failed = None  # a failed restart's error belongs to the Parsl it replaced
        try:
            self._dfk = DataFlowKernel(self.build_config())
            # This scan's own numbered run directory (e.g. .../000): pools started for it carry it.
            self._active_run_dir = os.path.abspath(self._dfk.run_dir)
            self._pool = ParslPoolExecutor(dfk=self._dfk)
        except Exception as error:
            self.shutdown()
            raise ExecutorError(f"Parsl could not start: {error}") from error
        if self._at_exit is None:
            # Parsl only warns at exit: a script that ends without shutdown() (an exception, no
            # `with`) would leave the interchange and worker pools running, holding its terminal.
            self._at_exit = _shutdown_at_exit(weakref.ref(self))
            atexit.register(self._at_exit)
        if self.provider == "local" and self._watch_thread is None:
            # Only pools on this machine can be watched (a user's config may start them anywhere).
            self._watch = PoolWatch(self._active_run_dir)
            self._watching.clear()
            self._watch_thread = threading.Thread(target=self._watch_pools, name="pyhf-dist-parsl-watch",
                                                  daemon=True)
            self._watch_thread.start()

    def launch(self, context: Context) -> None:
        self._compressed = CompressedContext.of(context)
        if self._dfk is None:  # not started by prepare()
            self._start_parsl()

    def submit(self, task: Task | Pack) -> concurrent.futures.Future:
        with self._lock:  # not while a stalled Parsl is replaced
            if self._restart_failed is not None:
                raise ExecutorError(self._restart_failed)
            if self._pool is None:
                raise RuntimeError("ParslExecutor.start(context) must be called before submit()")
            inner = self._pool.submit(run_parsl_task, task, self._compressed)
            # The scan waits on a future of its own, which a restart can settle when Parsl's never will.
            outer: concurrent.futures.Future = concurrent.futures.Future()
            self._inner[outer] = inner
        inner.add_done_callback(lambda done: self._settle(outer, done))
        return outer

    def _settle(self, outer: concurrent.futures.Future, inner: concurrent.futures.Future) -> None:
        # Without the lock: Parsl's cleanup, run under it by a restart, may settle tasks from its threads.
        self._inner.pop(outer, None)
        try:
            if inner.cancelled():
                outer.cancel()
            elif inner.exception() is not None:
                outer.set_exception(inner.exception())
            else:
                outer.set_result(inner.result())
        except concurrent.futures.InvalidStateError:  # settled already, as lost in a restart
            pass

    def started_at(self, future: concurrent.futures.Future) -> float | None:
        inner = self._inner.get(future)
        return time.time() if inner is not None and inner.running() else None

    def abandon(self, future: concurrent.futures.Future) -> None:
        # Parsl cannot cancel a task (its futures raise NotImplementedError): the task is left to
        # end on its worker, and the scan has recorded it as failed already.
        self._inner.pop(future, None)

    def _watch_pools(self) -> None:
        while not self._watching.wait(1.0):
            with self._lock:
                watch, waiting = self._watch, bool(self._inner)
            stalled = watch.check(waiting) if watch is not None else None
            if stalled:
                self._restart(stalled)

    def _restart(self, reason: str) -> None:
        """Replace a stalled Parsl with a fresh one; the tasks in flight become lost-worker errors,
        which the scan submits again."""
        with self._lock:
            if self._dfk is None or self._watching.is_set():  # shut down meanwhile
                return
            lost, self._inner = list(self._inner), {}
            for outer in lost:  # settled first: the old Parsl's cleanup cancels their tasks
                # The worker that died was waiting: the tasks in flight are not why it died.
                outer.set_exception(WorkerLostError(f"{reason}: Parsl was started afresh", bystander=True))
            self._stop_parsl()
            try:
                self._start_parsl()
            except ExecutorError as error:
                self._restart_failed = f"{reason}, and {error}"
                return
            self._watch = PoolWatch(self._active_run_dir)

    def is_worker_lost(self, error: BaseException) -> bool:
        return isinstance(error, (WorkerLostError, *lost_worker_errors()))

    def shutdown(self, cancel_futures: bool = True) -> None:
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None
        self._watching.set()
        thread, self._watch_thread = self._watch_thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            self._stop_parsl()
            self._watch, self._inner = None, {}
        run_dir, self._own_run_dir = self._own_run_dir, None
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)

    def _stop_parsl(self) -> None:
        dfk, self._dfk = self._dfk, None
        self._pool = None
        cleaned = _clean_up(dfk) if dfk is not None else True
        active, self._active_run_dir = self._active_run_dir, None
        if active is not None and self.config is None:
            # Pools Parsl could not stop wait for an interchange that is gone: no grace for them.
            stop_pools_of(active, grace=5.0 if cleaned else 0.0)
            # The run's keys (its interchange's encryption) are of no use once it ended; Parsl
            # leaves them in the run directory, which the Slurm provider keeps in the working folder.
            for certificates in Path(active).glob("*/certificates"):
                shutil.rmtree(certificates, ignore_errors=True)

    def job_script(self) -> str:
        if self.provider != "slurm":
            return super().job_script()
        raise ExecutorOptionError(
            "Parsl writes the script of each Slurm job as it submits it, into the submit_scripts folder of "
            f"its run directory ({self.run_dir or 'pyhf-dist-parsl'}/NNN/submit_scripts); --show-job-script prints "
            "the script of executor 'slurm', which submits its jobs itself"
        )

    def describe(self) -> Description:
        info: Description = {"executor": self.name, "workers": self.workers, "provider": self.provider,
                "parsl_version": parsl.__version__}
        if self.config is None:
            info.update({k: v for k, v in self.options.items() if v not in (None, "")})
        return info

    def __repr__(self) -> str:
        return f"ParslExecutor(workers={self.workers!r}, provider={self.provider!r})"
