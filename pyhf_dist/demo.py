"""A small synthetic pallet, built in code, for the demo and the documentation.

Three channels (two signal regions of 3 and 2 bins, one single-bin control region), a background
with a free normalization, normsys, histosys, staterror and lumi uncertainties, and a grid of
signal hypotheses in a (m1, m2) plane whose yields fall with m1 and with the m1 - m2 splitting.
It exercises the same code paths as a published pallet (a real pyhf PatchSet with digests) and fits
in seconds on a laptop.
"""

from __future__ import annotations

import math

from pyhf_dist.pallet import Pallet, load_patches

__all__ = ["demo_workspace", "demo_patchset", "demo_pallet"]

_CHANNELS = {
    # name: (background, observed, background histosys shift, signal efficiency shape)
    "CR": ([820.0], [846.0], [15.0], [0.02]),
    "SRhigh": ([3.1, 1.9, 1.2], [2.0, 3.0, 0.0], [0.4, 0.3, 0.2], [0.25, 0.35, 0.40]),
    "SRlow": ([18.0, 11.0], [21.0, 9.0], [1.5, 1.2], [0.45, 0.30]),
}


def demo_workspace() -> dict:
    """The background-only workspace (a pyhf workspace specification)."""
    channels, observations = [], []
    for name, (background, observed, shift, _) in _CHANNELS.items():
        modifiers = [
            {"name": "mu_bkg", "type": "normfactor", "data": None},
            {"name": "bkg_theory", "type": "normsys", "data": {"hi": 1.08, "lo": 0.93}},
            {"name": "jet_energy_scale", "type": "histosys",
             "data": {"hi_data": [b + s for b, s in zip(background, shift)],
                      "lo_data": [b - 0.8 * s for b, s in zip(background, shift)]}},
            {"name": f"staterror_{name}", "type": "staterror", "data": [0.05 * b + 0.3 for b in background]},
            {"name": "lumi", "type": "lumi", "data": None},
        ]
        channels.append({"name": name, "samples": [{"name": "background", "data": background, "modifiers": modifiers}]})
        observations.append({"name": name, "data": observed})
    return {
        "channels": channels,
        "observations": observations,
        "measurements": [{
            "name": "demo",
            "config": {"poi": "mu_SIG", "parameters": [
                {"name": "lumi", "auxdata": [1.0], "sigmas": [0.017], "bounds": [[0.915, 1.085]], "inits": [1.0]},
                {"name": "mu_SIG", "bounds": [[0.0, 10.0]], "inits": [1.0]},
            ]},
        }],
        "version": "1.0.0",
    }


def _grid(points: int | None) -> list[tuple[int, int]]:
    grid = [(m1, m2) for m1 in range(300, 1000, 100) for m2 in range(0, m1 - 99, 150)]
    return grid if points is None else grid[:points]


def _signal_yield(m1: int, m2: int) -> float:
    # Production falls steeply with mass; a compressed spectrum leaves little visible energy.
    cross_section = 60.0 * math.exp(-(m1 - 300) / 170.0)
    acceptance = 1.0 - math.exp(-(m1 - m2) / 180.0)
    return cross_section * acceptance


def demo_patchset(points: int | None = None) -> dict:
    """A pyhf patchset with one patch per grid point (25 by default)."""
    import pyhf

    workspace = pyhf.Workspace(demo_workspace())
    patches = []
    for m1, m2 in _grid(points):
        total = _signal_yield(m1, m2)
        operations = []
        for index, (name, (_, _, _, shape)) in enumerate(_CHANNELS.items()):
            signal = [round(total * fraction, 6) for fraction in shape]
            operations.append({
                "op": "add",
                "path": f"/channels/{index}/samples/1",
                "value": {"name": f"signal_{m1}_{m2}", "data": signal, "modifiers": [
                    {"name": "mu_SIG", "type": "normfactor", "data": None},
                    {"name": "signal_theory", "type": "normsys", "data": {"hi": 1.1, "lo": 0.9}},
                    {"name": "lumi", "type": "lumi", "data": None},
                ]},
            })
        patches.append({"metadata": {"name": f"demo_{m1}_{m2}", "values": [m1, m2]}, "patch": operations})
    return {
        "metadata": {
            "name": "pyhf-dist demo",
            "description": "synthetic signal grid for the pyhf-dist demo",
            "digests": {"sha256": pyhf.utils.digest(workspace)},
            "labels": ["m1", "m2"],
            # The schema requires a HEPData record; the demo has none, so a null Inspire id.
            "references": {"hepdata": "ins0000000"},
        },
        "patches": patches,
        "version": "1.0.0",
    }


def demo_pallet(points: int | None = None) -> Pallet:
    """The demo pallet: :func:`demo_workspace` plus :func:`demo_patchset`.

    >>> len(demo_pallet()) >= 20
    True
    """
    workspace = demo_workspace()
    patches, labels, description = load_patches(demo_patchset(points), workspace)
    return Pallet(workspace, patches, labels, "pyhf-dist demo", description)
