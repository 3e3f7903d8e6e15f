"""The client side of a scan: what to fit (:mod:`~pyhf_dist.scan.plan`), its options, declared
once (:mod:`~pyhf_dist.scan.options`), the loop that submits tasks and collects records
(:mod:`~pyhf_dist.scan.loop`), and the public functions (:mod:`~pyhf_dist.scan.api`)."""

from pyhf_dist.scan.api import iter_fits, map_fits
from pyhf_dist.scan.options import ScanOptions
from pyhf_dist.scan.plan import Plan, prepare_pallet, prepare_pallets

__all__ = ["iter_fits", "map_fits", "ScanOptions", "Plan", "prepare_pallet", "prepare_pallets"]
