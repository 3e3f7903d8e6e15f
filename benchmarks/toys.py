"""Toy-based hypotests: the fast path toy by toy against pyhf, speed, and a killed scan resumed.

    python benchmarks/pyhf_toy_reference.py 1lbb benchmarks/output/toy-reference/1lbb.jsonl   # hours; resumable
    python benchmarks/toys.py                          # per-toy table, 10,000 toys of C1N2_Wh_hbb_700_150 on 2 workers
    python benchmarks/toys.py --resume-toys 200000     # also a 200,000-toy scan killed half way and resumed
    python benchmarks/toys.py --ntoys 0                # the per-toy table alone

A toy here is one pseudo-experiment of one hypothesis (one test statistic: a conditional and a free
fit); ``ntoys=N`` draws N signal-plus-background and N background-only toys, as pyhf's
ToyCalculator. What it prints:

1. **Per toy** — for every toy that ``pyhf_toy_reference.py`` fitted with plain pyhf (numpy,
   SLSQP, one BLAS thread; toys drawn after ``numpy.random.seed(1)`` with ``ntoys =
   --reference-toys``), the fast path's statistic of the same toy and the class it falls in:
   ``agree`` (|Δq| <= 1e-6), ``close`` (<= 1e-3, both at one minimum), ``pyhf stopped above``
   (one of pyhf's fits ends above pyhf's own -2 log L at the fast path's parameters),
   ``fast stopped above`` (the other way round: a local minimum), ``at pyhf's rounding`` (both fits
   within the resolution of pyhf's own -2 log L, where that is coarser than 1e-4: 3L-eRJR's is
   0.002), toys without a minimum split by
   what pyhf returned for them (``q = 0``, ``q > 0``, raised), ``pyhf raised``; max |Δq| per
   class. The fast side runs the worker's own code (``calculations.compute``) in this process
   (one BLAS thread, an empty cache: generating parameters computed as the reference computed them).
2. **Speed** — ``map_fits(..., backend="jax", calctype="toybased", ntoys=N, seed=1)`` of the patch on
   ``--workers`` local workers from a cold ``python`` process, with an empty pyhf-dist cache and
   again with the cache it left: wall time, toys per second per worker (records' worker time), peak
   worker memory, CLs, the toys without a minimum and CLs under the other treatments.
3. ``--resume-toys M``: a scan of M toys killed with SIGKILL (client and workers) once half its
   chunks are journaled, resumed, and run again uninterrupted: chunks journaled, fitted again
   (none should be), CLs identical or not.
4. ``--scan-toys M``: every patch of the pallet with M toys, wall time from a cold process.

Timings on a shared 2-core machine are noisy: compare figures of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The reference was fitted with one BLAS thread: threaded BLAS sums in another order, pyhf's
# generating fits end elsewhere by ~1e-4, and the toys drawn from them are not the same toys.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("PYHF_DIST_DATA", HERE.parent.parent / "shared" / "data"))
sys.path.insert(0, str(HERE))


def cold_scan(pallet: str, patches, ntoys: int, workers: int, cache: str) -> dict:
    """One toy scan in a fresh ``python`` process; returns its JSON summary."""
    code = f"""
import json, sys, time
began = time.perf_counter()
import pyhf_dist
def main():
    result = pyhf_dist.map_fits({pallet!r}, patches={patches!r}, executor="local", workers={workers}, backend="jax",
                                calctype="toybased", ntoys={ntoys}, seed=1)
    records = [r.to_dict() for r in result]
    wall = time.perf_counter() - began
    import resource  # the workers have exited: their peak resident memory, in kB on Linux
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({{"wall": wall, "records": records, "worker_peak_mb": peak}}))
if __name__ == "__main__":
    main()
