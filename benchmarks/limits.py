"""95% CL upper limits on mu for a whole pallet on the fast path, against plain pyhf's ``upper_limit``.

    python benchmarks/limits.py                                  # 1Lbb and stau Region-combined
    python benchmarks/limits.py --pallets 1Lbb --sample 5 --trials 3
    python benchmarks/limits.py --scan 0,5,11                    # a grid instead of root-finding

For each pallet, printed and written to ``benchmarks/output/limits.json``:

* wall time of ``map_fits(..., calculation="upper_limit")`` on every patch (local executor,
  ``--workers`` workers, backend jax) from a cold ``python`` process (``one_scan.py``: imports,
  reading the pallet, starting the workers, fitting, writing the results file), over ``--trials``;
  how many patches took the fast path, fell back to plain pyhf (and why), or failed (and why);
* agreement with plain pyhf's ``pyhf.infer.intervals.upper_limits.upper_limit`` (numpy, serial,
  the same ``scan`` and ``level``) on a sample of ``--sample`` patches: the largest relative
  difference of the observed limit and of each expected one, and whether the same patches fail;
* in the same run, the scan of CLs at mu = 1 on the fast path (the same cold-process script), as
  the yardstick of this machine's speed at that moment (the machine is shared: ratios travel
  better than seconds);
* the time plain pyhf took per sample patch, and the whole pallet on ``--workers`` processes at
  that rate (what ``--upper-limit`` cost before the fast path covered it; it cannot be measured
  whole: hours).

Plain pyhf costs minutes per 1Lbb patch, so its limits are computed once (over ``--workers``
processes) and kept in ``benchmarks/output/limits-reference.json``, keyed by pallet, patch,
scan, level and pyhf version; later runs reuse them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sources  # noqa: E402
from baselines import CODE4, pool_upper_limits  # noqa: E402

OUTPUT = HERE / "output"
BANDS = ("obs", "exp-2", "exp-1", "exp", "exp+1", "exp+2")
#: Sample patches across each plane (excluded, boundary, allowed; for stau also best fits at mu = 0).
SAMPLES = {
    "1Lbb": ["C1N2_Wh_hbb_300_150", "C1N2_Wh_hbb_400_0", "C1N2_Wh_hbb_650_50", "C1N2_Wh_hbb_750_100",
             "C1N2_Wh_hbb_1000_0", "C1N2_Wh_hbb_550_200"],
    "stau": ["DS_100_1_Staus", "DS_120_40_Staus", "DS_240_80_Staus", "DS_300_1_Staus", "DS_160_100_Staus",
             "DS_200_120_Staus"],
}


def references(key: str, pallet, names: list, scan, level: float, workers: int) -> dict:
    """Plain pyhf's upper limits of ``names`` (cached in ``limits-reference.json``)."""
    import pyhf

    path = OUTPUT / "limits-reference.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    prefix = f"{key}|{scan}|{level}|pyhf {pyhf.__version__}|"
    todo = [p for p in pallet.patches if p.name in names and prefix + p.name not in cache]
    if todo:
        print(f"  plain pyhf upper limits on {len(todo)} {key} patches (cached afterwards)...", flush=True)
        jobs = [(p.name, p.operations, scan, level, CODE4) for p in todo]
        for name, outcome in pool_upper_limits(pallet, jobs, workers):
            cache[prefix + name] = outcome
            OUTPUT.mkdir(exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
            found = outcome.get("limits") or outcome.get("error")
            print(f"    {name}: {found} ({outcome['seconds']:.0f} s)", flush=True)
    return {name: cache[prefix + name] for name in names if prefix + name in cache}


# -------------------------------------------------------------------------------- fast path

def timed_scan(source: str, workers: int, scan, upper_limit: bool = True) -> dict:
    command = [sys.executable, str(HERE / "one_scan.py"), source, "--executor", "local",
               "--workers", str(workers), "--backend", "jax"]
    if upper_limit:
        command.append("--upper-limit")
    if upper_limit and scan is not None:
        command += ["--scan", ",".join(str(value) for value in scan)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def agreement(scan_limits: dict, scan_errors: dict, reference: dict) -> dict:
    worst = dict.fromkeys(BANDS, 0.0)
    mismatched = []
    for name, outcome in reference.items():
        ours = scan_limits.get(name)
        if "error" in outcome or ours is None:
            if "error" not in outcome or ours is not None:
                theirs, ours = outcome.get("error") or "ok", scan_errors.get(name) or "ok"
                mismatched.append(f"{name}: pyhf {theirs}, pyhf-dist {ours}")
            continue
        values = [ours[0], *ours[1]]
        for band, value, theirs in zip(BANDS, values, outcome["limits"]):
            if math.isnan(theirs) and value is not None and math.isnan(value):
                continue
            difference = abs(value - theirs) / abs(theirs) if value is not None else math.inf
            worst[band] = max(worst[band], difference)
    return {"max_relative_difference": worst, "patches": len(reference), "outcome_mismatches": mismatched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pallets", default="1Lbb,stau")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--sample", type=int, default=5, help="patches checked against plain pyhf")
    parser.add_argument("--scan", default=None, help="grid START,STOP,POINTS instead of root-finding")
    parser.add_argument("--level", type=float, default=0.05)
    args = parser.parse_args()
    scan = None
    if args.scan:
        start, stop, points = args.scan.split(",")
        scan = (float(start), float(stop), int(points))

    report = {}
    for key in args.pallets.split(","):
        if key not in SAMPLES:
            raise SystemExit(f"unknown pallet {key!r}: choose {' or '.join(SAMPLES)}")
        source = sources.spec(key)
        print(f"{key}: {source}", flush=True)
        walls, cls_walls = [], []
        for _ in range(args.trials):
            # Side by side: the CLs scan times this machine's speed at the moment of the limits' one.
            cls_walls.append(timed_scan(source, args.workers, None, upper_limit=False)["wall_seconds"])
            last = timed_scan(source, args.workers, scan)
            walls.append(last["wall_seconds"])
        pallet = sources.load(key, validate=True)
        names = SAMPLES[key][: args.sample]
        reference = references(key, pallet, names, scan, args.level, args.workers)
        seconds = [outcome["seconds"] for outcome in reference.values()]
        per_patch = statistics.mean(seconds) if seconds else None
        report[key] = {
            "patches": last["patches"],
            "workers": args.workers,
            "scan": scan,
            "wall_seconds": walls,
            "wall_seconds_mean": statistics.mean(walls),
            "cls_scan_wall_seconds": cls_walls,
            "engines": last["engines"],
            "failed": last["failed"],
            "errors": _counts(last["errors"]),
            "fallbacks": _counts(last["fallbacks"]),
            "compute_seconds_mean": last["compute_seconds"],
            "agreement": agreement(last["limits"], last["errors"], reference),
            "pyhf_seconds_per_patch": per_patch,
            "pyhf_pallet_seconds_estimate": per_patch * last["patches"] / args.workers if per_patch else None,
        }
        _print(key, report[key])
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "limits.json").write_text(json.dumps(report, indent=1))


def _counts(reasons: dict) -> dict:
    counts: dict = {}
    for reason in reasons.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _print(key: str, row: dict) -> None:
    walls = row["wall_seconds"]
    spread = f" ± {statistics.stdev(walls):.1f}" if len(walls) > 1 else ""
    print(f"  {row['patches']} patches, local executor, {row['workers']} workers, cold process: "
          f"{row['wall_seconds_mean']:.1f}{spread} s wall ({len(walls)} trial(s))")
    cls_wall = statistics.mean(row["cls_scan_wall_seconds"])
    print(f"  the same scan of CLs at mu = 1, side by side: {cls_wall:.1f} s "
          f"(upper limits take {row['wall_seconds_mean'] / cls_wall:.1f}x as long)")
    print(f"  engines: {row['engines']}; failed: {row['failed']}")
    for reason, count in {**row["errors"], **row["fallbacks"]}.items():
        print(f"    {count} x {reason}")
    agree = row["agreement"]
    worst = ", ".join(f"{band} {value:.2g}" for band, value in agree["max_relative_difference"].items())
    print(f"  vs pyhf upper_limit on {agree['patches']} sample patches, max relative difference: {worst}")
    if agree["outcome_mismatches"]:
        print(f"  outcome differs: {agree['outcome_mismatches']}")
    if row["pyhf_seconds_per_patch"]:
        print(f"  plain pyhf: {row['pyhf_seconds_per_patch']:.0f} s per sample patch -> about "
              f"{row['pyhf_pallet_seconds_estimate'] / 60:.0f} min for the pallet on {row['workers']} workers "
              f"({row['pyhf_pallet_seconds_estimate'] / row['wall_seconds_mean']:.0f}x the fast path)")


if __name__ == "__main__":
    sys.exit(main())
