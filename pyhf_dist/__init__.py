"""pyhf-dist: fit every signal hypothesis of an LHC likelihood pallet across many workers.

>>> import pyhf_dist
>>> sorted(set(pyhf_dist.available_executors()) & {"local", "dask", "slurm", "funcx", "parsl"})
['dask', 'funcx', 'local', 'parsl', 'slurm']
"""

from pyhf_dist.demo import demo_pallet
from pyhf_dist.exceptions import PyhfDistError
from pyhf_dist.executors import Executor, available_executors, get_executor, register_executor
from pyhf_dist.pallet import Pallet, Patch, load_pallet
from pyhf_dist.results import FitRecord, ScanResult
from pyhf_dist.scan import iter_fits, map_fits
from pyhf_dist.settings import FitSettings

__version__ = "0.2.0"

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
