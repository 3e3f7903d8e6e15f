"""Fit on Slurm: Dask workers in Slurm batch jobs, through ``dask_jobqueue.SLURMCluster``.

A :class:`DaskExecutor` whose cluster is a ``SLURMCluster`` started for the scan: the same
worker plugin ships the workspace to each worker once, and closing the cluster cancels its jobs.
Options resolve as dask-jobqueue users expect: a keyword argument wins over the
``cluster_config`` file, which wins over dask's own ``jobqueue.slurm`` configuration
(``~/.config/dask/jobqueue.yaml``); pyhf-dist adds defaults only where those say nothing
(one core and one single-threaded worker per job, 2 GB per core, and a worker without a Nanny
process where a job holds one worker). The jobs' Dask processes get the settings of every cluster
pyhf-dist starts (:func:`~pyhf_dist.executors.dask.own_cluster_tuning`: no
``MALLOC_TRIM_THRESHOLD_``, no profiler, slower housekeeping ticks) and one thread per numerical
library, as ``export`` lines at the top of the job script, before the site's own
``job_script_prologue``, which can change them.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid

from pyhf_dist.exceptions import ExecutorError, ExecutorOptionError, MissingDependencyError
from pyhf_dist.executors.base import Description, ExecutorFlag
from pyhf_dist.executors.dask import DaskExecutor, own_cluster_tuning, tuning_exports
from pyhf_dist.executors.slurm_jobs import JobWatch
from pyhf_dist.protocol import first_line
from pyhf_dist.runtime.threads import thread_limit_exports

try:
    import dask
    import dask_jobqueue
    from dask_jobqueue.core import Job, JobQueueCluster
    from dask_jobqueue.slurm import SLURMJob
except ImportError as error:
    raise MissingDependencyError("dask-jobqueue", "slurm", 'executor="slurm"') from error

__all__ = ["SlurmExecutor", "load_cluster_config"]


def _restore_ctrl_c() -> None:
    # Importing dask_jobqueue (its runner module) makes SIGINT call sys.exit(): Ctrl-C would then
    # end a scan with exit status 0, as if it had finished. Give Ctrl-C back its KeyboardInterrupt.
    handler = signal.getsignal(signal.SIGINT)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread and getattr(handler, "__module__", None) == "dask_jobqueue.runner":
        signal.signal(signal.SIGINT, signal.default_int_handler)


_restore_ctrl_c()


class _SlurmJob(SLURMJob):
    """dask-jobqueue's Slurm job, whose ``sbatch`` and ``scancel`` a Ctrl-C at the terminal does not reach.

    A Ctrl-C signals the terminal's whole process group. An ``sbatch`` running at that moment would
    die of it; dask-jobqueue would then log the failure with a traceback and fail the cluster's start,
    and the scan would stop as "could not start" instead of as interrupted. The scan answers the
    Ctrl-C itself, and cancels the jobs it submitted.
    """

    @staticmethod
    async def _call(cmd, *, shell=False, **kwargs):
        return await SLURMJob._call(cmd, shell=shell, start_new_session=True, **kwargs)


#: Keywords of ``JobQueueCluster`` itself; the rest go to each job.
_CLUSTER_KEYS = {"security", "shared_temp_directory", "silence_logs", "scheduler_options", "protocol", "interface"}
#: Signature entries that are not user options: set by us or by dask-jobqueue, or refused by it.
_NOT_OPTIONS = {"self", "scheduler", "name", "job_cls", "loop", "asynchronous", "n_workers", "dashboard_address",
                "host", "base_class_kwargs", "job_kwargs", "config_name"}


def _accepted_keys() -> set[str]:
    keys = set(_CLUSTER_KEYS)
    for function in (SLURMJob.__init__, Job.__init__, JobQueueCluster.__init__):
        keys |= set(inspect.signature(function).parameters)
    return keys - _NOT_OPTIONS


def _normalize(options: dict, where: str) -> dict:
    """dask config spelling (``job-extra-directives``, ``name``) to keyword arguments."""
    normalized = {}
    for key, value in options.items():
        key = str(key).replace("-", "_")
        normalized["job_name" if key == "name" else key] = value
    unknown = sorted(set(normalized) - _accepted_keys())
    if unknown:
        raise ExecutorOptionError(
            f"{where}: unknown SLURMCluster option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_accepted_keys()))})"
        )
    return normalized


#: SLURMCluster options that are lists of lines or arguments: dask-jobqueue would take a string
#: given for one as its characters (one ``#SBATCH`` line, or one shell command, per character).
_LIST_OPTIONS = ("job_extra_directives", "job_directives_skip", "job_script_prologue", "worker_extra_args",
                 "job_extra", "env_extra", "extra", "header_skip")
#: A job's memory as dask-jobqueue reads it: a number and a unit.
_MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*[kmgtp]i?b\s*$", re.IGNORECASE)


def _as_lists(options: dict) -> dict:
    """The options, with one string given for a list option as a list of that one string."""
    return {key: [value] if key in _LIST_OPTIONS and isinstance(value, str) else value
            for key, value in options.items()}


def load_cluster_config(path: str | os.PathLike, config_name: str = "slurm") -> dict:
    """Read a ``--cluster-config`` YAML file into SLURMCluster keyword arguments.

    The file is either a dask ``jobqueue.yaml`` (``jobqueue: {slurm: {...}}``) or the inner
    mapping alone (``queue: ...``, ``job-extra-directives: [...]``); dashes or underscores.
    """
    import yaml

    try:
        with open(path) as stream:
            data = yaml.safe_load(stream) or {}
    except OSError as error:
        raise ExecutorOptionError(f"cannot read cluster config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ExecutorOptionError(f"cluster config {path} is not valid YAML: {first_line(error)}") from None
    if isinstance(data, dict) and isinstance(data.get("jobqueue"), dict):
        data = data["jobqueue"].get(config_name, {})
    if not isinstance(data, dict):
        raise ExecutorOptionError(
            f"cluster config {path} must be a mapping of SLURMCluster options, e.g. 'queue: short'"
        )
    return _normalize(data, f"cluster config {path}")


class SlurmExecutor(DaskExecutor):
    """Runs fits in Slurm jobs, each holding Dask workers.

    Args:
        jobs: Fixed number of Slurm jobs (default 1 unless ``adapt`` is given).
        adapt: ``(minimum, maximum)`` jobs: scale with the work left, and replace lost jobs.
        cores: Cores per job (``--cpus-per-task``).
        processes: Single-threaded Dask workers per job (default: ``cores``; pyhf fits hold the GIL).
        memory: Memory per job, e.g. ``"4GB"``.
        walltime: Time limit per job, ``"HH:MM:SS"``.
        queue: Slurm partition (``-p``).
        account: Slurm account (``-A``).
        job_script_prologue: Shell lines run before the worker starts (``module load``, ``source venv``).
        interface: Network interface of the scheduler and workers (e.g. ``"ib0"``, ``"lo"``).
        cluster_config: YAML file of further SLURMCluster options (see :func:`load_cluster_config`).
        config_name: Section of dask's ``jobqueue`` config to read defaults from (default ``slurm``).
        workers: Dask workers wanted; turned into ``jobs`` when ``jobs`` is not given.
        **options: Any other ``SLURMCluster`` keyword (``job_extra_directives``, ``log_directory``,
            ``local_directory``, ``worker_extra_args``, ``job_name``, ``scheduler_options``...).

    Example:
        >>> executor = SlurmExecutor(jobs=4, cores=8, memory="16GB", walltime="01:00:00", queue="short")
        >>> print(executor.job_script())  # doctest: +SKIP
    """

    name = "slurm"
    flags = (
        ExecutorFlag("jobs", "Batch jobs to start.", int),
        ExecutorFlag("cores", "Cores per job.", int),
        ExecutorFlag("memory", "Memory per job, e.g. 2GB."),
        ExecutorFlag("walltime", "Wall time per job, e.g. 00:30:00."),
        ExecutorFlag("queue", "Partition."),
        ExecutorFlag("account", "Account to charge."),
        ExecutorFlag("cluster_config", "YAML file of further SLURMCluster arguments.", "file"),
    )

    def __init__(
        self,
        jobs: int | None = None,
        adapt: tuple[int, int] | None = None,
        cores: int | None = None,
        processes: int | None = None,
        memory: str | None = None,
        walltime: str | None = None,
        queue: str | None = None,
        account: str | None = None,
        job_script_prologue: list[str] | None = None,
        interface: str | None = None,
        cluster_config: str | os.PathLike | None = None,
        config_name: str = "slurm",
        workers: int | None = None,
        **options,
    ):
        self.config_name = config_name
        explicit = dict(cores=cores, processes=processes, memory=memory, walltime=walltime, queue=queue,
                        account=account, job_script_prologue=job_script_prologue, interface=interface)
        merged = load_cluster_config(cluster_config, config_name) if cluster_config is not None else {}
        merged.update(_normalize(options, "executor 'slurm'"))
        merged.update({key: value for key, value in explicit.items() if value is not None})
        self.options = self._with_defaults(merged)
        per_job = self.options["processes"]

        if jobs is not None and adapt is not None:
            raise ExecutorOptionError("give either jobs=N (fixed size) or adapt=(minimum, maximum), not both")
        if adapt is not None:
            try:
                minimum, maximum = (int(value) for value in adapt)
            except (TypeError, ValueError):
                raise ExecutorOptionError(f"adapt must be (minimum_jobs, maximum_jobs), got {adapt!r}") from None
            if not 0 <= minimum <= maximum or maximum < 1:
                raise ExecutorOptionError(f"adapt needs 0 <= minimum <= maximum and maximum >= 1, got {adapt!r}")
            adapt = (minimum, maximum)
        elif jobs is None:
            jobs = -(-workers // per_job) if workers else 1
        if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
            raise ExecutorOptionError(f"jobs must be a positive integer, got {jobs!r}")
        self.jobs = jobs
        self.adapt = adapt
        super().__init__(workers=(jobs if adapt is None else adapt[1]) * per_job)
        # A name of our own marks our jobs in squeue, and lets shutdown find any job the cluster
        # lost track of; a job_name from the user or the config is kept (and, as other jobs may
        # share it, never used to cancel by).
        self._own_job_name = "job_name" not in self.options
        self.job_name = self.options.setdefault("job_name", f"pyhf-dist-{uuid.uuid4().hex[:8]}")
        self._watch: JobWatch | None = None
        self._jobs_failed: ExecutorError | None = None  # what stops the scan when jobs keep ending

    def _with_defaults(self, options: dict) -> dict:
        # Read the config ourselves only where dask-jobqueue would fail (cores, memory) or choose
        # for a threaded workload (processes: it picks ~sqrt(cores) workers, each with threads).
        options = _as_lists(options)
        config = dask.config.get(f"jobqueue.{self.config_name}", default={}) or {}
        if options.get("cores") is None:
            options["cores"] = config.get("cores") or 1
        if options.get("processes") is None:
            options["processes"] = config.get("processes") or options["cores"]
        if options.get("memory") is None:
            options["memory"] = config.get("memory") or f"{2 * options['cores']}GB"
        if options.get("nanny") is None and options["processes"] == 1:
            # A Nanny is a second interpreter per job that only restarts a worker that dies; it
            # delays the first fit by ~0.7 s (it imports Dask, then spawns the worker, which
            # imports it again). A lost worker is replaced by a new job instead (see make_cluster).
            # Dask's command line needs a Nanny for several workers in one job.
            options["nanny"] = bool(config["nanny"]) if "nanny" in config else False
        if config.get("name") not in (None, "dask-worker") and "job_name" not in options:
            options["job_name"] = config["name"]
        for key in ("cores", "processes"):
            value = options[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ExecutorOptionError(f"{key} must be a positive integer, got {value!r}")
        if not isinstance(options["memory"], str) or not _MEMORY.match(options["memory"]):
            raise ExecutorOptionError(
                f"memory must be a size with its unit, e.g. '4GB' or '500MB', got {options['memory']!r}")
        if options.get("nanny") is False and options["processes"] > 1:
            raise ExecutorOptionError(
                f"nanny=False needs one worker process per job (got processes={options['processes']}): "
                "Dask starts several workers in a job through Nannies"
            )
        if options["processes"] > options["cores"]:
            raise ExecutorOptionError(
                f"processes ({options['processes']}) cannot exceed cores ({options['cores']}): "
                "each worker process needs a core"
            )
        return options

    def _job_options(self, tuning: dict) -> dict:
        """The options, with the Dask settings ``tuning`` exported first in each job's script."""
        options = dict(self.options)
        prologue = options.get("job_script_prologue")
        if prologue is None:
            prologue = dask.config.get(f"jobqueue.{self.config_name}.job-script-prologue", default=None) or []
            prologue = [prologue] if isinstance(prologue, str) else prologue
        # A job inherits the submitting process's environment (sbatch --export=ALL).
        environ = dict(os.environ)
        options["job_script_prologue"] = [*tuning_exports(tuning, environ=environ), *thread_limit_exports(environ),
                                          *prologue]
        return options

    def _cluster_kwargs(self, tuning: dict) -> dict:
        return dict(self._job_options(tuning), config_name=self.config_name)

    def job_script(self) -> str:
        """The batch script each job would run, without submitting anything (a dry run)."""
        job_options = {key: value for key, value in self._job_options(own_cluster_tuning()).items()
                       if key not in _CLUSTER_KEYS - {"interface", "protocol", "security"}}
        try:
            job = SLURMJob("tcp://<scheduler-address>:8786", name="<worker-name>",
                           config_name=self.config_name, **job_options)
        except (TypeError, ValueError) as error:
            raise ExecutorOptionError(f"invalid SLURMCluster options: {first_line(error)}") from None
        return job.job_script()

    # --- lifecycle ---------------------------------------------------------------------------

    def make_cluster(self):
        _restore_ctrl_c()
        _check_slurm_commands()
        self._test_submission()
        tuning = own_cluster_tuning()
        try:
            with dask.config.set(tuning):  # for the scheduler in this process
                cluster = dask_jobqueue.SLURMCluster(job_cls=_SlurmJob, **self._cluster_kwargs(tuning))
        except (TypeError, ValueError) as error:
            raise ExecutorOptionError(f"invalid SLURMCluster options: {first_line(error)}") from None
        try:
            # A fixed size is kept by Dask's adaptive scaling pinned to it: a job that ends early
            # (a worker that crashed, a job cancelled or preempted) is replaced by a new one.
            # Adaptive first acts one interval (1 s) after it starts: the first jobs go now.
            minimum, maximum = self.adapt if self.adapt is not None else (self.jobs, self.jobs)
            cluster.scale(jobs=minimum)
            cluster.adapt(minimum_jobs=minimum, maximum_jobs=maximum)
            # Jobs that end before their worker joins are invisible to Dask: the watch hands them back.
            self._jobs_failed = None
            self._watch = JobWatch(cluster, limit=max(3, 3 * maximum), give_up=self._jobs_keep_ending)
            self._watch.start()
        except BaseException:
            self.close_cluster(cluster)
            raise
        return cluster

    def _test_submission(self) -> None:
        # dask-jobqueue submits in the background and only logs a refused sbatch; the scan would
        # then wait forever for workers. `sbatch --test-only` asks slurmctld whether the script
        # would be accepted (partition, account, memory, time limit) without queueing it.
        with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="pyhf-dist-") as script:
            script.write(self.job_script())
            script.flush()
            result = _run_slurm(["sbatch", "--test-only", script.name])
        if result.returncode != 0:
            message = _slurm_error(result.stderr) or f"exit code {result.returncode}"
            raise ExecutorError(f"Slurm refuses the worker job: {message} (see the script with --show-job-script)")

    def _jobs_keep_ending(self, count: int, job_ids: list[str]) -> None:
        """Fail what waits for a worker, and what is submitted after, instead of waiting forever."""
        folder, last = self.options.get("log_directory"), job_ids[-1]
        # Where sbatch writes a job's output: dask-jobqueue names it when given a log_directory.
        output = (os.path.join(folder, f"{self.job_name}-{last}.out (and .err)") if folder
                  else os.path.join(os.getcwd(), f"slurm-{last}.out"))
        self._jobs_failed = ExecutorError(
            f"{count} Slurm jobs ended before their Dask worker joined; what the last one printed is in {output}")
        for future in list(self._inner):
            if not future.done():
                future.set_exception(self._jobs_failed)

    def submit(self, task) -> concurrent.futures.Future:
        if self._jobs_failed is None:
            return super().submit(task)
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_exception(self._jobs_failed)
        return future

    def close_cluster(self, cluster) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        try:
            cluster.close()
        finally:
            # The cluster cancels the jobs it knows; a job submitted while the scan was being
            # interrupted may not be among them. Our job name finds it.
            if self._own_job_name and shutil.which("scancel"):
                _run_slurm(["scancel", "--name", self.job_name, "--user", _user()])

    # --- what the scan asks ------------------------------------------------------------------

    @property
    def pack_seconds(self) -> float:
        # With adapt, the number of tasks waiting is what tells Dask to submit more jobs.
        return super().pack_seconds if self.adapt is None else 0.0

    def describe(self) -> Description:
        info = super().describe()
        info.update(
            executor=self.name,
            jobs=self.jobs,
            adapt=list(self.adapt) if self.adapt else None,
            cores=self.options["cores"],
            processes=self.options["processes"],
            memory=self.options["memory"],
            job_name=self.job_name,
        )
        for key in ("walltime", "queue", "account"):
            if self.options.get(key) is not None:
                info[key] = self.options[key]
        return info

    def __repr__(self) -> str:
        size = f"adapt={self.adapt!r}" if self.adapt else f"jobs={self.jobs!r}"
        shown = ", ".join(f"{key}={self.options[key]!r}" for key in ("cores", "processes", "memory")
                          if key in self.options)
        return f"{type(self).__name__}({size}, {shown})"


def _check_slurm_commands() -> None:
    missing = [command for command in ("sbatch", "squeue", "scancel") if shutil.which(command) is None]
    if missing:
        raise ExecutorError(
            f"{', '.join(missing)} not found: executor='slurm' must run where Slurm jobs can be submitted "
            "(a login node with the Slurm client commands on PATH)"
        )


def _run_slurm(command: list[str]) -> subprocess.CompletedProcess:
    try:
        # In a session of its own, as the jobs' commands (see _SlurmJob): a Ctrl-C is the scan's to answer.
        return subprocess.run(command, capture_output=True, text=True, timeout=60, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise ExecutorError(f"'{' '.join(command[:2])}' did not answer within 60 s: is slurmctld up?") from None


def _slurm_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1]


def _user() -> str:
    import getpass

    return getpass.getuser()

