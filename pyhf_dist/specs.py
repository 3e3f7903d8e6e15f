"""The parts of a pallet: a background workspace and its patches, read and checked.

:class:`Patch` and :class:`Pallet` hold them; :func:`load_workspace` and :func:`load_patches` read
them from files, dictionaries or pyhf objects, validated against pyhf's schemas (an error names
the JSON path and the fix); :func:`select_patches` and :func:`select_across` choose patches by
name or pattern. :mod:`pyhf_dist.pallet` finds pallets in directories, archives and DOIs.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import hashlib
import json
import marshal
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from pyhf_dist import cache, collector, discovery
from pyhf_dist.discovery import PATCHSET_NAMES
from pyhf_dist.exceptions import PalletError, PatchSelectionError, WorkspaceError
from pyhf_dist.observations import check_counts, check_patch_counts
from pyhf_dist.protocol import first_line

__all__ = [
    "Patch", "Pallet", "load_workspace", "load_patches", "select_patches", "select_across", "check_workspace",
    "is_pyhf", "parse_json", "read_bytes", "values_from_name", "check_operations", "patches_from_patchset",
    "generic_labels", "patch_digest",
]

_PATCH_FILE = discovery.PATCH_FILE


@dataclasses.dataclass(frozen=True)
class Patch:
    """One signal hypothesis.

    Attributes:
        name: The patch's name, e.g. ``C1N2_Wh_hbb_700_400``.
        values: Its point in the signal plane, e.g. ``(700.0, 400.0)``.
        operations: The jsonpatch operations that add the signal to the background workspace.
    """

    name: str
    values: tuple
    operations: list = dataclasses.field(repr=False)


def patch_digest(operations) -> str:
    """A digest of a patch's operations: what a scan's journal keeps to tell a patch that changed
    since (another file under the same name, a row of signals with other yields, another template).

    >>> first, second = [{"op": "add", "path": "/a", "value": 1}], [{"op": "add", "path": "/a", "value": 1}]
    >>> patch_digest(first) == patch_digest(second) != patch_digest([{"op": "add", "path": "/a", "value": 2}])
    True
    """
    try:
        # marshal's format 2 (no shared references) gives the same bytes for equal content, and is
        # 4 times quicker than JSON: a 1Lbb patch is ~100 kB, and every record of a scan takes one.
        data = marshal.dumps(operations, 2)
    except ValueError:  # objects marshal does not take (numpy numbers in a patch made in Python)
        data = json.dumps(operations, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclasses.dataclass
class Pallet:
    """A background-only workspace and its signal patches.

    Attributes:
        workspace: The background-only workspace specification (a dict).
        patches: The signal patches, in the pallet's order.
        labels: Names of the ``values`` axes (e.g. ``["m1", "m2"]``); generic when unknown.
        source: Where the pallet came from (the archive, directory or DOI).
        description: The patchset's description, if any.
        name: Its name within a source that holds several pallets (its folder, e.g.
            ``"Region-combined"``); ``None`` for the only pallet of its source.
    """

    workspace: dict
    patches: list[Patch]
    labels: list[str]
    source: str = "<memory>"
    description: str = ""
    name: str | None = None

    def __len__(self) -> int:
        return len(self.patches)

    def names(self) -> list[str]:
        return [patch.name for patch in self.patches]


#: The checks beyond pyhf's schema (observed counts): part of the key under which a workspace or
#: patchset is remembered as valid, so that a new check applies to files checked before it.
CHECKS = "counts"

# --------------------------------------------------------------------------------------- reading


def parse_json(text: bytes | str, where: str) -> Any:
    def not_finite(constant: str):
        # Python's json reads NaN and Infinity, which JSON has not; a fit on them fails far from here.
        raise PalletError(
            f"{where} holds {constant} where a number belongs: yields, uncertainties and data must be "
            "finite numbers; fix the file"
        )

    try:
        with collector.paused():  # millions of containers, no cycles (see pyhf_dist.collector)
            return json.loads(text, parse_constant=not_finite)
    except json.JSONDecodeError as error:
        hint = "the file looks truncated: download it again" if error.pos >= len(text) - 1 else "fix or replace it"
        raise PalletError(
            f"{where} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): {hint}"
        ) from None
    except UnicodeDecodeError:
        raise PalletError(f"{where} is not a JSON text file (binary content): give the .json file") from None


def _read_json(path: Path) -> Any:
    return parse_json(read_bytes(path), str(path))


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PalletError(f"{path} does not exist: check the path") from None
    except IsADirectoryError:
        raise PalletError(f"{path} is a directory, not a JSON file") from None
    except PermissionError:
        raise PalletError(f"{path} cannot be read (permission denied)") from None


def _json_path(path_parts: Iterable) -> str:
    return "/" + "/".join(str(part) for part in path_parts)


def check_workspace(spec: Any, where: str, full: bool = True) -> dict:
    """Validate a background workspace against pyhf's schema; raise one clear line if it fails.

    Args:
        spec: The workspace specification.
        where: Where it came from, for the message.
        full: Run pyhf's whole JSON-schema validation (about a second for a large workspace);
            ``False`` checks only the top-level shape, for callers that validate fully later.
    """
    if not isinstance(spec, dict) or "channels" not in spec:
        kind = type(spec).__name__
        raise WorkspaceError(
            f"{where} is not a HistFactory workspace (a JSON object with 'channels', 'observations', "
            f"'measurements', 'version'; got a {kind}{' without channels' if kind == 'dict' else ''})"
        )
    if not full:
        return spec
    digest = _spec_digest(spec)
    key = cache.digest(digest, cache.versions("pyhf"), CHECKS) if digest is not None else None
    if key is not None and cache.recall("workspace", key) == "valid":
        return spec
    _validate_workspace(spec, where)
    if key is not None:
        cache.remember("workspace", key, "valid")
    return spec


def _spec_digest(spec: dict) -> str | None:
    """Digest of a specification's JSON, or ``None`` if it is not JSON (then nothing is remembered)."""
    try:
        return cache.digest(json.dumps(spec, separators=(",", ":")))
    except (TypeError, ValueError):
        return None


