"""Finding the pallets in a source: each background workspace, the patches beside it, its name.

A HEPData record can hold several pallets, one per folder (``Region-combined/``,
``Region-lowMass/``..., or ``RegionA/``, ``RegionB/``...), each a background file (``BkgOnly.json``
or another accepted name) with a ``patchset.json`` or one ``patch.<name>.json`` file per signal
point beside it. Archives come as their authors packed them: a top folder, a README, macOS
AppleDouble files (``._BkgOnly.json``: binary, though the name ends in ``.json``), ``.DS_Store``
and ``__MACOSX/`` entries. :func:`locate` finds every pallet in a listing of the source's files
and names it by its folder, relative to the folder all pallets share (so a packer's top folder is
no part of the name); :func:`choose` picks the ones asked for.

>>> found = locate(["./1911.06660/README.md", "./1911.06660/._.DS_Store",
...                 "./1911.06660/Region-lowMass/BkgOnly.json", "./1911.06660/Region-lowMass/patchset.json",
...                 "./1911.06660/Region-combined/BkgOnly.json", "./1911.06660/Region-combined/._BkgOnly.json",
...                 "./1911.06660/Region-combined/patchset.json"])
>>> [location.name for location in found]
['Region-combined', 'Region-lowMass']
>>> [location.name for location in choose(found, "Region-low*", "stau.tar.gz")]
['Region-lowMass']
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import posixpath
import re
from typing import Iterable, Sequence

from pyhf_dist.exceptions import PalletSelectionError

__all__ = [
    "Location", "locate", "choose", "select_names", "normalize", "is_noise",
    "BACKGROUND_NAMES", "PATCHSET_NAMES", "PATCH_FILE", "ALL",
]

#: Accepted names of the background-only workspace (compared without case).
BACKGROUND_NAMES = ("bkgonly.json", "bkg_only.json", "backgroundonly.json")
#: Accepted names of a patchset file (compared without case).
PATCHSET_NAMES = ("patchset.json",)
#: One jsonpatch file per signal point (the older HEPData layout).
PATCH_FILE = re.compile(r"^patch[._](?P<name>.+)\.json$", re.IGNORECASE)
#: The choice that selects every pallet of a source.
ALL = "all"
#: The name of a pallet at the top of a source that also holds pallets in folders below it.
TOP = "."
#: How many pallet names a message lists before it says "and N more".
_LISTED = 8


@dataclasses.dataclass(frozen=True)
class Location:
    """Where one pallet lies in its source (paths relative to the source, with ``/``).

    Attributes:
        name: The pallet's name: its folder relative to the folder all the source's pallets share
            (e.g. ``"Region-combined"``), :data:`TOP` for a pallet in that folder itself.
        folder: Its folder in the source (``""`` for the top).
        background: Its background workspace file.
        patchset: Its ``patchset.json``, or ``None``.
        patch_files: Its ``patch.<name>.json`` files (older layout), sorted; used without a patchset.
    """

    name: str
    folder: str
    background: str
    patchset: str | None
    patch_files: tuple[str, ...]


def normalize(path: str) -> str | None:
    """A member path as ``a/b/c`` (no ``./``, no leading ``/``); ``None`` for one that leaves the source.

    >>> normalize("./1911.06660/Region-combined/BkgOnly.json"), normalize("../x.json")
    ('1911.06660/Region-combined/BkgOnly.json', None)
    """
    text = posixpath.normpath(path.replace("\\", "/")).lstrip("/")
    if text in ("", ".") or text == ".." or text.startswith("../"):
        return None
    return text


def is_noise(path: str) -> bool:
    """Whether a path is packing debris: any part hidden (``._*`` AppleDouble files, ``.DS_Store``,
    ``.git``...) or ``__MACOSX``.

    >>> is_noise("top/Region/._BkgOnly.json"), is_noise("__MACOSX/top/BkgOnly.json"), is_noise("top/BkgOnly.json")
    (True, True, False)
    """
    return any(part.startswith(".") or part == "__MACOSX" for part in path.split("/"))


def locate(paths: Iterable[str]) -> list[Location]:
    """Every pallet in a listing of a source's files, sorted by name.

    Args:
        paths: The source's file paths, relative to it (archive member names, or paths under a
            directory); other files and packing debris (:func:`is_noise`) are ignored.

    Returns:
        One :class:`Location` per folder holding a background file (the first of
        :data:`BACKGROUND_NAMES` present when a folder holds several), empty when there is none.
    """
    folders: dict[str, dict[str, str]] = {}
    for raw in paths:
        path = normalize(raw)
        if path is None or is_noise(path):
            continue
        folder, base = posixpath.split(path)
        folders.setdefault(folder, {}).setdefault(base.lower(), path)
    found = []
    for folder, files in folders.items():
        background = next((files[name] for name in BACKGROUND_NAMES if name in files), None)
        if background is None:
            continue
        patchset = next((files[name] for name in PATCHSET_NAMES if name in files), None)
        patch_files = tuple(sorted(path for base, path in files.items() if PATCH_FILE.match(base)))
        found.append((folder, background, patchset, patch_files))
    # A lone pallet is named by its own folder; several by their folders below the one they share.
    shared = _shared_parts([folder for folder, *_ in found]) if len(found) > 1 else []
    locations = []
    for folder, background, patchset, patch_files in found:
        parts = folder.split("/")[len(shared):] if folder else []
        name = (parts[-1] if len(found) == 1 and parts else "/".join(parts)) or TOP
        locations.append(Location(name, folder, background, patchset, patch_files))
    return sorted(locations, key=lambda location: (location.name != TOP, location.name))


def _shared_parts(folders: Sequence[str]) -> list[str]:
    """The leading folder parts every one of ``folders`` has (a packer's top folder)."""
    if not folders:
        return []
    split = [folder.split("/") if folder else [] for folder in folders]
    shared = []
    for parts in zip(*split):
        if any(part != parts[0] for part in parts):
            break
        shared.append(parts[0])
    return shared


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def select_names(names: Sequence[str], choice, where: str) -> list[int]:
    """Indices of ``names`` that ``choice`` selects, in the order asked (each once).

    Args:
        names: The available pallet names.
        choice: ``None`` (the only pallet; refused when there are several), ``"all"``, a name, a
            shell-style pattern (``"Region-*"``), or a list of names and patterns.
        where: The source, for messages.

    Raises:
        PalletSelectionError: Several pallets and no choice (the message lists them and says how
            to choose), or a name that matches none (close names are suggested).

    >>> select_names(["A", "B", "C"], ["C", "A"], "x")
    [2, 0]
    """
    if choice is None:
        if len(names) > 1:
            raise PalletSelectionError(
                f"{where} holds {len(names)} pallets: {_listing(list(names))}; choose with --pallet NAME "
                f"(repeatable, or --pallet all; pallet= in Python)"
            )
        return list(range(len(names)))
    wanted = [choice] if isinstance(choice, str) else list(choice)
    if not wanted or not all(isinstance(item, str) and item.strip() for item in wanted):
        raise PalletSelectionError(
            f"the pallet choice {choice!r} is empty or not text: give pallet names, or \"all\""
        )
    chosen: list[int] = []
    for item in wanted:
        item = item.strip()
        if item.lower() == ALL:
            matches = list(range(len(names)))
        else:
            matches = _matches(names, item)
        if not matches:
            close = difflib.get_close_matches(item, list(names), n=3, cutoff=0.6)
            named = [name for name in names if name and name != TOP]
            if close:
                hint = f"did you mean {', '.join(close)}?"
            elif named:
                hint = f"its pallets are {_listing(named)}"
            else:
                hint = "it holds one pallet: drop --pallet (pallet= in Python)"
            raise PalletSelectionError(f"{where} has no pallet {item!r}: {hint}")
        chosen.extend(index for index in matches if index not in chosen)
    return chosen


def _matches(names: Sequence[str], item: str) -> list[int]:
    if any(character in item for character in "*?["):
        return [index for index, name in enumerate(names) if fnmatch.fnmatchcase(name, item)]
    item = (normalize(item) or TOP).rstrip("/")
    exact = [index for index, name in enumerate(names) if name == item]
    return exact or [index for index, name in enumerate(names) if name.lower() == item.lower()]


def choose(locations: Sequence[Location], choice, where: str) -> list[Location]:
    """The located pallets ``choice`` selects (see :func:`select_names`)."""
    return [locations[index] for index in select_names([location.name for location in locations], choice, where)]
