"""One scan from a cold process, as a user would run it; prints a JSON line of measurements.

    python benchmarks/one_scan.py PALLET [PALLET ...] --executor local --workers 2 [--backend jax] [--patches N]
                                  [--upper-limit [--scan START,STOP,POINTS]]

A PALLET is a path, or ``PATH::NAME`` for one pallet of a source that holds several (the stau
archive: ``stau-likelihoods-1911.06660.tar.gz::Region-combined``), read as
``load_pallet(PATH, pallet=NAME)`` reads it.

Wall time covers everything after the interpreter started: imports, reading the pallet, starting
the executor, fitting, writing the results file. Several pallets are scanned one after another
in the same process, each scan starting its own workers (as a user without a multi-pallet
source does). The per-task breakdown comes from the records: queue wait (submitted -> started
on a worker: includes transfer), compute on the worker, and result return (finished on the
worker -> received by the client). CPU per fit is measured from outside the fits: the CPU time
every worker process (and this client process) used between the first tenth of the results
and the last one, over the fits in between; so it includes what a worker spends besides
fitting (event loops, heartbeats, monitors), which a fit's own clock cannot see.
"""

from __future__ import annotations

import time

BEGAN = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402


class CpuMeter:
    """CPU seconds used by this process and by the scan's worker processes, between two moments.

    Workers are this process's descendants (local pool, Dask workers pyhf-dist starts), the other
    processes of its session but its ancestors (Parsl and Globus Compute worker pools, which their
    launcher leaves to init), plus, for a Slurm job name given (Dask workers in Slurm jobs), the
    job scripts of those jobs and their descendants.
    """

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.job_name: str | None = None
        self.marks: list[tuple[int, float, float]] = []  # (results so far, client CPU, worker CPU)

    def _workers(self) -> list:
        processes = {p.pid: p for p in self.me.children(recursive=True)}
        ancestors = {p.pid for p in self.me.parents()} | {self.me.pid}
        session = os.getsid(0)
        for process in self.psutil.process_iter():
            try:
                if process.pid not in ancestors and os.getsid(process.pid) == session:
                    processes.setdefault(process.pid, process)
            except (OSError, self.psutil.Error):
                continue
        if self.job_name:
            for process in self.psutil.process_iter():
                try:
                    if process.pid not in processes and process.environ().get("SLURM_JOB_NAME") == self.job_name:
                        processes[process.pid] = process
                        # The job script's children: a process that renames itself rewrites
                        # its environment's memory too.
                        processes.update({child.pid: child for child in process.children(recursive=True)})
                except (OSError, self.psutil.Error):
                    continue
        return list(processes.values())

    @staticmethod
    def _cpu(process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    def mark(self, results: int) -> None:
        workers = 0.0
        for process in self._workers():
            try:
                workers += self._cpu(process)
            except Exception:  # a process that just ended
                continue
        self.marks.append((results, self._cpu(self.me), workers))

    def per_fit(self) -> dict:
        """CPU seconds per fit between the first and the last mark (``None`` without two marks)."""
        if len(self.marks) < 2 or self.marks[-1][0] <= self.marks[0][0]:
            return {"client_cpu_per_fit": None, "worker_cpu_per_fit": None}
        (n0, c0, w0), (n1, c1, w1) = self.marks[0], self.marks[-1]
        return {"client_cpu_per_fit": (c1 - c0) / (n1 - n0), "worker_cpu_per_fit": (w1 - w0) / (n1 - n0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pallets", nargs="+")
    parser.add_argument("--executor", default="local")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--patches", type=int, default=None, help="fit only the first N patches")
    parser.add_argument("--options", default="{}", help="JSON of extra executor options")
    parser.add_argument("--upper-limit", action="store_true", help="95%% CL upper limits instead of CLs at mu = 1")
    parser.add_argument("--scan", default=None, help="with --upper-limit: a grid START,STOP,POINTS")
    parser.add_argument("--match-pyhf", action="store_true", help="pyhf's own digits instead of certified fits")
    args = parser.parse_args()

    import pyhf_dist

    options = json.loads(args.options)
    if args.upper_limit:
        options["calculation"] = "upper_limit"
        if args.scan:
            start, stop, points = args.scan.split(",")
            options["upper_limit_scan"] = (float(start), float(stop), int(points))
    if args.executor != "sequential":
        options.setdefault("workers", args.workers)
    received: dict = {}
    records: list[dict] = []
    meters = []
    backend = None
    scan_seconds = 0.0
    for source in args.pallets:
        path, name = source.partition("::")[::2]
        # As the one-liner is used: map_fits reads the pallet while the workers start.
        where = {"workspace": path, "pallet": name or None}
        if args.patches:
            pallet = pyhf_dist.load_pallet(path, pallet=name or None, validate=False)
            pallet.patches = pallet.patches[: args.patches]
            where = {"workspace": pallet}
        meter = CpuMeter()
        total: list[int] = []
        done = [0]

        def started(info: dict, meter=meter, total=total) -> None:
            meter.job_name = info.get("job_name") if args.executor == "slurm" else None
            total.append(info["patches"])

        def arrived(record, meter=meter, total=total, done=done) -> None:
            received[record.name] = time.time()
            done[0] += 1
            # After the first tenth (set-up and compilation behind us), and at the last result.
            if done[0] in (max(2, total[0] // 10), total[0]):
                meter.mark(done[0])

        result = pyhf_dist.map_fits(**where, executor=args.executor, backend=args.backend, callback=arrived,
                                    on_start=started, match_pyhf=args.match_pyhf, **options)
        with tempfile.TemporaryDirectory() as directory:
            result.to_json(f"{directory}/results.json")
        records += [record.to_dict() for record in result]
        meters.append(meter)
        backend = result.metadata["settings"]["backend"]
        scan_seconds += result.metadata["wall_seconds"]
    wall = time.perf_counter() - BEGAN
    line = summary(args.executor, args.workers, backend, records, received, wall, scan_seconds)
    cpu = [meter.per_fit() for meter in meters]
    for key in ("client_cpu_per_fit", "worker_cpu_per_fit"):
        values = [entry[key] for entry in cpu if entry[key] is not None]
        line[key] = statistics.mean(values) if values else None
    if args.executor == "sequential":  # the fits ran in this process
        line["worker_cpu_per_fit"] = line["client_cpu_per_fit"]
    line["scans"] = len(args.pallets)
    print(json.dumps(line))


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
        # How the fits ended: records certified converged, and those where pyhf's default stalls.
        "converged": sum(r.get("converged") is True for r in ok),
        "pyhf_stalls": sum(bool(r.get("pyhf_default")) for r in ok),
        "results": {r["name"]: [r.get("CLs_obs"), r.get("CLs_exp")] for r in records},
        "limits": {r["name"]: [r.get("mu_up_obs"), r.get("mu_up_exp")] for r in records if r.get("mu_up_exp")},
        "errors": {r["name"]: r.get("error") for r in records if r["status"] != "ok"},
        # Why the fast path declined each patch it did not fit.
        "fallbacks": {r["name"]: r.get("fallback_reason") for r in records if r.get("fallback_reason")},
    }


def _count(values) -> dict:
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