def _validate_workspace(spec: dict, where: str) -> None:
    import pyhf

    version = spec.get("version")
    if not isinstance(version, str):  # pyhf picks the schema file by version: check it first
        raise WorkspaceError(
            f"{where} is not a valid HistFactory workspace: 'version' must be a string such as \"1.0.0\", "
            f"got {version!r} at /version"
        )
    try:
        pyhf.Workspace(spec)
    except pyhf.exceptions.InvalidSpecification as error:
        raise WorkspaceError(f"{where} is not a valid HistFactory workspace: {_schema_message(error)}") from None
    except (pyhf.exceptions.InvalidWorkspaceOperation, pyhf.exceptions.InvalidModel) as error:
        raise WorkspaceError(f"{where} is not a valid HistFactory workspace: {first_line(error)}") from None
    except Exception as error:  # what the schema lets through but pyhf cannot build (or an unknown version)
        raise WorkspaceError(
            f"{where} is not a valid HistFactory workspace: {type(error).__name__}: {first_line(error)}"
        ) from None
    check_counts(spec.get("observations", []), where, "/observations")


def _schema_message(error) -> str:
    """``<what is wrong> at <JSON path>`` from pyhf's InvalidSpecification."""
    parent = getattr(error, "parent", None)
    path = list(getattr(parent, "absolute_path", []) or [])
    message = getattr(parent, "message", None) or str(error).splitlines()[0]
    if len(message) > 160:
        message = message[:157] + "..."
    return f"{message} at {_json_path(path)}"


def is_pyhf(obj: Any, name: str) -> bool:
    """Whether ``obj`` is a ``pyhf.<name>`` (without importing pyhf: an instance implies it is)."""
    pyhf = sys.modules.get("pyhf")
    return pyhf is not None and isinstance(obj, getattr(pyhf, name))


def load_workspace(source: Any, validate: bool = True) -> dict:
    """The background workspace specification from a ``pyhf.Workspace``, a dict or a JSON path."""
    if is_pyhf(source, "Workspace"):
        return dict(source)
    if isinstance(source, dict):
        return check_workspace(source, "the workspace", full=validate)
    if not isinstance(source, (str, os.PathLike)):
        raise WorkspaceError(
            f"cannot read a workspace from {type(source).__name__} {source!r:.40}: give a BkgOnly.json path, "
            "a dict or a pyhf.Workspace"
        )
    path = Path(source)
    return check_workspace(_read_json(path), str(path), full=validate)


