"""Fit the same pallet on different executors and compare the answers.

    python examples/switch_executors.py [PALLET] [EXECUTOR ...]

PALLET defaults to the built-in demo pallet; EXECUTOR defaults to "sequential local".
"""

import sys

import pyhf_dist


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else pyhf_dist.demo_pallet()
    executors = sys.argv[2:] or ["sequential", "local"]
    results = {}
    for executor in executors:
        results[executor] = pyhf_dist.map_fits(source, executor=executor, backend="numpy")
        print(f"{executor:>12}: {results[executor].metadata['wall_seconds']:6.1f} s")
    first, *others = results.values()
    for other in others:
        worst = max(abs(a.CLs_obs - b.CLs_obs) for a, b in zip(first, other) if a.ok and b.ok)
        print(f"largest |ΔCLs_obs| between executors: {worst:.2g}")


if __name__ == "__main__":
    main()
