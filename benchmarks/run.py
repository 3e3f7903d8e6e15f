"""Benchmark a pallet across executors and backends, against plain pyhf.

    python benchmarks/run.py                              # 1Lbb, default backend, local/dask/parsl...
    python benchmarks/run.py --executors local --trials 5 --backends jax,numpy
    python benchmarks/run.py --patches 25 --baselines cached

Writes to ``--output`` (default ``benchmarks/output/``): ``benchmark.json`` (every measurement),
``table.md`` (in the form of Table 1 of the 2021 funcX study: patches, wall time mean ± std over
trials, single-worker time), ``walltime.png`` (bar chart like its Figure 2) and ``scaling.png``.

Measured, per executor and backend (``globus-engine``: a Globus Compute endpoint engine on this
machine, through ``engine_scan.py``):
* wall time of a whole scan from a cold ``python`` process (imports, pallet, fits, results file),
  over ``--trials`` runs, once more with an empty pyhf-dist cache (a fresh machine), and with a
  single worker;
* agreement with plain serial pyhf on numpy: max |ΔCLs| over CLs_obs and the five CLs_exp;
* per-task breakdown: queue wait (incl. transfer), compute on the worker, extra cost of each
  worker's first task (setup, compilation), result return;
* scheduling overhead per task with a no-op task, and the executor's start-up time;
and, in the same run, plain pyhf serially and over ``multiprocessing.Pool`` with the same
worker count (ratios in the table), plus a scaling study (1, 2, 4 workers; 25/50/125 patches).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import pool_pyhf, serial_pyhf  # noqa: E402

DATA = Path(os.environ.get("PYHF_DIST_DATA", HERE.parent.parent / "shared" / "data"))
CODE4 = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
DEFAULT_EXECUTORS = "sequential,local,dask,slurm,parsl,globus-engine"


def slurm_is_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0


def executor_options(name: str, workers: int) -> dict:
    """Options that give each executor ``workers`` single-core workers on this machine."""
    if name == "slurm":
        return {"jobs": workers, "cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:30:00"}
    if name in ("sequential", "globus-engine"):
        return {}
    return {"workers": workers}


def cold_scan(pallet: str, executor: str, workers: int, backend: str | None, patches: int | None,
              empty_cache: bool = False) -> dict:
    """One scan in a fresh process; ``empty_cache``: as the first run on a fresh machine (nothing
    compiled or checked before, see ``pyhf_dist.cache``)."""
    if executor == "globus-engine":
        command = [sys.executable, str(HERE / "engine_scan.py"), pallet, "--workers", str(workers)]
    else:
        options = {k: v for k, v in executor_options(executor, workers).items() if k != "workers"}
        command = [sys.executable, str(HERE / "one_scan.py"), pallet, "--executor", executor,
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
    """Largest |ΔCLs| over CLs_obs and the five CLs_exp of every patch in ``results``."""
    worst = 0.0
    for name, (observed, expected) in results.items():
        ref_observed, ref_expected = reference[name]
        for a, b in zip([observed, *expected], [ref_observed, *ref_expected]):
            if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
                if not ((a is None or math.isnan(a)) and (b is None or math.isnan(b))):
                    return math.inf
                continue
            worst = max(worst, abs(a - b))
    return worst


def noop_overhead(executor: str, workers: int, tasks: int) -> dict:
    """Start the executor, run ``tasks`` no-op tasks through it, and time both."""
    import concurrent.futures

    import pyhf_dist
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.worker import WorkerContext

    context = WorkerContext.build(pyhf_dist.demo_pallet(points=1).workspace, FitSettings(backend="numpy").to_dict())
    runner = pyhf_dist.get_executor(executor, **executor_options(executor, workers))
    began = time.perf_counter()
    try:
        runner.start(context)
        # The first task also waits for the workers to come up: count it as start-up.
        runner.submit({"name": "warm", "patch": [], "context": context.key, "kind": "noop"}).result()
        started = time.perf_counter() - began
        began = time.perf_counter()
        futures = [runner.submit({"name": f"noop{i}", "patch": [], "context": context.key, "kind": "noop"})
                   for i in range(tasks)]
        concurrent.futures.wait(futures)
        elapsed = time.perf_counter() - began
    finally:
        runner.shutdown()
    return {"startup_seconds": started, "per_task_ms": 1000 * elapsed / tasks, "tasks": tasks}


def load_or_measure_baselines(pallet_path: str, pallet, workers: int, mode: str, output: Path,
                              serial_patches: int | None) -> dict:
    """Plain pyhf over ``multiprocessing.Pool`` on every patch (also the CLs reference: the same
    single-threaded pyhf computation as a serial loop) and plain serial pyhf, timed."""
    key = hashlib.sha256(("\n".join(pallet.names()) + pallet_path).encode()).hexdigest()[:12]
    cache = output / f"baselines-{key}-w{workers}-s{serial_patches or 'all'}.json"
    if mode == "cached" and cache.exists():
        return json.loads(cache.read_text())
    print(f"plain pyhf over multiprocessing.Pool({workers}), {len(pallet)} patches (numpy; the slow part)...", flush=True)
    reference, pool_seconds = pool_pyhf(pallet, CODE4, workers)
    print(f"  {pool_seconds:.1f} s", flush=True)
    subset = pallet
    if serial_patches and serial_patches < len(pallet):
        subset = type(pallet)(pallet.workspace, pallet.patches[:serial_patches], pallet.labels, pallet.source)
    print(f"plain pyhf, serial, {len(subset)} patches...", flush=True)
    serial, serial_seconds = serial_pyhf(subset, CODE4)
    print(f"  {serial_seconds:.1f} s", flush=True)
    data = {"reference": reference, "pool_seconds": pool_seconds, "workers": workers,
            "serial_seconds": serial_seconds * len(pallet) / len(subset),
            "serial_estimated_from": len(subset) if len(subset) < len(pallet) else None,
            "pool_max_difference": max_difference(serial, reference)}
    cache.write_text(json.dumps(data))
    return data


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def write_table(rows: list[dict], baselines: dict, patches: int, workers: int) -> str:
    """The Markdown table, in the form of Table 1 of the 2021 study, plus ratios and agreement."""
    lines = [
        f"| executor | backend | patches | wall time (s), {workers} workers | first run, empty cache (s) "
        f"| single worker (s) | × faster than plain pyhf Pool({workers}) | × faster than serial pyhf | max abs ΔCLs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        mean = statistics.mean(row["walls"])
        single = "–" if row["single_worker"] is None else f"{row['single_worker']:.1f}"
        first = "–" if row.get("first_run") is None else f"{row['first_run']:.1f}"
        lines.append(
            f"| {row['executor']} | {row['backend']} | {patches} | {mean_std(row['walls'])} | {first} | {single} "
            f"| {baselines['pool_seconds'] / mean:.1f} | {baselines['serial_seconds'] / mean:.1f} "
            f"| {row['max_difference']:.1e} |"
        )
    estimated = baselines.get("serial_estimated_from")
    serial = f"{baselines['serial_seconds']:.0f}" + (f" (from {estimated} patches)" if estimated else "")
    lines.append(
        f"| plain pyhf, multiprocessing.Pool({workers}) | numpy | {patches} | {baselines['pool_seconds']:.1f} | – "
        f"| {serial} | 1.0 | {baselines['serial_seconds'] / baselines['pool_seconds']:.1f} "
        f"| {baselines['pool_max_difference']:.1e} |"
    )
    note = ("\nWall time: from a cold `python` process to the results file, with the machine's cache "
            "(compiled likelihood, checks already passed) from earlier runs; *first run, empty cache*: the "
            "same with an empty cache, as on a fresh machine.\n")
    if estimated:
        note += f"Plain serial pyhf was timed on the first {estimated} patches and scaled to {patches}.\n"
    return "\n".join(lines) + "\n" + note


def write_overhead_table(rows: list[dict], noop: dict) -> str:
    """Per-task breakdown (means, seconds) and the no-op scheduling overhead per executor."""
    lines = [
        "| executor | backend | queue wait + transfer | compute | first task extra (setup, compile) "
        "| result return | executor start-up | no-op task overhead |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        last = row["runs"][-1]
        overhead = noop.get(row["executor"], {})
        startup = f"{overhead['startup_seconds']:.2f} s" if overhead else "–"
        per_task = f"{overhead['per_task_ms']:.2f} ms" if overhead else "–"
        lines.append(
            f"| {row['executor']} | {row['backend']} | {last['queue_wait_seconds']:.3f} s | {last['compute_seconds']:.3f} s "
            f"| {last['first_task_extra_seconds']:.3f} s | {last['return_seconds'] * 1000:.1f} ms | {startup} | {per_task} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], baselines: dict, scaling: dict, output: Path, workers: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install "pyhf-dist[plot]"): no figures', flush=True)
        return
    labels = [f"{row['executor']}\n{row['backend']}" for row in rows] + [f"pyhf\nPool({workers})", "pyhf\nserial"]
    means = [statistics.mean(row["walls"]) for row in rows] + [baselines["pool_seconds"], baselines["serial_seconds"]]
    errors = [statistics.stdev(row["walls"]) if len(row["walls"]) > 1 else 0 for row in rows] + [0, 0]
    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.5))
    axis.bar(range(len(labels)), means, yerr=errors, capsize=4,
             color=["tab:blue"] * len(rows) + ["tab:gray", "tab:gray"])
    axis.set_xticks(range(len(labels)), labels, fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel("wall time [s]")
    axis.set_title(f"{baselines.get('pallet', 'pallet')}: all patches, {workers} workers")
    for index, value in enumerate(means):
        axis.annotate(f"{value:.1f}", (index, value), ha="center", va="bottom", fontsize=8)
    figure.tight_layout()
    figure.savefig(output / "walltime.png", dpi=120)
    if scaling:
        figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
        by_workers = scaling.get("workers", {})
        left.plot(list(map(int, by_workers)), list(by_workers.values()), "o-")
        left.set_xlabel("workers (2 cores)")
        left.set_ylabel("wall time [s]")
        left.set_title("local executor, all patches")
        by_patches = scaling.get("patches", {})
        right.plot(list(map(int, by_patches)), list(by_patches.values()), "o-")
        right.set_xlabel("patches")
        right.set_title(f"local executor, {workers} workers")
        for axis in (left, right):
            axis.set_ylim(bottom=0)
        figure.tight_layout()
        figure.savefig(output / "scaling.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pallet", default=str(DATA / "1Lbb-likelihoods-hepdata.tar.gz"))
    parser.add_argument("--executors", default=DEFAULT_EXECUTORS)
    parser.add_argument("--backends", default="default", help="comma list of jax, numpy, default")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--patches", type=int, default=None, help="only the first N patches")
    parser.add_argument("--baselines", choices=["measure", "cached"], default="cached",
                        help="cached: reuse plain-pyhf timings and reference from an earlier run if present")
    parser.add_argument("--serial-patches", type=int, default=None,
                        help="time plain serial pyhf on only the first N patches and scale to all (labelled)")
    parser.add_argument("--noop", type=int, default=200, help="no-op tasks per executor (0: skip)")
    parser.add_argument("--scaling", action="store_true",
                        help="also run the scaling study (local executor, mean of --trials runs per point)")
    parser.add_argument("--output", default=str(HERE / "output"))
    args = parser.parse_args()

    import pyhf_dist

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    pallet = pyhf_dist.load_pallet(args.pallet)
    if args.patches:
        pallet.patches = pallet.patches[: args.patches]
    patches = len(pallet)
    executors = [name for name in args.executors.split(",") if name]
    if "slurm" in executors and not slurm_is_up():
        print("Slurm is not running (executors/slurm/start-slurm.sh starts it): skipping slurm", flush=True)
        executors.remove("slurm")
    if "globus-engine" in executors and importlib.util.find_spec("globus_compute_endpoint") is None:
        print("globus-compute-endpoint is not installed (pip install globus-compute-endpoint): skipping globus-engine",
              flush=True)
        executors.remove("globus-engine")
    backends = [None if name == "default" else name for name in args.backends.split(",")]

    baselines = load_or_measure_baselines(args.pallet, pallet, args.workers, args.baselines, output,
                                          args.serial_patches)
    baselines["pallet"] = Path(args.pallet).name
    reference = baselines["reference"]

    rows = []
    for executor in executors:
        for backend in backends:
            runs = []
            for trial in range(args.trials):
                run = cold_scan(args.pallet, executor, args.workers, backend, args.patches)
                runs.append(run)
                print(f"{executor:>10} {run['backend']:>5} trial {trial + 1}: {run['wall_seconds']:7.2f} s"
                      f"  failed {run['failed']}  max|ΔCLs| {max_difference(run['results'], reference):.1e}", flush=True)
            first = cold_scan(args.pallet, executor, args.workers, backend, args.patches, empty_cache=True)
            print(f"{executor:>10} {first['backend']:>5} empty cache: {first['wall_seconds']:7.2f} s", flush=True)
            single = None
            if executor != "sequential":
                single = cold_scan(args.pallet, executor, 1, backend, args.patches)["wall_seconds"]
            rows.append({
                "executor": executor, "backend": runs[0]["backend"], "walls": [r["wall_seconds"] for r in runs],
                "first_run": first["wall_seconds"], "single_worker": single,
                "runs": [{k: v for k, v in r.items() if k != "results"} for r in runs],
                "max_difference": max(max_difference(r["results"], reference) for r in runs),
            })

    # Before the no-op study: Slurm and Parsl workers it stops may take seconds to exit.
    scaling = {}
    if args.scaling:
        def mean_wall(workers: int, subset: int | None) -> float:
            return statistics.mean(cold_scan(args.pallet, "local", workers, None, subset)["wall_seconds"]
                                   for _ in range(args.trials))

        scaling["workers"] = {n: mean_wall(n, args.patches) for n in (1, 2, 4)}
        scaling["patches"] = {n: mean_wall(args.workers, n) for n in (25, 50, patches) if n <= patches}
        print(f"scaling: {scaling}", flush=True)

    noop = {}
    # The engine row has no pyhf-dist executor in front of it to time no-op tasks through.
    for executor in [name for name in executors if name != "globus-engine"] if args.noop else []:
        noop[executor] = noop_overhead(executor, args.workers, args.noop)
        print(f"{executor:>10} no-op: start-up {noop[executor]['startup_seconds']:.2f} s, "
              f"{noop[executor]['per_task_ms']:.2f} ms per task", flush=True)

    table = write_table(rows, baselines, patches, args.workers)
    overhead = write_overhead_table(rows, noop)
    (output / "table.md").write_text(table + "\n" + overhead)
    (output / "benchmark.json").write_text(json.dumps(
        {"pallet": args.pallet, "patches": patches, "workers": args.workers, "trials": args.trials,
         "rows": rows, "noop": noop, "scaling": scaling,
         "baselines": {k: v for k, v in baselines.items() if k != "reference"},
         "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}}, indent=1))
    plot(rows, baselines, scaling, output, args.workers)
    print()
    print(table)
    print(overhead)
    headline = next((row for row in rows if row["executor"] == "local"), rows[0] if rows else None)
    if headline is not None:
        mean = statistics.mean(headline["walls"])
        print(f"Headline: {patches} patches, local executor, {args.workers} workers, backend {headline['backend']}: "
              f"{mean:.2f} s wall from a cold process (mean of {len(headline['walls'])}), "
              f"max |ΔCLs| vs serial pyhf {headline['max_difference']:.1e}, "
              f"{baselines['pool_seconds'] / mean:.0f}× faster than plain pyhf over a {args.workers}-process Pool; "
              f"first run with an empty cache {headline['first_run']:.2f} s; peak RSS per worker "
              f"{max(run['child_peak_rss_mb'] for run in headline['runs']):.0f} MB.")
    print(f"Written to {output}/ (table.md, benchmark.json, walltime.png, scaling.png)")


if __name__ == "__main__":
    main()