# ---------------------------------------------------------------------------------------- patches


def values_from_name(name: str) -> tuple:
    # Older HEPData records encode the signal point in the file name: ERJR_350p0_100p0 -> (350, 100).
    numbers = re.findall(r"(?<![A-Za-z])(\d+(?:p\d+)?)(?![A-Za-z]*\d)", name)
    return tuple(float(number.replace("p", ".")) for number in numbers)


def check_operations(operations: Any, where: str) -> list:
    if not isinstance(operations, list) or not operations:
        raise WorkspaceError(f"{where} is not a jsonpatch (expected a non-empty list of operations)")
    for index, operation in enumerate(operations):
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise WorkspaceError(
                f"{where} is not a jsonpatch: operation /{index} needs 'op' and 'path' keys"
            )
    check_patch_counts(operations, where)
    return operations


def patches_from_patchset(
    spec: Any, where: str, workspace: dict | None, raw: bytes | None = None
) -> tuple[list[Patch], list[str], str]:
    """The patches of a patchset, validated against pyhf's schema and the background's digest.

    ``raw`` (the file's bytes) lets a patchset validated before, with this background, be read
    without pyhf (:mod:`pyhf_dist.cache`).
    """
    if not is_pyhf(spec, "PatchSet"):
        if not isinstance(spec, dict) or "patches" not in spec:
            raise WorkspaceError(f"{where} is not a pyhf patchset (a JSON object with 'metadata' and 'patches')")
        key = None
        background = _spec_digest(workspace) if workspace is not None else ""
        if raw is not None and background is not None:
            key = cache.digest(raw, background, cache.versions("pyhf"), CHECKS)
            if cache.recall("patchset", key) == "valid":
                return _read_validated_patchset(spec)
        result = _validated_patchset(spec, where, workspace)
        if key is not None:
            cache.remember("patchset", key, "valid")
        return result
    return _validated_patchset(spec, where, workspace)


def _read_validated_patchset(spec: dict) -> tuple[list[Patch], list[str], str]:
    # What pyhf.PatchSet reads from a patchset that passed its schema.
    metadata = spec["metadata"]
    patches = [
        Patch(patch["metadata"]["name"], tuple(patch["metadata"]["values"]), list(patch["patch"]))
        for patch in spec["patches"]
    ]
    return patches, list(metadata["labels"]), metadata["description"]


def _validated_patchset(spec: Any, where: str, workspace: dict | None) -> tuple[list[Patch], list[str], str]:
    import pyhf

    if isinstance(spec, pyhf.PatchSet):
        patchset = spec
    else:
        try:
            patchset = pyhf.PatchSet(spec)
        except pyhf.exceptions.InvalidSpecification as error:
            raise WorkspaceError(f"{where} is not a valid pyhf patchset: {_schema_message(error)}") from None
        except pyhf.exceptions.InvalidPatchSet as error:
            raise WorkspaceError(f"{where} is not a valid pyhf patchset: {_patchset_fault(spec, error)}") from None
        except Exception as error:  # e.g. a jsonpatch path that is not a JSON pointer
            raise WorkspaceError(
                f"{where} is not a valid pyhf patchset: {type(error).__name__}: {first_line(error)}"
            ) from None
    if workspace is not None:
        try:
            background = pyhf.Workspace(workspace, validate=False)
        except Exception:
            # Not even well-formed enough to compute its digest: say what is wrong with it.
            check_workspace(workspace, "the background workspace", full=True)
            raise WorkspaceError("the background workspace is not a valid HistFactory workspace") from None
        try:
            patchset.verify(background)
        except pyhf.exceptions.PatchSetVerificationError:
            raise PalletError(
                f"{where} was not made for this background workspace (its digest does not match): "
                "use the BkgOnly.json published with this patchset"
            ) from None
    patches = [Patch(p.name, tuple(p.values), list(p.patch)) for p in patchset.patches]
    for patch in patches:
        check_patch_counts(patch.operations, f"{where} (patch {patch.name})")
    return patches, list(patchset.labels), patchset.description


