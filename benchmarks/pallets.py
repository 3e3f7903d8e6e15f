"""Every shared pallet on the fast path: how many patches it fits, how fast, how close to pyhf.

    python benchmarks/pallets.py                          # all pallets, 2 workers, reference on 10 patches each
    python benchmarks/pallets.py --reference-patches 0    # compare with plain pyhf on every patch (slow)
    python benchmarks/pallets.py --pallets stau-combined,3L-eRJR --workers 2

For each pallet (1Lbb; stau Region-combined, Region-lowMass, Region-highMass; 3L-eRJR) it prints:
patches, the fast-path share (records with ``engine == "fast"``) and why the others fell back, the
wall time of the whole scan on the local executor from a cold ``python`` process
(``one_scan.py``, backend jax), and the largest |ΔCLs| (CLs_obs and the five CLs_exp) against
plain serial pyhf on numpy.

Plain pyhf is slow (1Lbb: ~1000 s for all 125 patches), so it runs on ``--reference-patches N``
patches spread over the pallet (0: all), and its results are kept in
``benchmarks/output/reference-*.json`` (one entry per patch: later runs compute only patches not
yet there). Writes ``pallets.md`` and ``pallets.json`` to ``--output``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import serial_pyhf  # noqa: E402

DATA = Path(os.environ.get("PYHF_DIST_DATA", HERE.parent.parent / "shared" / "data"))
CODE4 = {"normsys": {"interpcode": "code4"}, "histosys": {"interpcode": "code4p"}}
STAU = "stau-likelihoods-1911.06660.tar.gz"
#: name -> (where it is, relative to the data directory or the extracted stau tarball).
PALLETS = {
    "1Lbb": "1Lbb-likelihoods-hepdata.tar.gz",
    "stau-combined": f"{STAU}/Region-combined",
    "stau-lowMass": f"{STAU}/Region-lowMass",
    "stau-highMass": f"{STAU}/Region-highMass",
    "3L-eRJR": "3L-eRJR",
}


def pallet_path(name: str, scratch: Path) -> Path:
    """The pallet's path; the stau tarball is extracted into ``scratch`` (a temporary directory:
    published pallets are never copied into the repository)."""
    where = PALLETS[name]
    if not where.startswith(STAU):
        return DATA / where
    target = scratch / "stau"
    region = where.split("/", 1)[1]
    if not (target / "1911.06660" / region / "patchset.json").exists():
        with tarfile.open(DATA / STAU) as archive:
            members = [m for m in archive.getmembers() if m.name.endswith(("BkgOnly.json", "patchset.json"))]
            archive.extractall(target, members=members, filter="data")
    return target / "1911.06660" / region


def spread(names: list[str], count: int) -> list[str]:
    """``count`` names spread evenly over ``names`` (all of them for 0 or more than there are).

    >>> spread(["a", "b", "c", "d", "e"], 2)
    ['a', 'd']
    """
    if count <= 0 or count >= len(names):
        return list(names)
    step = math.ceil(len(names) / count)
    return names[::step][:count]


def reference(name: str, path: Path, names: list[str], output: Path) -> tuple[dict, float | None]:
    """Plain serial pyhf on ``names``: ``({name: (obs, exp)}, seconds per patch)``, cached per patch."""
    import pyhf_dist

    key = hashlib.sha256(f"{name}\n{PALLETS[name]}\n{DATA}".encode()).hexdigest()[:12]
    cache = output / f"reference-{name}-{key}.json"
    known = json.loads(cache.read_text()) if cache.exists() else {"results": {}, "seconds": {}}
    missing = [n for n in names if n not in known["results"]]
    if missing:
        pallet = pyhf_dist.load_pallet(path)
        pallet.patches = [patch for patch in pallet.patches if patch.name in missing]
        print(f"  plain serial pyhf on {len(missing)} patches of {name} (numpy; the slow part)...", flush=True)
        results, seconds = serial_pyhf(pallet, CODE4)
        for patch_name, value in results.items():
            known["results"][patch_name] = value
            known["seconds"][patch_name] = seconds / len(results)
        cache.write_text(json.dumps(known))
    timed = [known["seconds"][n] for n in names if n in known["seconds"]]
    return {n: known["results"][n] for n in names}, (sum(timed) / len(timed) if timed else None)


def difference(value, expected) -> float:
    """|value - expected|, where an undefined CLs (NaN, null) agrees only with another."""
    undefined = [x is None or (isinstance(x, float) and math.isnan(x)) for x in (value, expected)]
    if all(undefined):
        return 0.0
    return math.inf if any(undefined) else abs(value - expected)


def scan(path: Path, workers: int) -> dict:
    """One scan of the whole pallet on the local executor, backend jax, in a fresh process."""
    command = [sys.executable, str(HERE / "one_scan.py"), str(path), "--executor", "local",
               "--workers", str(workers), "--backend", "jax"]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"one_scan.py failed on {path}:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pallets", default=",".join(PALLETS), help=f"comma list of {', '.join(PALLETS)}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reference-patches", type=int, default=10,
                        help="compare with plain pyhf on N patches spread over each pallet (0: all)")
    parser.add_argument("--output", default=str(HERE / "output"))
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    rows = []
    scratch = tempfile.TemporaryDirectory(prefix="pyhf-dist-pallets-")
    for name in args.pallets.split(","):
        path = pallet_path(name, Path(scratch.name))
        print(f"{name}: scanning {path} on {args.workers} local workers...", flush=True)
        measured = scan(path, args.workers)
        records = measured["results"]
        compared = spread(sorted(records), args.reference_patches)
        expected, serial_per_patch = reference(name, path, compared, output)
        worst = 0.0
        for patch_name in compared:
            observed = records[patch_name]
            reference_obs, reference_exp = expected[patch_name]
            pairs = [(observed[0], reference_obs)] + list(zip(observed[1] or [None] * 5, reference_exp))
            worst = max([worst] + [difference(a, b) for a, b in pairs])
        row = {
            "pallet": name,
            "patches": measured["patches"],
            "failed": measured["failed"],
            "engines": measured["engines"],
            "fallbacks": collections.Counter(measured["fallbacks"].values()),
            "wall_seconds": measured["wall_seconds"],
            "compared": len(compared),
            "max_difference": worst,
            "serial_seconds_per_patch": serial_per_patch,
        }
        rows.append(row)
        print(f"  {row['engines']} in {row['wall_seconds']:.1f} s; max |ΔCLs| {worst:.1e} on {len(compared)} patches",
              flush=True)
    scratch.cleanup()
    table = write_table(rows, args.workers)
    (output / "pallets.md").write_text(table)
    (output / "pallets.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table)


def write_table(rows: list[dict], workers: int) -> str:
    lines = [
        f"| pallet | patches | fast path | wall time (s), {workers} workers | plain serial pyhf (s/patch) "
        "| × faster than serial pyhf | max abs ΔCLs (patches compared) | fallbacks to plain pyhf |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        fast = row["engines"].get("fast", 0)
        share = f"{fast}/{row['patches']} ({100 * fast / row['patches']:.0f}%)" if row["patches"] else "–"
        serial = row["serial_seconds_per_patch"]
        per_patch = f"{serial:.1f}" if serial else "–"
        ratio = f"{serial * row['patches'] / row['wall_seconds']:.0f}" if serial else "–"
        reasons = "; ".join(f"{count}× {reason}" for reason, count in row["fallbacks"].items()) or "–"
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        lines.append(
            f"| {row['pallet']} | {row['patches']}{failed} | {share} | {row['wall_seconds']:.1f} | {per_patch} "
            f"| {ratio} | {row['max_difference']:.1e} ({row['compared']}) | {reasons} |"
        )
    note = ("\nWall time: the whole scan from a cold `python` process to the results file (local executor, "
            "backend jax), with the machine's pyhf-dist cache from earlier runs. Plain serial pyhf: numpy, "
            "timed on the compared patches; × faster: that per-patch time times the patches, over the wall time.\n")
    return "\n".join(lines) + "\n" + note


if __name__ == "__main__":
    sys.exit(main())
