"""Scale: many signal points, and a client that must feed many workers.

Three measurements, each configuration in a fresh Python process (a cold client, its own peak RSS):

* ``table``: a synthetic pallet of ``--points`` signal points (1 channel x 3 bins; each point adds a
  signal sample with a normfactor and a normsys), fitted on ``--workers`` workers by the patch route
  (a patchset of that many patches) and by the signals route (a CSV of yields and a template), on
  the local executor and on Dask. With ``--before PATH`` the patch route also runs the code at PATH
  (a checkout of an earlier version). Wall time, client CPU and peak RSS, worker CPU per point.
* ``noop``: the same scans with no-op fits (a worker returns at once): client CPU per point,
  what the scan loop itself costs.
* ``simulate``: no-op fits on simulated workers, for each count in ``--simulated``: Dask (a
  scheduler process, and every worker a single-threaded ``distributed.Worker`` in one other
  process) and Parsl's HighThroughputExecutor (one pool of that many worker processes). Client
  and scheduler CPU per point and points per second; the worker count at which the client or the
  scheduler saturates, extrapolated for fits of 50 ms (1Lbb-sized) and 1 ms: ``fit seconds /
  max(client, scheduler CPU seconds per point)`` (each does its per-point work on one core).

Results go to ``--out`` (JSON, a Markdown table, and a plot with matplotlib)::

    python benchmarks/scale.py table --points 20000
    python benchmarks/scale.py noop --points 20000
    python benchmarks/scale.py simulate --simulated 16,64,256,1024 --points 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FITS = {"1Lbb-sized (50 ms)": 0.050, "small (1 ms)": 0.001}


# ------------------------------------------------------------------------------ the inputs


def background() -> dict:
    """1 channel x 3 bins: background with a normsys and MC statistics, POI ``mu_SIG``."""
    data = [52.0, 27.0, 11.0]
    return {
        "version": "1.0.0",
        "channels": [{"name": "SR", "samples": [{"name": "bkg", "data": data, "modifiers": [
            {"name": "bkg_norm", "type": "normsys", "data": {"hi": 1.1, "lo": 0.9}},
            {"name": "staterror_SR", "type": "staterror", "data": [1.5, 1.1, 0.7]}]}]}],
        "observations": [{"name": "SR", "data": [55.0, 24.0, 13.0]}],
        "measurements": [{"name": "meas", "config": {"poi": "mu_SIG", "parameters": []}}],
    }


def yields(index: int) -> list[float]:
    scale = 0.5 + (index % 997) / 50.0
    return [round(scale * share, 6) for share in (0.2, 0.35, 0.45)]


def write_inputs(folder: Path, points: int) -> dict:
    """BkgOnly.json, patchset.json (the patch route) and yields.csv + template.json (the signals
    route), for the same points."""
    import pyhf

    folder.mkdir(parents=True, exist_ok=True)
    workspace = background()
    (folder / "BkgOnly.json").write_text(json.dumps(workspace))
    normsys = {"name": "sig_xsec", "hi": 1.15, "lo": 0.85}
    patches = []
    with open(folder / "yields.csv", "w") as csv:
        csv.write("name,m1,m2,SR[0],SR[1],SR[2]\n")
        for index in range(points):
            m1, m2, signal = 100 + index // 200, index % 200, yields(index)
            name = f"p_{m1}_{m2}"
            csv.write(f"{name},{m1},{m2},{signal[0]},{signal[1]},{signal[2]}\n")
            patches.append({"metadata": {"name": name, "values": [m1, m2]}, "patch": [{
                "op": "add", "path": "/channels/0/samples/1", "value": {"name": "signal", "data": signal, "modifiers": [
                    {"name": "mu_SIG", "type": "normfactor", "data": None},
                    {"name": "sig_xsec", "type": "normsys", "data": {"hi": 1.15, "lo": 0.85}}]}}]})
    patchset = {"metadata": {"name": "scale", "description": "synthetic", "labels": ["m1", "m2"],
                             "digests": {"sha256": pyhf.utils.digest(workspace)},
                             "references": {"hepdata": "ins0000000"}}, "version": "1.0.0", "patches": patches}
    (folder / "patchset.json").write_text(json.dumps(patchset))
    (folder / "template.json").write_text(json.dumps({"normsys": normsys}))
    return {"folder": str(folder), "points": points}


# ------------------------------------------------------------------- one configuration


def _usage() -> tuple[float, float, float]:
    """CPU seconds of this process and of its waited-for children, and this process's peak RSS in MB."""
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime, children.ru_utime + children.ru_stime, _peak_rss_mb()