def _patchset_fault(spec: dict, error: Exception) -> str:
    """What pyhf's ``InvalidPatchSet`` says, in a line: the names a patchset repeats (pyhf's
    message holds the whole patch), or its first line, shortened."""
    names = [patch.get("metadata", {}).get("name") for patch in spec.get("patches", []) if isinstance(patch, dict)]
    repeated = sorted((name for name, count in collections.Counter(names).items() if count > 1), key=str)
    if repeated:
        return (f"patch name{'s' if len(repeated) > 1 else ''} {', '.join(map(repr, repeated[:5]))} "
                f"{'are' if len(repeated) > 1 else 'is'} given to several patches: each patch needs its own name")
    message = first_line(error)
    return message if len(message) <= 200 else message[:197] + "..."


def _patches_from_directory(directory: Path) -> list[Patch]:
    patches = []
    for path in sorted(directory.iterdir()):
        match = _PATCH_FILE.match(path.name)
        if match and path.is_file():
            name = match.group("name")
            patches.append(Patch(name, values_from_name(name), check_operations(_read_json(path), str(path))))
    if not patches:
        raise PalletError(
            f"{directory} holds no patchset.json and no patch.<name>.json files: point at a pallet directory"
        )
    return patches


def generic_labels(patches: list[Patch]) -> list[str]:
    width = max((len(patch.values) for patch in patches), default=0)
    return [f"value {index + 1}" for index in range(width)]


def load_patches(source: Any, workspace: dict | None = None) -> tuple[list[Patch], list[str], str]:
    """Signal patches from a ``pyhf.PatchSet``, a patchset dict, a ``patchset.json`` path, a
    directory of ``patch.<name>.json`` files, a single jsonpatch file, or a list of patches (patch
    files, pyhf's ``Patch`` objects, patchset entries or :class:`Patch`).

    When ``workspace`` is given and the patchset carries digests, they are verified against it.

    Returns:
        ``(patches, labels, description)``.
    """
    if isinstance(source, dict) or is_pyhf(source, "PatchSet"):
        return patches_from_patchset(source, "the patchset", workspace)
    if isinstance(source, (list, tuple)):
        return _patches_from_list(source, workspace)
    if not isinstance(source, (str, os.PathLike)):
        raise WorkspaceError(
            f"cannot read patches from {type(source).__name__} {source!r:.40}: give a patchset.json, a directory of "
            "patch files, a pyhf.PatchSet or a list of patches"
        )
    path = Path(source)
    if path.is_dir():
        for name in PATCHSET_NAMES:
            if (path / name).is_file():
                raw = read_bytes(path / name)
                return patches_from_patchset(parse_json(raw, str(path / name)), str(path / name), workspace, raw)
        patches = _patches_from_directory(path)
        return patches, generic_labels(patches), ""
    raw = read_bytes(path)
    spec = parse_json(raw, str(path))
    if isinstance(spec, list):  # a single jsonpatch file
        match = _PATCH_FILE.match(path.name)
        name = match.group("name") if match else path.stem
        patches = [Patch(name, values_from_name(name), check_operations(spec, str(path)))]
        return patches, generic_labels(patches), ""
    return patches_from_patchset(spec, str(path), workspace, raw)


