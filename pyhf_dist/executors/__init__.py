"""Executors by name: a registry that imports optional backends only when they are asked for.

>>> from pyhf_dist.executors import available_executors
>>> "local" in available_executors() and "dask" in available_executors()
True
"""

from __future__ import annotations

import concurrent.futures
import importlib
import inspect
from typing import Any, Callable

from pyhf_dist.exceptions import ExecutorOptionError, UnknownExecutorError
from pyhf_dist.executors.base import Executor, default_workers

__all__ = [
    "Executor", "get_executor", "register_executor", "unregister_executor", "available_executors", "default_workers",
    "executor_flags",
]

# name -> "module:attribute" (imported on first use) or a factory registered at run time.
_REGISTRY: dict[str, str | Callable[..., Executor]] = {
    "local": "pyhf_dist.executors.local:LocalExecutor",
    "sequential": "pyhf_dist.executors.sequential:SequentialExecutor",
    "dask": "pyhf_dist.executors.dask:DaskExecutor",
    "slurm": "pyhf_dist.executors.slurm:SlurmExecutor",
    "funcx": "pyhf_dist.executors.funcx.executor:FuncXExecutor",
    "parsl": "pyhf_dist.executors.parsl:ParslExecutor",
}
_ALIASES = {"globus-compute": "funcx"}
_BUILT_IN = frozenset(_REGISTRY)


def available_executors() -> list[str]:
    """The registered executor names (whether or not their optional packages are installed)."""
    return sorted(set(_REGISTRY) | set(_ALIASES))


def register_executor(name: str, factory: Callable[..., Executor]) -> None:
    """Make ``executor=name`` build executors with ``factory(**options)``."""
    _REGISTRY[name] = factory


def unregister_executor(name: str) -> None:
    """Forget an executor :func:`register_executor` registered (the built-in ones stay)."""
    if name in _BUILT_IN:
        raise ExecutorOptionError(f"executor {name!r} is built in and cannot be unregistered")
    _REGISTRY.pop(name, None)


def _factory(name: str) -> Callable[..., Executor]:
    entry = _REGISTRY[_ALIASES.get(name, name)]
    if isinstance(entry, str):
        module_name, attribute = entry.split(":")
        # An optional backend's module raises MissingDependencyError (with the pip command) here.
        entry = getattr(importlib.import_module(module_name), attribute)
    return entry


def get_executor(executor: Any = "local", **options) -> Executor:
    """Turn the ``executor=`` argument of :func:`pyhf_dist.map_fits` into an :class:`Executor`.

    Args:
        executor: A registered name, an :class:`Executor`, or any ``concurrent.futures.Executor``.
        **options: Keyword arguments for the named executor (``workers``, ``jobs``...).

    Raises:
        UnknownExecutorError: ``executor`` is a name nobody registered.
        ExecutorOptionError: ``options`` has a keyword the executor does not take.

    >>> get_executor("nowhere")
    Traceback (most recent call last):
    ...
    pyhf_dist.exceptions.UnknownExecutorError: unknown executor 'nowhere': choose one of dask, funcx, globus-compute, local, parsl, sequential, slurm
    """
    if isinstance(executor, Executor):
        _no_options(options, f"an executor object ({type(executor).__name__})")
        return executor
    if isinstance(executor, concurrent.futures.Executor):
        from pyhf_dist.executors.futures import FuturesExecutor

        workers = options.pop("workers", None)  # a hint for wrapped pools: how many run at once
        _no_options(options, f"a {type(executor).__name__}")
        return FuturesExecutor(executor, workers=workers)
    if not isinstance(executor, str) or _ALIASES.get(executor, executor) not in _REGISTRY:
        raise UnknownExecutorError(
            f"unknown executor {executor!r}: choose one of {', '.join(available_executors())}"
        )
    factory = _factory(executor)
    _check_options(factory, executor, options)
    return factory(**options)


def executor_flags(name: str) -> tuple:
    """The command-line options (:class:`~pyhf_dist.executors.base.ExecutorFlag`) executor ``name``
    declares; none for a name nobody registered, or a factory that declares none.

    Imports that executor's module (and its optional backend) only.
    """
    if _ALIASES.get(name, name) not in _REGISTRY:
        return ()
    return tuple(getattr(_factory(name), "flags", ()))


def _no_options(options: dict, what: str) -> None:
    if options:
        raise ExecutorOptionError(
            f"executor options {', '.join(sorted(options))} cannot be applied to {what}: "
            "configure it before passing it in"
        )


def _check_options(factory: Callable, name: str, options: dict) -> None:
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [p for p, v in parameters.items() if v.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ExecutorOptionError(
            f"executor {name!r} does not take {', '.join(unknown)}: it takes {', '.join(accepted) or 'no options'}"
        )
