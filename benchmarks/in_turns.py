"""Cold scans of every shared pallet with this checkout and earlier ones, taken in turns.

    python benchmarks/in_turns.py --before /path/to/earlier/checkout [--before ...] [--rounds 2]
                                  [--pallets 1Lbb,stau-combined,3L-eRJR] [--upper-limit]

An earlier checkout is a directory holding the ``pyhf_dist`` package of another commit
(``git worktree add /tmp/earlier COMMIT``); every scan runs in a fresh ``python`` process with
that directory first on ``PYTHONPATH``, in the same virtual environment, so only the package's
code differs. (To reproduce an older install, give a directory holding a link to that
``pyhf_dist`` and the other versions of its dependencies, unpacked from their wheels.) Each scan is what a user runs (``load_pallet``, then ``map_fits(pallet,
executor="local", workers=2)``), timed from the interpreter's start to the last record. Rounds go
round every pallet and every checkout in turn, so the machine's load falls on all of them alike;
the table gives the median of the rounds and each checkout's ratio to this one. The first round
of a checkout may compile the likelihood or check its structure against pyhf (each checkout keys
the cache on its own code): use two rounds or more.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sources  # noqa: E402

#: Every shared pallet, by its name in :data:`sources.PALLETS`.
PALLETS = ["1Lbb", "stau-combined", "stau-lowMass", "stau-highMass", "3L-eRJR"]

SCAN = """
import time
began = time.perf_counter()
import sys
import pyhf_dist

def main():
    source, name, upper_limit = sys.argv[1], sys.argv[2] or None, sys.argv[3] == "1"
    pallet = pyhf_dist.load_pallet(source, pallet=name) if name else pyhf_dist.load_pallet(source)
    options = {"calculation": "upper_limit"} if upper_limit else {}
    records = list(pyhf_dist.map_fits(pallet, executor="local", workers=2, **options))
    ok = sum(record.status == "ok" for record in records)
    print(time.perf_counter() - began, ok, len(records))

if __name__ == "__main__":
    main()
"""


def scan(code: Path, source: str, name: str | None, upper_limit: bool) -> tuple[float, int, int]:
    """``(wall seconds, ok records, records)`` of one cold scan with the package of ``code``."""
    environment = {**os.environ, "PYTHONPATH": str(code)}
    run = subprocess.run([sys.executable, "-c", SCAN, source, name or "", "1" if upper_limit else "0"],
                         capture_output=True, text=True, env=environment, cwd=code)
    if run.returncode != 0:
        raise RuntimeError(f"scan with {code} failed:\n{run.stderr[-2000:]}")
    wall, ok, total = run.stdout.split()[-3:]
    return float(wall), int(ok), int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", action="append", required=True, type=Path,
                        help="a checkout of an earlier commit (repeat for several)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pallets", default=",".join(PALLETS), help=f"comma-separated, of {', '.join(PALLETS)}")
    parser.add_argument("--upper-limit", action="store_true", help="95%% CL upper limits instead of CLs at mu = 1")
    args = parser.parse_args()
    codes = [*(path.resolve() for path in args.before), HERE.parent]
    labels = [*(str(path) for path in args.before), "this checkout"]
    chosen = args.pallets.split(",")
    unknown = [label for label in chosen if label not in PALLETS]
    if unknown:
        parser.error(f"unknown pallet {unknown[0]!r}: choose from {', '.join(PALLETS)}")
    walls: dict = {}
    for round_number in range(1, args.rounds + 1):
        for label in chosen:
            path, name = sources.location(label)
            for code, code_label in zip(codes, labels):
                wall, ok, total = scan(code, path, name, args.upper_limit)
                walls.setdefault((label, code_label), []).append(wall)
                print(f"round {round_number}: {label:22} {code_label}: {wall:.2f} s ({ok} of {total} ok)", flush=True)
    print(f"\n| pallet | {' | '.join(labels)} | {' | '.join(f'{label} / this' for label in labels[:-1])} |")
    print("| --- |" + " ---: |" * (2 * len(labels) - 1))
    for label in chosen:
        medians = [statistics.median(walls[label, code_label]) for code_label in labels]
        ratios = [f"{median / medians[-1]:.2f}" for median in medians[:-1]]
        print(f"| {label} | {' | '.join(f'{median:.2f}' for median in medians)} | {' | '.join(ratios)} |")
    load = os.getloadavg()[0]
    print(f"\nmedian wall seconds of {args.rounds} rounds, cold processes, 2 local workers; load {load:.1f}")


if __name__ == "__main__":
    main()
