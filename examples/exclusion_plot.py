"""Scan the demo pallet (or a pallet given on the command line) and draw its exclusion contours.

    python examples/exclusion_plot.py                       # demo pallet -> exclusion.png/.pdf
    python examples/exclusion_plot.py results.json          # plot an existing results file
    python examples/exclusion_plot.py results.json out.pdf

The same as ``pyhf-dist plot results.json -o exclusion.png``.
"""

from __future__ import annotations

import sys

import pyhf_dist
from pyhf_dist.plotting import plot_exclusion


def main(argv: list[str]) -> None:
    if argv:
        results = argv[0]
    else:
        results = "demo-results.json"
        pyhf_dist.map_fits(pyhf_dist.demo_pallet(), executor="local", workers=2, backend="numpy").to_json(results)
    outputs = argv[1:] or ["exclusion.png", "exclusion.pdf"]
    for output in outputs:
        figure = plot_exclusion(results, output, title="pyhf-dist demo" if not argv else None)
        print(f"wrote {output}")
    contours = figure.exclusion_contours
    print(f"contour level: {contours['quantity']} = {contours['level']} "
          f"(log10 = {contours['log_level']:.4f}); observed drawn: {contours['observed'] is not None}")


if __name__ == "__main__":
    main(sys.argv[1:])
