"""One scan from a cold process, as a user would run it; prints a JSON line of measurements.

    python benchmarks/one_scan.py PALLET --executor local --workers 2 [--backend jax] [--patches N]
                                  [--upper-limit [--scan START,STOP,POINTS]]

Wall time covers everything after the interpreter started: imports, reading the pallet, starting
the executor, fitting, writing the results file. The per-task breakdown comes from the records:
queue wait (submitted -> started on a worker: includes transfer), compute on the worker, and result
return (finished on the worker -> received by the client).
"""

from __future__ import annotations

import time

BEGAN = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pallet")
    parser.add_argument("--executor", default="local")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--patches", type=int, default=None, help="fit only the first N patches")
    parser.add_argument("--options", default="{}", help="JSON of extra executor options")
    parser.add_argument("--upper-limit", action="store_true", help="95%% CL upper limits instead of CLs at mu = 1")
    parser.add_argument("--scan", default=None, help="with --upper-limit: a grid START,STOP,POINTS")
    args = parser.parse_args()

    import pyhf_dist

    pallet = args.pallet  # as the one-liner is used: map_fits reads it while the workers start
    if args.patches:
        pallet = pyhf_dist.load_pallet(args.pallet, validate=False)
        pallet.patches = pallet.patches[: args.patches]
    received = {}
    options = json.loads(args.options)
    if args.upper_limit:
        options["calculation"] = "upper_limit"
        if args.scan:
            start, stop, points = args.scan.split(",")
            options["upper_limit_scan"] = (float(start), float(stop), int(points))
    if args.executor != "sequential":
        options.setdefault("workers", args.workers)
    result = pyhf_dist.map_fits(
        pallet, executor=args.executor, backend=args.backend,
        callback=lambda record: received.__setitem__(record.name, time.time()), **options,
    )
    with tempfile.TemporaryDirectory() as directory:
        result.to_json(f"{directory}/results.json")
    wall = time.perf_counter() - BEGAN
    print(json.dumps(summary(args.executor, args.workers, result.metadata["settings"]["backend"],
                             [record.to_dict() for record in result], received, wall, result.metadata["wall_seconds"])))


def summary(executor: str, workers: int, backend: str, records: list[dict], received: dict, wall: float,
            scan_seconds: float) -> dict:
    """The JSON line of one scan: wall times, per-task breakdown, and every patch's CLs."""
    ok = [record for record in records if record["status"] == "ok"]
    by_worker: dict = {}
    for record in sorted(ok, key=lambda r: r["started"]):
        by_worker.setdefault((record["worker"]["host"], record["worker"]["pid"]), []).append(record["fit_seconds"])
    compute = [record["fit_seconds"] for record in ok]
    typical = statistics.median(compute) if compute else 0.0
    first = [times[0] for times in by_worker.values()]
    return {
        "executor": executor,
        "backend": backend,
        "workers": workers,
        "patches": len(records),
        "failed": len(records) - len(ok),
        "wall_seconds": wall,
        "scan_seconds": scan_seconds,
        "worker_processes": len(by_worker),
        "queue_wait_seconds": statistics.mean(r["started"] - r["submitted"] for r in ok) if ok else None,
        "compute_seconds": statistics.mean(compute) if compute else None,
        "compute_median_seconds": typical,
        "first_task_extra_seconds": statistics.mean(first) - typical if first else None,
        "return_seconds": statistics.mean(received[r["name"]] - r["finished"] for r in ok) if ok else None,
        # Largest resident set of any finished child process (the local executor's workers are
        # children; other executors' workers may be further down the tree).
        "child_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        # What fitted each patch, and why the fast path declined the others.
        "engines": _count(r.get("engine") for r in ok),
        "fallbacks": _count(r.get("fallback_reason") for r in ok if r.get("fallback_reason")),
        "results": {r["name"]: [r.get("CLs_obs"), r.get("CLs_exp")] for r in records},
        "limits": {r["name"]: [r.get("mu_up_obs"), r.get("mu_up_exp")] for r in records if r.get("mu_up_exp")},
        "errors": {r["name"]: r.get("error") for r in records if r["status"] != "ok"},
        "fallbacks": {r["name"]: r.get("fallback_reason") for r in records if r.get("fallback_reason")},
    }


def _count(values) -> dict:
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
