"""Where the benchmarks' pallets are, and how they are read: through ``pyhf_dist.load_pallet``.

The published pallets sit in ``$PYHF_DIST_DATA`` (default ``../shared/data`` beside the
repository); they are never copied into it. A name of this table (``1Lbb``, ``stau``, ...) or any
pallet path is accepted. A source that holds several pallets (the stau archive) is written
``PATH::PALLET`` on command lines, and read with ``load_pallet(PATH, pallet=PALLET)``.

>>> parse("archive.tar.gz::Region-combined")
('archive.tar.gz', 'Region-combined')
>>> parse("pallet-dir")
('pallet-dir', None)
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA", "PALLETS", "location", "spec", "parse", "load"]

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("PYHF_DIST_DATA", HERE.parent.parent / "shared" / "data"))
STAU = "stau-likelihoods-1911.06660.tar.gz"
SEPARATOR = "::"

#: name -> (file or folder in the data directory, pallet within it or ``None``).
PALLETS = {
    "1Lbb": ("1Lbb-likelihoods-hepdata.tar.gz", None),
    "stau": (STAU, "Region-combined"),
    "stau-combined": (STAU, "Region-combined"),
    "stau-lowMass": (STAU, "Region-lowMass"),
    "stau-highMass": (STAU, "Region-highMass"),
    "3L-eRJR": ("3L-eRJR", None),
}


def location(name: str) -> tuple[str, str | None]:
    """``(path, pallet)`` of a pallet name of :data:`PALLETS`, or of a ``PATH[::PALLET]`` given."""
    if name in PALLETS:
        where, pallet = PALLETS[name]
        return str(DATA / where), pallet
    return parse(name)


def spec(name: str) -> str:
    """The one-string form (``PATH`` or ``PATH::PALLET``) of a pallet name, for command lines."""
    path, pallet = location(name)
    return path if pallet is None else f"{path}{SEPARATOR}{pallet}"


def parse(text: str) -> tuple[str, str | None]:
    """Split ``PATH::PALLET`` into ``(PATH, PALLET)`` (``PALLET`` is ``None`` without ``::``)."""
    path, _, pallet = text.partition(SEPARATOR)
    return path, (pallet or None)


def load(name: str, validate: bool = False):
    """The :class:`pyhf_dist.Pallet` of a name of :data:`PALLETS` or of a ``PATH[::PALLET]``."""
    import pyhf_dist

    path, pallet = location(name)
    return pyhf_dist.load_pallet(path, pallet=pallet, validate=validate)

