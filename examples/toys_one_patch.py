"""Toy-based CLs for one demo patch, its toys split over worker processes, checked against pyhf.

    python examples/toys_one_patch.py [ntoys] [workers]

The merged test-statistic samples are bitwise those of ``numpy.random.seed(seed)`` followed by
pyhf's ``ToyCalculator`` run serially with the same number of toys (see ``pyhf_dist.runtime.toys``).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pyhf

import pyhf_dist

PATCH, SEED = "demo_700_150", 1


def main(ntoys: int = 200, workers: int = 2) -> None:
    pallet = pyhf_dist.demo_pallet()
    started = time.time()
    result = pyhf_dist.map_fits(pallet, executor="local", workers=workers, patches=[PATCH], backend="numpy",
                                calctype="toybased", ntoys=ntoys, seed=SEED)
    record = result[PATCH]
    print(f"distributed: {ntoys} toys over {workers} workers in {time.time() - started:.1f} s: "
          f"CLs_obs={record.CLs_obs:.4f} CLs_exp={np.round(record.CLs_exp, 4).tolist()}")

    pyhf.set_backend("numpy")
    workspace = pyhf.Workspace(pallet.workspace)
    patch = next(p for p in pallet.patches if p.name == PATCH)
    model = workspace.model(patches=[patch.operations])
    data = workspace.data(model)
    started = time.time()
    np.random.seed(SEED)
    calculator = pyhf.infer.calculators.ToyCalculator(data, model, ntoys=ntoys, track_progress=False)
    sb, b = calculator.distributions(1.0)
    _, _, cls = calculator.pvalues(calculator.teststatistic(1.0), sb, b)
    print(f"serial pyhf: {time.time() - started:.1f} s: CLs_obs={float(cls):.4f}")


if __name__ == "__main__":
    main(*(int(value) for value in sys.argv[1:3]))
