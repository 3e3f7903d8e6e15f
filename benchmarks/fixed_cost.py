"""Where a scan's fixed cost goes: each step of a scan's start, timed apart in fresh processes.

    python benchmarks/fixed_cost.py 1Lbb --workers 2 --repeats 3

Client side (one fresh process per repeat): starting the interpreter, ``import pyhf_dist``,
reading the pallet (``load_pallet``), checking the background against pyhf's schema (remembered
in the pyhf-dist cache after the first time: the *remembered* row), building the worker context.
Worker side (a fresh process, one thread per library, as a local worker): importing what the fit
needs (``pyhf_dist.runtime.preload``: jax, scipy, the fast path), setting up for the context
(``pyhf_dist.runtime.initialize``: parsing the workspace, compiling the likelihood or loading its
executables from the cache), the first patch (the structure check against pyhf, remembered
too, and the first call of every compiled function), and the median of the next patches (the
cost per patch, for scale). Then the local executor: ``start`` to the first no-op task's result on
``--workers`` workers (spawning them; their imports and set-up run in parallel). Steps that
overlap in a real scan (the workers start while the client reads the pallet) are timed apart
here: the sum is more than a scan's fixed cost. ``--empty-cache`` repeats the worker set-up with
an empty pyhf-dist cache (a fresh machine: compiling, checking).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sources  # noqa: E402
from baselines import single_threaded  # noqa: E402

#: Each probe marks its steps: (wall, CPU) seconds since the previous mark. CPU time hardly
#: depends on what else runs on the machine; wall time does.
MARKS = """
import json, statistics, sys, time
clock = [time.perf_counter(), time.process_time()]
steps = dict()
def mark(step):
    now = [time.perf_counter(), time.process_time()]
    steps[step] = [now[0] - clock[0], now[1] - clock[1]]
    clock[:] = now
"""

CLIENT = MARKS + """
sys.path.insert(0, {here!r})
from pyhf_dist import load_pallet, map_fits  # what a scan imports
mark("import pyhf_dist (map_fits, load_pallet)")
import sources
from pyhf_dist.pallet import check_workspace
from pyhf_dist.settings import FitSettings
from pyhf_dist.protocol import WorkerContext
pallet = sources.load({name!r})
mark("read the pallet (load_pallet)")
check_workspace(pallet.workspace, "probe")
mark("schema check")
context = WorkerContext.build(pallet.workspace, FitSettings().to_dict())
mark("worker context (JSON of the workspace)")
print(json.dumps(steps))
"""

WORKER = MARKS + """
from pyhf_dist import runtime as worker
from pyhf_dist.protocol import WorkerContext
mark("import pyhf_dist.runtime")
tasks = json.load(open({tasks!r}))
worker.preload(tasks["settings"])
mark("worker imports (preload: jax, scipy, fast path)")
context = WorkerContext(tasks["key"], open({payload!r}, "rb").read())
worker.initialize(context)
mark("worker set-up (initialize: workspace, compiled likelihood)")
later = []
for index, task in enumerate(tasks["tasks"]):
    record = worker.run_task(task)
    assert record["status"] == "ok", record["error"]
    mark("first patch (structure check, first calls)" if index == 0 else "next")
    if index:
        later.append(steps.pop("next"))
steps["next patches, median (cost per patch)"] = [statistics.median(column) for column in zip(*later)]
steps["engine"] = record.get("engine")
print(json.dumps(steps))
"""

EXECUTOR = """
import json, time
import pyhf_dist
from pyhf_dist.protocol import WorkerContext
context = WorkerContext({key!r}, open({payload!r}, "rb").read())
runner = pyhf_dist.get_executor("local", workers={workers})
began = time.perf_counter()
runner.prepare(json.load(open({tasks!r}))["settings"])
runner.start(context)
futures = [runner.submit({{"name": f"noop{{i}}", "patch": [], "context": context.key, "kind": "noop"}})
           for i in range({workers})]
[future.result() for future in futures]
up = time.perf_counter()
import psutil
workers = psutil.Process().children(recursive=True)
cpu = sum(sum(child.cpu_times()[:2]) for child in workers)
runner.shutdown()
print(json.dumps({{"local workers: start to first no-op results (CPU: all its processes)": [up - began, cpu],
                  "local workers: shutdown": [time.perf_counter() - up, None]}}))
