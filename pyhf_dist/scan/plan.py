"""What a scan fits: its pallets, the patches chosen in each, and the context the workers get.

One pallet is a list of one: a source with a single pallet gives ``[Pallet]`` whose name is
``None``, and everything here treats it like the pallets of a source that holds several.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from pyhf_dist import discovery, signals as signal_points
from pyhf_dist.combine import check_method
from pyhf_dist.exceptions import InputError
from pyhf_dist.journal import scan_key
from pyhf_dist.pallet import (
    Pallet, Patch, check_workspace, is_pyhf, load_pallet, load_patches, load_workspace,
)
from pyhf_dist.protocol import WorkerContext
from pyhf_dist.specs import patch_digest

__all__ = ["Plan", "prepare_pallet", "prepare_pallets"]


def prepare_pallet(workspace: Any, patchset: Any = None, *, validate: bool = True) -> Pallet:
    """Turn the ``workspace``/``patchset`` arguments of :func:`map_fits` into a :class:`Pallet`."""
    if isinstance(workspace, Pallet):
        return workspace
    if patchset is None:
        if isinstance(workspace, dict) or is_pyhf(workspace, "Workspace") or str(workspace).lower().endswith(".json"):
            raise InputError(
                "a background workspace alone has no signal patches: also give the patchset "
                "(patchset.json, a directory of patch files) or a whole pallet"
            )
        return load_pallet(workspace, validate=validate)
    spec = load_workspace(workspace, validate=validate)
    patches, labels, description = load_patches(patchset, spec)
    return Pallet(spec, patches, labels, str(workspace) if isinstance(workspace, (str, os.PathLike)) else "<memory>", description)


def prepare_pallets(workspace: Any, patchset: Any = None, pallet: Any = None, *, validate: bool = True) -> list[Pallet]:
    """The pallets a scan fits: :func:`prepare_pallet`, or the ones ``pallet`` chooses in a source
    (or in a list of :class:`Pallet` objects) that holds several."""
    if isinstance(workspace, (list, tuple)) and workspace and all(isinstance(p, Pallet) for p in workspace):
        names = [p.name for p in workspace]
        if len(workspace) > 1 and (None in names or len(set(names)) < len(names)):
            raise InputError("pallets fitted together need distinct names: set each Pallet's name")
        if pallet is None:
            return list(workspace)
        indices = discovery.select_names([name or discovery.TOP for name in names], pallet, "the pallets given")
        return [workspace[index] for index in indices]
    if patchset is not None:
        if pallet is not None:
            raise InputError(
                "pallet= chooses among the pallets of one source; a workspace given with its patchset is one "
                "pallet: drop the pallet choice"
            )
        return [prepare_pallet(workspace, patchset, validate=validate)]
    single_json = isinstance(workspace, dict) or is_pyhf(workspace, "Workspace") or (
        not isinstance(workspace, Pallet) and str(workspace).lower().endswith(".json"))
    if single_json:
        return [prepare_pallet(workspace, validate=validate)]  # says the patches are missing
    loaded = load_pallet(workspace, pallet=pallet, validate=validate)
    return loaded if isinstance(loaded, list) else [loaded]


def _signals_pallet(workspace, patchset, pallet, signals, template) -> Pallet:
    """The pallet of a ``signals=`` scan (see :mod:`pyhf_dist.signals`)."""
    if signals is None:
        raise InputError("template= (--template) describes the rows of a signals file: also give signals=")
    if patchset is not None or pallet is not None:
        raise InputError("signals= (--signals) replaces the patchset: give the background workspace and the signals file")
    return signal_points.load_signals(workspace, signals, template)


@dataclasses.dataclass
class Plan:
    """The pallets of a scan and the patches chosen in each (in the pallets' order)."""

    pallets: list[Pallet]
    chosen: list[list[Patch]]
    combine: str | None = None

    @classmethod
    def of(cls, workspace: Any, patchset: Any, pallet: Any, patches: Any, combine: str | None,
           signals: Any = None, template: Any = None) -> "Plan":
        """The plan of a scan's arguments. Full schema validation is left to :meth:`check`, run
        once the patch selection and settings are known to be right."""
        if signals is not None or template is not None:  # points as data: one lazily read pallet
            workspace = _signals_pallet(workspace, patchset, pallet, signals, template)
            patchset = pallet = None
        pallets = prepare_pallets(workspace, patchset, pallet, validate=False)
        return cls(pallets, signal_points.select(pallets, patches), check_method(combine, pallets))

    @functools.cached_property
    def values_by_key(self) -> dict[tuple, list]:
        """``(pallet name, patch name)`` -> the patch's parameter values, in the scan's order (the
        lists the records get)."""
        return {(each.name, name): values for each, chosen in zip(self.pallets, self.chosen)
                for name, values in signal_points.named_values(chosen)}

    def todo(self, finished: dict):
        """``(pallet name, patch)`` of the chosen patches without a record in ``finished``: a list,
        or for a signals file a sized stream that makes each patch as the scan submits it."""
        return signal_points.pending(self.pallets, self.chosen, finished)

    def patch_digests(self, keys: set) -> dict:
        """``(pallet name, patch name)`` -> :func:`~pyhf_dist.specs.patch_digest` of the patch
        now, for the chosen patches among ``keys`` (for a signals file, each point is made anew)."""
        digests = {}
        if not keys:
            return digests
        for each, chosen in zip(self.pallets, self.chosen):
            for patch in chosen:
                if (each.name, patch.name) in keys and getattr(patch, "operations", None) is not None:
                    digests[(each.name, patch.name)] = patch_digest(patch.operations)
        return digests

    @property
    def workspaces(self) -> dict:
        """Pallet name -> background workspace (``None`` is the name of a lone unnamed pallet)."""
        return {each.name: each.workspace for each in self.pallets}

    def journal_key(self, settings) -> str:
        """The key of the scan's journal (:func:`pyhf_dist.journal.scan_key`)."""
        workspaces = self.workspaces
        # A lone unnamed pallet keeps the key its scans always had: their journals resume across versions.
        return scan_key(workspaces[None] if list(workspaces) == [None] else workspaces, settings)

    def context(self, settings) -> WorkerContext:
        """The workers' context: every pallet's workspace and the fit settings."""
        return WorkerContext.for_pallets(self.workspaces, settings.to_dict())

    def check(self) -> None:
        """Validate every workspace against pyhf's schema (an invalid one names its JSON path)."""
        for each in self.pallets:
            source = "the workspace given" if each.source == "<memory>" else each.source
            check_workspace(each.workspace, source if each.name is None else f"{source}:{each.name}")

    def describe(self) -> dict:
        """The scan's metadata about what it fits."""
        return {
            "source": self.pallets[0].source,
            "labels": self.pallets[0].labels,
            "patches": len(self.values_by_key),
            "pallets": ({each.name: len(chosen) for each, chosen in zip(self.pallets, self.chosen)}
                        if self.pallets[0].name is not None else None),
            "combine": self.combine,
            "order": list(self.values_by_key),
        }
