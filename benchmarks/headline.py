"""The headline figure: pyhf-dist against the best plain pyhf can do, timed in the same run.

Plain pyhf (``baselines.py``) is timed on a random sample of patches (fixed seed), one thread per
numerical library, in fresh processes, two ways:

* *alone*: one process, the patches one after another; a perfect pool of ``workers`` such
  processes would take ``mean seconds per patch × patches / workers`` for the whole pallet;
* *pool*: ``multiprocessing.Pool(workers)`` over the sample; scaled to the whole pallet as
  ``pool wall × patches / sample``.

The headline ratio divides the faster of the two (or, when lower, the *alone* estimate by CPU
time: what idle cores would take, on a machine busy with other work) by pyhf-dist's wall time (a
cold process, the whole pallet, the local executor, median over trials, its rounds spread before,
between and after the plain-pyhf timings so that the machine's load weighs on both sides). pyhf-dist's fixed cost per scan and cost per
patch come from a straight line through cold scans of several patch counts (taken in turns, so that
a slow stretch of the shared machine weighs on every count). A baseline read from an earlier run
(``--baselines cached``) is printed with the date and machine it was measured on.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import sources
from baselines import single_threaded
from scans import cold_scan, linear_fit

__all__ = ["measure_baselines", "measure_headline", "scan_line", "headline_table"]

HERE = Path(__file__).resolve().parent


def _timed(name: str, mode: str, workers: int, sample: int, seed: int) -> dict:
    """One baseline in a fresh single-threaded process (``baselines.py``'s command line)."""
    command = [sys.executable, str(HERE / "baselines.py"), name, "--mode", mode, "--workers", str(workers),
               "--sample", str(sample), "--seed", str(seed)]
    run = subprocess.run(command, capture_output=True, text=True, env=single_threaded())
    if run.returncode != 0:
        raise RuntimeError(f"plain pyhf ({mode}) failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def summarise(serial: dict, pool: dict, workers: int) -> dict:
    """Both baselines scaled to the whole pallet on ``workers`` processes, and the faster of them."""
    per_patch = [wall for wall, _ in serial["seconds_per_patch"].values()]
    cpu = [seconds for _, seconds in serial["seconds_per_patch"].values()]
    total = serial["pallet_patches"]
    alone = statistics.mean(per_patch) * total / workers
    pooled = pool["wall_seconds"] * total / len(pool["names"])
    # CPU seconds per patch: what idle cores would take, whatever else ran on the machine meanwhile.
    by_cpu = statistics.mean(cpu) * total / workers
    estimates = {"alone": alone, "pool": pooled, "alone_cpu": by_cpu}
    best = min(estimates, key=estimates.get)
    return {
        "pallet_patches": total, "workers": workers, "seed": serial["seed"], "machine": serial["machine"],
        "alone": {"patches": len(per_patch), "mean": statistics.mean(per_patch),
                  "median": statistics.median(per_patch), "min": min(per_patch), "max": max(per_patch),
                  "cpu_mean": statistics.mean(cpu), "estimate": alone, "load": serial.get("load")},
        "pool": {"patches": len(pool["names"]), "wall": pool["wall_seconds"], "estimate": pooled,
                 "load": pool.get("load")},
        "alone_cpu": {"estimate": by_cpu},
        "best": best,
        "best_estimate": estimates[best],
        "reference": serial["results"],
        "pool_results": pool["results"],
    }


def _cache_path(name: str, workers: int, sample: int, seed: int, output: Path) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return output / f"baseline-{slug}-w{workers}-n{sample}-s{seed}.json"


def _cached(name: str, path: Path) -> dict:
    data = json.loads(path.read_text())
    where = data["machine"]
    print(f"{name}: plain pyhf baseline CACHED, not measured in this run: taken {where['date']} on "
          f"{where['host']} ({where['cores']} cores, {where['cpu']}), file {path}", flush=True)
    return {**data, "cached": True}


def measure_baselines(name: str, workers: int, sample: int, seed: int, mode: str, output: Path,
                      between=None) -> dict:
    """Plain pyhf alone and over a pool on ``sample`` patches (``mode="cached"``: an earlier run's,
    if there is one, labelled with its date and machine). ``between()``, if given, runs before,
    between and after the two (pyhf-dist's scans, so that the machine's load weighs on both sides)."""
    path = _cache_path(name, workers, sample, seed, output)
    if mode == "cached" and path.exists():
        return _cached(name, path)
    between = between or (lambda: None)
    between()
    print(f"{name}: plain pyhf alone, 1 thread, {sample or 'all'} random patches (seed {seed})...", flush=True)
    serial = _timed(name, "serial", workers, sample, seed)
    print(f"  {statistics.mean(wall for wall, _ in serial['seconds_per_patch'].values()):.1f} s per patch", flush=True)
    between()
    print(f"{name}: plain pyhf over multiprocessing.Pool({workers}), the same patches...", flush=True)
    pool = _timed(name, "pool", workers, sample, seed)
    print(f"  {pool['wall_seconds']:.1f} s", flush=True)
    between()
    data = summarise(serial, pool, workers)
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return {**data, "cached": False}


def scan_rounds(name: str, workers: int, counts: list[int], executor: str = "local"):
    """``(line, one_round)``: ``one_round()`` scans the first ``counts`` patches and the whole pallet
    once each, cold, into ``line``; :func:`fit_line` then fits ``wall = fixed + patches × per_patch``."""
    total = len(sources.load(name))
    counts = sorted({min(count, total) for count in counts} | {total})  # the whole pallet: the headline
    line: dict = {"executor": executor, "workers": workers, "total": total, "walls": {count: [] for count in counts},
                  "results": {}, "loads": []}

    def one_round() -> None:
        trial = len(line["walls"][total]) + 1
        for count in counts:
            line["loads"].append(os.getloadavg()[0])
            run = cold_scan([sources.spec(name)], executor, workers, None, count if count < total else None)
            line["walls"][count].append(run["wall_seconds"])
            if count == total:
                line["results"] = run["results"]
            print(f"{name}: pyhf-dist {executor}, {count} patches, trial {trial}: {run['wall_seconds']:.2f} s "
                  f"(failed {run['failed']}, engines {run['engines']})", flush=True)

    return line, one_round


def fit_line(line: dict) -> dict:
    """``line`` with its ``fixed`` cost per scan and cost ``per_patch`` (least squares)."""
    points = [(1, count, wall) for count, values in line["walls"].items() for wall in values]
    line["fixed"], line["per_patch"] = linear_fit(points)
    return line


def scan_line(name: str, workers: int, counts: list[int], trials: int, executor: str = "local") -> dict:
    """Cold scans of the first ``counts`` patches and of the whole pallet (``trials`` rounds, in
    turns), and the line through them: ``{"walls": {count: [...]}, "fixed": s, "per_patch": s,
    "results": CLs of a whole-pallet scan}``."""
    line, one_round = scan_rounds(name, workers, counts, executor)
    for _ in range(trials):
        one_round()
    return fit_line(line)


def measure_headline(name: str, workers: int, sample: int, seed: int, mode: str, output: Path,
                     counts: list[int], trials: int) -> tuple[dict, dict]:
    """``(baseline, line)`` of the headline: pyhf-dist's rounds of scans spread before, between and
    after the two plain-pyhf timings (all of them at once when the baseline is cached)."""
    line, one_round = scan_rounds(name, workers, counts)
    slots = [trials // 3 + (1 if slot < trials % 3 else 0) for slot in range(3)]

    def between() -> None:
        for _ in range(slots.pop(0) if slots else 0):
            one_round()

    baseline = measure_baselines(name, workers, sample, seed, mode, output, between)
    while len(line["walls"][line["total"]]) < trials:
        one_round()
    return baseline, fit_line(line)


def headline_table(name: str, baseline: dict, line: dict, difference: float) -> str:
    """The table: both baselines, pyhf-dist's wall, the ratios, its fixed cost and cost per patch."""
    total, workers = line["total"], line["workers"]
    wall = statistics.median(line["walls"][total])
    alone, pool = baseline["alone"], baseline["pool"]
    where = baseline["machine"]
    cpu = f"; CPU {alone['cpu_mean']:.1f}" if alone.get("cpu_mean") else ""
    rows = [
        f"| what | patches timed | s per patch | {total} patches, {workers} workers (s) | × slower than pyhf-dist |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| plain pyhf alone (1 process, 1 thread), perfect pool of {workers} | {alone['patches']} "
        f"(seed {baseline['seed']}) | {alone['mean']:.1f} (median {alone['median']:.1f}, {alone['min']:.1f}–"
        f"{alone['max']:.1f}{cpu}) | {alone['estimate']:.0f} | {alone['estimate'] / wall:.0f} |",
        f"| plain pyhf over multiprocessing.Pool({workers}), 1 thread each | {pool['patches']} | – "
        f"| {pool['estimate']:.0f} | {pool['estimate'] / wall:.0f} |",
        *([f"| plain pyhf alone, by its CPU time (idle cores) | {alone['patches']} | {alone['cpu_mean']:.1f} (CPU) "
           f"| {baseline['alone_cpu']['estimate']:.0f} | {baseline['alone_cpu']['estimate'] / wall:.0f} |"]
          if baseline.get("alone_cpu") else []),
        f"| pyhf-dist, {line['executor']} executor, cold process (median of {len(line['walls'][total])}) | {total} "
        f"| {1000 * line['per_patch']:.0f} ms (slope) | {wall:.2f} | 1 |",
    ]
    counts = ", ".join(f"{count}: {statistics.median(values):.2f} s" for count, values in line["walls"].items())
    if baseline.get("cached"):
        provenance = (f"**cached** from an earlier run: measured {where['date']} on {where['host']} "
                      f"({where['cores']} cores, {where['cpu']}), not in this run")
    else:
        provenance = f"measured in this run on {where['host']} ({where['cores']} cores, {where['cpu']}), {where['date']}"
    return "\n".join(rows) + (
        f"\n\n**Headline: {baseline['best_estimate'] / wall:.0f}×** the fastest plain pyhf "
        f"({BEST[baseline['best']]}).\n"
        f"pyhf-dist fixed cost per scan **{line['fixed']:.2f} s**, cost per patch **{1000 * line['per_patch']:.1f} ms** "
        f"(a line through cold scans of {counts}; medians shown).\n"
        f"Plain pyhf baseline {provenance}; max |ΔCLs| of pyhf-dist against it on the "
        f"{alone['patches']} patches: {difference:.1e}.\n"
        f"Machine load (1-minute average, {where['cores']} cores) during plain pyhf alone {_load(alone)}, over the "
        f"Pool {_load(pool)}, during pyhf-dist's scans {min(line['loads']):.1f}–{max(line['loads']):.1f}.\n"
    )


BEST = {"alone": "alone, as a perfect pool", "pool": "over the Pool",
        "alone_cpu": "alone, as a perfect pool, by CPU time"}


def _load(timed: dict) -> str:
    load = timed.get("load")
    return f"{load[0]:.1f}→{load[1]:.1f}" if load else "not recorded"
