"""Patches of different structures fitted together (``runtime.fast.group``) against one at a time.

    python benchmarks/groups.py                          # 1Lbb and 3L-eRJR, groups of 16
    python benchmarks/groups.py --pallets 1Lbb --group 32 --upper-limit-values 12
    python benchmarks/groups.py --pallets 1Lbb,stau-combined,stau-lowMass,stau-highMass,3L-eRJR --group 1000
                                                         # on a GPU: each pallet in one group
    python benchmarks/groups.py --pallets 1Lbb --limits 32 # upper limits, searches in lockstep

In one process, per pallet, after a warm-up group (compilation is not timed):

* the hypotests at mu = 1 of every patch one at a time on the certified fast path
  (``PoiScan``, as ``fit.hypotest``, always on the CPU, as a scan fits them there) and in groups
  of ``--group`` patches (``GroupScan``, on jax's default device: a GPU where jax sees one), the
  patches a group leaves (its starts found different minima, or a fit failed) then one at a time:
  wall time of each, the ratio, how many patches were left, and the largest |ΔCLs| between the two;
* with ``--upper-limit-values N``: the CLs at ``N`` POI values per patch (a search's worth of
  values) both ways: wall time and ratio;
* with ``--limits N`` instead: the upper limits (pyhf's root-finding) of ``N`` patches spread over
  the pallet, one at a time (on the CPU) and with their searches in lockstep, each round of POI
  values fitted in one group (``runtime.fast.group_limits``), the patches it leaves (or whose
  search fails: a limit beyond the POI bound) then one at a time: wall time, ratio, how many were
  left, and the largest relative difference of the limits.

Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sources


def _one_at_a_time(problems, mus):
    from pyhf_dist.runtime.fast import fit
    from pyhf_dist.runtime.fast.errors import FastPathUnsupported

    out = []
    for problem, values in zip(problems, mus):
        try:
            stats = fit.PoiScan(problem, "qtilde").statistics_many(values)
            out.append([fit.asymptotic_cls(s["qmu"], s["qmu_A"], "qtilde", powerless_is_one=True) for s in stats])
        except FastPathUnsupported:
            out.append(None)
    return out


def _grouped(problems, mus, size: int, alone=None):
    from pyhf_dist.runtime.fast.group import GroupScan

    out = []
    for start in range(0, len(problems), size):
        out.extend(GroupScan(problems[start : start + size]).statistics(mus[start : start + size]))
    # What a group leaves is fitted one at a time (``alone``: the same problems on the CPU), as a
    # scan would: its time counts.
    alone = problems if alone is None else alone
    left = [i for i, found in enumerate(out) if found is None]
    for i, found in zip(left, _one_at_a_time([alone[i] for i in left], [mus[i] for i in left])):
        out[i] = found
    return out, len(left)


def _largest_difference(first, second) -> float:
    worst = 0.0
    for ours, theirs in zip(first, second):
        if ours is None or theirs is None:
            continue
        for a, b in zip(ours, theirs):
            worst = max(worst, abs(a["CLs_obs"] - b["CLs_obs"]), *(abs(x - y) for x, y in zip(a["CLs_exp"], b["CLs_exp"])))
    return worst


def _limits(problems, on_cpu) -> tuple[list, list, float, float, int]:
    """Upper limits of ``problems`` one at a time (on ``on_cpu``, the same patches on the CPU) and in
    lockstep: ``(one at a time, in lockstep, seconds, seconds, patches the lockstep left)``; a limit
    is ``(observed, expected)``."""
    from pyhf_dist.runtime.fast import group_limits, limits

    def alone(indices):
        out = []
        for i in indices:
            try:
                found = limits.upper_limit(on_cpu[i], "qtilde", 0.05)
                out.append((found["mu_up_obs"], found["mu_up_exp"]))
            except Exception:  # noqa: BLE001 - counted as no limit
                out.append(None)
        return out

    began = time.perf_counter()
    one_at_a_time = alone(range(len(problems)))
    alone_seconds = time.perf_counter() - began
    began = time.perf_counter()
    found = group_limits.upper_limits(problems.__getitem__, list(range(len(problems))))
    together = [None if f is None else (f["mu_up_obs"], f["mu_up_exp"]) for f in found]
    left = [i for i, f in enumerate(together) if f is None]
    for i, f in zip(left, alone(left)):
        together[i] = f
    return one_at_a_time, together, alone_seconds, time.perf_counter() - began, len(left)


def _largest_relative(first, second) -> float:
    worst = 0.0
    for ours, theirs in zip(first, second):
        if ours is None or theirs is None:
            continue
        for a, b in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):
            worst = max(worst, abs(a - b) / abs(b))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pallets", default="1Lbb,3L-eRJR")
    parser.add_argument("--group", type=int, default=16, help="patches per group")
    parser.add_argument("--upper-limit-values", type=int, default=0, help="also N POI values per patch")
    parser.add_argument("--limits", type=int, default=0, help="instead: the upper limits of N patches")
    args = parser.parse_args()

    import jax
    import numpy as np

    from pyhf_dist.protocol import SMALLEST_GROUP
    from pyhf_dist.runtime.fast.engine import FastHypotest

    device = jax.devices()[0]
    # Each structure is checked against pyhf's own model where pyhf is installed; a GPU machine
    # may have jax, numpy and scipy alone (the arithmetic is the same as on the CPU, where the
    # checks run in the tests).
    verify = importlib.util.find_spec("pyhf") is not None
    if not verify:
        print("pyhf is not installed: the structures are not checked against pyhf's model here", flush=True)
    rows = []
    for name in args.pallets.split(","):
        pallet = sources.load(name)
        engine = FastHypotest(pallet.workspace, verify=verify)
        problems = [engine.problem(patch.operations) for patch in pallet.patches]
        on_cpu = problems
        if device.platform != "cpu":
            with jax.default_device(jax.devices("cpu")[0]):
                engine = FastHypotest(pallet.workspace, verify=verify)  # its arrays and compiled code on the CPU
                on_cpu = [engine.problem(patch.operations) for patch in pallet.patches]
        if args.limits:
            # Patches spread over the pallet (a pallet's first ones may all be points beyond its
            # reach, whose search fails at the POI bound whichever way it runs).
            spread = sorted(set(np.linspace(0, len(problems) - 1, min(args.limits, len(problems))).round().astype(int)))
            chosen, chosen_on_cpu = [problems[i] for i in spread], [on_cpu[i] for i in spread]
            count = len(chosen)
            _limits(chosen[:SMALLEST_GROUP], chosen_on_cpu[:SMALLEST_GROUP])  # warm-up: compilation
            alone, together, alone_seconds, group_seconds, left = _limits(chosen, chosen_on_cpu)
            rows.append((name, "upper limits", count, alone_seconds, group_seconds, left, _largest_relative(together, alone)))
            print(f"{name}: upper limits: one at a time {alone_seconds:.1f} s, in lockstep {group_seconds:.1f} s", flush=True)
            continue
        cases = [("hypotest mu=1", [[1.0]] * len(problems))]
        if args.upper_limit_values:
            cases.append((f"{args.upper_limit_values} POI values", [list(np.linspace(0.2, 3.0, args.upper_limit_values))] * len(problems)))
        for label, mus in cases:
            _grouped(problems[: args.group], mus[: args.group], args.group)  # warm-up: compilation
            _one_at_a_time(on_cpu[:2], mus[:2])
            began = time.perf_counter()
            alone = _one_at_a_time(on_cpu, mus)
            alone_seconds = time.perf_counter() - began
            began = time.perf_counter()
            together, left = _grouped(problems, mus, args.group, on_cpu)
            group_seconds = time.perf_counter() - began
            worst = _largest_difference(together, alone)
            rows.append((name, label, len(problems), alone_seconds, group_seconds, left, worst))
            print(f"{name}: {label}: one at a time {alone_seconds:.1f} s, groups of {args.group} {group_seconds:.1f} s", flush=True)
    print()
    print(f"Groups on {device.device_kind} ({device.platform}); one at a time on the CPU.")
    difference = "max rel. d(limit)" if args.limits else "max abs dCLs"
    print(f"| pallet | fits | patches | one at a time (s) | in groups (s) | ratio | left to one at a time | {difference} |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, label, count, alone_seconds, group_seconds, left, worst in rows:
        print(f"| {name} | {label} | {count} | {alone_seconds:.1f} | {group_seconds:.1f} | "
              f"{alone_seconds / group_seconds:.2f} | {left} | {worst:.1e} |")


if __name__ == "__main__":
    main()