def _peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child started by a large
    # parent would report the parent's peak.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def noop_executor(runner):
    """``runner`` with every task made a no-op (the worker returns at once): what is left is the
    executor's and the scan's own cost per point."""
    original = runner.submit
    runner.tasks_submitted = 0

    def submit(task):
        for each in task["tasks"] if task.get("kind") == "pack" else [task]:
            each["kind"] = "noop"
        runner.tasks_submitted += 1
        return original(task)

    runner.submit = submit
    return runner


def run_one(config: dict) -> dict:
    """One scan, in this (fresh) process; returns its figures."""
    import pyhf_dist
    from pyhf_dist.executors import get_executor

    folder = Path(config["folder"])
    marks = {}
    began, (cpu0, _, _) = time.monotonic(), _usage()
    options = dict(backend=config.get("backend"), progress=False, journal=folder / f"j-{os.getpid()}.jsonl",
                   on_start=lambda info: marks.setdefault("start", (time.monotonic(), _usage()[0])))
    runner = config["executor"]
    options_executor = {"workers": config["workers"]} if isinstance(runner, str) else {}
    if config.get("noop"):
        runner = noop_executor(get_executor(runner, **config.get("executor_options", {"workers": config["workers"]})))
        options_executor = {}
    if config["route"] == "signals":
        source = dict(workspace=folder / "BkgOnly.json", signals=folder / "yields.csv", template=folder / "template.json")
    else:
        source = dict(workspace=folder / "BkgOnly.json", patchset=folder / "patchset.json")
    try:
        result = pyhf_dist.map_fits(executor=runner, **source, **options, **options_executor)
    finally:
        if not isinstance(runner, str):
            runner.shutdown()
    wall, (cpu1, children, rss) = time.monotonic() - began, _usage()
    options["journal"].unlink(missing_ok=True)  # every record is in the result
    points = len(result)
    fit = [record.fit_seconds for record in result if record.fit_seconds is not None]
    start_wall, start_cpu = marks.get("start", (began, cpu0))
    return {
        **{key: value for key, value in config.items() if key != "folder"},
        "points": points, "failed": len(result.failed()), "wall_s": round(wall, 2),
        "loop_wall_s": round(time.monotonic() - start_wall, 2),
        "client_cpu_ms_per_point": round(1e3 * (cpu1 - cpu0) / points, 4),
        "loop_cpu_ms_per_point": round(1e3 * (cpu1 - start_cpu) / points, 4),
        "worker_fit_ms_per_point": round(1e3 * sum(fit) / max(len(fit), 1), 3),
        "children_cpu_ms_per_point": round(1e3 * children / points, 3) if children else None,
        "client_peak_rss_mb": round(rss, 1),
        "engines": result.engines() if hasattr(result, "engines") else None,
    }


