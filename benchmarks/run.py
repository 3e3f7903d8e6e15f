"""Benchmark pallets across executors and backends, against plain pyhf timed in the same run.

    python benchmarks/run.py                              # headline, then 1Lbb and stau, every executor here
    python benchmarks/run.py --pallets 1Lbb --executors none --trials 3 --breakdown   # the headline only
    python benchmarks/run.py --quick                      # smoke run
    python benchmarks/run.py --backends jax,numpy --scaling

Pallets: ``1Lbb`` (ATLAS 1Lbb, 125 patches), ``stau`` (ATLAS stau, pallet Region-combined, 57
patches), the two analyses of Table 1 of the 2021 funcX study, any name of ``sources.py``, or any
pallet path (``PATH[::PALLET]``).

First the headline (``headline.py``), for the first pallet: plain pyhf timed in this run on
``--sample`` random patches (``--seed``), one thread per library, alone in one process and over
``multiprocessing.Pool(--workers)``, each scaled to the pallet; pyhf-dist's wall time (local
executor, cold process, median of ``--trials``) and its fixed cost per scan and cost per patch (a
line through cold scans of ``--counts`` patches and the whole pallet); the ratio to the faster
plain pyhf. A cached baseline (``--baselines cached``) is printed with its date and machine.
``--breakdown`` adds where the fixed cost goes (``fixed_cost.py``).

Then, per pallet, executor and backend (``--executors none`` skips it; ``globus-engine``: a Globus
Compute endpoint engine on this machine, through ``engine_scan.py``):
* wall time of a whole scan from a cold ``python`` process (imports, pallet, fits, results file),
  over ``--trials`` runs taken in turns across the executors, with a single worker, and
  (``--empty-cache``) once with an empty pyhf-dist cache (a fresh machine);
* each executor's wall time over the local pool's, and per-fit compute: the median fit on a
  worker (wall) and the CPU time the worker processes spend per fit (fitting, and what else a
  worker does meanwhile: event loops, heartbeats, monitors);
* agreement with plain pyhf on numpy: max |ΔCLs| over CLs_obs and the five CLs_exp of the sample;
* per-task breakdown: queue wait (incl. transfer), compute on the worker, extra cost of each
  worker's first task (setup, compilation), result return; scheduling overhead per task with a
  no-op task, and the executor's start-up time.
``--scaling``: wall time against workers (1, 2, 4, and up to twice the cores) on the first pallet,
and against patches (stau's 57, 1Lbb's 125, and all four pallets one after another in one
process), fitted as ``wall = scans × fixed cost + patches × cost per patch``, for the local, Dask
and Parsl executors.

Writes to ``--output`` (default ``benchmarks/output/``): ``headline.md``, ``table1.md`` (Table 1 of
the study reproduced), ``table-<pallet>.md``, ``benchmark.json`` (every measurement),
``table1.png`` and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sources  # noqa: E402
from headline import headline_table, measure_baselines, measure_headline  # noqa: E402
from scans import cold_scan, executor_options, linear_fit, max_difference, mean_std  # noqa: E402
from tables import plot, write_overhead_table, write_ratios, write_scaling, write_table, write_table1  # noqa: E402

DEFAULT_EXECUTORS = "sequential,local,dask,slurm,parsl,globus-engine"
SCALING_EXECUTORS = ("local", "dask", "parsl")


def pallet_sources(name: str) -> list[str]:
    """The sources ``one_scan.py`` reads for a pallet name of this benchmark (``PATH[::PALLET]``)."""
    if name == "all":  # every published pallet of Table 1's analyses, one after another
        return [sources.spec(each) for each in ("1Lbb", "stau-combined", "stau-lowMass", "stau-highMass")]
    return [sources.spec(name)]


def slurm_is_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0


def noop_overhead(executor: str, workers: int, tasks: int) -> dict:
    """Start the executor, run ``tasks`` no-op tasks through it, and time both."""
    import concurrent.futures
    import time

    import pyhf_dist
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.protocol import WorkerContext

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


def measure_pallet(name: str, args, executors: list[str], backends: list, baseline: dict) -> dict:
    """Every executor and backend on one pallet: trials, single worker, empty cache; against ``baseline``."""
    specs = pallet_sources(name)
    patches = min(args.patches or baseline["pallet_patches"], baseline["pallet_patches"])
    reference = baseline["reference"]
    combinations = [(executor, backend) for executor in executors for backend in backends]
    # Trials go round the executors (local, dask, slurm, local, dask, ...): a stretch of time when
    # the shared machine is slower then weighs on every executor, not on one of them.
    runs: dict[tuple, list[dict]] = {combination: [] for combination in combinations}
    for trial in range(args.trials):
        for executor, backend in combinations:
            run = cold_scan(specs, executor, args.workers, backend, args.patches)
            runs[executor, backend].append(run)
            print(f"{name:>6} {executor:>13} {run['backend']:>5} trial {trial + 1}: {run['wall_seconds']:7.2f} s"
                  f"  failed {run['failed']}  max|ΔCLs| {max_difference(run['results'], reference):.1e}"
                  f"  fit {run['compute_median_seconds'] * 1000:.0f} ms"
                  + (f"  worker CPU/fit {run['worker_cpu_per_fit'] * 1000:.0f} ms"
                     if run.get("worker_cpu_per_fit") else ""), flush=True)
    rows = []
    for executor, backend in combinations:
        trials = runs[executor, backend]
        first = None
        if args.empty_cache:
            first = cold_scan(specs, executor, args.workers, backend, args.patches, empty_cache=True)
            print(f"{name:>6} {executor:>13} {first['backend']:>5} empty cache: {first['wall_seconds']:7.2f} s",
                  flush=True)
        single = None
        if executor != "sequential":
            single = cold_scan(specs, executor, 1, backend, args.patches)["wall_seconds"]
            print(f"{name:>6} {executor:>13} {trials[0]['backend']:>5} 1 worker: {single:7.2f} s", flush=True)
        rows.append({
            "executor": executor, "backend": trials[0]["backend"], "walls": [r["wall_seconds"] for r in trials],
            "first_run": first["wall_seconds"] if first else None, "single_worker": single,
            "runs": [{k: v for k, v in r.items() if k != "results"} for r in trials],
            "max_difference": max(max_difference(r["results"], reference) for r in trials),
        })
    alone, pool = baseline["alone"], baseline["pool"]
    scaled = {  # the baselines at their measured rates, for the patches scanned here
        "pool_seconds": pool["wall"] * patches / pool["patches"], "pool_estimated_from": pool["patches"],
        "serial_seconds": alone["mean"] * patches, "serial_estimated_from": alone["patches"],
        "perfect_pool_seconds": alone["mean"] * patches / args.workers,
        "pool_max_difference": max_difference(baseline["pool_results"], reference),
        "compared_patches": len(reference), "cached": baseline.get("cached", False), "machine": baseline["machine"],
    }
    return {"name": name, "sources": specs, "patches": patches, "rows": rows, "baselines": scaled}


def measure_scaling(args, first_pallet: str, executors: list[str]) -> dict:
    """Wall time against workers and against patches, for the local, Dask and Parsl executors."""
    counts = sorted({1, 2, 4, *(n for n in (8, 16, 32) if n <= 2 * (os.cpu_count() or 1))})
    sizes = {"stau": ["stau"], "1Lbb": ["1Lbb"], "all pallets": ["all"]}
    scaling: dict = {}
    for executor in [name for name in SCALING_EXECUTORS if name in executors]:
        entry = scaling.setdefault(executor, {"workers": {}, "patches": {}})
        for count in counts:
            walls = [cold_scan(pallet_sources(first_pallet), executor, count, None, args.patches)["wall_seconds"]
                     for _ in range(args.trials)]
            entry["workers"][count] = walls
            print(f"scaling {executor:>6}: {count} workers {mean_std(walls)} s", flush=True)
        points = []
        for label, names in sizes.items():
            specs = [spec for name in names for spec in pallet_sources(name)]
            runs = [cold_scan(specs, executor, args.workers, None, None) for _ in range(args.trials)]
            walls = [run["wall_seconds"] for run in runs]
            entry["patches"][label] = {"patches": runs[0]["patches"], "scans": len(specs), "walls": walls}
            points += [(len(specs), runs[0]["patches"], wall) for wall in walls]
            print(f"scaling {executor:>6}: {label} ({runs[0]['patches']} patches, {len(specs)} scans) "
                  f"{mean_std(walls)} s", flush=True)
        entry["fixed_seconds"], entry["per_patch_seconds"] = linear_fit(points)
    return scaling


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pallets", default="1Lbb,stau", help="comma list: names of sources.py, or PATH[::PALLET]")
    parser.add_argument("--executors", default=DEFAULT_EXECUTORS, help="comma list for Table 1 ('none': skip it)")
    parser.add_argument("--backends", default="default", help="comma list of jax, numpy, default")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--patches", type=int, default=None, help="Table 1: only the first N patches")
    parser.add_argument("--baselines", choices=["measure", "cached"], default="measure",
                        help="cached: plain pyhf's timings from an earlier run, if any (printed with their date "
                             "and machine)")
    parser.add_argument("--sample", type=int, default=10, help="plain pyhf on N random patches (0: all)")
    parser.add_argument("--seed", type=int, default=1, help="of the random sample of patches")
    parser.add_argument("--counts", default="10,40,125",
                        help="patch counts of the headline's line (fixed cost per scan, cost per patch); the whole pallet "
                             "is always one")
    parser.add_argument("--empty-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each executor once with an empty pyhf-dist cache (a fresh machine)")
    parser.add_argument("--noop", type=int, default=200, help="no-op tasks per executor (0: skip)")
    parser.add_argument("--scaling", action="store_true",
                        help="also run the scaling study (local, dask, parsl; mean of --trials runs per point)")
    parser.add_argument("--breakdown", action="store_true", help="also where a scan's fixed cost goes (fixed_cost.py)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1Lbb, headline only, 2 sampled patches, counts 10 and all, one trial")
    parser.add_argument("--output", default=str(HERE / "output"))
    args = parser.parse_args()
    if args.quick:
        args.pallets, args.executors, args.sample, args.counts, args.trials = "1Lbb", "none", 2, "10", 1
        args.empty_cache, args.noop = False, 0
    return args


def available(requested: str) -> list[str]:
    """The executors of ``requested`` that can run on this machine (saying why the others cannot)."""
    executors = [name for name in requested.split(",") if name and name != "none"]
    if "slurm" in executors and not slurm_is_up():
        print("Slurm is not running (executors/slurm/start-slurm.sh starts it): skipping slurm", flush=True)
        executors.remove("slurm")
    if "globus-engine" in executors and importlib.util.find_spec("globus_compute_endpoint") is None:
        print("globus-compute-endpoint is not installed (pip install globus-compute-endpoint): skipping globus-engine",
              flush=True)
        executors.remove("globus-engine")
    return executors


def main() -> None:
    args = arguments()
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    executors = available(args.executors)
    backends = [None if name == "default" else name for name in args.backends.split(",")]
    pallets = [name for name in args.pallets.split(",") if name]
    if args.sample and args.sample < 10:
        print(f"Note: plain pyhf timed on {args.sample} patches only (the headline asks for 10 or more)", flush=True)

    # The headline: the first pallet on the local pool, against the fastest plain pyhf.
    first = pallets[0]
    baselines = {}
    baselines[first], line = measure_headline(first, args.workers, args.sample, args.seed, args.baselines, output,
                                              [int(c) for c in args.counts.split(",")], args.trials)
    for name in pallets[1:]:
        baselines[name] = measure_baselines(name, args.workers, args.sample, args.seed, args.baselines, output)
    difference = max_difference(line["results"], baselines[first]["reference"])
    headline = headline_table(first, baselines[first], line, difference)
    breakdown = ""
    if args.breakdown:
        run = subprocess.run([sys.executable, str(HERE / "fixed_cost.py"), first, "--workers", str(args.workers)],
                             capture_output=True, text=True)
        breakdown = run.stdout if run.returncode == 0 else f"fixed_cost.py failed:\n{run.stderr[-2000:]}"

    analyses = [measure_pallet(name, args, executors, backends, baselines[name]) for name in pallets] if executors else []
    # Before the no-op study: Slurm and Parsl workers it stops may take seconds to exit.
    scaling = measure_scaling(args, first, executors) if args.scaling else {}
    noop = {}
    # The engine row has no pyhf-dist executor in front of it to time no-op tasks through.
    for executor in [name for name in executors if name != "globus-engine"] if args.noop else []:
        noop[executor] = noop_overhead(executor, args.workers, args.noop)
        print(f"{executor:>10} no-op: start-up {noop[executor]['startup_seconds']:.2f} s, "
              f"{noop[executor]['per_task_ms']:.2f} ms per task", flush=True)
    report(args, command, output, first, headline, breakdown, line, baselines, analyses, scaling, noop)


def report(args, command, output: Path, first: str, headline: str, breakdown: str, line: dict, baselines: dict,
           analyses: list, scaling: dict, noop: dict) -> None:
    """Write the tables and ``benchmark.json`` to ``output``, and print them."""
    (output / "headline.md").write_text(f"{headline}\n{breakdown}\nMade by\n\n```bash\n{command}\n```\n")
    (output / "benchmark.json").write_text(json.dumps(
        {"command": command, "headline": {"pallet": first, "line": line, "baselines": {
            name: {k: v for k, v in data.items() if k not in ("reference", "pool_results")}
            for name, data in baselines.items()}},
         "pallets": analyses, "workers": args.workers, "trials": args.trials, "noop": noop,
         "scaling": scaling, "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}}, indent=1))
    print(f"\n## {first}: pyhf-dist against plain pyhf, {args.workers} workers, this run\n")
    print(headline)
    if breakdown:
        print(breakdown)
    if analyses:
        table1 = write_table1(analyses, args.workers, command)
        ratios = write_ratios(analyses)
        (output / "table1.md").write_text(table1 + "\n" + ratios)
        for analysis in analyses:
            text = write_table(analysis, args.workers) + "\n" + write_overhead_table(analysis, noop)
            (output / f"table-{Path(analysis['name']).name}.md").write_text(text)
            print(f"## {analysis['name']}\n")
            print(text)
        plot(analyses, scaling, output, args.workers)
        print("## Table 1 of the 2021 study, reproduced\n")
        print(table1)
        print("## Each executor against the local pool, in this run\n")
        print(ratios)
    if scaling:
        print("\n## Scaling\n")
        print(write_scaling(scaling, args.workers, os.cpu_count() or 1))
    print(f"Written to {output}/ (headline.md, benchmark.json{', table1.md, table-*.md, table1.png' if analyses else ''}"
          f"{', scaling.png' if scaling else ''})")


if __name__ == "__main__":
    main()
