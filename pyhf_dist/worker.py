"""What runs on a worker: one-time setup, then one task per patch.

Every executor runs the same two functions:

* :func:`initialize` takes a :class:`WorkerContext` (the background workspace — or, for a scan of
  several pallets, each pallet's, by name — and the fit settings, serialized once on the client)
  and prepares the worker: one thread per BLAS/OpenMP/XLA
  pool, the pyhf backend, the parsed workspace. The prepared :class:`WorkerState` is kept in the
  process, keyed by the context's digest, so the setup runs once per worker whatever the engine.
* :func:`run_task` fits one patch and returns a plain-dict record. A fit that raises becomes a
  record with ``status="failed"`` and the traceback's last line; only the death of the worker
  itself escapes as an exception.

Executors that can run a setup hook per worker (process-pool initializers, Dask worker plugins,
Parsl/Globus Compute warm workers) call :func:`initialize` there and submit ``run_task(task)``;
any other executor submits ``run_task(task, context)`` and the worker sets itself up on its
first task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import threading
import time
from typing import Any

from pyhf_dist.exceptions import first_line

__all__ = [
    "WorkerContext", "WorkerState", "initialize", "preload", "release", "run_task", "pin_threads", "xla_flags",
    "worker_info", "setup_count", "THREAD_LIMITS", "thread_limits", "thread_limit_exports", "make_task", "make_batch", "new_record",
    "failed_record",
]

#: One thread per numerical library per worker: many single-threaded pyhf processes on a few
#: cores are far faster than processes that each start a thread per core and fight for them.
THREAD_LIMITS = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
}
XLA_SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def xla_flags(flags: str) -> str:
    """``XLA_FLAGS`` with XLA's CPU backend limited to one thread, unless the flags already say.

    >>> xla_flags("")
    '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
    >>> xla_flags("--xla_cpu_multi_thread_eigen=true")
    '--xla_cpu_multi_thread_eigen=true'
    """
    if "xla_cpu_multi_thread_eigen" in flags:
        return flags
    return f"{flags} {XLA_SINGLE_THREAD}".strip()


def thread_limits(environ: dict) -> dict[str, str]:
    """What ``environ`` lacks for one thread per numerical library: the :data:`THREAD_LIMITS` it
    does not set, and ``XLA_FLAGS`` with XLA's CPU backend on one thread. Values set are kept.

    >>> thread_limits({"OMP_NUM_THREADS": "4", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"})
    {'OPENBLAS_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'NUMEXPR_NUM_THREADS': '1', 'VECLIB_MAXIMUM_THREADS': '1'}
    """
    missing = {name: value for name, value in THREAD_LIMITS.items() if name not in environ}
    flags = xla_flags(environ.get("XLA_FLAGS", ""))
    if flags != environ.get("XLA_FLAGS"):
        missing["XLA_FLAGS"] = flags
    return missing


def pin_threads() -> None:
    """Limit numerical libraries to one thread in this process (before they are imported).

    Values the user set explicitly are kept.
    """
    os.environ.update(thread_limits(os.environ))


def thread_limit_exports(environ: dict) -> list[str]:
    """:func:`thread_limits` as shell lines, for a worker started by a script (a batch job, a
    worker pool's launch command): in force before the interpreter loads numpy or jax, which read
    them once. ``environ`` is what the script inherits (the submitting shell's).

    >>> print(*thread_limit_exports({"OMP_NUM_THREADS": "4"})[:2], sep="\\n")
    export OPENBLAS_NUM_THREADS=1
    export MKL_NUM_THREADS=1
    """
    import shlex

    return [f"export {name}={shlex.quote(value)}" for name, value in thread_limits(environ).items()]


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """Everything a worker needs besides the patch: serialized once, shipped once per worker.

    Attributes:
        key: Digest of ``payload``; the worker caches its setup under it.
        payload: JSON bytes ``{"workspace": <background spec>, "settings": <FitSettings dict>}``;
            for several pallets ``{"pallets": {<name>: {"key": <key of that pallet's own
            single-workspace context>, "workspace": <spec>}, ...}, "settings": ...}``, and each
            task names its pallet (``task["pallet"]``).
    """

    key: str
    payload: bytes

    @classmethod
    def build(cls, workspace_spec: dict, settings: dict) -> "WorkerContext":
        payload = json.dumps({"workspace": workspace_spec, "settings": settings}, separators=(",", ":")).encode()
        return cls(key=hashlib.sha256(payload).hexdigest()[:20], payload=payload)

    @classmethod
    def build_pallets(cls, workspaces: dict, settings: dict) -> "WorkerContext":
        """The context of a scan of several pallets: ``workspaces`` maps pallet names to specs.

        Each pallet keeps the key its own single-pallet context has, so what a worker remembers
        per workspace (the fast path's checks) is shared with scans of that pallet alone.
        """
        pallets = {name: {"key": cls.build(spec, settings).key, "workspace": spec} for name, spec in workspaces.items()}
        payload = json.dumps({"pallets": pallets, "settings": settings}, separators=(",", ":")).encode()
        return cls(key=hashlib.sha256(payload).hexdigest()[:20], payload=payload)

    def __repr__(self) -> str:
        return f"WorkerContext(key={self.key!r}, payload=<{len(self.payload)} bytes>)"


class WorkerState:
    """A worker's prepared state for one context: parsed workspace, settings, caches.

    A context of several pallets gives one state per pallet (:attr:`pallets`, each with the
    attributes below); :meth:`for_pallet` picks the one a task names.

    Attributes:
        workspace: The background ``pyhf.Workspace``.
        settings: The :class:`~pyhf_dist.settings.FitSettings`.
        cache: Free for calculations to keep things between tasks (compiled likelihoods...).
        pallets: The per-pallet states by name (empty for a single-pallet context).
    """

    def __init__(self, context: WorkerContext):
        from pyhf_dist.settings import FitSettings

        data = json.loads(context.payload)
        settings = FitSettings.from_dict(data["settings"])
        self._setup(context.key, settings, data.get("workspace"))
        self.pallets = {
            name: WorkerState._part(part["key"], settings, part["workspace"])
            for name, part in (data.get("pallets") or {}).items()
        }

    def _setup(self, key: str, settings, workspace_spec: dict | None) -> None:
        self.key = key
        self.settings = settings
        self.workspace_spec = workspace_spec
        self._workspace = None
        self.cache: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.pallets: dict[str, WorkerState] = {}

    @classmethod
    def _part(cls, key: str, settings, workspace_spec: dict) -> "WorkerState":
        state = cls.__new__(cls)
        state._setup(key, settings, workspace_spec)
        return state

    def for_pallet(self, name: str | None) -> "WorkerState":
        """The state of pallet ``name`` (this state itself for a single-pallet context)."""
        if not self.pallets:
            return self
        try:
            return self.pallets[name]
        except KeyError:
            raise KeyError(f"the scan's context has no pallet {name!r} (it has {', '.join(self.pallets)})") from None

    def parts(self) -> list["WorkerState"]:
        """The states that hold a workspace: one per pallet, or this one."""
        return list(self.pallets.values()) or [self]

    @property
    def workspace(self):
        """The ``pyhf.Workspace``, made on first use: a worker whose fits all take the fast path
        never imports pyhf."""
        if self._workspace is None:
            import pyhf

            # The client validated the workspace against the schema before any task was sent.
            self._workspace = pyhf.Workspace(self.workspace_spec, validate=False)
        return self._workspace


_STATES: dict[str, WorkerState] = {}
_STATES_LOCK = threading.Lock()
_SETUP_COUNT = 0


def setup_count() -> int:
    """How many times :func:`initialize` prepared a new state in this process (for tests)."""
    return _SETUP_COUNT


def initialize(context: WorkerContext) -> WorkerState:
    """Prepare this worker for ``context`` (once; later calls return the cached state)."""
    global _SETUP_COUNT
    with _STATES_LOCK:
        state = _STATES.get(context.key)
        if state is None:
            pin_threads()
            state = WorkerState(context)
            _STATES[context.key] = state
            _SETUP_COUNT += 1
            from pyhf_dist import fast

            # Compile the fast path's likelihood now, while the client is still sending tasks
            # (a no-op for scans that do not use it).
            for part in state.parts():
                fast.warm_up(part)
        return state


def preload(settings: dict) -> None:
    """Import what fits with ``settings`` (a FitSettings dict) will need, before the context arrives.

    For workers started while the client still reads the pallet. Never raises: anything missing
    shows up, with its real error, when the worker is set up.
    """
    pin_threads()
    try:
        from pyhf_dist.settings import FitSettings

        if FitSettings.from_dict(settings).fast_path:
            from pyhf_dist import fast

            fast.preload()
        else:
            import pyhf  # noqa: F401
    except Exception:  # noqa: BLE001 - an optimisation only
        pass


def release(key: str) -> None:
    """Forget the state of context ``key`` in this process (a long-lived worker between scans)."""
    with _STATES_LOCK:
        _STATES.pop(key, None)


def worker_info() -> dict:
    """Where a task ran: host, process id, and the Slurm job id (``None`` outside Slurm)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


class FitTimeout(Exception):
    """A fit ran past the scan's per-fit ``timeout``."""


def _on_alarm(signum, frame):
    raise FitTimeout()


def _call_with_timeout(function, timeout: float | None):
    # A timed-out fit must free its worker. SIGALRM interrupts the fit between two Python-level
    # steps of the minimizer; it can only be used from a process's main thread, which is where
    # process-pool, Parsl and Globus Compute workers run their tasks. Elsewhere (threads) the
    # scan's client-side timeout takes over.
    if not timeout or threading.current_thread() is not threading.main_thread():
        return function()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(timeout))
    try:
        return function()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def make_task(name: str, patch: list, context: str, *, pallet: str | None = None, chunk: dict | None = None,
              timeout: float | None = None, kind: str | None = None) -> dict:
    """The task of one patch (or of one chunk of its toys): what a scan submits to a worker.

    Args:
        name: The patch's name.
        patch: Its jsonpatch operations.
        context: The key of the :class:`WorkerContext` it applies to.
        pallet: The patch's pallet, in a context of several pallets (its name there).
        chunk: The slice of the patch's pseudo-experiments (:func:`pyhf_dist.toys.plan`), if split.
        timeout: Seconds after which the worker gives up on the fit.
        kind: ``"noop"`` for a task that computes nothing (benchmarks of an executor's overhead).

    >>> make_task("A_1_2", [], "c0ffee")
    {'name': 'A_1_2', 'patch': [], 'context': 'c0ffee', 'chunk': None, 'timeout': None}
    """
    task = {"name": name, "patch": patch, "context": context, "chunk": chunk, "timeout": timeout}
    if pallet is not None:
        task["pallet"] = pallet
    if kind is not None:
        task["kind"] = kind
    return task


def make_batch(tasks: list[dict]) -> dict:
    """One task of several: :func:`run_task` fits them in turn on one worker and returns
    ``{"batch": [record, ...]}``, in the same order. For short fits, whose cost in a scheduler's
    per-task work would rival the fit itself.

    >>> batch = make_batch([make_task("A_1_2", [], "c0ffee"), make_task("A_1_3", [], "c0ffee")])
    >>> batch["kind"], batch["context"], len(batch["tasks"])
    ('batch', 'c0ffee', 2)
    """
    return {"kind": "batch", "tasks": list(tasks), "context": tasks[0]["context"]}


def new_record(task: dict) -> dict:
    """The start of the record of ``task``: its name (and chunk), status ``"ok"``, no error.

    >>> new_record(make_task("A_1_2", [], "c0ffee"))
    {'name': 'A_1_2', 'status': 'ok', 'error': None}
    """
    record: dict[str, Any] = {"name": task["name"], "status": "ok", "error": None}
    if task.get("chunk") is not None:
        record["chunk"] = task["chunk"]
    return record


def failed_record(task: dict, error: str) -> dict:
    """The record of a task that produced no result: status ``"failed"`` and why (one line, or a
    remote traceback); no timing or worker, as nothing was measured.

    >>> failed_record(make_task("A_1_2", [], "c0ffee"), "worker lost 3 times")["status"]
    'failed'
    """
    record = new_record(task)
    record.update(status="failed", error=error, started=None, finished=None, fit_seconds=None, worker=None)
    return record


def run_task(task: dict, context: WorkerContext | None = None) -> dict:
    """Fit one task (one patch, or one chunk of a patch's toys) and return its record.

    Args:
        task: A task from :func:`make_task`.
        context: Given by executors without a per-worker setup hook; used on the first task only.

    Returns:
        A dict with ``name``, ``status`` (``"ok"``/``"failed"``), ``error``, the calculation's
        numbers (``CLs_obs``, ``CLs_exp``...), ``fit_seconds``, ``started``, ``finished``, ``worker``;
        for a task of :func:`make_batch`, ``{"batch": [record, ...]}``.
    """
    if task.get("kind") == "batch":
        return {"batch": [run_task(each, context) for each in task["tasks"]]}
    state = _STATES.get(task["context"])
    if state is None:
        if context is None or context.key != task["context"]:
            raise RuntimeError(
                f"worker has no context {task['context']!r}: the executor must call "
                "pyhf_dist.worker.initialize(context) or pass the context with the task"
            )
        state = initialize(context)
    started = time.time()
    # Durations on the monotonic clock: a clock set forward or back mid-fit (NTP, an operator) must
    # not give a fit a negative or hour-long duration.
    began = time.monotonic()
    record = new_record(task)
    try:
        from pyhf_dist import calculations

        part = state.for_pallet(task.get("pallet"))
        values = _call_with_timeout(lambda: calculations.compute(part, task), task.get("timeout"))
        record.update(values)
    except FitTimeout:
        record.update(status="failed", error=f"timed out after {task.get('timeout')} s")
    except Exception as error:  # a failed fit is a result, not a crash of the scan
        record.update(status="failed", error=first_line(error, with_type=True))
    finished = time.time()
    record.update(started=started, finished=finished, fit_seconds=time.monotonic() - began, worker=worker_info())
    return record