"""
    environment = dict(os.environ, PYHF_DIST_CACHE=cache)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(code)
    try:
        out = subprocess.run([sys.executable, handle.name], capture_output=True, text=True, env=environment, check=True)
    finally:
        os.unlink(handle.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------- per-toy comparison

#: Agreement of one toy's statistic with pyhf's.
AGREE = 1e-6
#: A fit lower than the other's by more than this (pyhf's -2 log L of both minima) found a lower
#: minimum: the other stopped above it.
LOWER = 1e-4


def fast_toys(label: str, ntoys: int, seed: int) -> dict:
    """The fast path's toys of one model as a scan's worker fits them (``toystats.run_chunk``),
    with the parameters behind each statistic (the same fits again: the engine is deterministic).

    The reference's toys are pyhf's, drawn from pyhf's own fits of the observed data; the engine
    fits those same toys here. Where pyhf's fits of the observed data stop short (3L-eRJR: pyhf's
    minimizer stalls there) a scan draws its toys from the converged fits instead, so the scan's
    statistics are other toys' and are not compared with these.
    """
    import numpy as np
    import pyhf

    from toy_models import load

    from pyhf_dist.runtime import reference, toys
    from pyhf_dist.runtime.fast import FastPathUnsupported, batched, for_state, toystats
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.protocol import WorkerContext
    from pyhf_dist.runtime import initialize

    spec, operations = load(label)
    settings = FitSettings(backend="jax", calctype="toybased", ntoys=ntoys, seed=seed)
    state = initialize(WorkerContext.build(spec, settings.to_dict()))
    pyhf.set_backend("numpy")
    model, data = reference.build_model(state, operations)
    fast = for_state(state)
    began = time.perf_counter()
    try:
        chunk = toystats.run_chunk(fast, operations, model, data, settings, toys.split(ntoys, 1)[0])
        engine, reason = "fast", None
    except FastPathUnsupported as error:
        chunk, engine, reason = None, "pyhf", str(error).splitlines()[0]
    seconds = time.perf_counter() - began
    samples = toys.draw(model, data, settings)
    problem = fast.problem(operations)
    fitter = batched.BatchFitter(problem)
    out = {"engine": engine, "fallback_reason": reason, "seconds": seconds, "model": model,
           "teststat": chunk["toys"]["teststat"] if chunk else toys.pyhf_statistic(model, data, settings)}
    for key, sample, generating in (("sb", "signal", "signal_pars"), ("b", "background", "background_pars")):
        rows = np.asarray(samples[sample])
        point = np.asarray(samples[generating], dtype=float)
        result = toystats.toy_statistics(fitter, rows, 1.0, "qtilde", metric_at=point, generating=point)
        away = np.asarray(result["runaway"], dtype=bool)
        values = np.where(away, toys.NO_MINIMUM_STATISTIC, result["teststat"])
        if chunk is not None and not (chunk.get("pyhf_default") or {}).get("toys_drawn_from"):
            scanned = np.asarray(chunk["toys"][key])
            lost = ~np.isfinite(values)  # lost by the engine: the scan took pyhf's own fits
            values[lost] = scanned[lost]
            assert np.array_equal(values, scanned), "the engine's fits are not those of the scan"
        out[key] = values
        out[key + "_no_minimum"] = away
        out[key + "_theta"] = (result["theta_conditional"], result["theta_free"])
        out[key + "_rows"] = rows
    return out


def read_reference(path: Path) -> dict:
    """pyhf's per-toy fits (``pyhf_toy_reference.py``) by ``(hypothesis, toy)``."""
    entries = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        entries[(entry["hypothesis"], entry["toy"])] = entry
    return entries


