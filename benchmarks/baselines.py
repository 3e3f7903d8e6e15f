"""Plain pyhf as a physicist writes it by hand: the one reference every benchmark compares with.

Each patch is applied to the whole background workspace (as ``pyhf.PatchSet`` and
``jsonpatch BkgOnly.json patch.json | pyhf cls`` apply it), the model built with the pallet's
interpolation codes, and ``pyhf.infer.hypotest`` (or ``upper_limit``) run on the numpy backend
with pyhf's default minimizer (SciPy's SLSQP) or MINUIT (``optimizer="minuit"``, iminuit through
``pyhf.optimize.minuit_optimizer``, strategy 2: the arbiter where SLSQP stalls). Nothing here uses
pyhf-dist beyond reading the pallet.

Timed baselines run in a fresh process with one thread per numerical library, alone or over
``multiprocessing.Pool(workers)``, on a random sample of patches (fixed seed)::

    python benchmarks/baselines.py 1Lbb --mode serial --sample 10 --seed 1
    python benchmarks/baselines.py 1Lbb --mode pool --workers 2 --sample 10 --seed 1

Each prints one JSON line: seconds per patch (serial), the pool's wall time (pool), CLs per patch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

__all__ = [
    "CODE4", "THREAD_VARIABLES", "single_threaded", "use_numpy", "build_model", "hypotest", "upper_limit",
    "serial_pyhf", "pool_pyhf", "sample", "machine", "timed_in_process",
]

HERE = Path(__file__).resolve().parent
#: The interpolation codes of the published pallets (also pyhf's defaults).
CODE4 = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
#: One thread each: a physicist's pool of single-threaded processes, and the same sums as workers.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS")

_WORKSPACE: dict | None = None


def single_threaded(environ: dict | None = None) -> dict:
    """A copy of ``environ`` (default ``os.environ``) with every numerical library on one thread."""
    return {**(os.environ if environ is None else environ), **{name: "1" for name in THREAD_VARIABLES}}


def use_numpy(optimizer: str = "scipy") -> None:
    """Switch pyhf to its numpy backend with SLSQP (``"scipy"``) or MINUIT (``"minuit"``)."""
    import logging

    import pyhf

    if optimizer == "minuit":
        logging.getLogger("pyhf.optimize.mixins").setLevel(logging.CRITICAL)  # its failures print the fit state
        pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-4, strategy=2))
    elif optimizer == "scipy":
        pyhf.set_backend("numpy", pyhf.optimize.scipy_optimizer())
    else:
        raise ValueError(f"optimizer must be 'scipy' or 'minuit', not {optimizer!r}")


def build_model(workspace: dict, operations: list, modifier_settings: dict | None = None, validate: bool = True):
    """``(model, data)`` of one patch applied to the whole background workspace (the model
    validated against pyhf's schema unless ``validate`` is off)."""
    import jsonpatch
    import pyhf

    patched = pyhf.Workspace(jsonpatch.apply_patch(workspace, operations), validate=False)
    model = patched.model(modifier_settings=modifier_settings or CODE4, validate=validate)
    return model, patched.data(model)


def hypotest(workspace: dict, operations: list, modifier_settings: dict | None = None, poi_test: float = 1.0,
             test_stat: str = "qtilde"):
    """``(CLs_obs, [CLs_exp x5])`` of one patch; ``(None, None)`` where MINUIT finds no minimum."""
    import pyhf

    model, data = build_model(workspace, operations, modifier_settings)
    try:
        observed, expected = pyhf.infer.hypotest(poi_test, data, model, test_stat=test_stat,
                                                 return_expected_set=True)
    except pyhf.exceptions.FailedMinimization:  # MINUIT's "distance to minimum too large"
        if pyhf.optimizer.name == "scipy":
            raise
        return None, None
    return float(observed), [float(value) for value in expected]


def upper_limit(workspace: dict, operations: list, scan=None, level: float = 0.05,
                modifier_settings: dict | None = None) -> dict:
    """pyhf's 95% CL upper limits of one patch: ``{"limits": [obs, exp x5]}`` or ``{"error": ...}``."""
    import numpy as np
    import pyhf

    model, data = build_model(workspace, operations, modifier_settings)
    grid = None if scan is None else np.linspace(scan[0], scan[1], int(scan[2]))
    try:
        observed, expected = pyhf.infer.intervals.upper_limits.upper_limit(data, model, grid, level=level,
                                                                            test_stat="qtilde")
    except Exception as error:  # noqa: BLE001 - pyhf's own outcome for this patch
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    return {"limits": [float(observed), *(float(value) for value in expected)]}


def _setup(spec: dict, optimizer: str = "scipy") -> None:
    """Once per process: the backend, and the background validated against pyhf's schema once."""
    global _WORKSPACE
    import pyhf

    use_numpy(optimizer)
    pyhf.Workspace(spec)
    _WORKSPACE = spec


def _fit(job: tuple) -> tuple:
    name, operations, modifier_settings = job
    began, cpu = time.perf_counter(), time.process_time()
    observed, expected = hypotest(_WORKSPACE, operations, modifier_settings)
    return name, observed, expected, (time.perf_counter() - began, time.process_time() - cpu)


def _limit(job: tuple) -> tuple:
    name, operations, scan, level, modifier_settings = job
    began = time.perf_counter()
    outcome = upper_limit(_WORKSPACE, operations, scan, level, modifier_settings)
    outcome["seconds"] = time.perf_counter() - began
    return name, outcome


def serial_pyhf(pallet, modifier_settings: dict | None = None, optimizer: str = "scipy",
                seconds_per_patch: dict | None = None) -> tuple[dict, float]:
    """Every patch one after another in this process: ``({name: (obs, exp)}, seconds)``.

    ``seconds_per_patch``, when given, is filled with each patch's own ``(wall, CPU)`` seconds
    (model and hypotest): far apart on a machine busy with other work.
    """
    began = time.perf_counter()
    _setup(pallet.workspace, optimizer)
    results = {}
    for patch in pallet.patches:
        name, observed, expected, seconds = _fit((patch.name, patch.operations, modifier_settings))
        results[name] = (observed, expected)
        if seconds_per_patch is not None:
            seconds_per_patch[name] = seconds
    return results, time.perf_counter() - began


def pool_pyhf(pallet, modifier_settings: dict | None, workers: int, optimizer: str = "scipy") -> tuple[dict, float]:
    """``multiprocessing.Pool(workers).imap_unordered`` over the patches (spawned processes, one
    thread each): ``({name: (obs, exp)}, seconds)``, the seconds including the pool's start."""
    os.environ.update(single_threaded({}))  # inherited by the spawned processes
    began = time.perf_counter()
    jobs = [(patch.name, patch.operations, modifier_settings) for patch in pallet.patches]
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_setup, initargs=(pallet.workspace, optimizer)) as pool:
        results = {name: (observed, expected) for name, observed, expected, _ in pool.imap_unordered(_fit, jobs)}
    return results, time.perf_counter() - began


