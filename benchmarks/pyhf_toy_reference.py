"""Plain pyhf's fits of individual toys, journaled toy by toy (the reference of ``toys.py --per-toy``).

    python benchmarks/pyhf_toy_reference.py 1lbb out.jsonl --ntoys 1000 --seed 1

For every toy ``i`` (signal-plus-background toy ``i``, then background-only toy ``i``, so that a
run stopped early still covers both hypotheses alike) it records what pyhf 0.7.6 on numpy with its
default SLSQP makes of it: the conditional fit at the tested POI value and the free fit (each
``-2 log L``, the POI, whether pyhf raised and with what), and pyhf's own test statistic
(``pyhf.infer.test_statistics.qmu_tilde``'s formula on those two fits, which are the fits it runs). One JSON line per toy, flushed as it is done; a rerun
with the same output skips the toys already there. Toys are drawn by :func:`pyhf_dist.runtime.toys.draw`,
which draws them as pyhf's ToyCalculator does after ``numpy.random.seed(seed)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import build_model, use_numpy  # noqa: E402
from toy_models import MODELS, load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("output")
    parser.add_argument("--ntoys", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--last", type=int, default=None)
    args = parser.parse_args()

    import numpy as np
    from pyhf.infer.mle import fit, fixed_poi_fit

    from pyhf_dist.runtime import toys
    from pyhf_dist.settings import FitSettings

    use_numpy()
    spec, operations = load(args.model)
    settings = FitSettings(backend="numpy", calctype="toybased", ntoys=args.ntoys, seed=args.seed)
    model, data = build_model(spec, operations, settings.modifier_settings, validate=False)
    samples = toys.draw(model, data, settings)
    init, bounds, fixed = model.config.suggested_init(), model.config.suggested_bounds(), model.config.suggested_fixed()
    poi = model.config.poi_index
    output = Path(args.output)
    done = set()
    if output.exists():
        for line in output.read_text().splitlines():
            try:
                entry = json.loads(line)
                done.add((entry["hypothesis"], entry["toy"]))
            except (ValueError, KeyError):
                pass
    import warnings

    warnings.filterwarnings("ignore")
    with open(output, "a") as stream:
        for i in range(args.first, args.ntoys if args.last is None else args.last):
            for hypothesis, key in (("sb", "signal"), ("b", "background")):
                if (hypothesis, i) in done:
                    continue
                row = samples[key][i]
                entry = {"hypothesis": hypothesis, "toy": i}
                began = time.process_time()
                for name, call in (
                    ("conditional", lambda: fixed_poi_fit(1.0, row, model, init, bounds, fixed, return_fitted_val=True)),
                    ("free", lambda: fit(row, model, init, bounds, fixed, return_fitted_val=True)),
                ):
                    try:
                        pars, value = call()
                        entry[name] = {"twice_nll": float(value), "poi": float(pars[poi]),
                                       "min_yield": float(np.min(model.expected_actualdata(pars)))}
                    except Exception as error:  # pyhf raises FailedMinimization and friends
                        entry[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
                conditional, free = entry["conditional"], entry["free"]
                if "error" not in conditional and "error" not in free:
                    # pyhf's qmu_tilde from the same two fits (it runs exactly these, with these
                    # starts and bounds; refitting would only double the time).
                    tmu = max(conditional["twice_nll"] - free["twice_nll"], 0.0)
                    entry["q"] = 0.0 if free["poi"] > 1.0 else tmu
                entry["cpu_s"] = time.process_time() - began
                stream.write(json.dumps(entry) + "\n")
                stream.flush()


if __name__ == "__main__":
    main()