"""


def probe(code: str, environment: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; its last line of output is a JSON dict of seconds."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    if run.returncode != 0:
        raise RuntimeError(f"probe failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def interpreter_seconds() -> list:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return [time.perf_counter() - began, None]


def import_profile(top: int = 6) -> list[tuple[str, float]]:
    """The modules a scan's imports (``from pyhf_dist import map_fits``) spend most on (cumulative
    ms, ``python -X importtime``)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", "from pyhf_dist import load_pallet, map_fits"],
                         capture_output=True, text=True, check=True)
    best: dict[str, float] = {}
    for line in run.stderr.splitlines():
        parts = [part.strip() for part in line.split("|")]
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        name = parts[2]
        if name.startswith("pyhf_dist") or name.split(".")[0] in ("numpy", "loky", "jsonschema", "yaml", "psutil"):
            best[name] = max(best.get(name, 0.0), int(parts[1]) / 1000)
    ranked = sorted(best.items(), key=lambda item: -item[1])
    return ranked[:top]


def write_inputs(name: str, directory: Path, patches: int) -> tuple[Path, Path, str]:
    """The context payload and the first ``patches`` tasks of the pallet, as a worker receives them."""
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.protocol import WorkerContext, make_task

    pallet = sources.load(name)
    settings = FitSettings().to_dict()
    context = WorkerContext.build(pallet.workspace, settings)
    payload = directory / "context.json"
    payload.write_bytes(context.payload)
    tasks = directory / "tasks.json"
    tasks.write_text(json.dumps({"key": context.key, "settings": settings, "tasks": [
        make_task(patch.name, patch.operations, context.key) for patch in pallet.patches[:patches]]}))
    return payload, tasks, context.key


def measure(name: str, workers: int, repeats: int, empty_cache: bool) -> dict:
    """Median seconds of every step over ``repeats`` fresh processes."""
    load = os.getloadavg()[0]
    worker_environment = single_threaded()
    samples: dict[str, list] = {"interpreter start (python -c pass)": []}
    extra: dict = {}
    with tempfile.TemporaryDirectory(prefix="pyhf-dist-fixed-cost-") as scratch:
        payload, tasks, key = write_inputs(name, Path(scratch), patches=4)
        for _ in range(repeats):
            samples["interpreter start (python -c pass)"].append(interpreter_seconds())
            runs = [probe(CLIENT.format(here=str(HERE), name=name)),
                    probe(WORKER.format(tasks=str(tasks), payload=str(payload)), worker_environment),
                    probe(EXECUTOR.format(key=key, payload=str(payload), tasks=str(tasks), workers=workers))]
            if empty_cache:
                with tempfile.TemporaryDirectory(prefix="pyhf-dist-empty-cache-") as cache:
                    fresh = probe(WORKER.format(tasks=str(tasks), payload=str(payload)),
                                  {**worker_environment, "PYHF_DIST_CACHE": cache})
                runs.append({f"{step}, empty cache": value for step, value in fresh.items()})
                with tempfile.TemporaryDirectory(prefix="pyhf-dist-empty-cache-") as cache:
                    first = probe(CLIENT.format(here=str(HERE), name=name), {**os.environ, "PYHF_DIST_CACHE": cache})
                runs.append({"schema check, empty cache": first["schema check"]})
            for run in runs:
                for step, value in run.items():
                    if isinstance(value, list):
                        samples.setdefault(step, []).append(value)
                    else:
                        extra[step] = value
    return {"steps": {step: [_median(column) for column in zip(*values)] for step, values in samples.items()},
            "repeats": repeats, "extra": extra, "imports": import_profile(), "load": [load, os.getloadavg()[0]]}


def _median(values) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def table(name: str, measured: dict, workers: int) -> str:
    lines = [f"| step ({name}, {workers} workers) | wall s (median of {measured['repeats']}) | CPU s of that process |",
             "| --- | ---: | ---: |"]
    lines += [f"| {step} | {wall:.3f} | {'–' if cpu is None else f'{cpu:.3f}'} |"
              for step, (wall, cpu) in measured["steps"].items()]
    imports = ", ".join(f"{module} {ms:.0f} ms" for module, ms in measured["imports"])
    return ("\n".join(lines) + f"\n\nFast path on the probe's patches: {measured['extra'].get('engine')}. "
            f"Largest imports of a scan (cumulative): {imports}. Machine load (1-minute average, "
            f"{os.cpu_count()} cores) during the probes: {measured['load'][0]:.1f}→{measured['load'][1]:.1f}.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pallet", nargs="?", default="1Lbb", help="a name of sources.py or PATH[::PALLET]")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--empty-cache", action="store_true", help="also the worker set-up on a fresh machine")
    args = parser.parse_args()
    measured = measure(args.pallet, args.workers, args.repeats, args.empty_cache)
    print(table(args.pallet, measured, args.workers))


if __name__ == "__main__":
    main()
