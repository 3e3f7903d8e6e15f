"""Every shared pallet on the fast path: how many patches it fits, how fast, whether its fits
converged, and how its answers compare with pyhf's default fits and with MINUIT's.

    python benchmarks/pallets.py                          # all pallets, 2 workers, references on 10 patches each
    python benchmarks/pallets.py --reference-patches 0    # compare on every patch (slow: hours)
    python benchmarks/pallets.py --pallets stau-combined,3L-eRJR --workers 2

For each pallet (1Lbb; stau Region-combined, Region-lowMass, Region-highMass; 3L-eRJR) it prints:
patches, the fast-path share (records with ``engine == "fast"``) and why the others fell back, the
share whose fits are certified converged, the patches on which pyhf's default minimizer stalls at
its start (from the records), the wall time of the whole scan on the local executor from a cold
``python`` process (``one_scan.py``, backend jax), and, on the compared patches, the largest
|ΔCLs| (CLs_obs and the five CLs_exp):

* against plain pyhf (SciPy's SLSQP, pyhf's default) where SLSQP and MINUIT agree (within
  :data:`AGREE`): both converged, so this is the fast path's precision;
* against MINUIT where they do not (pyhf's default fits stop short there; MINUIT, iminuit through
  ``pyhf.optimize.minuit_optimizer``, strategy 2, is the field's standard), and how many patches
  MINUIT itself fails on;
* and the points excluded (CLs_obs < 0.05) by each of the three.

Plain pyhf is slow (1Lbb: ~1000 s for all 125 patches, MINUIT about as much again), so it runs on
``--reference-patches N`` patches spread over the pallet (0: all), and its results are kept in
``benchmarks/output/reference-*.json`` (one entry per patch and minimizer: later runs compute only
patches not yet there). Writes ``pallets.md`` and ``pallets.json`` to ``--output``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sources  # noqa: E402
from baselines import CODE4, serial_pyhf  # noqa: E402

DATA = sources.DATA
#: SLSQP and MINUIT "agree" (both converged) when their CLs differ by at most this.
AGREE = 1e-4
#: name -> where it is in the data directory (``file/pallet`` for one pallet of a multi-pallet
#: archive); the string is part of the reference caches' keys.
PALLETS = {
    name: where if pallet is None else f"{where}/{pallet}"
    for name, (where, pallet) in sources.PALLETS.items() if name != "stau"
}


def spread(names: list[str], count: int) -> list[str]:
    """``count`` names spread evenly over ``names`` (all of them for 0 or more than there are).

    >>> spread(["a", "b", "c", "d", "e"], 2)
    ['a', 'd']
    """
    if count <= 0 or count >= len(names):
        return list(names)
    step = math.ceil(len(names) / count)
    return names[::step][:count]


def reference(name: str, names: list[str], output: Path, optimizer: str = "scipy") -> tuple[dict, float | None]:
    """Plain serial pyhf on ``names``: ``({name: (obs, exp)}, seconds per patch)``, cached per patch
    (``(None, None)`` where MINUIT fails)."""
    key = hashlib.sha256(f"{name}\n{PALLETS[name]}\n{DATA}".encode()).hexdigest()[:12]
    suffix = "" if optimizer == "scipy" else f"-{optimizer}"
    cache = output / f"reference-{name}-{key}{suffix}.json"
    known = json.loads(cache.read_text()) if cache.exists() else {"results": {}, "seconds": {}}
    missing = [n for n in names if n not in known["results"]]
    if missing:
        pallet = sources.load(name, validate=True)
        pallet.patches = [patch for patch in pallet.patches if patch.name in missing]
        print(f"  plain serial pyhf ({optimizer}) on {len(missing)} patches of {name} (numpy; the slow part)...",
              flush=True)
        results, seconds = serial_pyhf(pallet, CODE4, optimizer)
        for patch_name, value in results.items():
            known["results"][patch_name] = value
            known["seconds"][patch_name] = seconds / len(results)
        cache.write_text(json.dumps(known))
    timed = [known["seconds"][n] for n in names if n in known["seconds"]]
    return {n: known["results"][n] for n in names}, (sum(timed) / len(timed) if timed else None)


def cls(value) -> list:
    """``(obs, [exp x5])`` as six numbers (``None`` for a fit that failed)."""
    observed, expected = value
    return [observed, *(expected or [None] * 5)]


def largest(pairs) -> float:
    """The largest |ΔCLs| over ``[(ours, theirs), ...]`` of six-number lists (0 for none)."""
    return max([0.0] + [difference(a, b) for ours, theirs in pairs for a, b in zip(ours, theirs)])


def compare(records: dict, slsqp: dict, minuit: dict, names: list[str]) -> dict:
    """The columns of one pallet's comparison on ``names`` (see the module)."""
    agree = [n for n in names if minuit[n][0] is not None and largest([(cls(slsqp[n]), cls(minuit[n]))]) <= AGREE]
    stopped = [n for n in names if n not in agree]
    judged = [n for n in stopped if minuit[n][0] is not None]

    def excluded(values: dict) -> int:
        return sum(1 for n in names if values[n][0] is not None and values[n][0] < 0.05)

    return {
        "compared": len(names),
        "agree": len(agree),
        "max_vs_pyhf": largest([(cls(records[n]), cls(slsqp[n])) for n in agree]),
        "stopped_short": len(stopped),
        "max_vs_minuit": largest([(cls(records[n]), cls(minuit[n])) for n in judged]),
        "minuit_failed": len(stopped) - len(judged),
        "excluded": {"pyhf": excluded(slsqp), "minuit": excluded(minuit), "pyhf-dist": excluded(records)},
    }


