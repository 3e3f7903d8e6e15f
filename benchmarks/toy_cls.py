"""CLs and its band from toy distributions: sorted samples against pyhf's value-at-a-time count.

    python benchmarks/toy_cls.py [--sizes 10000,40000,100000,1000000] [--direct-up-to 40000]

pyhf's ``ToyCalculator.expected_pvalues`` counts, for every background-only sample, the samples of
both distributions at or above it: N^2 comparisons. :func:`pyhf_dist.runtime.toys.cls_from_distributions`
gets the same counts from the sorted samples. A toy scan's client computes CLs three times when it
merges a patch's chunks (the answer, and the two alternatives for toys without a minimum). For
each size (toys per hypothesis, chi-square samples with ties), this prints the seconds of one CLs
computation both ways (the direct count only up to ``--direct-up-to``, beyond that extrapolated as
N^2 from the largest size timed), of the client's whole merge of the patch's chunks of 10,000
toys (:func:`pyhf_dist.chunks.merge`), and whether both ways give the same numbers bit for bit.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pyhf_dist.chunks import merge
from pyhf_dist.runtime.toys import BLOCK, NORMAL_PERCENTILES, cls_from_distributions
from pyhf_dist.settings import FitSettings


def one_value_at_a_time(teststat, sb, b):
    """pyhf's formulas evaluated as pyhf evaluates them (``EmpiricalDistribution.pvalue`` per value)."""

    def pvalues(value):
        clsb = np.sum(np.where(sb >= value, 1, 0)) / sb.shape[0]
        clb = np.sum(np.where(b >= value, 1, 0)) / b.shape[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            return clsb, clb, clsb / clb

    clsb, clb, cls = pvalues(teststat)
    band = np.percentile(np.asarray([pvalues(value) for value in b]), NORMAL_PERCENTILES, axis=0, method="linear")
    return [float(cls), *band[:, 2].tolist()]


def chunk_records(teststat, sb, b) -> list[dict]:
    """The records of a patch's chunks of :data:`BLOCK` toys, as workers return them (every 25th
    background-only toy and every 50th signal-plus-background toy without a minimum)."""
    records = []
    for start in range(0, len(b), BLOCK):
        stop = min(start + BLOCK, len(b))
        no_minimum = {"sb": [[i, 0.0] for i in range(start, stop, 50)], "b": [[i, 0.0] for i in range(start, stop, 25)]}
        toys = {"start": start, "stop": stop, "ntoys": len(b), "teststat": teststat if start == 0 else None,
                "sb": sb[start:stop].tolist(), "b": b[start:stop].tolist(), "no_minimum": no_minimum}
        records.append({"name": "patch", "status": "ok", "error": None, "engine": "fast", "toys": toys})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,40000,100000,1000000")
    parser.add_argument("--direct-up-to", type=int, default=40000)
    args = parser.parse_args()
    generator = np.random.default_rng(1)
    print("| toys per hypothesis | sorted (s) | one value at a time (s) | ratio | merge of the patch's chunks (s) | same |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    measured = None  # (size, seconds) of the largest direct count timed
    for size in (int(part) for part in args.sizes.split(",")):
        sb = np.round(generator.chisquare(1, size), 4)
        b = np.round(generator.chisquare(1, size) + 0.5, 4)
        sb[: size // 10] = 0.0  # toys at the statistic's floor, as qtilde gives them
        teststat = float(b[size // 2])
        began = time.perf_counter()
        result = cls_from_distributions(teststat, sb, b)
        sorted_seconds = time.perf_counter() - began
        records = chunk_records(teststat, sb, b)
        began = time.perf_counter()
        merged = merge(records, FitSettings(backend="jax", calctype="toybased", ntoys=size, seed=1))
        merge_seconds = time.perf_counter() - began
        assert merged["CLs_obs"] == result["CLs_obs"] and "if_dropped" in merged["toy_summary"]
        if size <= args.direct_up_to:
            began = time.perf_counter()
            direct = one_value_at_a_time(teststat, sb, b)
            direct_seconds = time.perf_counter() - began
            measured = (size, direct_seconds)
            same = "yes" if direct == [result["CLs_obs"], *result["CLs_exp"]] else "**no**"
            direct_text = f"{direct_seconds:.2f}"
        elif measured is not None:
            direct_seconds = measured[1] * (size / measured[0]) ** 2
            same, direct_text = "–", f"~{direct_seconds:,.0f} (extrapolated)"
        else:
            direct_seconds, same, direct_text = float("nan"), "–", "–"
        print(f"| {size:,} | {sorted_seconds:.3f} | {direct_text} | {direct_seconds / sorted_seconds:,.0f} | "
              f"{merge_seconds:.3f} | {same} |")


if __name__ == "__main__":
    main()
