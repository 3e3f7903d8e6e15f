"""The signal template: how one row of signal yields becomes the patch a reinterpreter would write.

A template names the channels the signal goes into, the signal sample's name and its modifiers:
the normfactor (the measurement's parameter of interest), optionally a normsys of fixed size, a
per-bin ``staterror`` or ``shapesys`` from the row's uncertainties, and any further modifiers
written out verbatim (``lumi``, say). Applied to a row, it gives one jsonpatch ``add`` of the
sample to each channel, as the patches of a pyhf patchset do.

As JSON (``--template template.json``, or the same dict as ``template=`` in Python)::

    {"channels": ["SR"], "sample": "signal", "poi": "mu_SIG",
     "normsys": {"name": "sig_xsec", "hi": 1.1, "lo": 0.9},
     "uncertainty": "staterror", "modifiers": [{"name": "lumi", "type": "lumi", "data": null}],
     "parameters": ["m1", "m2"]}

Every key is optional. ``channels`` defaults to the channels the signals file names; ``poi`` to the
first measurement's POI; ``parameters`` to every column that is neither the name nor a yield.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from pyhf_dist.exceptions import InputError

__all__ = ["SignalsError", "Template", "load_template"]

UNCERTAINTIES = ("staterror", "shapesys")
_KEYS = ("channels", "sample", "poi", "normsys", "uncertainty", "uncertainty_name", "modifiers", "parameters")


class SignalsError(InputError):
    """A signals file or template that cannot be used (the scan stops at once, with one line)."""


@dataclasses.dataclass(frozen=True)
class Template:
    """How a row of signal yields becomes a patch (see the module's docstring).

    Attributes:
        channels: Channels the signal is added to; ``None``: those the signals file names.
        sample: Name of the added sample.
        poi: The normfactor on the sample, the first measurement's POI (``None``: taken from there).
        normsys: ``{"name", "hi", "lo"}``: a normsys on the sample, the same for every point.
        uncertainty: ``"staterror"`` or ``"shapesys"`` from the row's per-bin uncertainties.
        uncertainty_name: Name of that modifier; ``{channel}`` and ``{sample}`` are filled in
            (default ``staterror_{channel}``, which pools with the background's MC statistics,
            or ``{sample}_shapesys_{channel}``).
        modifiers: Further modifiers added to the sample as written (e.g. ``lumi``).
        parameters: The columns that hold the model parameters; ``None``: every other column.
    """

    channels: tuple | None = None
    sample: str = "signal"
    poi: str | None = None
    normsys: dict | None = None
    uncertainty: str | None = None
    uncertainty_name: str | None = None
    modifiers: tuple = ()
    parameters: tuple | None = None

    @classmethod
    def from_dict(cls, spec: dict, where: str = "the template") -> "Template":
        """A template from its JSON form; an unknown key or a wrong value is one line."""
        if not isinstance(spec, dict):
            raise SignalsError(f"{where} must be a JSON object (keys {', '.join(_KEYS)}), got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(_KEYS))
        if unknown:
            raise SignalsError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(_KEYS)})")
        channels = spec.get("channels")
        parameters = spec.get("parameters")
        for key, value in (("channels", channels), ("parameters", parameters)):
            if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
                raise SignalsError(f"{where}: {key!r} must be a list of names, got {value!r:.60}")
        template = cls(
            channels=tuple(channels) if channels is not None else None,
            sample=spec.get("sample", "signal"),
            poi=spec.get("poi"),
            normsys=spec.get("normsys"),
            uncertainty=spec.get("uncertainty"),
            uncertainty_name=spec.get("uncertainty_name"),
            modifiers=tuple(spec.get("modifiers") or ()),
            parameters=tuple(parameters) if parameters is not None else None,
        )
        template.check_shape(where)
        return template

    def check_shape(self, where: str = "the template") -> None:
        """Check what can be checked without the workspace."""
        if not isinstance(self.sample, str) or not self.sample:
            raise SignalsError(f"{where}: 'sample' must be a non-empty name, got {self.sample!r}")
        if self.poi is not None and not isinstance(self.poi, str):
            raise SignalsError(f"{where}: 'poi' must be a parameter name, got {self.poi!r}")
        if self.uncertainty is not None and self.uncertainty not in UNCERTAINTIES:
            raise SignalsError(f"{where}: 'uncertainty' must be one of {', '.join(UNCERTAINTIES)}, got {self.uncertainty!r}")
        if self.normsys is not None:
            _check_normsys(self.normsys, where)
        for index, modifier in enumerate(self.modifiers):
            if not isinstance(modifier, dict) or not {"name", "type"} <= set(modifier):
                raise SignalsError(f"{where}: modifiers[{index}] must be an object with 'name', 'type' and 'data'")

    def resolve(self, workspace: dict, named: list[str] | None, where: str = "the template") -> "Bound":
        """Bind the template to a workspace: the channels' positions and sizes, the POI.

        Args:
            workspace: The background workspace specification.
            named: The channels the signals file names in its columns (``None``: it names them
                per row, in a ``yields`` column).

        Raises:
            SignalsError: A channel the workspace lacks, a sample name already used in one of the
                channels, yield columns and template channels that differ, no POI to use, a ``poi``
                other than the measurement's.
        """
        index = {channel["name"]: position for position, channel in enumerate(workspace["channels"])}
        bins = {channel["name"]: len(channel["samples"][0]["data"]) for channel in workspace["channels"]}
        channels = self.channels if self.channels is not None else (tuple(named) if named is not None else None)
        for channel in channels or ():
            if channel not in index:
                raise SignalsError(f"{where}: no channel {channel!r} in the workspace (channels: {_listing(index)})")
            if any(sample["name"] == self.sample for sample in workspace["channels"][index[channel]]["samples"]):
                raise SignalsError(f"{where}: channel {channel!r} already has a sample {self.sample!r}: name the signal "
                                   "sample otherwise ('sample')")
        if self.channels is not None and named is not None:
            # Yield columns are the signal of every point: a channel's columns left out of the
            # template's channels would be added all the same, or the points all fail.
            extra = [channel for channel in named if channel not in self.channels]
            if extra:
                raise SignalsError(f"{where}: 'channels' leaves out {extra[0]!r}, which the signals file has yield "
                                   f"columns for: add it to 'channels', or drop its columns from the file")
            lacking = [channel for channel in self.channels if channel not in named]
            if lacking:
                raise SignalsError(f"{where}: channel {lacking[0]!r} has no yield columns ({lacking[0]}[0], ...) in "
                                   "the signals file: add them, or drop it from 'channels'")
        measurements = workspace.get("measurements") or []
        if not measurements:
            if self.poi is None:
                raise SignalsError(f"{where}: the workspace has no measurement to take the POI from: give 'poi'")
            return Bound(self, index, bins, channels, self.poi)
        # Every fit uses the first measurement: a normfactor of another name would leave its POI
        # undeclared (pyhf then fails every point alike) or test a strength that is not the signal's.
        measured = measurements[0]["config"]["poi"]
        if self.poi is not None and self.poi != measured:
            raise SignalsError(f"{where}: 'poi' is {self.poi!r}, but the workspace's measurement "
                               f"{measurements[0].get('name', '')!r} tests {measured!r}: drop 'poi' or set it to "
                               f"{measured!r}")
        return Bound(self, index, bins, channels, measured)


def _check_normsys(normsys: Any, where: str) -> None:
    if not isinstance(normsys, dict) or set(normsys) != {"name", "hi", "lo"}:
        raise SignalsError(f"{where}: 'normsys' must be {{\"name\", \"hi\", \"lo\"}}, got {normsys!r:.80}")
    for side in ("hi", "lo"):
        value = normsys[side]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise SignalsError(f"{where}: normsys {side!r} must be a positive number, got {value!r}")


def _listing(names) -> str:
    names = list(names)
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


@dataclasses.dataclass(frozen=True)
class Bound:
    """A template bound to one workspace: what turns checked yields into patch operations."""

    template: Template
    index: dict
    bins: dict
    channels: tuple | None
    poi: str

    def operations(self, yields: dict, uncertainties: dict | None) -> list:
        """The patch of one point: an ``add`` of the signal sample to each channel, in the
        workspace's channel order.

        Args:
            yields: ``{channel: [yield per bin]}``, checked.
            uncertainties: ``{channel: [absolute uncertainty per bin]}`` when the template has one.
        """
        template = self.template
        operations = []
        for channel in sorted(yields, key=self.index.__getitem__):
            modifiers = [{"name": self.poi, "type": "normfactor", "data": None}]
            if template.normsys is not None:
                modifiers.append({"name": template.normsys["name"], "type": "normsys",
                                  "data": {"hi": template.normsys["hi"], "lo": template.normsys["lo"]}})
            if template.uncertainty is not None:
                default = "staterror_{channel}" if template.uncertainty == "staterror" else "{sample}_shapesys_{channel}"
                name = (template.uncertainty_name or default).format(channel=channel, sample=template.sample)
                modifiers.append({"name": name, "type": template.uncertainty, "data": list(uncertainties[channel])})
            modifiers.extend(dict(modifier) for modifier in template.modifiers)
            operations.append({
                "op": "add", "path": f"/channels/{self.index[channel]}/samples/-",
                "value": {"name": template.sample, "data": list(yields[channel]), "modifiers": modifiers},
            })
        return operations


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # an editor may begin it with a byte order mark
    except OSError as error:
        raise SignalsError(f"cannot read the template {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise SignalsError(f"the template {path} is not UTF-8 text: save it as UTF-8") from None


def _parsed(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise SignalsError(f"{where} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None


def load_template(template: Any) -> Template:
    """A :class:`Template` from ``None`` (the defaults), a dict, a JSON file or inline JSON text."""
    if template is None:
        return Template()
    if isinstance(template, Template):
        template.check_shape()
        return template
    if isinstance(template, dict):
        return Template.from_dict(template)
    if isinstance(template, (str, os.PathLike)):
        inline = isinstance(template, str) and template.lstrip().startswith("{")
        where = "the template" if inline else str(template)
        return Template.from_dict(_parsed(template if inline else _text(Path(template)), where), where)
    raise SignalsError(f"template must be a dict, a JSON file or a Template, got {type(template).__name__}")