def difference(value, expected) -> float:
    """|value - expected|, where an undefined CLs (NaN, null) agrees only with another."""
    undefined = [x is None or (isinstance(x, float) and math.isnan(x)) for x in (value, expected)]
    if all(undefined):
        return 0.0
    return math.inf if any(undefined) else abs(value - expected)


def scan(source: str, workers: int) -> dict:
    """One scan of the whole pallet on the local executor, backend jax, in a fresh process."""
    command = [sys.executable, str(HERE / "one_scan.py"), source, "--executor", "local",
               "--workers", str(workers), "--backend", "jax"]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"one_scan.py failed on {source}:\n{run.stderr[-2000:]}")
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
    for name in args.pallets.split(","):
        if name not in PALLETS:
            raise SystemExit(f"unknown pallet {name!r}: choose from {', '.join(PALLETS)}")
        source = sources.spec(name)
        print(f"{name}: scanning {source} on {args.workers} local workers...", flush=True)
        measured = scan(source, args.workers)
        records = measured["results"]
        compared = spread(sorted(records), args.reference_patches)
        slsqp, serial_per_patch = reference(name, compared, output)
        minuit, _ = reference(name, compared, output, optimizer="minuit")
        row = {
            "pallet": name,
            "patches": measured["patches"],
            "failed": measured["failed"],
            "engines": measured["engines"],
            "converged": measured["converged"],
            "pyhf_stalls": measured["pyhf_stalls"],
            "excluded_all": sum(1 for value in records.values() if value[0] is not None and value[0] < 0.05),
            "fallbacks": collections.Counter(measured["fallbacks"].values()),
            "wall_seconds": measured["wall_seconds"],
            "serial_seconds_per_patch": serial_per_patch,
            **compare(records, slsqp, minuit, compared),
        }
        rows.append(row)
        print(f"  {row['engines']} in {row['wall_seconds']:.1f} s; {row['converged']} converged; max |ΔCLs| "
              f"{row['max_vs_pyhf']:.1e} vs pyhf on {row['agree']}, {row['max_vs_minuit']:.1e} vs MINUIT on "
              f"{row['stopped_short'] - row['minuit_failed']} of {len(compared)} patches", flush=True)
    table = write_table(rows, args.workers)
    (output / "pallets.md").write_text(table)
    (output / "pallets.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table)


def write_table(rows: list[dict], workers: int) -> str:
    lines = [
        f"| pallet | patches | fast path | converged | pyhf's default stalls | wall time (s), {workers} workers "
        "| plain serial pyhf (s/patch) | × faster than serial pyhf | compared | SLSQP = MINUIT: max abs ΔCLs vs pyhf "
        "| SLSQP stops short: max abs ΔCLs vs MINUIT (MINUIT failed) | excluded of compared: pyhf / MINUIT / pyhf-dist "
        "| excluded of all | fallbacks to plain pyhf |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        fast = row["engines"].get("fast", 0)
        share = f"{fast}/{row['patches']} ({100 * fast / row['patches']:.0f}%)" if row["patches"] else "–"
        serial = row["serial_seconds_per_patch"]
        per_patch = f"{serial:.1f}" if serial else "–"
        ratio = f"{serial * row['patches'] / row['wall_seconds']:.0f}" if serial else "–"
        reasons = "; ".join(f"{count}× {reason}" for reason, count in row["fallbacks"].items()) or "–"
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        converged = f"{row['converged']}/{row['patches']}"
        short = row["stopped_short"] - row["minuit_failed"]
        versus_minuit = f"{row['max_vs_minuit']:.1e} on {short}" if short else "–"
        if row["minuit_failed"]:
            versus_minuit += f" ({row['minuit_failed']})"
        versus_pyhf = f"{row['max_vs_pyhf']:.1e} on {row['agree']}" if row["agree"] else "–"
        excluded = " / ".join(str(row["excluded"][who]) for who in ("pyhf", "minuit", "pyhf-dist"))
        lines.append(
            f"| {row['pallet']} | {row['patches']}{failed} | {share} | {converged} | {row['pyhf_stalls']} "
            f"| {row['wall_seconds']:.1f} | {per_patch} | {ratio} | {row['compared']} | {versus_pyhf} | {versus_minuit} "
            f"| {excluded} | {row['excluded_all']} | {reasons} |"
        )
    note = ("\nWall time: the whole scan from a cold `python` process to the results file (local executor, "
            "backend jax), with the machine's pyhf-dist cache from earlier runs. Plain serial pyhf: numpy, "
            "timed on the compared patches; × faster: that per-patch time times the patches, over the wall time. "
            f"SLSQP = MINUIT: pyhf's default and MINUIT agree within {AGREE:g} on every CLs value (both converged); "
            "elsewhere pyhf's default fits stop short and MINUIT is the arbiter, where it converges.\n")
    return "\n".join(lines) + "\n" + note


if __name__ == "__main__":
    sys.exit(main())