def _patches_from_list(items, workspace: dict | None) -> tuple[list[Patch], list[str], str]:
    """Patches from a list whose items are patch files (or patchsets), pyhf's ``Patch`` objects,
    patchset entries (``{"metadata": {"name", "values"}, "patch": [...]}``) or :class:`Patch`."""
    patches, labels = [], None
    for index, item in enumerate(items):
        where = f"item {index} of the list of patches"
        if isinstance(item, Patch):
            found, found_labels = [item], None
        elif isinstance(item, dict) and "patch" in item:
            metadata = item.get("metadata")
            if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
                raise WorkspaceError(f"{where} has no name: give it 'metadata': {{'name': ..., 'values': [...]}}")
            name = metadata["name"]
            values = tuple(metadata["values"]) if "values" in metadata else values_from_name(name)
            found, found_labels = [Patch(name, values, check_operations(item["patch"], where))], None
        elif hasattr(item, "metadata") and hasattr(item, "patch"):  # a pyhf.patchset.Patch
            found = [Patch(item.name, tuple(item.values), check_operations(list(item.patch), where))]
            found_labels = None
        elif isinstance(item, (str, os.PathLike)):
            found, found_labels, _ = load_patches(item, workspace)
            found_labels = None if found_labels == generic_labels(found) else found_labels
        elif isinstance(item, list):
            raise WorkspaceError(
                f"{where} is a jsonpatch without a name: give it as {{'metadata': {{'name': ..., "
                "'values': [...]}, 'patch': [...]}, or as a patch.<name>.json file"
            )
        else:
            raise WorkspaceError(
                f"{where} is {type(item).__name__} {item!r:.40}: give patch files, pyhf patches or patchset entries"
            )
        patches.extend(found)
        labels = labels or found_labels
    if not patches:
        raise WorkspaceError("the list of patches is empty: give at least one patch")
    seen = set()
    for patch in patches:
        if patch.name in seen:
            raise WorkspaceError(f"two patches in the list are named {patch.name!r}: each needs its own name")
        seen.add(patch.name)
    width = max(len(patch.values) for patch in patches)
    if labels is None or len(labels) != width:
        labels = generic_labels(patches)
    return patches, labels, ""


# ----------------------------------------------------------------------------------------- pallets


def select_patches(patches: list[Patch], selection: Iterable[str] | str | None) -> list[Patch]:
    """Patches whose names match any of ``selection`` (exact names or shell-style globs).

    Raises:
        PatchSelectionError: A name or pattern matches nothing (close names are suggested), or
            the selection is empty.

    >>> patches = [Patch("A_1_2", (1, 2), []), Patch("A_3_4", (3, 4), []), Patch("B_5_6", (5, 6), [])]
    >>> [p.name for p in select_patches(patches, ["A_*"])]
    ['A_1_2', 'A_3_4']
    """
    if not patches:
        raise PatchSelectionError("the pallet has no patches to fit")
    chosen = _chosen_names([patch.name for patch in patches], selection)
    return [patch for patch in patches if chosen is None or patch.name in chosen]


def select_across(pallets: list[Pallet], selection: Iterable[str] | str | None) -> list[list[Patch]]:
    """:func:`select_patches` over several pallets: each pattern must match in at least one of them.

    Returns:
        The selected patches of each pallet, in the order of ``pallets`` (a list may be empty).

    >>> one = Pallet({}, [Patch("A_1_2", (1, 2), [])], [], name="one")
    >>> two = Pallet({}, [Patch("A_1_2", (1, 2), []), Patch("B_5_6", (5, 6), [])], [], name="two")
    >>> [[p.name for p in chosen] for chosen in select_across([one, two], ["B_*"])]
    [[], ['B_5_6']]
    """
    for pallet in pallets:
        if not pallet.patches:
            label = f"pallet {pallet.name!r}" if pallet.name is not None else "the pallet"
            raise PatchSelectionError(f"{label} has no patches to fit")
    names = list(dict.fromkeys(patch.name for pallet in pallets for patch in pallet.patches))
    chosen = _chosen_names(names, selection)
    return [[patch for patch in pallet.patches if chosen is None or patch.name in chosen] for pallet in pallets]


def _chosen_names(names: list[str], selection: Iterable[str] | str | None) -> set[str] | None:
    """The names ``selection`` picks (``None``: all); raises when a pattern matches nothing."""
    if selection is None:
        return None
    if isinstance(selection, str):
        selection = [selection]
    # Blank names (e.g. ``-p ""`` from a script whose variable was empty) select nothing.
    selection = [str(pattern) for pattern in selection if str(pattern).strip()]
    if not selection:
        raise PatchSelectionError("the patch selection is empty: give at least one name or pattern, or none for all")
    chosen: set[str] = set()
    for pattern in selection:
        matched = fnmatch.filter(names, pattern) if any(c in pattern for c in "*?[") else (
            [pattern] if pattern in names else []
        )
        if not matched:
            import difflib

            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else f"the pallet has {len(names)} patches, e.g. {names[0]}"
            raise PatchSelectionError(f"no patch matches {pattern!r}: {hint}")
        chosen.update(matched)
    return chosen
