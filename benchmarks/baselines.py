"""What a physicist would write by hand: plain pyhf, serially and over ``multiprocessing.Pool``.

These are the baselines the benchmark compares pyhf-dist against, and the reference its CLs are
checked against: pyhf's default minimizer (SciPy's SLSQP), or MINUIT (``optimizer="minuit"``,
iminuit through ``pyhf.optimize.minuit_optimizer``, strategy 2), the arbiter where SLSQP stalls.
Nothing here uses pyhf-dist beyond reading the pallet.
"""

from __future__ import annotations

import multiprocessing
import os
import time

__all__ = ["serial_pyhf", "pool_pyhf"]

_WORKSPACE = None


def _fit(args):
    import jsonpatch
    import pyhf

    name, operations, modifier_settings = args[:3]
    # The patch applies to the whole workspace, as pyhf.PatchSet and `jsonpatch ... | pyhf cls` apply it.
    workspace = pyhf.Workspace(jsonpatch.apply_patch(_WORKSPACE, operations), validate=False)
    model = workspace.model(modifier_settings=modifier_settings)
    try:
        observed, expected = pyhf.infer.hypotest(
            1.0, workspace.data(model), model, test_stat="qtilde", return_expected_set=True
        )
    except pyhf.exceptions.FailedMinimization:  # MINUIT's "distance to minimum too large"
        if pyhf.optimizer.name == "scipy":
            raise
        return name, None, None
    return name, float(observed), [float(value) for value in expected]


def _setup(spec, optimizer: str = "scipy"):
    global _WORKSPACE
    import logging

    import pyhf

    if optimizer == "minuit":
        logging.getLogger("pyhf.optimize.mixins").setLevel(logging.CRITICAL)  # its failures print the fit state
        pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-4, strategy=2))
    else:
        pyhf.set_backend("numpy", pyhf.optimize.scipy_optimizer())
    pyhf.Workspace(spec)  # validated once
    _WORKSPACE = spec


def serial_pyhf(pallet, modifier_settings, optimizer: str = "scipy") -> tuple[dict, float]:
    """Every patch one after another in this process; returns ``({name: (obs, exp)}, seconds)``
    (``(None, None)`` for a patch MINUIT fails on)."""
    began = time.perf_counter()
    _setup(pallet.workspace, optimizer)
    results = {}
    for patch in pallet.patches:
        name, observed, expected = _fit((patch.name, patch.operations, modifier_settings))
        results[name] = (observed, expected)
    return results, time.perf_counter() - began


def pool_pyhf(pallet, modifier_settings, workers: int) -> tuple[dict, float]:
    """``multiprocessing.Pool(workers).imap_unordered`` over the patches, one thread per process."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    began = time.perf_counter()
    jobs = [(patch.name, patch.operations, modifier_settings) for patch in pallet.patches]
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_setup, initargs=(pallet.workspace,)) as pool:
        results = {name: (observed, expected) for name, observed, expected in pool.imap_unordered(_fit, jobs)}
    return results, time.perf_counter() - began
