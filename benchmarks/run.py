"""Benchmark pallets across executors and backends, against plain pyhf and the 2021 study.

    python benchmarks/run.py                              # 1Lbb and stau, every executor that runs here
    python benchmarks/run.py --pallets 1Lbb --executors local,dask --trials 5
    python benchmarks/run.py --backends jax,numpy --scaling

Pallets: ``1Lbb`` (ATLAS 1Lbb, 125 patches), ``stau`` (ATLAS stau, pallet Region-combined, 57
patches), the two analyses of Table 1 of the 2021 funcX study, or any pallet path
(``--pallets path/to/pallet.tar.gz``).

Writes to ``--output`` (default ``benchmarks/output/``): ``table1.md`` (Table 1 of the study
reproduced: wall time mean ± std over trials with ``--workers`` workers, single-worker time,
the study's own figures beside them), ``table-<pallet>.md`` (ratios to plain pyhf, agreement,
per-task breakdown), ``benchmark.json`` (every measurement), ``table1.png`` (bar chart like the
study's Figure 2) and ``scaling.png``.

Measured, per pallet, executor and backend (``globus-engine``: a Globus Compute endpoint engine on
this machine, through ``engine_scan.py``):
* wall time of a whole scan from a cold ``python`` process (imports, pallet, fits, results file),
  over ``--trials`` runs taken in turns across the executors, with a single worker, and
  (``--empty-cache``) once with an empty
  pyhf-dist cache (a fresh machine);
* each executor's wall time over the local pool's, and per-fit compute: the median fit on a
  worker (wall) and the CPU time the worker processes spend per fit (fitting, and what else a
  worker does meanwhile: event loops, heartbeats, monitors);
* agreement with plain pyhf on numpy: max |ΔCLs| over CLs_obs and the five CLs_exp;
* per-task breakdown: queue wait (incl. transfer), compute on the worker, extra cost of each
  worker's first task (setup, compilation), result return; scheduling overhead per task with a
  no-op task, and the executor's start-up time;
and, in the same run, plain pyhf serially and over ``multiprocessing.Pool`` with the same
worker count. ``--scaling``: wall time against workers (1, 2, 4, and up to twice the cores) on the
first pallet, and against patches (stau's 57, 1Lbb's 125, and all four pallets one after another
in one process), fitted as ``wall = scans × fixed cost + patches × cost per patch``, for the
local, Dask and Parsl executors.
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
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import pool_pyhf, serial_pyhf  # noqa: E402

DATA = Path(os.environ.get("PYHF_DIST_DATA", HERE.parent.parent / "shared" / "data"))
CODE4 = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
DEFAULT_EXECUTORS = "sequential,local,dask,slurm,parsl,globus-engine"
SCALING_EXECUTORS = ("local", "dask", "parsl")
STAU_ARCHIVE = DATA / "stau-likelihoods-1911.06660.tar.gz"

#: Table 1 of the 2021 study (funcX on RIVER: wall time mean ± std over trials on 4 nodes, and the
#: single-node time), keyed by our pallet names.
STUDY = {
    "1Lbb": {"analysis": "ATLAS 1Lbb (Eur. Phys. J. C 80 (2020) 691)", "patches": 125,
             "wall": 156.2, "std": 9.5, "single": 3842},
    "stau": {"analysis": "ATLAS stau (Phys. Rev. D 101 (2020) 032009), Region-combined", "patches": 57,
             "wall": 57.4, "std": 5.2, "single": 612},
}


def stau_source(region: str = "Region-combined") -> str:
    """A directory holding one pallet of the stau archive, extracted once to a cache directory.

    The one place that knows how the stau pallet is read: when ``load_pallet`` takes ``pallet=``,
    this becomes ``(archive, region)``.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyhf-dist-benchmarks"
    target = cache / "1911.06660" / region
    if not (target / "patchset.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(STAU_ARCHIVE) as archive:
            members = [m for m in archive.getmembers()
                       if m.isfile() and f"/{region}/" in m.name and not Path(m.name).name.startswith("._")]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(cache, members=members, **safe)
    return str(target)


def pallet_sources(name: str) -> list[str]:
    """The sources ``one_scan.py`` reads for a pallet name of this benchmark (or a path)."""
    if name == "1Lbb":
        return [str(DATA / "1Lbb-likelihoods-hepdata.tar.gz")]
    if name == "stau":
        return [stau_source("Region-combined")]
    if name == "all":  # every published pallet here, one after another
        return [*pallet_sources("1Lbb"), *(stau_source(region) for region in
                                           ("Region-combined", "Region-lowMass", "Region-highMass"))]
    return [name]


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


def cold_scan(sources: list[str], executor: str, workers: int, backend: str | None, patches: int | None,
              empty_cache: bool = False) -> dict:
    """One scan (or one scan per source, in one process) in a fresh process; ``empty_cache``: as the
    first run on a fresh machine (nothing compiled or checked before, see ``pyhf_dist.cache``)."""
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
    """Largest |ΔCLs| over CLs_obs and the five CLs_exp of every patch in ``reference``."""
    worst = 0.0
    for name, (ref_observed, ref_expected) in reference.items():
        if name not in results:
            continue
        observed, expected = results[name]
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


def load_or_measure_baselines(name: str, pallet, workers: int, mode: str, output: Path,
                              serial_patches: int | None, pool_patches: int | None) -> dict:
    """Plain pyhf over ``multiprocessing.Pool`` (also the CLs reference: the same single-threaded
    pyhf computation as a serial loop) and plain serial pyhf, timed; on the first ``pool_patches``
    and ``serial_patches`` patches when given (times then scaled to all, and labelled)."""
    key = hashlib.sha256(("\n".join(pallet.names()) + name).encode()).hexdigest()[:12]
    cache = output / f"baselines-{key}-w{workers}-p{pool_patches or 'all'}-s{serial_patches or 'all'}.json"
    if mode == "cached" and cache.exists():
        return json.loads(cache.read_text())

    def first(count):
        if count and count < len(pallet):
            return type(pallet)(pallet.workspace, pallet.patches[:count], pallet.labels, pallet.source)
        return pallet

    pool_subset, serial_subset = first(pool_patches), first(serial_patches)
    print(f"{name}: plain pyhf over multiprocessing.Pool({workers}), {len(pool_subset)} patches "
          "(numpy; the slow part)...", flush=True)
    reference, pool_seconds = pool_pyhf(pool_subset, CODE4, workers)
    print(f"  {pool_seconds:.1f} s", flush=True)
    print(f"{name}: plain pyhf, serial, {len(serial_subset)} patches...", flush=True)
    serial, serial_seconds = serial_pyhf(serial_subset, CODE4)
    print(f"  {serial_seconds:.1f} s", flush=True)
    data = {"reference": reference, "workers": workers,
            "pool_seconds": pool_seconds * len(pallet) / len(pool_subset),
            "pool_estimated_from": len(pool_subset) if len(pool_subset) < len(pallet) else None,
            "serial_seconds": serial_seconds * len(pallet) / len(serial_subset),
            "serial_estimated_from": len(serial_subset) if len(serial_subset) < len(pallet) else None,
            "pool_max_difference": max_difference(serial, reference)}
    cache.write_text(json.dumps(data))
    return data


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def measure_pallet(name: str, args, executors: list[str], backends: list) -> dict:
    """Every executor and backend on one pallet: trials, single worker, empty cache; baselines."""
    import pyhf_dist

    sources = pallet_sources(name)
    pallet = pyhf_dist.load_pallet(sources[0], validate=False)
    if args.patches:
        pallet.patches = pallet.patches[: args.patches]
    baselines = load_or_measure_baselines(name, pallet, args.workers, args.baselines, Path(args.output),
                                          args.serial_patches, args.pool_patches)
    reference = baselines["reference"]
    combinations = [(executor, backend) for executor in executors for backend in backends]
    # Trials go round the executors (local, dask, slurm, local, dask, ...): a stretch of time when
    # the shared machine is slower then weighs on every executor, not on one of them.
    runs: dict[tuple, list[dict]] = {combination: [] for combination in combinations}
    for trial in range(args.trials):
        for executor, backend in combinations:
            run = cold_scan(sources, executor, args.workers, backend, args.patches)
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
            first = cold_scan(sources, executor, args.workers, backend, args.patches, empty_cache=True)
            print(f"{name:>6} {executor:>13} {first['backend']:>5} empty cache: {first['wall_seconds']:7.2f} s",
                  flush=True)
        single = None
        if executor != "sequential":
            single = cold_scan(sources, executor, 1, backend, args.patches)["wall_seconds"]
            print(f"{name:>6} {executor:>13} {trials[0]['backend']:>5} 1 worker: {single:7.2f} s", flush=True)
        rows.append({
            "executor": executor, "backend": trials[0]["backend"], "walls": [r["wall_seconds"] for r in trials],
            "first_run": first["wall_seconds"] if first else None, "single_worker": single,
            "runs": [{k: v for k, v in r.items() if k != "results"} for r in trials],
            "max_difference": max(max_difference(r["results"], reference) for r in trials),
        })
    baselines = {k: v for k, v in baselines.items() if k != "reference"}
    baselines["compared_patches"] = len(reference)
    return {"name": name, "sources": sources, "patches": len(pallet), "rows": rows, "baselines": baselines}


def write_table(analysis: dict, workers: int) -> str:
    """One pallet's table: wall times, ratios to plain pyhf, agreement."""
    baselines, patches = analysis["baselines"], analysis["patches"]
    lines = [
        f"| executor | backend | patches | wall time (s), {workers} workers | first run, empty cache (s) "
        f"| single worker (s) | × faster than plain pyhf Pool({workers}) | × faster than serial pyhf | max abs ΔCLs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in analysis["rows"]:
        mean = statistics.mean(row["walls"])
        single = "–" if row["single_worker"] is None else f"{row['single_worker']:.1f}"
        first = "–" if row.get("first_run") is None else f"{row['first_run']:.1f}"
        lines.append(
            f"| {row['executor']} | {row['backend']} | {patches} | {mean_std(row['walls'])} | {first} | {single} "
            f"| {baselines['pool_seconds'] / mean:.1f} | {baselines['serial_seconds'] / mean:.1f} "
            f"| {row['max_difference']:.1e} |"
        )
    pool = baselines.get("pool_estimated_from")
    serial = baselines.get("serial_estimated_from")
    lines.append(
        f"| plain pyhf, multiprocessing.Pool({workers}) | numpy | {patches} | {baselines['pool_seconds']:.1f}"
        f"{' (est.)' if pool else ''} | – | {baselines['serial_seconds']:.0f}{' (est.)' if serial else ''} | 1.0 "
        f"| {baselines['serial_seconds'] / baselines['pool_seconds']:.1f} | {baselines['pool_max_difference']:.1e} |"
    )
    note = ("\nWall time: from a cold `python` process to the results file, with the machine's cache "
            "(compiled likelihood, checks already passed) from earlier runs; *first run, empty cache*: the "
            "same with an empty cache, as on a fresh machine. ΔCLs: against plain pyhf on numpy, over the "
            f"{baselines['compared_patches']} patches it was run on.\n")
    if pool:
        note += f"Plain pyhf over the Pool was timed on the first {pool} patches and scaled to {patches}.\n"
    if serial:
        note += f"Plain serial pyhf was timed on the first {serial} patches and scaled to {patches}.\n"
    return "\n".join(lines) + "\n" + note


def write_table1(analyses: list[dict], workers: int, command: str) -> str:
    """Table 1 of the 2021 study, reproduced: every executor, both analyses, the study beside them."""
    lines = [
        f"| analysis | patches | executor | wall time (s), {workers} workers | single worker (s) |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for analysis in analyses:
        study = STUDY.get(analysis["name"])
        label = study["analysis"] if study else analysis["name"]
        for row in analysis["rows"]:
            single = "–" if row["single_worker"] is None else f"{row['single_worker']:.1f}"
            name = row["executor"] if row["backend"] == "jax" else f"{row['executor']} ({row['backend']})"
            lines.append(f"| {label} | {analysis['patches']} | {name} | {mean_std(row['walls'])} | {single} |")
        if study:
            lines.append(f"| {label} | {study['patches']} | *2021 study: funcX, 4 nodes / 1 node* "
                         f"| *{study['wall']} ± {study['std']}* | *{study['single']}* |")
    return ("\n".join(lines) + "\n\n"
            f"Wall time mean ± std over trials, from a cold `python` process to the results file, on this "
            f"machine ({os.cpu_count()} cores); the study's figures are its Table 1 (RIVER cluster: "
            "4 nodes, and a single node). Made by\n\n```bash\n" + command + "\n```\n")


def write_ratios(analyses: list[dict]) -> str:
    """Each executor against the local pool, measured in the same run: wall time and per-fit compute."""
    lines = [
        "| pallet | executor | wall / local | median fit on a worker (ms) | fit / local "
        "| worker CPU per fit (ms) | CPU / local | client CPU per fit (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for analysis in analyses:
        by_name = {(row["executor"], row["backend"]): row for row in analysis["rows"]}
        for row in analysis["rows"]:
            local = by_name.get(("local", row["backend"]))

            def typical(r, key):
                values = [run.get(key) for run in r["runs"] if run.get(key) is not None]
                return statistics.median(values) if values else None

            def ratio(a, b):
                return f"{a / b:.2f}" if a is not None and b else "–"

            def ms(value):
                return f"{value * 1000:.1f}" if value is not None else "–"

            wall = statistics.mean(row["walls"])
            local_wall = statistics.mean(local["walls"]) if local else None
            fit, cpu = typical(row, "compute_median_seconds"), typical(row, "worker_cpu_per_fit")
            local_fit = typical(local, "compute_median_seconds") if local else None
            local_cpu = typical(local, "worker_cpu_per_fit") if local else None
            lines.append(
                f"| {analysis['name']} | {row['executor']} | {ratio(wall, local_wall)} | {ms(fit)} | {ratio(fit, local_fit)} "
                f"| {ms(cpu)} | {ratio(cpu, local_cpu)} | {ms(typical(row, 'client_cpu_per_fit'))} |"
            )
    return ("\n".join(lines) + "\n\nWorker CPU per fit: CPU time of all worker processes between the first "
            "tenth of the results and the last, over the fits in between (for `sequential`, the one process).\n")


def write_overhead_table(analysis: dict, noop: dict) -> str:
    """Per-task breakdown (means, seconds) and the no-op scheduling overhead per executor."""
    lines = [
        "| executor | backend | queue wait + transfer | compute | first task extra (setup, compile) "
        "| result return | executor start-up | no-op task overhead |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in analysis["rows"]:
        last = row["runs"][-1]
        overhead = noop.get(row["executor"], {})
        startup = f"{overhead['startup_seconds']:.2f} s" if overhead else "–"
        per_task = f"{overhead['per_task_ms']:.2f} ms" if overhead else "–"
        lines.append(
            f"| {row['executor']} | {row['backend']} | {last['queue_wait_seconds']:.3f} s | {last['compute_seconds']:.3f} s "
            f"| {last['first_task_extra_seconds']:.3f} s | {last['return_seconds'] * 1000:.1f} ms | {startup} | {per_task} |"
        )
    return "\n".join(lines) + "\n"


def linear_fit(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares of ``wall = scans × fixed + patches × per_patch`` through ``(scans, patches, wall)``."""
    s11 = sum(s * s for s, _, _ in points)
    s12 = sum(s * p for s, p, _ in points)
    s22 = sum(p * p for _, p, _ in points)
    b1 = sum(s * w for s, _, w in points)
    b2 = sum(p * w for _, p, w in points)
    determinant = s11 * s22 - s12 * s12
    return (b1 * s22 - b2 * s12) / determinant, (s11 * b2 - s12 * b1) / determinant


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
            sources = [source for name in names for source in pallet_sources(name)]
            runs = [cold_scan(sources, executor, args.workers, None, None) for _ in range(args.trials)]
            walls = [run["wall_seconds"] for run in runs]
            entry["patches"][label] = {"patches": runs[0]["patches"], "scans": len(sources), "walls": walls}
            points += [(len(sources), runs[0]["patches"], wall) for wall in walls]
            print(f"scaling {executor:>6}: {label} ({runs[0]['patches']} patches, {len(sources)} scans) "
                  f"{mean_std(walls)} s", flush=True)
        entry["fixed_seconds"], entry["per_patch_seconds"] = linear_fit(points)
    return scaling


def write_scaling(scaling: dict, workers: int, cores: int) -> str:
    lines = []
    for executor, entry in scaling.items():
        by_workers = ", ".join(f"{n}: {mean_std(walls)}" for n, walls in entry["workers"].items())
        by_patches = ", ".join(f"{label} ({data['patches']}): {mean_std(data['walls'])}"
                               for label, data in entry["patches"].items())
        lines.append(f"- **{executor}**: by workers ({cores} cores) {by_workers} s; by patches ({workers} workers) "
                     f"{by_patches} s; fit: {entry['fixed_seconds']:.2f} s fixed per scan + "
                     f"{entry['per_patch_seconds'] * 1000:.0f} ms per patch")
    return "\n".join(lines) + ("\n\n'all pallets': 1Lbb and the three stau pallets scanned one after another in one "
                               "process (four scans); the fit is wall = scans × fixed + patches × per patch.\n")


def plot(analyses: list[dict], scaling: dict, output: Path, workers: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install "pyhf-dist[plot]"): no figures', flush=True)
        return
    # Like Figure 2 of the study: per analysis, the wall time of each executor (and the study's).
    figure, axes = plt.subplots(1, len(analyses), figsize=(6 * len(analyses), 4.5), squeeze=False)
    for axis, analysis in zip(axes[0], analyses):
        study = STUDY.get(analysis["name"])
        labels = [row["executor"] for row in analysis["rows"]]
        means = [statistics.mean(row["walls"]) for row in analysis["rows"]]
        errors = [statistics.stdev(row["walls"]) if len(row["walls"]) > 1 else 0 for row in analysis["rows"]]
        singles = [row["single_worker"] or 0 for row in analysis["rows"]]
        colors = ["tab:blue"] * len(labels)
        if study:
            labels.append("2021 study\n(funcX)")
            means.append(study["wall"])
            errors.append(study["std"])
            singles.append(study["single"])
            colors.append("tab:gray")
        positions = range(len(labels))
        axis.bar([p - 0.2 for p in positions], means, width=0.4, yerr=errors, capsize=3, color=colors,
                 label=f"{workers} workers (study: 4 nodes)")
        axis.bar([p + 0.2 for p in positions], singles, width=0.4, color=colors, alpha=0.4, hatch="//",
                 label="single worker (study: 1 node)")
        axis.set_xticks(list(positions), labels, fontsize=8, rotation=30)
        axis.set_yscale("log")
        axis.set_ylabel("wall time [s]")
        axis.set_title(f"{analysis['name']}: {analysis['patches']} patches")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output / "table1.png", dpi=120)
    if scaling:
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for executor, entry in scaling.items():
            counts = list(entry["workers"])
            left.errorbar(counts, [statistics.mean(w) for w in entry["workers"].values()],
                          yerr=[statistics.stdev(w) if len(w) > 1 else 0 for w in entry["workers"].values()],
                          marker="o", label=executor, capsize=3)
            data = list(entry["patches"].values())
            right.errorbar([d["patches"] for d in data], [statistics.mean(d["walls"]) for d in data],
                           yerr=[statistics.stdev(d["walls"]) if len(d["walls"]) > 1 else 0 for d in data],
                           marker="o", linestyle="", label=executor, capsize=3)
        left.set_xlabel(f"workers ({os.cpu_count()} cores)")
        left.set_ylabel("wall time [s]")
        left.set_title(f"{analyses[0]['name']}, all patches")
        right.set_xlabel("patches (stau; 1Lbb; all four pallets, one after another)")
        right.set_title(f"{workers} workers")
        for axis in (left, right):
            axis.set_ylim(bottom=0)
            axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(output / "scaling.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pallets", default="1Lbb,stau", help="comma list: 1Lbb, stau, or pallet paths")
    parser.add_argument("--executors", default=DEFAULT_EXECUTORS)
    parser.add_argument("--backends", default="default", help="comma list of jax, numpy, default")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--patches", type=int, default=None, help="only the first N patches")
    parser.add_argument("--baselines", choices=["measure", "cached"], default="cached",
                        help="cached: reuse plain-pyhf timings and reference from an earlier run if present")
    parser.add_argument("--pool-patches", type=int, default=None,
                        help="time plain pyhf over the Pool (the CLs reference) on only the first N patches, "
                             "and scale to all (labelled)")
    parser.add_argument("--serial-patches", type=int, default=None,
                        help="time plain serial pyhf on only the first N patches and scale to all (labelled)")
    parser.add_argument("--empty-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each executor once with an empty pyhf-dist cache (a fresh machine)")
    parser.add_argument("--noop", type=int, default=200, help="no-op tasks per executor (0: skip)")
    parser.add_argument("--scaling", action="store_true",
                        help="also run the scaling study (local, dask, parsl; mean of --trials runs per point)")
    parser.add_argument("--output", default=str(HERE / "output"))
    args = parser.parse_args()
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    executors = [name for name in args.executors.split(",") if name]
    if "slurm" in executors and not slurm_is_up():
        print("Slurm is not running (executors/slurm/start-slurm.sh starts it): skipping slurm", flush=True)
        executors.remove("slurm")
    if "globus-engine" in executors and importlib.util.find_spec("globus_compute_endpoint") is None:
        print("globus-compute-endpoint is not installed (pip install globus-compute-endpoint): skipping globus-engine",
              flush=True)
        executors.remove("globus-engine")
    backends = [None if name == "default" else name for name in args.backends.split(",")]
    pallets = [name for name in args.pallets.split(",") if name]

    analyses = [measure_pallet(name, args, executors, backends) for name in pallets]

    # Before the no-op study: Slurm and Parsl workers it stops may take seconds to exit.
    scaling = measure_scaling(args, pallets[0], executors) if args.scaling else {}

    noop = {}
    # The engine row has no pyhf-dist executor in front of it to time no-op tasks through.
    for executor in [name for name in executors if name != "globus-engine"] if args.noop else []:
        noop[executor] = noop_overhead(executor, args.workers, args.noop)
        print(f"{executor:>10} no-op: start-up {noop[executor]['startup_seconds']:.2f} s, "
              f"{noop[executor]['per_task_ms']:.2f} ms per task", flush=True)

    table1 = write_table1(analyses, args.workers, command)
    ratios = write_ratios(analyses)
    (output / "table1.md").write_text(table1 + "\n" + ratios)
    for analysis in analyses:
        text = write_table(analysis, args.workers) + "\n" + write_overhead_table(analysis, noop)
        (output / f"table-{Path(analysis['name']).name}.md").write_text(text)
    (output / "benchmark.json").write_text(json.dumps(
        {"command": command, "pallets": analyses, "workers": args.workers, "trials": args.trials, "noop": noop,
         "scaling": scaling, "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}}, indent=1))
    plot(analyses, scaling, output, args.workers)

    print()
    for analysis in analyses:
        print(f"## {analysis['name']}\n")
        print(write_table(analysis, args.workers))
        print(write_overhead_table(analysis, noop))
    print("## Table 1 of the 2021 study, reproduced\n")
    print(table1)
    print("## Each executor against the local pool, in this run\n")
    print(ratios)
    for analysis in analyses:
        by_name = {row["executor"]: statistics.mean(row["walls"]) for row in analysis["rows"]}
        if "local" in by_name:
            print(f"{analysis['name']}: " + ", ".join(
                f"{name}/local {wall / by_name['local']:.2f}" for name, wall in by_name.items() if name != "local"))
    if scaling:
        print("\n## Scaling\n")
        print(write_scaling(scaling, args.workers, os.cpu_count() or 1))
    print(f"Written to {output}/ (table1.md, table-*.md, benchmark.json, table1.png"
          f"{', scaling.png' if scaling else ''})")


if __name__ == "__main__":
    main()
