"""Scans of pyhf-dist from a cold ``python`` process (``one_scan.py``), and what is computed from them.

>>> fixed, per_patch = linear_fit([(1, 10, 2.5), (1, 40, 4.0), (1, 125, 8.25)])
>>> round(fixed, 6), round(per_patch, 6)
(2.0, 0.05)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["executor_options", "cold_scan", "max_difference", "linear_fit", "mean_std"]

HERE = Path(__file__).resolve().parent


def executor_options(name: str, workers: int) -> dict:
    """Options that give each executor ``workers`` single-core workers on this machine."""
    if name == "slurm":
        return {"jobs": workers, "cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:30:00"}
    if name in ("sequential", "globus-engine"):
        return {}
    return {"workers": workers}


def cold_scan(sources: list[str], executor: str, workers: int, backend: str | None = None,
              patches: int | None = None, empty_cache: bool = False) -> dict:
    """One scan (or one scan per source, in one process) in a fresh process; ``empty_cache``: as the
    first run on a fresh machine (nothing compiled or checked before, see ``pyhf_dist.cache``).

    ``sources`` are ``PATH`` or ``PATH::PALLET`` strings (``sources.spec``).
    """
    if executor == "globus-engine":
        if len(sources) != 1:
            raise ValueError("the engine benchmark scans one pallet")
        command = [sys.executable, str(HERE / "engine_scan.py"), sources[0], "--workers", str(workers)]
    else:
        options = {k: v for k, v in executor_options(executor, workers).items() if k != "workers"}
        command = [sys.executable, str(HERE / "one_scan.py"), *sources, "--executor", executor,
                   "--workers", str(workers), "--options", json.dumps(options)]
    if backend:
        command += ["--backend", backend]
    if patches:
        command += ["--patches", str(patches)]
    with tempfile.TemporaryDirectory(prefix="pyhf-dist-empty-cache-") as cache:
        environment = dict(os.environ, PYHF_DIST_CACHE=cache) if empty_cache else None
        run = subprocess.run(command, capture_output=True, text=True, env=environment)
    if run.returncode != 0:
        raise RuntimeError(f"{executor}/{backend} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def max_difference(results: dict, reference: dict) -> float:
    """Largest |ΔCLs| over CLs_obs and the five CLs_exp of every patch of ``reference`` in ``results``."""
    worst = 0.0
    for name, (ref_observed, ref_expected) in reference.items():
        if name not in results:
            continue
        observed, expected = results[name]
        for a, b in zip([observed, *(expected or [None] * 5)], [ref_observed, *(ref_expected or [None] * 5)]):
            if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
                if not ((a is None or math.isnan(a)) and (b is None or math.isnan(b))):
                    return math.inf
                continue
            worst = max(worst, abs(a - b))
    return worst


def linear_fit(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares of ``wall = scans × fixed + patches × per_patch`` through ``(scans, patches, wall)``
    (with one scan per point: a straight line, ``fixed`` its intercept)."""
    s11 = sum(s * s for s, _, _ in points)
    s12 = sum(s * p for s, p, _ in points)
    s22 = sum(p * p for _, p, _ in points)
    b1 = sum(s * w for s, _, w in points)
    b2 = sum(p * w for _, p, w in points)
    determinant = s11 * s22 - s12 * s12
    if determinant == 0:
        raise ValueError("a line needs scans of at least two patch counts")
    return (b1 * s22 - b2 * s12) / determinant, (s11 * b2 - s12 * b1) / determinant


def mean_std(values: list[float]) -> str:
    """``mean ± std`` of a list, to a tenth (the value alone for one)."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