def pyhf_resolution(model, theta, row, draws: int = 8) -> float:
    """How finely pyhf's ``-2 log L`` resolves at ``theta``: the spread of its values at points a
    relative 1e-9 away, where at a minimum the likelihood itself moves by far less.

    On 3L-eRJR a shapesys with tau ~ 2e11 puts terms of ~5e12 into pyhf's sum, whose float64
    values step by 2**-9 (0.002): pyhf's fits there cannot tell minima closer than that apart.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    theta = np.asarray(theta, dtype=float)
    values = [float(-2.0 * model.logpdf(theta * (1.0 + 1e-9 * rng.standard_normal(theta.shape)), row)[0])
              for _ in range(draws)]
    return max(values) - min(values)


def classify(fast: dict, reference: dict) -> dict:
    """Every toy pyhf fitted, in one class; the counts and the worst cases.

    Classes: ``agree`` (|Δq| <= 1e-6); ``close`` (|Δq| <= 1e-3, both fits at one minimum: the
    rounding of SLSQP's stopping rule); ``pyhf stopped above`` (one of pyhf's fits ends higher
    than pyhf's own -2 log L at the fast path's parameters: pyhf's fit did not converge);
    ``fast stopped above`` (the other way round); ``at pyhf's rounding`` (both fits within twice
    the resolution of pyhf's own ``-2 log L`` there, :func:`pyhf_resolution`, where that exceeds
    the 1e-4 of the two classes before: they count as different minima only beyond it); ``other``
    (a larger |Δq| that neither explains);
    for toys without a minimum (the fast path's fits ran away): ``no minimum: pyhf q = 0``,
    ``no minimum: pyhf q > 0``, ``no minimum: pyhf raised``; ``pyhf raised`` elsewhere.
    """

    model = fast["model"]
    counts: dict[str, dict] = {}
    worst = {"agree": 0.0}
    examples: dict[str, list] = {}
    for (hypothesis, toy), entry in sorted(reference.items()):
        if toy >= len(fast[hypothesis]):
            continue
        q = float(fast[hypothesis][toy])
        raised = "q" not in entry
        delta = abs(q - entry["q"]) if not raised else None
        if fast[hypothesis + "_no_minimum"][toy]:
            kind = "no minimum: pyhf raised" if raised else (
                "no minimum: pyhf q = 0" if entry["q"] == 0 else "no minimum: pyhf q > 0")
        elif raised:
            kind = "pyhf raised"
        elif delta <= AGREE:
            kind = "agree"
            worst["agree"] = max(worst["agree"], delta)
        else:
            row = fast[hypothesis + "_rows"][toy]
            gaps, steps = [], []
            for index, name in enumerate(("conditional", "free")):
                theta = fast[hypothesis + "_theta"][index][toy]
                ours = float(-2.0 * model.logpdf(theta, row)[0])
                gaps.append(entry[name]["twice_nll"] - ours)  # > 0: pyhf's fit ended higher
                steps.append(pyhf_resolution(model, theta, row))
            lower = max(LOWER, 2.0 * max(steps))
            if max(gaps) > lower:
                kind = "pyhf stopped above"
            elif min(gaps) < -lower:
                kind = "fast stopped above"
            elif delta <= 1e-3:
                kind = "close"
            elif lower > LOWER:
                kind = "at pyhf's rounding"
            else:
                kind = "other"
            worst[kind] = max(worst.get(kind, 0.0), delta)
        counts.setdefault(kind, {"sb": 0, "b": 0})[hypothesis] += 1
        if kind != "agree" and len(examples.setdefault(kind, [])) < 3:
            examples[kind].append({"hypothesis": hypothesis, "toy": toy, "q_fast": q, "q_pyhf": entry.get("q"),
                                   "pyhf": {k: entry[k] for k in ("conditional", "free")}})
    return {"counts": counts, "max |dq|": worst, "examples": examples}


def per_toy(labels, ntoys: int, seed: int, references: Path) -> list[dict]:
    """The per-toy table: every toy pyhf's reference fitted, by class and hypothesis."""
    from toy_models import name

    rows = []
    # Generating parameters computed here, as the reference computed them, not recalled from a
    # cache another process (other threads) filled.
    os.environ["PYHF_DIST_CACHE"] = "off"
    for label in labels:
        path = references / f"{label}.jsonl"
        if not path.exists():
            print(f"no reference for {label}: run benchmarks/pyhf_toy_reference.py {label} {path}")
            continue
        reference = read_reference(path)
        fast = fast_toys(label, ntoys, seed)
        table = classify(fast, reference)
        compared = {h: sum(1 for (hyp, toy) in reference if hyp == h and toy < ntoys) for h in ("sb", "b")}
        rows.append({"model": name(label), "engine": fast["engine"] if fast["engine"] == "fast" else
                     "batched engine; scans use plain pyhf here", "fallback_reason": fast["fallback_reason"],
                     "toys compared": compared, **table,
                     "fast toys/s (one process, this model)":
                         round(2 * ntoys / fast["seconds"], 1) if fast["engine"] == "fast" else None})
    return rows


RESUME_SCAN = """
import json, sys, time
import pyhf_dist
began = time.perf_counter()
result = pyhf_dist.map_fits({pallet!r}, patches=[{patch!r}], executor="local", workers={workers}, backend="jax",
                            calctype="toybased", ntoys={ntoys}, seed=1, journal={journal!r}, resume={resume})
record = result[{patch!r}]
print(json.dumps({{"wall": time.perf_counter() - began, "CLs_obs": record.CLs_obs, "CLs_exp": record.CLs_exp,
                  "status": record.status, "error": record.error, "toy_summary": record.toy_summary}}))
"""


def journal_chunks(path: Path) -> list[tuple]:
    """``(start, stop)`` of every chunk line of a journal (a line cut short by the kill skipped)."""
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "chunk" in entry:
            found.append((entry["chunk"]["record"]["toys"]["start"], entry["chunk"]["record"]["toys"]["stop"]))
    return found


def interrupted_and_resumed(pallet: str, patch: str, ntoys: int, workers: int, cache: str) -> dict:
    """A toy scan killed (SIGKILL to its process group: client and workers) once half its chunks are
    journaled, resumed, and the same scan uninterrupted: their CLs, and which chunks were fitted."""
    import signal

    from pyhf_dist.runtime import toys

    environment = dict(os.environ, PYHF_DIST_CACHE=cache)
    blocks = len(toys.plan_blocks(ntoys)) if toys.block_stream(ntoys) else None
    figures = {"toys per hypothesis": ntoys, "chunks": blocks}
    with tempfile.TemporaryDirectory() as directory:
        journal = Path(directory) / "scan.journal.jsonl"

        def run(resume: bool, kill_at: int | None = None, journal_path: Path = journal):
            code = RESUME_SCAN.format(pallet=pallet, patch=patch, workers=workers, ntoys=ntoys, journal=str(journal_path),
                                      resume=resume)
            began = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=environment,
                                       start_new_session=True)
            if kill_at is not None:
                while process.poll() is None and len(journal_chunks(journal_path)) < kill_at:
                    time.sleep(0.2)
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return {"wall": time.perf_counter() - began}
            out, _ = process.communicate()
            return json.loads(out.strip().splitlines()[-1])

        killed = run(False, kill_at=(blocks or 2) // 2)
        kept = journal_chunks(journal)
        resumed = run(True)
        after = journal_chunks(journal)
        uninterrupted = run(False, journal_path=Path(directory) / "fresh.journal.jsonl")
    figures.update({
        "killed after s": round(killed["wall"], 1),
        "chunks journaled at the kill": len(kept),
        "resumed run wall s": round(resumed["wall"], 1),
        "chunks fitted by the resumed run": len(after) - len(kept),
        "chunk fitted twice": len(after) != len(set(after)),
        "uninterrupted wall s": round(uninterrupted["wall"], 1),
        "CLs identical": (resumed["CLs_obs"], resumed["CLs_exp"]) == (uninterrupted["CLs_obs"], uninterrupted["CLs_exp"]),
        "CLs_obs, CLs_exp": [resumed["CLs_obs"], resumed["CLs_exp"]],
        "toys without a minimum": resumed["toy_summary"]["no_minimum"],
    })
    return figures


def table(rows: list[dict]) -> str:
    """The per-toy agreement as a markdown table: one row per model and class."""
    lines = ["| model | toys compared (s+b / b) | class | s+b | b | max \\|Δq\\| |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        compared = f"{row['toys compared']['sb']} / {row['toys compared']['b']}"
        for kind, counts in sorted(row["counts"].items(), key=lambda item: -sum(item[1].values())):
            worst = row["max |dq|"].get(kind)
            lines.append(f"| {row['model']} ({row['engine']}) | {compared} | {kind} | {counts['sb']} | {counts['b']} | "
                         f"{'' if worst is None else f'{worst:.2g}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pallet", default=str(DATA / "1Lbb-likelihoods-hepdata.tar.gz"))
    parser.add_argument("--patch", default="C1N2_Wh_hbb_700_150")
    parser.add_argument("--ntoys", type=int, default=10000, help="toys per hypothesis of the timed scan (0: none)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-toy", default="1lbb,stau,3l", help="models of the per-toy table (those with a reference)")
    parser.add_argument("--reference", type=Path, default=HERE / "output" / "toy-reference",
                        help="folder of pyhf_toy_reference.py outputs, <model>.jsonl")
    parser.add_argument("--reference-toys", type=int, default=1000, help="ntoys the references were drawn with")
    parser.add_argument("--resume-toys", type=int, default=0, help="also kill a scan of this many toys half way and resume it")
    parser.add_argument("--scan-toys", type=int, default=0, help="also fit every patch with this many toys")
    args = parser.parse_args()

    lines = {}
    if args.per_toy:
        rows = per_toy([m for m in args.per_toy.split(",") if m], args.reference_toys, 1, args.reference)
        print("\nper-toy agreement with pyhf's own fits of the same toys (qtilde, mu = 1, seed 1):")
        print(table(rows))
        for row in rows:
            print(f"  {row['model']}: fast path {row['fast toys/s (one process, this model)']} toys/s in one process; "
                  f"examples: {json.dumps(row['examples'], default=str)[:2000]}")

    if args.ntoys:
        with tempfile.TemporaryDirectory() as cache:
            empty = cold_scan(args.pallet, [args.patch], args.ntoys, args.workers, cache)
            warm = cold_scan(args.pallet, [args.patch], args.ntoys, args.workers, cache)
        for name, run in (("empty cache", empty), ("warm cache", warm)):
            record = run["records"][0]
            assert record["status"] == "ok", record["error"]
            lines[f"{args.ntoys} toys of each hypothesis, {args.workers} workers, wall s ({name})"] = round(run["wall"], 1)
            lines[f"toys/s per worker ({name})"] = round(2 * args.ntoys / record["fit_seconds"], 1)
            lines[f"peak worker memory, MB ({name})"] = round(run["worker_peak_mb"])
        record = warm["records"][0]
        lines["CLs_obs, CLs_exp"] = [record["CLs_obs"], record["CLs_exp"]]
        lines["toys without a minimum (s+b, b)"] = record["toy_summary"]["no_minimum"]
        for name in ("if_dropped", "if_infinite"):
            if name in record["toy_summary"]:
                lines[f"  CLs {name.replace('_', ' ')}"] = [record["toy_summary"][name]["CLs_obs"],
                                                            record["toy_summary"][name]["CLs_exp"]]

    if args.resume_toys:
        with tempfile.TemporaryDirectory() as cache:
            figures = interrupted_and_resumed(args.pallet, args.patch, args.resume_toys, args.workers, cache)
        for key, value in figures.items():
            lines[f"interrupted and resumed: {key}"] = value

    if args.scan_toys:
        with tempfile.TemporaryDirectory() as cache:
            scan = cold_scan(args.pallet, None, args.scan_toys, args.workers, cache)
        failed = [r["name"] for r in scan["records"] if r["status"] != "ok"]
        engines = sorted({r["engine"] for r in scan["records"]})
        lines[f"all {len(scan['records'])} patches x {args.scan_toys} toys, wall s (empty cache)"] = round(scan["wall"], 1)
        lines["  failed patches, engines"] = [failed, engines]

    print()
    for key, value in lines.items():
        print(f"{key:<70} {value}")


if __name__ == "__main__":
    main()
