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
import platform
import sys
from pathlib import Path
from typing import Callable

from pyhf_dist import cache

__all__ = ["checked", "extension"]


def extension(name: str):
    """``scipy.optimize``'s extension module ``name`` (e.g. ``"_lbfgsb"``).

    The one ``scipy.optimize`` imported where it is; otherwise loaded from its file, without the
    package (Python records the module under its name, where a later import of the package finds
    it).
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
