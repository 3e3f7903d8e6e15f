"""One thread per numerical library on a worker, set before numpy or jax are imported.

Many single-threaded pyhf processes on a few cores are far faster than processes that each start a
thread per core and fight for them. A worker started in-process calls :func:`pin_threads`; one
started by a script (a batch job, a worker pool's launch command) gets
:func:`thread_limit_exports` in that script.
"""

from __future__ import annotations

import os

__all__ = ["THREAD_LIMITS", "XLA_SINGLE_THREAD", "xla_flags", "thread_limits", "pin_threads", "thread_limit_exports"]

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
