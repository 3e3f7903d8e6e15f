"""Chaos run: random faults at random times on real scans, and what survives them.

Each *scan* here is the command line (``pyhf-dist fit``) run to completion through faults: a fault
kind is drawn at random for the scan, and ``--per-scan`` faults of that kind are injected at random
moments; whenever the command stops (killed, interrupted, a full disk), it is run again with
``--resume``, as a user would, until its results file holds every patch ``ok`` (or ``--max-runs``
is reached: the scan then counts as not completed). Fault kinds:

* ``worker-kill``: SIGKILL of a worker process (local pool, Dask worker, Dask worker in a Slurm job);
* ``client-kill``: SIGKILL of the command line itself, then ``--resume``;
* ``ctrl-c``: SIGINT to the command line's process group (what Ctrl-C does), then ``--resume``;
* ``disk-full``: the output's filesystem (a small tmpfs this script mounts) filled for 1-4 s;
* ``scancel``: one of the scan's Slurm jobs cancelled (Slurm only).

Per executor and fault kind it prints: faults injected, scans completed, runs (the first and each
resume), records lost (patches missing from the final results: must be 0), records duplicated
(patches twice in the results, or fitted again although the journal already held them ok: must be
0), the largest |ΔCLs| (observed and the five expected) against an undisturbed run of the same
backend, and the stops (runs ending non-zero) that were clean: one line, or the interruption
message, or the SIGKILL injected, and no traceback (a run the script had to kill after
``--run-timeout`` seconds is never clean). The table goes to
``benchmarks/output/chaos.md`` with the command that made it; every run's details to
``chaos.json``.

Needs root for the tmpfs (without it ``disk-full`` is left out, and said so). Slurm rows need a
running Slurm (``executors/slurm/start-slurm.sh``).

    python benchmarks/chaos.py --faults 200 --executors local,dask,slurm      # the benchmark
    python benchmarks/chaos.py --faults 10 --executors local --patches 'ERJR_1[0-2]*'   # CI's short run
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("PYHF_DIST_DATA", HERE.parent.parent / "shared" / "data"))
KINDS = ["worker-kill", "client-kill", "ctrl-c", "disk-full", "scancel"]
TRACKERS = ("resource_tracker", "semaphore_tracker", "forkserver")


def source_of(pallet: str) -> str:
    if pallet == "3L-eRJR":
        return str(DATA / "3L-eRJR")
    if pallet == "1Lbb":
        return str(DATA / "1Lbb-likelihoods-hepdata.tar.gz")
    return pallet


# ------------------------------------------------------------------------------------ the output disk


class SmallDisk:
    """A tmpfs for the scan's output, which ``fill`` fills for a while (``None`` if not root)."""

    def __init__(self, size: str = "8m"):
        self.path = Path(tempfile.mkdtemp(prefix="pyhf-dist-chaos-"))
        self.mounted = False
        if os.geteuid() == 0 and shutil.which("mount"):
            run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
                                 capture_output=True, text=True)
            self.mounted = run.returncode == 0
            self.why = run.stderr.strip()
        else:
            self.why = "not root: cannot mount a tmpfs"

    def fill(self, seconds: float) -> None:
        """Take every free byte of the filesystem for ``seconds``, then give them back."""
        filler = self.path / ".chaos-filler"
        try:
            # Unbuffered, so that closing it has nothing left to write (and fail on).
            with open(filler, "wb", buffering=0) as stream:
                for size in (1 << 20, 65536, 4096, 1):  # until the disk says no, to the last byte
                    try:
                        while True:
                            stream.write(b"\1" * size)
                    except OSError:
                        pass
            time.sleep(seconds)
        finally:
            filler.unlink(missing_ok=True)

    def clear(self) -> None:
        for entry in self.path.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], capture_output=True)
        shutil.rmtree(self.path, ignore_errors=True)


