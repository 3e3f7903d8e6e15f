"""Reading likelihood pallets: a background-only workspace plus one patch per signal hypothesis.

Accepted forms (see :func:`load_pallet`, :func:`load_workspace`, :func:`load_patches`):

* a HEPData tarball (``.tar.gz``) or a directory holding ``BkgOnly.json`` and ``patchset.json``;
* the older HEPData layout: ``BkgOnly.json`` plus one jsonpatch file per signal point,
  ``patch.<name>.json`` or ``patch_<name>.json``;
* a HEPData DOI or URL, downloaded into a temporary folder and removed once read
  (:mod:`pyhf_dist.download`);
* in Python, ``pyhf.Workspace``/``pyhf.PatchSet`` objects or their dictionaries.

A source can hold several pallets, one per folder (:mod:`pyhf_dist.discovery` finds and names
them); :func:`load_pallet`'s ``pallet=`` chooses among them.

The parts of a pallet (:class:`Patch`, :class:`Pallet`, workspaces and patchsets read and
checked) are in :mod:`pyhf_dist.specs`, and importable from here too.

Every failure is a :class:`~pyhf_dist.exceptions.PalletError` or
:class:`~pyhf_dist.exceptions.WorkspaceError` whose one-line message names the file and the fix.
"""

from __future__ import annotations

import gzip
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any

from pyhf_dist import discovery, download
from pyhf_dist.exceptions import PalletError
from pyhf_dist.protocol import first_line
from pyhf_dist.specs import (
    Pallet, Patch, check_workspace, is_pyhf, load_patches, load_workspace, select_across, select_patches, parse_json, read_bytes, values_from_name, check_operations, patches_from_patchset, generic_labels,
)

__all__ = [
    "Patch", "Pallet", "load_pallet", "pallet_names", "load_workspace", "load_patches", "select_patches",
    "select_across", "check_workspace", "is_pyhf",
]
def _read_located(
    source: str, locations: list, chosen: list, read, where, validate: bool
) -> list[Pallet]:
    """The chosen pallets, read with ``read(path) -> bytes``; ``where(path)`` names a file in messages."""
    several = len(locations) > 1
    pallets = []
    for location in chosen:
        named = where(location.background)
        workspace = check_workspace(parse_json(read(location.background), named), named, full=validate)
        if location.patchset is not None:
            named = where(location.patchset)
            raw = read(location.patchset)
            patches, labels, description = patches_from_patchset(parse_json(raw, named), named, workspace, raw)
        elif location.patch_files:
            patches = []
            for path in location.patch_files:
                name = discovery.PATCH_FILE.match(os.path.basename(path)).group("name")
                operations = check_operations(parse_json(read(path), where(path)), where(path))
                patches.append(Patch(name, values_from_name(name), operations))
            labels, description = generic_labels(patches), ""
        else:
            raise PalletError(
                f"{where(location.folder) if location.folder else source} holds no patchset.json and no "
                "patch.<name>.json files: point at a pallet directory"
            )
        pallets.append(Pallet(workspace, patches, labels, source, description, location.name if several else None))
    return pallets


def _json_files(directory: Path) -> list[str]:
    """Paths (relative, with ``/``) of the JSON files under ``directory``, debris folders skipped."""
    found = []
    for root, folders, files in os.walk(directory):
        folders[:] = sorted(folder for folder in folders if not discovery.is_noise(folder))
        relative = Path(root).relative_to(directory).as_posix()
        for name in files:
            if name.lower().endswith(".json"):
                found.append(name if relative == "." else f"{relative}/{name}")
    return found


def _pallets_from_directory(directory: Path, choice, validate: bool, label: str | None = None) -> list[Pallet]:
    label = label or str(directory)
    locations = discovery.locate(_json_files(directory))
    if not locations:
        raise PalletError(
            f"{directory} holds no BkgOnly.json: point at a pallet directory, or give the background "
            "workspace and --patchset separately"
        )
    chosen = discovery.choose(locations, choice, label)
    return _read_located(
        label, locations, chosen, lambda path: read_bytes(directory / path), lambda path: str(directory / path),
        validate,
    )


def _pallets_from_tarball(path: Path, choice, validate: bool, label: str | None = None) -> list[Pallet]:
    label = label or str(path)
    try:
        with tarfile.open(path, "r:*") as archive:
            # One pass through the compressed stream: listing the members first and reading the
            # needed ones after meant decompressing it twice. Every JSON file is read on the way
            # (a pallet's files are all JSON; packing debris is not read); which are needed is
            # known once all are listed, so an archive of several pallets is held whole in memory
            # while one of them is chosen.
            read = {}
            for member in archive:
                name = discovery.normalize(member.name) if member.isfile() else None
                wanted = name is not None and name.lower().endswith(".json") and not discovery.is_noise(name)
                if wanted and name not in read:
                    read[name] = archive.extractfile(member).read()
            locations = discovery.locate(read)
            if not locations:
                raise PalletError(f"{label} holds no BkgOnly.json: is it a HEPData likelihood archive?")
            chosen = discovery.choose(locations, choice, label)
            needed = set()
            for location in chosen:
                needed.update([location.background, location.patchset, *location.patch_files])
            needed.discard(None)  # a pallet of patch files has no patchset
            contents = {name: read[name] for name in needed}
    except FileNotFoundError:
        raise PalletError(f"{path} does not exist: check the path") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise PalletError(f"{label} is truncated or corrupt ({first_line(error)}): download it again") from None
    except (tarfile.TarError, OSError) as error:
        raise PalletError(
            f"{label} is not a readable tar archive ({first_line(error)}): give a HEPData .tar.gz, "
            "a pallet directory or a DOI"
        ) from None
    return _read_located(label, locations, chosen, contents.__getitem__, lambda name: f"{label}:{name}", validate)


