"""Toy-based hypotests: plain pyhf against the batched fast path, speed and agreement.

    python benchmarks/toys.py                        # 1Lbb C1N2_Wh_hbb_700_150, 10,000 toys, 2 workers
    python benchmarks/toys.py --ntoys 2000 --compare 4 --no-stau
    python benchmarks/toys.py --scan-toys 1000       # also every 1Lbb patch with 1,000 toys (long)

A toy here is one pseudo-experiment of one hypothesis (one test statistic: a conditional and a free
fit); ``ntoys=N`` draws N signal-plus-background and N background-only toys, as pyhf's
ToyCalculator. What it prints:

1. **Before** — plain pyhf (``pyhf.infer.test_statistics`` on numpy, what every toy costs today):
   toys per second of one worker, timed on the ``--compare`` toys of each hypothesis (their
   statistics are also the reference of step 3).
2. **After** — ``pyhf_dist.map_fits(..., backend="jax", calctype="toybased", ntoys=N, seed=1)`` of the
   patch on ``--workers`` local workers, from a cold ``python`` process: wall time, once with an
   empty pyhf-dist cache (the engine compiles, pyhf's two generating fits run) and once more with
   the cache that run left (as a second scan on a machine finds it); toys per second per worker
   from the records' worker time.
3. **Agreement** — per toy, |q_fast - q_pyhf| on the compared toys of 1Lbb, of a stau
   (Region-combined) patch and of the all-modifier test workspace (toys drawn exactly as pyhf's
   ToyCalculator draws them after ``numpy.random.seed``: the same toys by construction); CLs from
   both sets of statistics on those shared toys, and the number of near ties (a toy whose
   statistic lies within 1e-3 of the observed one, where the two CLs may differ by that toy).
   Toys whose fits run away (an empty bin's expected yield driven far below zero: the likelihood
   has no minimum, pyhf returns wherever its minimizer stops or raises) are counted apart.
   For the N toys of step 2: the near ties with the observed statistic and the runaway toys.
4. ``--scan-toys M``: every patch of the pallet with M toys, wall time from a cold process.

Timings on a shared 2-core machine are noisy: compare figures of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("PYHF_DIST_DATA", HERE.parent.parent / "shared" / "data"))
TIE = 1e-3


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


def compare(label: str, spec: dict, operations: list, ntoys: int, compare_count: int, seed: int = 1) -> dict:
    """Per-toy statistics of pyhf and of the fast path on the first ``compare_count`` toys."""
    import numpy as np
    import pyhf

    from pyhf_dist import toys
    from pyhf_dist.fast import FastHypotest, batched, toystats
    from pyhf_dist.settings import FitSettings

    pyhf.set_backend("numpy")
    settings = FitSettings(backend="jax", calctype="toybased", ntoys=ntoys, seed=seed)
    workspace = pyhf.Workspace(spec, validate=False)
    model = workspace.model(patches=[operations] if operations else [], modifier_settings=settings.modifier_settings)
    data = workspace.data(model)
    samples = toys.draw(model, data, settings)
    reference, seconds = {}, 0.0
    for key in ("signal", "background"):
        began = time.process_time()
        reference[key] = np.array([toys.pyhf_statistic(model, row, settings) for row in samples[key][:compare_count]])
        seconds += time.process_time() - began
    observed_pyhf = toys.pyhf_statistic(model, data, settings)
    problem = FastHypotest(spec).problem(operations)
    fitter = batched.BatchFitter(problem)
    ours, runaway = {}, {}
    for key, pars in (("signal", "signal_pars"), ("background", "background_pars")):
        generating = np.asarray(samples[pars], dtype=float)
        result = toystats.toy_statistics(fitter, samples[key][:compare_count], 1.0, "qtilde", generating, generating)
        ours[key], runaway[key] = result["teststat"], result["runaway"]
    observed = toystats.toy_statistics(fitter, np.asarray(data)[None], 1.0, "qtilde")["teststat"][0]
    both = np.concatenate([ours["signal"], ours["background"]])
    theirs = np.concatenate([reference["signal"], reference["background"]])
    away = np.concatenate([runaway["signal"], runaway["background"]])
    delta = np.abs(both - theirs)
    near = int(np.sum(np.abs(theirs - observed_pyhf) < TIE))
    cls_fast = toys.cls_from_distributions(observed, ours["signal"], ours["background"])
    cls_pyhf = toys.cls_from_distributions(observed_pyhf, reference["signal"], reference["background"])
    return {
        "label": label,
        "toys compared": int(len(both)),
        "pyhf toys/s/worker": len(both) / seconds,
        "max |dq| (converged)": float(np.max(delta[~away], initial=0.0)),
        "toys |dq| > 1e-3 (converged)": int(np.sum(delta[~away] > TIE)),
        "runaway toys": int(np.sum(away)),
        "max |dq| (runaway)": float(np.max(delta[away], initial=0.0)),
        "|dq| observed": float(abs(observed - observed_pyhf)),
        "CLs fast": cls_fast["CLs_obs"],
        "CLs pyhf": cls_pyhf["CLs_obs"],
        "CLs_exp equal": cls_fast["CLs_exp"] == cls_pyhf["CLs_exp"],
        "near ties": near,
    }


def synthetic_spec() -> dict:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_fast import small_workspace

    return small_workspace()


def stau(directory: Path, pallet: str = "Region-combined"):
    with tarfile.open(DATA / "stau-likelihoods-1911.06660.tar.gz") as archive:
        members = [m for m in archive.getmembers() if f"/{pallet}/" in m.name and not Path(m.name).name.startswith("._")]
        archive.extractall(directory, members=members, filter="data")
    base = next(directory.rglob(f"{pallet}/BkgOnly.json")).parent
    return json.loads((base / "BkgOnly.json").read_text()), json.loads((base / "patchset.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pallet", default=str(DATA / "1Lbb-likelihoods-hepdata.tar.gz"))
    parser.add_argument("--patch", default="C1N2_Wh_hbb_700_150")
    parser.add_argument("--ntoys", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compare", type=int, default=10, help="toys per hypothesis compared with plain pyhf")
    parser.add_argument("--no-stau", action="store_true")
    parser.add_argument("--stau-patch", type=int, default=20, help="index of the stau Region-combined patch")
    parser.add_argument("--scan-toys", type=int, default=0, help="also fit every patch with this many toys")
    args = parser.parse_args()

    import numpy as np

    import pyhf_dist
    from pyhf_dist import calculations, toys
    from pyhf_dist.settings import FitSettings
    from pyhf_dist.worker import WorkerContext, initialize

    pallet = pyhf_dist.load_pallet(args.pallet, validate=False)
    patch = next(p for p in pallet.patches if p.name == args.patch)
    lines = {}

    # 1 + 3: plain pyhf on the compared toys, and the agreement there.
    rows = [compare(f"1Lbb {args.patch}", pallet.workspace, patch.operations, args.ntoys, args.compare)]
    if not args.no_stau:
        with tempfile.TemporaryDirectory() as directory:
            spec, patchset = stau(Path(directory))
            chosen = patchset["patches"][args.stau_patch]
            rows.append(compare(f"stau {chosen['metadata']['name']}", spec, chosen["patch"], args.ntoys, max(2, args.compare // 2)))
    rows.append(compare("all-modifier workspace", synthetic_spec(), [], 1000, 100))
    before = rows[0]["pyhf toys/s/worker"]
    lines["before: plain pyhf, toys/s per worker (1Lbb)"] = round(before, 4)

    # 2: the whole patch from cold processes.
    with tempfile.TemporaryDirectory() as cache:
        empty = cold_scan(args.pallet, [args.patch], args.ntoys, args.workers, cache)
        warm = cold_scan(args.pallet, [args.patch], args.ntoys, args.workers, cache)
    for name, run in (("empty cache", empty), ("warm cache", warm)):
        record = run["records"][0]
        assert record["status"] == "ok", record["error"]
        lines[f"{args.ntoys} toys, {args.workers} workers, wall s ({name})"] = round(run["wall"], 1)
        lines[f"after: fast path, toys/s per worker ({name})"] = round(2 * args.ntoys / record["fit_seconds"], 1)
        lines[f"peak worker memory, MB ({name})"] = round(run["worker_peak_mb"])
    lines["speed-up per worker (warm cache)"] = round(2 * args.ntoys / warm["records"][0]["fit_seconds"] / before, 1)
    lines["CLs_obs, CLs_exp (fast path)"] = [warm["records"][0]["CLs_obs"], warm["records"][0]["CLs_exp"]]

    # The same N toys in this process: near ties with the observed statistic, runaway toys.
    settings = FitSettings(backend="jax", calctype="toybased", ntoys=args.ntoys, seed=1)
    state = initialize(WorkerContext.build(pallet.workspace, settings.to_dict()))
    chunk = calculations.compute(state, {"patch": patch.operations, "chunk": toys.split(args.ntoys, 1)[0]})
    part = chunk["toys"]
    statistics = np.array(part["sb"] + part["b"])
    lines[f"{args.ntoys} toys: near ties with the observed statistic"] = int(np.sum(np.abs(statistics - part["teststat"]) < TIE))
    lines[f"{args.ntoys} toys: runaway toys, fits redone one at a time"] = [part["runaway"], part["fallbacks"]]

    if args.scan_toys:
        with tempfile.TemporaryDirectory() as cache:
            scan = cold_scan(args.pallet, None, args.scan_toys, args.workers, cache)
        failed = [r["name"] for r in scan["records"] if r["status"] != "ok"]
        engines = sorted({r["engine"] for r in scan["records"]})
        lines[f"all {len(scan['records'])} patches x {args.scan_toys} toys, wall s (empty cache)"] = round(scan["wall"], 1)
        lines["  failed patches, engines"] = [failed, engines]

    print("\nagreement with plain pyhf on shared toys (qtilde, mu = 1):")
    for row in rows:
        print("  " + json.dumps(row))
    print()
    for key, value in lines.items():
        print(f"{key:<62} {value}")


if __name__ == "__main__":
    main()