# ------------------------------------------------------------------------------------ processes and jobs


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def slurm_jobs(name: str) -> list[str]:
    if not shutil.which("squeue"):
        return []
    run = subprocess.run(["squeue", "-h", "--name", name, "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True)
    return run.stdout.split()


def workers_of(process: subprocess.Popen, executor: str, job_name: str) -> list[psutil.Process]:
    """The worker processes of a running scan: leaf Python processes (not the pools' trackers)."""
    if executor == "slurm":
        # The job scripts of the scan's jobs, then their leaf processes: a started Dask worker renames
        # its process (setproctitle), which also garbles its /proc environ, so it is found by its parent.
        jobs = set(slurm_jobs(job_name))
        found = []
        for candidate in psutil.process_iter(["cmdline"]):
            try:
                if candidate.environ().get("SLURM_JOB_ID") in jobs and "slurm_script" in " ".join(
                        candidate.info["cmdline"] or []):
                    found += [each for each in candidate.children(recursive=True) if not each.children()]
            except (psutil.Error, OSError):
                continue
        return found
    found = []
    for each in descendants(process.pid):
        try:
            line = " ".join(each.cmdline())
            if "python" in line and not any(word in line for word in TRACKERS) and not each.children():
                found.append(each)
        except psutil.Error:
            continue
    return found


# ------------------------------------------------------------------------------------ one scan through faults


def journal_ok(path: Path) -> dict[str, tuple]:
    """``{patch: (started, worker pid)}`` of the whole ``ok`` records in a journal."""
    kept = {}
    try:
        lines = path.read_bytes().split(b"\n")[:-1]  # the last piece has no newline: torn or empty
    except OSError:
        return kept
    for line in lines:
        try:
            record = json.loads(line)["record"]
        except (ValueError, KeyError, TypeError):
            continue
        if record.get("status") == "ok":
            kept[record["name"]] = (record.get("started"), (record.get("worker") or {}).get("pid"))
    return kept


def cls_values(record: dict) -> list[float]:
    return [record.get("CLs_obs")] + list(record.get("CLs_exp") or [])


def max_difference(results: list[dict], reference: dict[str, list]) -> float:
    largest = 0.0
    for record in results:
        for value, expected in zip(cls_values(record), reference.get(record["name"], [])):
            if value is not None and expected is not None:
                largest = max(largest, abs(value - expected))
    return largest


class Scan:
    """One scan on one executor, run to completion through faults of one kind."""

    def __init__(self, args, executor: str, kind: str, disk: SmallDisk, names: list[str], reference: dict,
                 rng: random.Random):
        self.args, self.executor, self.kind, self.disk = args, executor, kind, disk
        self.names, self.reference, self.rng = names, reference, rng
        self.job_name = f"chaos-{uuid.uuid4().hex[:6]}"
        self.output = disk.path / "results.json"
        self.journal = disk.path / "results.journal.jsonl"
        self.faults = 0
        self.runs: list[dict] = []
        self.snapshot: dict[str, tuple] = {}

    def command(self, resume: bool) -> list[str]:
        args = self.args
        command = [sys.executable, "-m", "pyhf_dist", "fit", source_of(args.pallet), "--executor", self.executor,
                   "--backend", args.backend, "-o", str(self.output), "-q", "--retries", str(args.retries)]
        if args.patches:
            command += ["-p", args.patches]
        if self.executor == "slurm":
            command += ["--jobs", str(args.workers), "--cores", "1", "--memory", "2GB", "--walltime", "00:15:00",
                        "--option", f"job_name={self.job_name}", "--option", "interface=lo"]
        else:
            command += ["--workers", str(args.workers)]
        return command + (["--resume"] if resume else [])

    def inject(self, process: subprocess.Popen) -> str | None:
        """One fault of this scan's kind; what was done, or ``None`` if there was nothing to hit."""
        if self.kind == "worker-kill":
            workers = workers_of(process, self.executor, self.job_name)
            if not workers:
                return None
            victim = self.rng.choice(workers)
            try:
                victim.kill()
            except psutil.Error:
                return None
            return f"SIGKILL worker {victim.pid}"
        if self.kind == "client-kill":
            process.kill()
            return f"SIGKILL client {process.pid}"
        if self.kind == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
            return "SIGINT to the process group"
        if self.kind == "disk-full":
            seconds = self.rng.uniform(1.0, 4.0)
            self.disk.fill(seconds)
            return f"disk full for {seconds:.1f} s"
        if self.kind == "scancel":
            jobs = slurm_jobs(self.job_name)
            if not jobs:
                return None
            job = self.rng.choice(jobs)
            subprocess.run(["scancel", job], capture_output=True)
            return f"scancel {job}"
        raise ValueError(self.kind)

    def after_client_kill(self) -> int:
        """What a killed client left running after 10 s (then stopped, so that the next run starts clean)."""
        deadline = time.time() + 10
        left: list = []
        while time.time() < deadline:
            left = [p for p in self._strays() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            jobs = slurm_jobs(self.job_name) if self.executor == "slurm" else []
            if not left and not jobs:
                return 0
            time.sleep(0.5)
        count = len(left) + len(jobs)
        for each in left:
            try:
                each.kill()
            except psutil.Error:
                pass
        if jobs:
            subprocess.run(["scancel", "--name", self.job_name], capture_output=True)
        return count

    def run(self) -> dict:
        self.disk.clear()
        began = time.time()
        resume = False
        strays = 0
        while len(self.runs) < self.args.max_runs:
            if resume:
                self.snapshot.update(journal_ok(self.journal))
            # Standard error to a file, not a pipe: a killed client's children may hold a pipe open
            # long after it died, and the run is over when the client is.
            errors = tempfile.TemporaryFile(mode="w+")
            process = subprocess.Popen(self.command(resume), stdout=subprocess.DEVNULL, stderr=errors, text=True,
                                       start_new_session=True)
            self._children = []
            injected: list[str] = []
            stop_injecting = threading.Event()

            def injector() -> None:
                while not stop_injecting.is_set() and self.faults < self.quota:
                    if stop_injecting.wait(self.rng.uniform(*self.args.gap)):
                        return
                    if process.poll() is not None:
                        return
                    self._children = descendants(process.pid)
                    done = self.inject(process)
                    if done:
                        self.faults += 1
                        injected.append(done)
                        if self.kind in ("client-kill", "ctrl-c"):
                            return  # that run is over; the next one gets the next fault

            thread = threading.Thread(target=injector, daemon=True)
            thread.start()
            timed_out = False
            try:
                process.wait(timeout=self.args.run_timeout)
            except subprocess.TimeoutExpired:  # a hung scan: never a clean stop
                timed_out = True
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            stop_injecting.set()
            thread.join()
            if self.kind == "client-kill" and process.returncode == -signal.SIGKILL:
                strays += self.after_client_kill()
            errors.seek(0)
            stderr = errors.read()
            errors.close()
            error_lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
            self.runs.append({"rc": process.returncode, "faults": injected, "timed_out": timed_out,
                              "traceback": "Traceback" in stderr,
                              "error_lines": error_lines, "stderr_tail": stderr[-2000:]})
            resume = True
            if process.returncode == 0 and self._all_ok():
                break
        return self._verdict(time.time() - began, strays)

    quota = 1

    def _strays(self) -> list[psutil.Process]:
        return [p for p in getattr(self, "_children", []) if p.is_running()]

    def _all_ok(self) -> bool:
        try:
            results = json.loads(self.output.read_text())["results"]
        except (OSError, ValueError, KeyError):
            return False
        return all(record["status"] == "ok" for record in results)

    def _verdict(self, seconds: float, strays: int) -> dict:
        try:
            results = json.loads(self.output.read_text())["results"]
        except (OSError, ValueError, KeyError):
            results = []
        seen = collections.Counter(record["name"] for record in results)
        final = {record["name"]: record for record in results}
        refit = [name for name, (started, pid) in self.snapshot.items()
                 if name in final and (final[name].get("started"), (final[name].get("worker") or {}).get("pid"))
                 != (started, pid)]
        stops = [run for run in self.runs if run["rc"] != 0]
        return {
            "executor": self.executor, "kind": self.kind, "faults": self.faults, "runs": len(self.runs),
            "completed": bool(results) and self.runs[-1]["rc"] == 0 and self._all_ok(),
            "lost": len(set(self.names) - set(seen)),
            "duplicated": sum(count - 1 for count in seen.values()) + len(refit),
            "max_dcls": max_difference(results, self.reference) if results else None,
            "tracebacks": sum(run["traceback"] for run in self.runs),
            "stops": len(stops),
            "stops_one_line": sum(1 for run in stops if run["rc"] in (-9, 130) or len(run["error_lines"]) == 1),
            "stops_clean": sum(1 for run in stops if (run["rc"] in (-9, 130) or len(run["error_lines"]) == 1)
                               and not run["traceback"] and not run["timed_out"]),
            "strays_after_client_kill": strays, "seconds": seconds, "runs_detail": self.runs,
        }


# ------------------------------------------------------------------------------------ the run


def undisturbed(args, disk: SmallDisk) -> tuple[list[str], dict]:
    """The names and CLs of an undisturbed run of the same pallet and backend (local executor)."""
    disk.clear()
    output = disk.path / "reference.json"
    command = [sys.executable, "-m", "pyhf_dist", "fit", source_of(args.pallet), "--backend", args.backend,
               "--workers", str(args.workers), "-o", str(output), "-q"] + (["-p", args.patches] if args.patches else [])
    subprocess.run(command, check=True, capture_output=True, text=True)
    results = json.loads(output.read_text())["results"]
    output.unlink()
    return [record["name"] for record in results], {record["name"]: cls_values(record) for record in results}


def table(rows: list[dict], command: str, args, notes: list[str]) -> str:
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[(row["executor"], row["kind"])].append(row)
    lines = [
        f"Chaos run: {args.pallet}{' ' + repr(args.patches) if args.patches else ''}, backend {args.backend}, "
        f"{args.workers} workers, --retries {args.retries}, {args.per_scan} faults per scan at random moments "
        f"({args.gap[0]:g}-{args.gap[1]:g} s apart); made with `{command}`",
        "",
        "| executor | fault | faults injected | scans completed | runs (incl. resumes) | records lost | "
        "records duplicated | max \\|ΔCLs\\| vs undisturbed | stops | stops with one line, no traceback |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def line(label_executor, label_kind, group):
        completed = sum(row["completed"] for row in group)
        differences = [row["max_dcls"] for row in group if row["max_dcls"] is not None]
        stops = sum(row["stops"] for row in group)
        clean = sum(row["stops_clean"] for row in group)
        return (f"| {label_executor} | {label_kind} | {sum(row['faults'] for row in group)} | {completed}/{len(group)} | "
                f"{sum(row['runs'] for row in group)} | {sum(row['lost'] for row in group)} | "
                f"{sum(row['duplicated'] for row in group)} | {max(differences) if differences else float('nan'):.2g} | "
                f"{stops} | {clean}/{stops} |")

    for (executor, kind), group in sorted(groups.items()):
        lines.append(line(executor, kind, group))
    lines.append(line("**all**", "", rows))
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pallet", default="3L-eRJR", help="3L-eRJR, 1Lbb, or a path")
    parser.add_argument("--patches", help="patch glob (e.g. 'ERJR_1[0-2]*' for a short run)")
    parser.add_argument("--executors", default="local,dask,slurm")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--faults", type=int, default=200, help="faults to inject in all (split across executors)")
    parser.add_argument("--per-scan", type=int, default=3, help="faults of one kind per scan")
    parser.add_argument("--gap", type=float, nargs=2, default=(0.5, 3.0), help="seconds between faults (uniform)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "jax"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--max-runs", type=int, default=12, help="runs of one scan (the first and its resumes) at most")
    parser.add_argument("--run-timeout", type=float, default=300)
    parser.add_argument("--minutes", type=float, default=15, help="stop starting scans after this long")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--output", default=str(HERE / "output"))
    args = parser.parse_args()
    # Started in the background by a shell (``cmd &``), this process and every scan it starts would
    # ignore SIGINT (a disposition kept across exec): the ctrl-c faults would do nothing. Scans get
    # Python's own handler back; SIGTERM here unmounts the disk on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(143))
    command = "python benchmarks/chaos.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    rng = random.Random(args.seed)
    executors = args.executors.split(",")
    notes = []
    disk = SmallDisk()
    kinds_wanted = args.kinds.split(",")
    if not disk.mounted and "disk-full" in kinds_wanted:
        kinds_wanted.remove("disk-full")
        notes.append(f"disk-full left out: {disk.why}")
    if "slurm" in executors and not shutil.which("sinfo"):
        executors.remove("slurm")
        notes.append("slurm left out: no Slurm here (executors/slurm/start-slurm.sh starts one)")
    rows: list[dict] = []
    try:
        names, reference = undisturbed(args, disk)
        print(f"undisturbed run: {len(names)} patches", flush=True)
        deadline = time.time() + 60 * args.minutes
        per_executor = {executor: args.faults // len(executors) + (index < args.faults % len(executors))
                        for index, executor in enumerate(executors)}
        for executor in executors:
            kinds = [kind for kind in kinds_wanted if kind != "scancel" or executor == "slurm"]
            done = 0
            turn = 0
            executor_deadline = time.time() + (deadline - time.time()) / (len(executors) - executors.index(executor))
            while done < per_executor[executor] and time.time() < executor_deadline:
                kind = kinds[turn % len(kinds)] if turn < len(kinds) else rng.choice(kinds)
                turn += 1
                scan = Scan(args, executor, kind, disk, names, reference, rng)
                scan.quota = min(args.per_scan, per_executor[executor] - done)
                row = scan.run()
                done += row["faults"]
                rows.append(row)
                print(f"{executor:6} {kind:12} faults {row['faults']} runs {row['runs']} completed {row['completed']} "
                      f"lost {row['lost']} dup {row['duplicated']} dCLs {row['max_dcls']} tracebacks {row['tracebacks']} "
                      f"rcs {[run['rc'] for run in row['runs_detail']]} ({row['seconds']:.0f} s)", flush=True)
            if done < per_executor[executor]:
                notes.append(f"{executor}: {done} of {per_executor[executor]} faults fitted in the time given")
            strays = sum(row["strays_after_client_kill"] for row in rows if row["executor"] == executor)
            if strays:
                notes.append(f"{executor}: after client SIGKILLs, {strays} processes (or Slurm jobs) were still there 10 s "
                             "later; this script stopped them before resuming")
    finally:
        disk.close()
    text = table(rows, command, args, notes)
    print("\n" + text)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "chaos.md").write_text(text)
    (output / "chaos.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1, default=str))
    bad = [row for row in rows if row["lost"] or row["duplicated"] or not row["completed"] or row["tracebacks"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
