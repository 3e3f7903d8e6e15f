"""What ``scipy.optimize.minimize`` costs around each evaluation, against driving its L-BFGS-B routine directly.

    python benchmarks/lbfgsb_overhead.py [PALLET] [--patches 5] [--repeats 3]

On the first ``--patches`` patches of the pallet (default 1Lbb), the fit a hypotest starts with
(the observed data at ``mu = 0``, from pyhf's initial values, in the fast path's scaled
coordinates) is run through ``scipy.optimize.minimize(method="L-BFGS-B")`` and through
:func:`pyhf_dist.runtime.fast.lbfgsb.minimize`, in turns, ``--repeats`` times each; single-threaded.
Prints microseconds per evaluation of each, of the objective alone (the compiled likelihood and
its scaling), and whether the two give the same minimum, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import single_threaded  # noqa: E402

os.environ.update(single_threaded())

import numpy as np  # noqa: E402

import sources  # noqa: E402


def background_fit(fit):
    """``(objective, start, lower, upper)`` of the fit at ``mu = 0`` to the observed data, in the
    scaled coordinates of the free parameters, as
    :meth:`~pyhf_dist.runtime.fast.problem.FitProblem.minimum` sets it up."""
    fixed = fit.fixed.copy()
    fixed[fit.poi_index] = True
    free = ~fixed
    scale = fit.scale[free]
    theta = np.where(fixed, fit.init, 0.0)
    theta[fit.poi_index] = 0.0

    def objective(x):
        theta[free] = x * scale
        result = np.asarray(fit.functions.value_and_grad(theta, fit.main, fit.aux, fit.layout))
        return result[0], result[1:][free] * scale

    lower, upper = fit.lower[free] / scale, fit.upper[free] / scale
    return objective, np.clip(fit.init[free] / scale, lower, upper), lower, upper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pallet", nargs="?", default="1Lbb")
    parser.add_argument("--patches", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from scipy.optimize import Bounds
    from scipy.optimize import minimize as scipy_minimize

    from pyhf_dist.runtime.fast import FastHypotest, lbfgsb, problem

    pallet = sources.load(args.pallet)
    fast = FastHypotest(pallet.workspace, verify=False)
    options = {"gtol": problem.GTOL, "ftol": problem.FTOL, "maxcor": problem.MAXCOR,
               "maxiter": problem.MAXITER, "maxfun": problem.MAXITER}
    seconds = {"scipy.optimize.minimize": 0.0, "driven directly": 0.0, "objective alone": 0.0}
    evaluations, same = 0, True
    for patch in pallet.patches[: args.patches]:
        objective, start, lower, upper = background_fit(fast.problem(patch.operations))
        if not evaluations:  # untimed: the compiled likelihood's first calls, the driver's check
            lbfgsb.minimize(objective, start, lower, upper, **options)
            scipy_minimize(objective, start, jac=True, method="L-BFGS-B", bounds=Bounds(lower, upper), options=options)
        for _ in range(args.repeats):
            began = time.perf_counter()
            theirs = scipy_minimize(objective, start, jac=True, method="L-BFGS-B", bounds=Bounds(lower, upper),
                                    options=options)
            seconds["scipy.optimize.minimize"] += time.perf_counter() - began
            began = time.perf_counter()
            ours = lbfgsb.minimize(objective, start, lower, upper, **options)
            seconds["driven directly"] += time.perf_counter() - began
            began = time.perf_counter()
            for _ in range(ours.nfev):
                objective(start)
            seconds["objective alone"] += time.perf_counter() - began
            evaluations += ours.nfev
            same = same and np.array_equal(ours.x, theirs.x) and ours.nfev == theirs.nfev
    per_fit = evaluations / (args.patches * args.repeats)
    print(f"{args.pallet}: {args.patches} patches x {args.repeats} repeats, {per_fit:.0f} evaluations per fit; "
          f"L-BFGS-B driven directly: {lbfgsb.direct()}")
    for name, total in seconds.items():
        print(f"  {name:24} {total / evaluations * 1e6:7.1f} us per evaluation")
    overhead = {name: (seconds[name] - seconds["objective alone"]) / evaluations * 1e6 for name in list(seconds)[:2]}
    print(f"  around the objective: {overhead['scipy.optimize.minimize']:.1f} us through minimize, "
          f"{overhead['driven directly']:.1f} us driven directly")
    print(f"  same minima, bit for bit: {same}")


if __name__ == "__main__":
    main()
