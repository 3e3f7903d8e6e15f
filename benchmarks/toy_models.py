"""The three models of the per-toy comparison: 1Lbb, a stau Region-combined patch, 3L-eRJR."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("PYHF_DIST_DATA", HERE.parent.parent / "shared" / "data"))

#: label -> (what, patch name)
MODELS = {
    "1lbb": ("1Lbb-likelihoods-hepdata.tar.gz", "C1N2_Wh_hbb_700_150"),
    "stau": ("stau-likelihoods-1911.06660.tar.gz", None),
    "3l": ("3L-eRJR", "ERJR_350p0_200p0"),
}
#: The stau Region-combined patch compared (index in its patchset, as benchmarks/toys.py).
STAU_PATCH = 20


def load(label: str) -> tuple[dict, list]:
    """``(background workspace, patch operations)`` of one model."""
    source, name = MODELS[label]
    if label == "stau":
        with tarfile.open(DATA / source) as archive:
            def read(suffix):
                member = next(m for m in archive.getmembers() if m.name.endswith(f"Region-combined/{suffix}")
                              and not Path(m.name).name.startswith("._"))
                return json.load(archive.extractfile(member))
            patchset = read("patchset.json")
            return read("BkgOnly.json"), patchset["patches"][STAU_PATCH]["patch"]
    import pyhf_dist

    pallet = pyhf_dist.load_pallet(str(DATA / source), validate=False)
    patch = next(p for p in pallet.patches if p.name == name)
    return pallet.workspace, patch.operations


def name(label: str) -> str:
    """The patch's name, for tables."""
    if label == "stau":
        with tarfile.open(DATA / MODELS["stau"][0]) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("Region-combined/patchset.json")
                          and not Path(m.name).name.startswith("._"))
            return "stau " + json.load(archive.extractfile(member))["patches"][STAU_PATCH]["metadata"]["name"]
    return MODELS[label][1]
