"""pyhf-dist: fit every signal hypothesis of an LHC likelihood pallet across many workers.

>>> import pyhf_dist
>>> sorted(set(pyhf_dist.available_executors()) & {"local", "dask", "slurm", "funcx", "parsl"})
['dask', 'funcx', 'local', 'parsl', 'slurm']

The public names are imported on first use: a worker process that imports
``pyhf_dist.runtime`` does not pay for the client's modules (the scan, results, executors).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "map_fits": "pyhf_dist.scan",
    "iter_fits": "pyhf_dist.scan",
    "load_pallet": "pyhf_dist.pallet",
    "Pallet": "pyhf_dist.pallet",
    "Patch": "pyhf_dist.pallet",
    "ScanResult": "pyhf_dist.results",
    "FitRecord": "pyhf_dist.results",
    "FitSettings": "pyhf_dist.settings",
    "Executor": "pyhf_dist.executors",
    "get_executor": "pyhf_dist.executors",
    "register_executor": "pyhf_dist.executors",
    "available_executors": "pyhf_dist.executors",
    "demo_pallet": "pyhf_dist.demo",
    "PyhfDistError": "pyhf_dist.exceptions",
}

__all__ = [
    "map_fits",
    "iter_fits",
    "load_pallet",
    "Pallet",
    "Patch",
    "ScanResult",
    "FitRecord",
    "FitSettings",
    "Executor",
    "get_executor",
    "register_executor",
    "available_executors",
    "demo_pallet",
    "PyhfDistError",
    "__version__",
]

if TYPE_CHECKING:  # what static tools and IDEs see
    from pyhf_dist.demo import demo_pallet
    from pyhf_dist.exceptions import PyhfDistError
    from pyhf_dist.executors import Executor, available_executors, get_executor, register_executor
    from pyhf_dist.pallet import Pallet, Patch, load_pallet
    from pyhf_dist.results import FitRecord, ScanResult
    from pyhf_dist.scan import iter_fits, map_fits
    from pyhf_dist.settings import FitSettings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"pyhf_dist.{name}") is not None:
            return importlib.import_module(f"pyhf_dist.{name}")  # pyhf_dist.pallet, as before the lazy names
        raise AttributeError(f"module 'pyhf_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
