"""scipy's compiled minimisation routines, without importing ``scipy.optimize``.

The fast path drives two of scipy's compiled routines itself: L-BFGS-B's ``setulb``
(:mod:`~pyhf_dist.runtime.fast.lbfgsb`) and SLSQP's ``slsqp``
(:mod:`~pyhf_dist.runtime.fast.slsqp`). Importing ``scipy.optimize`` to reach them costs a worker
0.15 s of CPU (it imports ``scipy.linalg`` and most of the package) before its first fit; their
extension modules take 3 ms, loaded from their files (:func:`extension`).

Each driver restates a loop of scipy's, and is used only where it reproduced
``scipy.optimize.minimize`` bit for bit on check problems. That check needs ``scipy.optimize``, so
its outcome is remembered per scipy installation (:func:`checked`, in :mod:`pyhf_dist.cache`): the
first worker on a machine checks, the others read the answer. With the cache off every process
checks.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import logging
import platform
import sys
from pathlib import Path
from typing import Callable

from pyhf_dist import cache

__all__ = ["checked", "driven", "extension", "integer_type", "rosenbrock", "scipy_version"]

log = logging.getLogger(__name__)


def extension(name: str):
    """``scipy.optimize``'s extension module ``name`` (e.g. ``"_lbfgsb"``).

    The one ``scipy.optimize`` imported where it is; otherwise loaded from its file, without the
    package (a later import of the package loads the module again, or finds it under its name).
    """
    full = f"scipy.optimize.{name}"
    if full in sys.modules or "scipy.optimize" in sys.modules:
        return importlib.import_module(full)
    return _load(name)


@functools.cache
def _load(name: str):
    full = f"scipy.optimize.{name}"
    path = _file(name)
    if path is None:
        return importlib.import_module(full)
    loader = importlib.machinery.ExtensionFileLoader(full, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(full, path, loader=loader))
    loader.exec_module(module)
    return module


def _file(name: str) -> Path | None:
    import scipy

    folder = Path(scipy.__file__).parent / "optimize"
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return None


def checked(name: str, extensions: tuple, check: Callable[[], str], source: str) -> str:
    """``check()``'s answer for this scipy installation, computed once per machine.

    Args:
        name: What is checked (the cache entry's kind).
        extensions: The extension modules the check exercises: their files are part of the key.
        check: Runs the check (it may import ``scipy.optimize``); returns a short answer.
        source: The driver's source file: a changed driver is checked again.
    """
    import numpy
    import scipy

    files = []
    for each in extensions:
        path = _file(each)
        stat = path.stat() if path is not None else None
        files.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}" if stat is not None else f"{each}:-")
    key = cache.digest(
        name, scipy.__version__, numpy.__version__, sys.version, platform.machine(), *files,
        Path(source).read_bytes(),
    )
    answer = cache.recall(name, key, folder="routines")
    if answer is None:
        answer = check()
        cache.remember(name, key, answer, folder="routines")
    return answer


def driven(label: str, name: str, versions: tuple, extensions: tuple, check: Callable[[], str], source: str,
           accepts: Callable[[], bool] | None = None) -> str | None:
    """Whether a driver of scipy's routines is used: the integer type of the routine's integer
    arrays (``"int32"``, ``"int64"``) where it is, ``None`` where fits go through
    ``scipy.optimize.minimize`` instead.

    Args:
        label: The routine, for the log line that says so.
        name, extensions, check, source: As for :func:`checked`; ``check`` answers ``"same "``
            and the integer type, or ``"different"``.
        versions: The scipy versions ``(major, minor)`` the driver restates: from, up to and
            excluding.
        accepts: Whether the routine takes the arguments the driver gives (its documented
            signature), checked first.
    """
    import scipy

    try:
        if not versions[0] <= scipy_version() < versions[1] or (accepts is not None and not accepts()):
            log.info("%s through scipy.optimize.minimize (scipy %s)", label, scipy.__version__)
            return None
        answer = checked(name, extensions, check, source)
    except Exception as error:  # noqa: BLE001 - another scipy: its own minimize remains
        log.info("%s through scipy.optimize.minimize (%r)", label, error)
        return None
    return answer.split()[1] if answer.startswith("same ") else None


def scipy_version() -> tuple:
    """scipy's ``(major, minor)``."""
    import scipy

    return tuple(int(part) for part in scipy.__version__.split(".")[:2])


def integer_type() -> str:
    """The type of the routines' integer arrays, as scipy's loops make them: from scipy 1.18 on,
    64-bit where scipy's LAPACK is (an ILP64 build), else 32-bit."""
    if scipy_version() >= (1, 18):
        from scipy.linalg.lapack import HAS_ILP64

        return "int64" if HAS_ILP64 else "int32"
    return "int32"


def rosenbrock(x, scale):
    """The Rosenbrock function of ``x * scale`` and its gradient in ``x``: the drivers' check problem
    (badly scaled, curved, with several bounds active at the minimum when bounded)."""
    import numpy as np

    y = x * scale
    value = np.sum(100.0 * (y[1:] - y[:-1] ** 2) ** 2 + (1.0 - y[:-1]) ** 2)
    grad = np.zeros_like(y)
    grad[:-1] = -400.0 * y[:-1] * (y[1:] - y[:-1] ** 2) - 2.0 * (1.0 - y[:-1])
    grad[1:] += 200.0 * (y[1:] - y[:-1] ** 2)
    return value, grad * scale
