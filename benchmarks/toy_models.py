"""The three models of the per-toy comparison: 1Lbb, a stau Region-combined patch, 3L-eRJR."""

from __future__ import annotations

import sources

#: label -> (pallet name of ``sources.PALLETS``, patch name).
MODELS = {
    "1lbb": ("1Lbb", "C1N2_Wh_hbb_700_150"),
    "stau": ("stau-combined", None),
    "3l": ("3L-eRJR", "ERJR_350p0_200p0"),
}
#: The stau Region-combined patch compared (its index in the pallet, as benchmarks/toys.py).
STAU_PATCH = 20


def _patch(label: str):
    source, name = MODELS[label]
    pallet = sources.load(source)
    if name is None:
        return pallet, pallet.patches[STAU_PATCH]
    return pallet, next(p for p in pallet.patches if p.name == name)


def load(label: str) -> tuple[dict, list]:
    """``(background workspace, patch operations)`` of one model."""
    pallet, patch = _patch(label)
    return pallet.workspace, patch.operations


def name(label: str) -> str:
    """The patch's name, for tables."""
    if label == "stau":
        return "stau " + _patch(label)[1].name
    return MODELS[label][1]
