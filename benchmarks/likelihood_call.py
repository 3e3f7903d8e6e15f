"""One call of the likelihood's value and gradient: the C likelihood against the compiled jax one.

    python benchmarks/likelihood_call.py [--pallets 1Lbb,stau-combined,3L-eRJR] [--patches 3] [--calls 5000]

For a few patches of each pallet (spread over it), in one process: µs per call of each (best of
three passes of ``--calls`` calls at a point near pyhf's initial values, with the Python around
the call that a fit makes), their ratio, the patch's non-zero table entries, and how far apart
the two answers are at random points (``native.disagreement``: relative, gradients in the fits'
Fisher-scaled coordinates).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sources

from pyhf_dist.runtime.threads import thread_limits


def best_of(call, calls: int) -> float:
    """µs per call: the best of three passes (after a warm-up)."""
    for _ in range(200):
        call()
    passes = []
    for _ in range(3):
        began = time.perf_counter()
        for _ in range(calls):
            call()
        passes.append((time.perf_counter() - began) / calls * 1e6)
    return min(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pallets", default="1Lbb,stau-combined,3L-eRJR")
    parser.add_argument("--patches", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()

    import os

    os.environ.update(thread_limits(os.environ))
    from pyhf_dist.runtime.fast import engine, native

    if not native.available():
        sys.exit("the C likelihood is not built (pip install -e . with a C compiler) or is switched off")
    print("| pallet | patch | non-zero entries (histosys, normsys) | jax (µs) | C (µs) | jax / C | largest disagreement |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for name in args.pallets.split(","):
        pallet = sources.load(name)
        fast = engine.FastHypotest(pallet.workspace, verify=False)
        picks = np.linspace(0, len(pallet.patches) - 1, args.patches).astype(int)
        for index in picks:
            patch = pallet.patches[index]
            problem = fast.problem(patch.operations)
            main, aux = np.asarray(problem.main), np.asarray(problem.aux)
            mine = problem.evaluator(main, aux)
            if not problem.in_c:
                print(f"| {name} | {patch.name} | – | – | – | – | refused by its check |")
                continue
            jitted, device = problem.functions.value_and_grad, problem.layout
            theta = np.clip(problem.init + 0.3 * problem.scale, problem.lower, problem.upper)
            jax_us = best_of(lambda f=jitted, t=theta, m=main, a=aux, d=device: np.asarray(f(t, m, a, d)), args.calls)
            c_us = best_of(lambda f=mine, t=theta: f(t), args.calls)
            worst = 0.0
            for spread in (0.1, 1.0, 3.0):
                point = np.clip(problem.init + spread * problem.scale * rng.normal(size=theta.size), problem.lower,
                                problem.upper)
                worst = max(worst, native.disagreement(mine(point), jitted(point, main, aux, device), problem.scale))
            tables = native.tables(device, problem.functions.codes)[-1]
            entries = f"{len(tables[2])}, {len(tables[7])}"
            print(f"| {name} | {patch.name} | {entries} | {jax_us:.1f} | {c_us:.1f} | {jax_us / c_us:.2f} | {worst:.1e} |")


if __name__ == "__main__":
    main()