def in_fresh_process(config: dict, code: str | None = None, timeout: float = 1800, mode: str = "one") -> dict:
    """:func:`run_one` (or :func:`simulate_one`) in a new interpreter (``code``: a checkout whose
    pyhf_dist to import)."""
    environment = dict(os.environ)
    if code:
        environment["PYTHONPATH"] = str(code) + os.pathsep + environment.get("PYTHONPATH", "")
    command = [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(config)]
    run = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    if run.returncode != 0:
        return {**config, "error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------- simulated workers


def serve_scheduler(address_file: str) -> None:
    """A Dask scheduler, on its own process (its CPU is measured from outside)."""
    import asyncio

    from distributed import Scheduler

    async def main():
        async with Scheduler(port=0, dashboard=False) as scheduler:
            Path(address_file).write_text(scheduler.address)
            await scheduler.finished()

    asyncio.run(main())


def serve_workers(address: str, count: int) -> None:
    """``count`` single-threaded Dask workers in this one process: simulated workers."""
    import asyncio

    from distributed import Worker

    async def main():
        workers = [Worker(address, nthreads=1, memory_limit=0, dashboard=False) for _ in range(count)]
        await asyncio.gather(*(worker.start() for worker in workers))
        while True:
            await asyncio.sleep(3600)

    asyncio.run(main())


def _cpu(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _interchange() -> int | None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if any("interchange" in part for part in child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def packed(runner, seconds: float = 0.25):
    """``runner`` packing short fits several to a task, as the clusters pyhf-dist starts do."""
    runner.__class__ = type(f"Packed{type(runner).__name__}", (type(runner),), {"pack_seconds": seconds})
    return runner


def simulate_one(config: dict) -> dict:
    """A no-op scan on simulated workers (in this fresh process): client and scheduler CPU."""
    import pyhf_dist
    from pyhf_dist.executors import get_executor

    folder, workers = Path(config["folder"]), config["workers"]
    if config["executor"] == "dask":
        runner = get_executor("dask", address=config["address"])
        runner.workers = workers  # known here: what packing sizes its tasks by
        scheduler = config["scheduler_pid"]
    else:
        runner = get_executor("parsl", workers=workers, run_dir=str(folder / f"parsl-{workers}"))
        scheduler = None
    runner = noop_executor(packed(runner) if config.get("packed") else runner)
    marks = {}

    def started(info):
        pid = scheduler or _interchange()
        marks.update(wall=time.monotonic(), cpu=_usage()[0], pid=pid, scheduler=_cpu(pid) if pid else None)

    try:
        result = pyhf_dist.map_fits(folder / "BkgOnly.json", signals=folder / "yields.csv",
                                    template=folder / "template.json", executor=runner, backend="numpy",
                                    journal=folder / f"sim-{os.getpid()}.jsonl", on_start=started)
        wall, cpu = time.monotonic() - marks["wall"], _usage()[0] - marks["cpu"]
        scheduler_cpu = _cpu(marks["pid"]) - marks["scheduler"] if marks.get("pid") else None
    finally:
        runner.shutdown()
    points = len(result)
    return {**{key: value for key, value in config.items() if key not in ("folder", "address", "scheduler_pid")},
            "points": points, "failed": len(result.failed()), "loop_wall_s": round(wall, 2),
            "points_per_task": round(points / max(runner.tasks_submitted, 1), 2), "points_per_s": round(points / wall, 1), "client_cpu_ms_per_point": round(1e3 * cpu / points, 4),
            "scheduler_cpu_ms_per_point": round(1e3 * scheduler_cpu / points, 4) if scheduler_cpu is not None else None}


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def simulate_dask(folder: Path, workers: int, packing: bool) -> dict:
    """Start a scheduler and ``workers`` simulated workers, scan on them, stop them."""
    address_file = folder / f"scheduler-{workers}.txt"
    address_file.unlink(missing_ok=True)
    scheduler = _spawn("scheduler", str(address_file))
    pool = None
    try:
        deadline = time.monotonic() + 60
        while not address_file.exists() or not address_file.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the Dask scheduler did not start")
            time.sleep(0.1)
        address = address_file.read_text()
        pool = _spawn("workers", address, str(workers))
        from distributed import Client

        with Client(address, timeout=60) as client:
            began = time.monotonic()
            joined = _wait_for_workers(client, workers)
            up = time.monotonic() - began
        config = {"executor": "dask", "workers": joined, "packed": packing, "folder": str(folder),
                  "address": address, "scheduler_pid": scheduler.pid}
        result = in_fresh_process(config, mode="simulate")
        return {**result, "workers_up_s": round(up, 1)}
    finally:
        for process in (pool, scheduler):
            if process is not None:
                process.kill()
                process.wait()


def _wait_for_workers(client, workers: int, patience: float = 90.0, limit: float = 900.0) -> int:
    """How many of ``workers`` joined: all, or as many as there are once no more joined for
    ``patience`` seconds (on a loaded machine a few of a thousand in-process workers time out)."""
    began = last_change = time.monotonic()
    joined = 0
    while joined < workers and (joined == 0 or time.monotonic() - last_change < patience) \
            and time.monotonic() - began < limit:
        now = len(client.scheduler_info(n_workers=-1)["workers"])
        if now != joined:
            joined, last_change = now, time.monotonic()
        time.sleep(1.0)
    return joined


def simulate_parsl(folder: Path, workers: int, packing: bool) -> dict:
    config = {"executor": "parsl", "workers": workers, "packed": packing, "folder": str(folder)}
    return in_fresh_process(config, mode="simulate")


def saturation(row: dict) -> dict:
    """Workers at which the client (or the scheduler) has no time left at the measured task size:
    fit seconds per point over the CPU seconds each spends per point."""
    busiest = max(row.get("client_cpu_ms_per_point") or 0, row.get("scheduler_cpu_ms_per_point") or 0) / 1e3
    return {label: (round(seconds / busiest) if busiest else None) for label, seconds in FITS.items()}


def cost_model(rows: list[dict], pack_seconds: float = 0.25) -> list[dict]:
    """Per executor and worker count, CPU per point = per point + per task / points per task, from
    the run with one point per task and the packed run; then the saturating worker count for each
    fit size with tasks of ``pack_seconds`` of fits (what the scan packs on a large scan), and
    with one point per task."""
    model = []
    keys = sorted({(row["executor"], row["workers"]) for row in rows if "error" not in row})
    for executor, workers in keys:
        pair = {row.get("packed"): row for row in rows
                if "error" not in row and (row["executor"], row["workers"]) == (executor, workers)}
        if set(pair) != {False, True} or pair[True]["points_per_task"] <= 1.05:
            continue
        entry = {"executor": executor, "workers": workers}
        for part in ("client", "scheduler"):
            single, packed_cost = (pair[flag][f"{part}_cpu_ms_per_point"] for flag in (False, True))
            per_task = max(0.0, (single - packed_cost) / (1 - 1 / pair[True]["points_per_task"]))
            entry[f"{part}_ms_per_task"] = round(per_task, 4)
            entry[f"{part}_ms_per_point"] = round(max(0.0, single - per_task), 4)
        for label, seconds in FITS.items():
            for size_label, size in (("packed", max(1.0, pack_seconds / seconds)), ("1/task", 1.0)):
                busiest = max(entry[f"{part}_ms_per_point"] + entry[f"{part}_ms_per_task"] / size
                              for part in ("client", "scheduler")) / 1e3
                entry[f"{label}, {size_label}"] = round(seconds / busiest) if busiest else None
        model.append(entry)
    return model


# ------------------------------------------------------------------------ tables and plot

COLUMNS = {
    "table": ["code", "route", "executor", "points", "failed", "wall_s", "worker_fit_ms_per_point",
              "children_cpu_ms_per_point", "client_cpu_ms_per_point", "loop_cpu_ms_per_point", "client_peak_rss_mb"],
    "simulate": ["executor", "packed", "workers", "points", "points_per_task", "workers_up_s", "points_per_s", "client_cpu_ms_per_point",
                 "scheduler_cpu_ms_per_point", *FITS],
}


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [row.get("error", "") if column == "failed" and "error" in row else row.get(column, "")
                 for column in columns]
        lines.append("| " + " | ".join("" if cell is None else str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], model: list[dict], path: Path) -> None:
    """Points per second sustained, and the saturating worker count of the cost model, per executor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = sorted({(row["executor"], row.get("packed")) for row in rows if "error" not in row})
    for executor, packing in series:
        chosen = sorted((row for row in rows if (row["executor"], row.get("packed")) == (executor, packing)
                         and "error" not in row), key=lambda row: row["workers"])
        label = f"{executor}{' packed' if packing else ', one point per task'}"
        counts = [row["workers"] for row in chosen]
        left.plot(counts, [row["points_per_s"] for row in chosen], "o-", label=label)
    for executor in sorted({entry["executor"] for entry in model}):
        chosen = [entry for entry in model if entry["executor"] == executor]
        for column, style in (("1Lbb-sized (50 ms), packed", "o-"), ("1Lbb-sized (50 ms), 1/task", "s--"),
                              ("small (1 ms), packed", "^:")):
            right.plot([entry["workers"] for entry in chosen], [entry[column] for entry in chosen], style,
                       label=f"{executor}: {column}")
    for axis, title in ((left, "no-op points per second sustained"), (right, "workers at which client/scheduler saturate")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("simulated workers")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    right.axhline(1000, color="grey", lw=0.8)
    left.legend(fontsize=7)
    right.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["table", "noop", "simulate", "report", "one", "scheduler", "workers"])
    parser.add_argument("arguments", nargs="*")
    parser.add_argument("--points", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--executors", default="local,dask")
    parser.add_argument("--routes", default="patches,signals")
    parser.add_argument("--before", help="a checkout of the earlier code: the patch route also runs it")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--simulated", default="16,64,256,1024")
    parser.add_argument("--simulators", default="dask,parsl")
    parser.add_argument("--packing", choices=["both", "one", "packed"], default="both",
                        help="simulated runs with one point per task, packed tasks, or both")
    parser.add_argument("--parsl-max", type=int, default=64, help="most Parsl worker processes to start")
    parser.add_argument("--out", default=str(HERE / "output" / "scale"))
    args = parser.parse_args(argv)
    if args.section in ("one", "simulate") and args.arguments:
        config = json.loads(args.arguments[0])
        print(json.dumps(run_one(config) if args.section == "one" else simulate_one(config)))
        return
    if args.section == "scheduler":
        return serve_scheduler(args.arguments[0])
    if args.section == "workers":
        return serve_workers(args.arguments[0], int(args.arguments[1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.section == "report":  # simulated-worker runs made apart (JSON files), in one table
        rows = [row for path in args.arguments for row in json.loads(Path(path).read_text())]
        return report(rows, out / "scale-simulate")
    folder = out / f"inputs-{args.points}"
    if not (folder / "yields.csv").exists():
        write_inputs(folder, args.points)
    rows = run_section(args, folder)
    name = f"scale-{args.section}-{args.points}"
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    if args.section == "simulate":
        return report(rows, out / name)
    table = markdown(rows, COLUMNS["table"])
    (out / f"{name}.md").write_text(table + "\n")
    print(table)


def report(rows: list[dict], stem: Path) -> None:
    """The simulated-worker table, the cost model's table and the plot, beside ``stem``."""
    rows = sorted(rows, key=lambda row: (row["executor"], row["workers"], bool(row.get("packed"))))
    table = markdown(rows, COLUMNS["simulate"])
    model = cost_model(rows)
    text = markdown(model, list(model[0]) if model else ["executor"])
    stem.with_suffix(".md").write_text(table + "\n\n" + text + "\n")
    stem.with_name(stem.name + "-model.json").write_text(json.dumps(model, indent=1))
    plot(rows, model, stem.with_suffix(".png"))
    print(table + "\n\n" + text)


def run_section(args, folder: Path) -> list[dict]:
    rows = []
    if args.section == "simulate":
        for count in [int(n) for n in args.simulated.split(",")]:
            for simulator in args.simulators.split(","):
                if simulator == "parsl" and count > args.parsl_max:
                    continue
                for packing in {"both": (False, True), "one": (False,), "packed": (True,)}[args.packing]:
                    run = simulate_dask if simulator == "dask" else simulate_parsl
                    row = run(folder, count, packing)
                    row.update(saturation(row) if "error" not in row else {})
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
        return rows
    for executor in args.executors.split(","):
        for route in args.routes.split(","):
            codes = [("before", args.before), ("after", None)] if route == "patches" and args.before else [("after", None)]
            for label, code in codes:
                config = {"route": route, "executor": executor, "workers": args.workers, "folder": str(folder),
                          "backend": args.backend, "noop": args.section == "noop", "code": label}
                if label == "before" and args.section == "noop":
                    continue  # the earlier code has no way to run no-op fits through a scan
                row = in_fresh_process(config, code)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


if __name__ == "__main__":
    main()