def pool_upper_limits(pallet, jobs: list[tuple], workers: int):
    """Yield ``(name, outcome)`` of pyhf's upper limits of ``jobs`` (``(name, operations, scan,
    level, modifier_settings)``) over ``multiprocessing.Pool(workers)``, as they finish."""
    os.environ.update(single_threaded({}))
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs)), initializer=_setup, initargs=(pallet.workspace,)) as pool:
        yield from pool.imap_unordered(_limit, jobs)


def sample(names: list[str], count: int, seed: int) -> list[str]:
    """``count`` names drawn at random with ``seed`` (all of them for 0 or more), in pallet order.

    >>> sample(["a", "b", "c", "d"], 2, seed=1) == sample(["a", "b", "c", "d"], 2, seed=1)
    True
    >>> sample(["a", "b"], 0, seed=1)
    ['a', 'b']
    """
    if count <= 0 or count >= len(names):
        return list(names)
    chosen = set(random.Random(seed).sample(names, count))
    return [name for name in names if name in chosen]


def machine() -> dict:
    """What a timing was taken on: host, cores, CPU model, Python and pyhf versions, and when."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        pyhf_version = version("pyhf")
    except Exception:  # noqa: BLE001 - only a label
        pyhf_version = None
    return {"host": platform.node(), "cores": os.cpu_count(), "cpu": cpu, "python": sys.version.split()[0],
            "pyhf": pyhf_version, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def timed_in_process(name: str, mode: str, workers: int, count: int, seed: int, optimizer: str = "scipy") -> dict:
    """Time plain pyhf on a sample of a pallet in this process (see the module's command line)."""
    import sources

    load = os.getloadavg()[0]
    pallet = sources.load(name)
    total = len(pallet)
    names = sample(pallet.names(), count, seed)
    pallet.patches = [patch for patch in pallet.patches if patch.name in names]
    line = {"pallet": name, "mode": mode, "workers": 1 if mode == "serial" else workers, "seed": seed,
            "names": names, "pallet_patches": total, "optimizer": optimizer, "machine": machine()}
    if mode == "serial":
        seconds: dict = {}
        results, wall = serial_pyhf(pallet, CODE4, optimizer, seconds)
        line["seconds_per_patch"] = seconds
    else:
        results, wall = pool_pyhf(pallet, CODE4, workers, optimizer)
    # How busy the machine was (1-minute load average, before and after): a shared machine's
    # other work slows every timing of the run, plain pyhf's and pyhf-dist's alike.
    line.update(wall_seconds=wall, results=results, load=[load, os.getloadavg()[0]])
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pallet", help="a pallet name of benchmarks/sources.py or PATH[::PALLET]")
    parser.add_argument("--mode", choices=["serial", "pool"], default="serial")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sample", type=int, default=10, help="patches drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--optimizer", choices=["scipy", "minuit"], default="scipy")
    args = parser.parse_args()
    if any(os.environ.get(name) != "1" for name in THREAD_VARIABLES):
        # numpy reads these when it is imported: only a fresh process can honour them.
        os.execve(sys.executable, [sys.executable, *sys.argv], single_threaded())
    sys.path.insert(0, str(HERE))
    print(json.dumps(timed_in_process(args.pallet, args.mode, args.workers, args.sample, args.seed, args.optimizer)))


if __name__ == "__main__":
    main()
