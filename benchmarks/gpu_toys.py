"""Toy fits of one 1Lbb patch with the batched engine on a GPU (whatever jax sees) and on the CPU.

    python benchmarks/gpu_toys.py /path/to/1Lbb-likelihoods-hepdata.tar.gz
    python benchmarks/gpu_toys.py TARBALL --ntoys 20000 --batches 4096,32768 --cpu-toys 1000

What it does (a few minutes; it stops adding batch sizes when ``--budget`` seconds are spent):

1. reads the pallet with ``pyhf_dist.load_pallet`` (unvalidated) and builds the fast path's model of the patch
   (``--patch``, default C1N2_Wh_hbb_700_150) — no network, no pyhf-dist cache needed;
2. draws ``--ntoys`` signal-plus-background and as many background-only toys: with pyhf exactly as
   its ToyCalculator does after ``numpy.random.seed(1)`` when pyhf is installed, otherwise with
   numpy from the fast path's own conditional fits (same distributions, other random numbers);
3. on jax's default device (a GPU when jax sees one), for each batch size: compiles the engine
   (timed apart), then computes every toy's test statistic (qtilde, mu = 1: a conditional and a free
   fit per toy) and prints toys per second;
4. the same on ``jax.devices("cpu")`` for the first ``--cpu-toys`` toys of each hypothesis (one
   process; XLA uses the machine's cores as it likes), and the agreement of the statistics between
   the devices on those toys (max |dq|, and how many differ by more than 1e-6 and by more than
   1e-3; toys whose fits run away — no minimum — and toys whose fits were lost are counted apart).

A toy is one pseudo-experiment of one hypothesis (one test statistic, two fits).
"""

from __future__ import annotations

import time

BEGAN = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def draw_toys(workspace: dict, operations: list, problem, ntoys: int, seed: int = 1) -> dict:
    """Signal-plus-background and background-only toys, as pyhf draws them when it can."""
    import numpy as np

    try:
        import pyhf
    except ImportError:
        pyhf = None
    if pyhf is not None:
        from pyhf_dist.runtime import toys
        from pyhf_dist.settings import FitSettings

        from baselines import build_model, use_numpy

        use_numpy()
        model, data = build_model(workspace, operations)
        settings = FitSettings(backend="jax", calctype="toybased", ntoys=ntoys, seed=seed)
        samples = toys.draw(model, data, settings)
        samples["source"] = "pyhf (as ToyCalculator after numpy.random.seed)"
        return samples
    # Without pyhf: the fast path's conditional fits and pyhf's sampling distributions.
    from pyhf_dist.runtime.fast import toystats

    rng = np.random.default_rng(seed)
    n = problem.n_pars
    columns = toystats.auxdata_columns(problem)
    sigma = np.asarray(problem.layout["sigma"])[:n]
    gauss = np.asarray(problem.layout["gauss"])[:n]
    tau = np.asarray(problem.layout["tau"])[:n]
    samples = {"source": "numpy from the fast path's fits (pyhf not installed)"}
    for key, mu in (("signal", 1.0), ("background", 0.0)):
        theta, _ = problem.fit(problem.main, problem.aux, problem.init, poi_value=mu)
        main, aux_all = (np.asarray(a) for a in problem.functions.expected(theta, problem.layout))
        rows = np.empty((ntoys, len(main) + len(columns)))
        rows[:, : len(main)] = rng.poisson(main, (ntoys, len(main)))
        expected_aux = aux_all[:n][columns]
        draws = np.where(gauss[columns], rng.normal(expected_aux, sigma[columns], (ntoys, len(columns))), 0.0)
        poisson_draws = rng.poisson(np.maximum(theta[:n][columns] * tau[columns], 0.0), (ntoys, len(columns)))
        rows[:, len(main) :] = np.where(gauss[columns], draws, poisson_draws)
        samples[key] = rows
        samples[f"{key}_pars"] = np.asarray(theta[:n])
    return samples


