"""One thread per numerical library on a worker, set before numpy or jax are imported.

Many single-threaded pyhf processes on a few cores are far faster than processes that each start a
thread per core and fight for them. A worker started in-process calls :func:`pin_threads`; one
started by a script (a batch job, a worker pool's launch command) gets
:func:`thread_limit_exports` in that script. XLA's CPU client, whose pool of threads these
settings do not size, is started with one by :func:`start_xla_single_threaded`.
"""

from __future__ import annotations

import os

__all__ = [
    "ACCELERATOR_PLUGINS",
    "THREAD_LIMITS",
    "XLA_SINGLE_THREAD",
    "pin_threads",
    "start_xla_single_threaded",
    "thread_limit_exports",
    "thread_limits",
    "xla_flags",
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


#: How the packages of jax's accelerator plugins begin (CUDA, ROCm, TPU).
ACCELERATOR_PLUGINS = ("jax_plugins", "jax_cuda", "jax_rocm", "libtpu")


def start_xla_single_threaded() -> bool:
    """Start jax's CPU client with a thread pool of one, where XLA is to run on one thread.

    ``--xla_cpu_multi_thread_eigen=false`` keeps Eigen's own kernels on the calling thread, but
    XLA's CPU client still sizes its pool of worker threads by the CPUs the process may use, and
    those threads wait for work spinning. Two workers on two cores then each use about 1.4 cores
    and slow each other down: 1,000 toys of each hypothesis of a 1Lbb patch took 15.0-18.9 s in
    each of two such processes, 12.6-14.6 s with a pool of one. The pool is sized when the client
    starts, so it is started here under a one-CPU affinity, then every thread it started, and
    this one, gets the process's CPUs back: the operating system still moves them freely.

    Only where ``XLA_FLAGS`` asks for one thread (a worker: :func:`thread_limits`), on Linux, before
    jax has started a backend, and where jax has no accelerator plugin (a GPU's client is left as
    jax makes it). Returns whether it started the client.
    """
    import threading

    if "xla_cpu_multi_thread_eigen=false" not in os.environ.get("XLA_FLAGS", ""):
        return False
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task") or _accelerator_plugins():
        return False
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):  # another jax: its defaults
        return False
    cpus = os.sched_getaffinity(0)
    before = _thread_ids()
    try:
        os.sched_setaffinity(0, {min(cpus)})
    except OSError:  # a sandbox that forbids it: jax's defaults
        return False
    try:
        xla_bridge.backends()
    finally:
        for thread in (_thread_ids() - before) | {threading.get_native_id()}:
            try:
                os.sched_setaffinity(thread, cpus)
            except OSError:  # a thread that has ended since
                pass
    return True


def _thread_ids() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/task")}


def _accelerator_plugins() -> bool:
    """Whether jax may find a GPU or TPU plugin (unless ``JAX_PLATFORMS`` says ``cpu``).

    By the names of the installed packages: reading every package's entry points, as
    ``importlib.metadata`` does, took 56 ms of each worker's start.
    """
    import sys

    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    for folder in sys.path:
        try:
            names = os.listdir(folder or ".")
        except OSError:
            continue
        if any(name.startswith(ACCELERATOR_PLUGINS) for name in names):
            return True
    return False