def _several(choice) -> bool:
    """Whether a pallet choice asks for a list (several names, a pattern, or "all")."""
    if isinstance(choice, str):
        return choice.strip().lower() == discovery.ALL or any(character in choice for character in "*?[")
    return choice is not None


def load_pallet(
    source: Any, *, pallet: str | list[str] | None = None, force_download: bool = False, validate: bool = True
) -> Pallet | list[Pallet]:
    """Read a pallet: background workspace plus signal patches.

    A source can hold several pallets (one per folder, e.g. ``Region-combined/``,
    ``Region-lowMass/``); ``pallet`` chooses among them, by name: the folder relative to the one
    they all share (see :mod:`pyhf_dist.discovery`).

    Args:
        source: A pallet directory, a HEPData ``.tar.gz``, or a HEPData DOI / URL (downloaded with
            ``pyhf.contrib.utils.download``; needs ``pip install "pyhf-dist[contrib]"``).
        pallet: Which pallet(s): a name (``"Region-combined"``), a shell-style pattern, a list of
            names, or ``"all"``; ``None`` for a source that holds one.
        force_download: Allow a URL outside HEPData / doi.org.
        validate: Validate the background workspace against pyhf's JSON schema (``False`` checks
            only its shape; :func:`check_workspace` can complete the check later).

    Returns:
        The :class:`Pallet`; a list of them when ``pallet`` is a list, a pattern or ``"all"``.
        A pallet's ``name`` is ``None`` when its source holds no other.

    Raises:
        PalletSelectionError: The source holds several pallets and none was chosen, or no pallet
            has the name asked for.
        PalletError: The source is missing, unreadable, truncated, or not a pallet.
        WorkspaceError: The JSON in it is not a HistFactory workspace or patchset.
    """
    if isinstance(source, Pallet):
        pallets = [source]
        if pallet is not None:
            names = [source.name or discovery.TOP]
            pallets = [pallets[index] for index in discovery.select_names(names, pallet, source.source)]
    else:
        pallets = _load_pallets(source, pallet, force_download, validate)
    return pallets if _several(pallet) else pallets[0]


def pallet_names(source: Any, *, force_download: bool = False) -> list[str]:
    """The names of the pallets a source holds, without reading them (``[name]`` for one pallet).

    >>> import tempfile, pathlib
    >>> top = pathlib.Path(tempfile.mkdtemp())
    >>> for region in ("SR-A", "SR-B"):
    ...     (top / "record" / region).mkdir(parents=True)
    ...     _ = (top / "record" / region / "BkgOnly.json").write_text("{}")
    >>> pallet_names(top)
    ['SR-A', 'SR-B']
    """
    text = os.fspath(source) if isinstance(source, os.PathLike) else source
    if isinstance(text, str) and not os.path.exists(text) and download.is_remote(text):
        with download.downloaded(text, force_download) as archive:
            return pallet_names(archive)
    path = Path(text)
    if path.is_dir():
        return [location.name for location in discovery.locate(_json_files(path))]
    try:
        with tarfile.open(path, "r:*") as archive:
            names = [member.name for member in archive.getmembers() if member.isfile()]
    except FileNotFoundError:
        raise PalletError(f"{path} does not exist: check the path") from None
    except (EOFError, zlib.error, gzip.BadGzipFile, tarfile.TarError, OSError) as error:
        raise PalletError(f"{path} is not a readable tar archive ({first_line(error)})") from None
    return [location.name for location in discovery.locate(names)]


def _load_pallets(source: Any, choice, force_download: bool, validate: bool) -> list[Pallet]:
    text = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(text, str):
        raise PalletError(f"cannot read a pallet from a {type(source).__name__}: give a path, a tarball or a DOI")
    if not os.path.exists(text) and download.is_remote(text):
        with download.downloaded(text, force_download) as archive:
            if archive.is_dir():
                return _pallets_from_directory(archive, choice, validate, label=text)
            return _pallets_from_tarball(archive, choice, validate, label=text)
    path = Path(text)
    if path.is_dir():
        return _pallets_from_directory(path, choice, validate)
    if path.is_file():
        if path.suffix.lower() == ".json":
            raise PalletError(
                f"{path} is a single JSON file, not a pallet: give its patches too "
                "(--patchset patchset.json or a directory of patch files)"
            )
        return _pallets_from_tarball(path, choice, validate)
    raise PalletError(f"{path} does not exist: check the path (a pallet directory, a .tar.gz or a HEPData DOI)")


# ---------------------------------------------------------------------------------------- selection