def run(problem, samples, device, batch: int, count: int) -> dict:
    """Statistics of the first ``count`` toys of each hypothesis on ``device``; times and results."""
    import numpy as np

    from pyhf_dist.runtime.fast import batched, toystats

    fitter = batched.BatchFitter(problem, device=device, batch=batch, fallback=False)
    # Compile (or load from the persistent cache) on a handful of toys first.
    began = time.perf_counter()
    point = np.asarray(samples["signal_pars"], dtype=float)
    toystats.toy_statistics(fitter, samples["signal"][:4], 1.0, "qtilde", metric_at=point, generating=point)
    compile_seconds = time.perf_counter() - began
    out, evaluations, began = {}, 0, time.perf_counter()
    for key in ("signal", "background"):
        generating = np.asarray(samples[f"{key}_pars"], dtype=float)
        # The scan's fits: from pyhf's starting point and from the generating point (toystats.run_chunk).
        result = toystats.toy_statistics(fitter, samples[key][:count], 1.0, "qtilde", metric_at=generating,
                                         generating=generating)
        out[key] = result
        evaluations += result["evaluations"]
    seconds = time.perf_counter() - began
    statistics = np.concatenate([out["signal"]["teststat"], out["background"]["teststat"]])
    runaway = np.concatenate([out["signal"]["runaway"], out["background"]["runaway"]])
    converged = np.concatenate([out["signal"]["converged"], out["background"]["converged"]])
    return {
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "batch": batch,
        "toys": int(len(statistics)),
        "seconds": round(seconds, 3),
        "compile_seconds": round(compile_seconds, 1),
        "toys_per_second": round(len(statistics) / seconds, 1),
        "evaluations_per_fit": round(evaluations / (2 * len(statistics)), 1),
        "runaway_toys": int(runaway.sum()),
        "unconverged_toys": int(np.sum(~converged & ~runaway)),
        "statistics": statistics,
        "runaway": runaway,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tarball")
    parser.add_argument("--patch", default="C1N2_Wh_hbb_700_150")
    parser.add_argument("--ntoys", type=int, default=20000, help="toys per hypothesis on the default device")
    parser.add_argument("--batches", default="4096,32768", help="slots per batch on the default device")
    parser.add_argument("--cpu-toys", type=int, default=1000, help="toys per hypothesis on the CPU")
    parser.add_argument("--cpu-batch", type=int, default=64)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds after which no new batch size starts")
    args = parser.parse_args()

    import jax
    import numpy as np

    import pyhf_dist
    from pyhf_dist.runtime.fast import FastHypotest, configure_jax

    configure_jax()
    pallet = pyhf_dist.load_pallet(args.tarball, validate=False)
    workspace = pallet.workspace
    operations = next(p.operations for p in pallet.patches if p.name == args.patch)
    import importlib.util

    verify = importlib.util.find_spec("pyhf") is not None  # the structure check compares with pyhf.Model
    problem = FastHypotest(workspace, verify=verify).problem(operations)
    samples = draw_toys(workspace, operations, problem, max(args.ntoys, args.cpu_toys))
    default = jax.devices()[0]
    print(f"jax {jax.__version__}; default device: {default.platform} {getattr(default, 'device_kind', '')}; "
          f"toys drawn with {samples['source']}; setup {time.perf_counter() - BEGAN:.1f} s", flush=True)

    results = []
    for batch in [int(b) for b in args.batches.split(",") if b]:
        if time.perf_counter() - BEGAN > args.budget:
            print(f"batch {batch}: skipped (budget of {args.budget:.0f} s spent)")
            continue
        result = run(problem, samples, default, batch, args.ntoys)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("statistics", "runaway")}), flush=True)
    cpu = run(problem, samples, jax.devices("cpu")[0], args.cpu_batch, args.cpu_toys)
    print(json.dumps({k: v for k, v in cpu.items() if k not in ("statistics", "runaway")}), flush=True)

    # Agreement between the devices on the toys both fitted (statistics are signal toys first).
    count = args.cpu_toys
    for result in results:
        pick = np.r_[0:count, len(result["statistics"]) // 2 : len(result["statistics"]) // 2 + count]
        ours, theirs = result["statistics"][pick], cpu["statistics"]
        away = result["runaway"][pick] | cpu["runaway"]
        # A statistic is NaN where a fit was lost (did not converge): counted apart.
        lost = ~away & ~(np.isfinite(ours) & np.isfinite(theirs))
        delta = np.abs(ours - theirs)[~away & ~lost]
        print(json.dumps({
            "agreement": f"{result['device']} batch {result['batch']} vs cpu batch {cpu['batch']}",
            "toys": int(len(pick)),
            "max_abs_dq": float(np.max(delta, initial=0.0)),
            "toys_dq_above_1e-6": int(np.sum(delta > 1e-6)),
            "toys_dq_above_1e-3": int(np.sum(delta > 1e-3)),
            "runaway_on_either": int(away.sum()),
            "lost_on_either": int(lost.sum()),
        }))
        if result["device"].startswith("cpu"):
            continue
        print(f"speed-up of {result['device']} batch {result['batch']} over this CPU process: "
              f"{result['toys_per_second'] / cpu['toys_per_second']:.1f}x")
    print(f"total {time.perf_counter() - BEGAN:.1f} s")


if __name__ == "__main__":
    main()
