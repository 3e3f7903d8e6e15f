"""A patched HistFactory spec turned into the plain numbers the compiled likelihood consumes.

pyhf builds a new ``Model`` (and new constants for jax) for every patch; here a patch becomes a
:class:`PatchArrays` of numpy arrays whose *shapes* are all the compiled likelihood depends on.
:func:`workspace_arrays` reads a whole patched workspace, as ``pyhf.PatchSet`` applies a patch
(:func:`~pyhf_dist.runtime.fast.patching.apply_patch`, copy-on-write). The parameters follow pyhf's
parameter sets (:mod:`~pyhf_dist.runtime.fast.parsets`); :mod:`~pyhf_dist.runtime.fast.padding` brings the arrays
of different patches to one common shape (:class:`~pyhf_dist.runtime.fast.padding.Caps`), so one compiled
function serves every patch of that shape. Those names are re-exported here.

The semantics follow pyhf 0.7 exactly (``pyhf.pdf``, ``pyhf.modifiers``): channels and samples in
sorted order, parameters in pyhf's ``par_order``, staterror widths pooled over every sample
carrying the modifier, shapesys factors ``(nominal/uncertainty)**2``. Anything outside what is
reproduced here raises :class:`~pyhf_dist.runtime.fast.errors.FastPathUnsupported`.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from pyhf_dist.runtime.fast import parsets
from pyhf_dist.runtime.fast.errors import FastPathUnsupported
from pyhf_dist.runtime.fast.padding import Caps, pad, pad_main, pad_parameters
from pyhf_dist.runtime.fast.parsets import MODIFIER_TYPES
from pyhf_dist.runtime.fast.patching import apply_patch
from pyhf_dist.settings import HISTOSYS_CODES, NORMSYS_CODES

__all__ = [
    "MODIFIER_TYPES",
    "Caps",
    "Channels",
    "PatchArrays",
    "SampleCache",
    "apply_patch",
    "build_arrays",
    "interpolation_codes",
    "pad",
    "pad_main",
    "pad_parameters",
    "workspace_arrays",
]



@dataclasses.dataclass
class PatchArrays:
    """One patched model as numpy arrays (unpadded), with its parameters and observed data.

    Slots are the (channel, sample) pairs in pyhf's order; a slot's bins are its channel's bins.
    Parameter indices refer to pyhf's parameter order; index ``P`` (one past the last parameter)
    means "the constant 1" in every index table.
    """

    nominal: np.ndarray  # [S, W]
    bin_index: np.ndarray  # [S, W] global bin of each slot bin, B for padding
    hist_par: np.ndarray  # [Kh] parameter of each histosys row
    hist_up: np.ndarray  # [Kh, S, W] hi_data - nominal (0 where the slot lacks the modifier)
    hist_dn: np.ndarray  # [Kh, S, W] nominal - lo_data
    norm_par: np.ndarray  # [Kn]
    norm_hi: np.ndarray  # [Kn, S] (1 where the slot lacks the modifier)
    norm_lo: np.ndarray  # [Kn, S]
    factor_par: np.ndarray  # [S, W, Kf]
    init: np.ndarray  # [P]
    lower: np.ndarray
    upper: np.ndarray
    fixed: np.ndarray  # bool
    gauss: np.ndarray  # bool: constrained by a normal
    sigma: np.ndarray  # width of the normal constraint (1 elsewhere)
    poisson: np.ndarray  # bool: constrained by a Poisson
    tau: np.ndarray  # Poisson constraint factor (1 elsewhere)
    aux: np.ndarray  # observed auxiliary data per parameter (0 if unconstrained)
    main_data: np.ndarray  # [B]
    poi_index: int
    par_names: list
    modifier_types: frozenset

    @property
    def sizes(self) -> Caps:
        """The unpadded sizes."""
        S = self.nominal.shape[0]
        return Caps(
            bins=len(self.main_data),
            slots=S,
            width=self.nominal.shape[1],
            histosys=len(self.hist_par),
            normsys=len(self.norm_par),
            factors=self.factor_par.shape[2],
            pars=len(self.init),
        )


@dataclasses.dataclass
class _Sample:
    """One sample of one channel, parsed: its numbers and its modifiers by kind."""

    nominal: np.ndarray
    # Modifiers sorted by (name, type), pyhf's config.modifiers order, by type:
    by_type: dict  # type -> ((name, data), ...)
    names_by_type: dict  # type -> (name, ...)
    hist_names: list
    hist_up: np.ndarray  # [kh, nbins] hi_data - nominal
    hist_dn: np.ndarray  # [kh, nbins] nominal - lo_data
    norm_names: list
    norm_hi: np.ndarray
    norm_lo: np.ndarray
    scalar_factors: list  # normfactor and lumi names
    bin_factors: list  # (name, type) of shapefactor and shapesys
    staterrors: list  # (name, uncertainties)
    types: frozenset  # modifier types present


def _parse_sample(sample: dict) -> _Sample:
    nominal = np.asarray(sample["data"], dtype=float)
    nbins = len(nominal)
    modifiers, seen = [], set()
    hist_names, hist_hi, hist_lo = [], [], []
    norm_names, norm_hi, norm_lo = [], [], []
    scalar_factors, bin_factors, staterrors = [], [], []
    for modifier in sample["modifiers"]:
        name, mtype, data = modifier["name"], modifier["type"], modifier.get("data")
        if mtype not in MODIFIER_TYPES:
            raise FastPathUnsupported(f"modifier type {mtype!r}")
        if (name, mtype) in seen:
            raise FastPathUnsupported(f"modifier {mtype}/{name} appears twice on one sample")
        seen.add((name, mtype))
        modifiers.append((name, mtype, data))
        if mtype == "histosys":
            hist_names.append(name)
            hist_hi.append(data["hi_data"])
            hist_lo.append(data["lo_data"])
        elif mtype == "normsys":
            hi, lo = float(data["hi"]), float(data["lo"])
            if not (hi > 0 and lo > 0):
                raise FastPathUnsupported(f"normsys {name!r} with non-positive factors")
            norm_names.append(name)
            norm_hi.append(hi)
            norm_lo.append(lo)
        elif mtype in ("normfactor", "lumi"):
            scalar_factors.append(name)
        elif mtype in ("shapefactor", "shapesys"):
            if mtype == "shapesys" and len(data) != nbins:
                raise FastPathUnsupported(f"shapesys {name!r} has the wrong number of bins")
            bin_factors.append((name, mtype))
        else:
            unc = np.asarray(data, dtype=float)
            if unc.shape != (nbins,):
                raise FastPathUnsupported(f"staterror {name!r} has the wrong number of bins")
            staterrors.append((name, unc))
    modifiers.sort(key=lambda m: (m[0], m[1]))
    by_type: dict = {}
    for name, mtype, data in modifiers:
        by_type.setdefault(mtype, []).append((name, data))
    hi = np.asarray(hist_hi, dtype=float).reshape(len(hist_names), nbins)
    lo = np.asarray(hist_lo, dtype=float).reshape(len(hist_names), nbins)
    return _Sample(
        nominal=nominal,
        by_type={mtype: tuple(entries) for mtype, entries in by_type.items()},
        names_by_type={mtype: tuple(name for name, _ in entries) for mtype, entries in by_type.items()},
        hist_names=hist_names,
        hist_up=hi - nominal,
        hist_dn=nominal - lo,
        norm_names=norm_names,
        norm_hi=np.asarray(norm_hi, dtype=float),
        norm_lo=np.asarray(norm_lo, dtype=float),
        scalar_factors=scalar_factors,
        bin_factors=bin_factors,
        staterrors=staterrors,
        types=frozenset(mtype for _, mtype in seen),
    )


class SampleCache:
    """Parsed samples of a background spec, reused by every patch that leaves them untouched.

    :func:`apply_patch` copies only what an operation changes, so the background's sample dicts
    survive patching as the same objects: keyed by identity (and holding the spec so that those
    identities stay valid), they are parsed once instead of once per patch.
    """

    def __init__(self, spec: dict):
        self._spec = spec
        self._known = {id(sample) for channel in spec["channels"] for sample in channel["samples"]}
        self._parsed: dict = {}

    def get(self, sample: dict) -> _Sample:
        key = id(sample)
        if key not in self._known:
            return _parse_sample(sample)
        parsed = self._parsed.get(key)
        if parsed is None:
            parsed = self._parsed[key] = _parse_sample(sample)
        return parsed


def build_arrays(
    spec: dict,
    measurement: dict,
    observations: dict,
    modifier_settings: dict,
    *,
    require_poi: bool = True,
    samples: SampleCache | None = None,
) -> PatchArrays:
    """Numbers of the model pyhf would build from ``spec`` (``{"channels", "parameters"}``).

    Args:
        spec: The patched model spec, as ``Workspace.model`` passes it to ``pyhf.Model``.
        measurement: The measurement (for the POI name).
        observations: Observed main data by channel name (the workspace's, as ``Workspace.data``).
        modifier_settings: pyhf's ``modifier_settings`` (interpolation codes).
        require_poi: Raise if the POI is not a parameter (off for a background-only workspace
            whose signal, and POI, come with the patches; ``poi_index`` is then -1).
        samples: Parsed samples of the unpatched spec, to reuse.

    Raises:
        FastPathUnsupported: Anything this module does not reproduce exactly.
    """
    interpolation_codes(modifier_settings)
    try:
        return _build(spec, measurement, observations, require_poi, samples)
    except FastPathUnsupported:
        raise
    except Exception as error:  # malformed specs: plain pyhf gives the authoritative error
        raise FastPathUnsupported(f"spec not understood by the fast path: {error!r}") from None


def workspace_arrays(
    workspace: dict,
    modifier_settings: dict,
    *,
    require_poi: bool = True,
    samples: SampleCache | None = None,
) -> PatchArrays:
    """Numbers of the model pyhf builds from a whole (patched) workspace specification.

    As ``pyhf.Workspace(spec).model(modifier_settings=...)`` and ``Workspace.data``: the channels,
    the first measurement's POI and parameter configuration, and the observations by channel name
    (observations of channels the model lacks are ignored, as pyhf ignores them).

    Raises:
        FastPathUnsupported: Anything :func:`build_arrays` does not reproduce, or a workspace
            without channels, observations or measurements (pyhf then gives its own error).
    """
    try:
        measurement = workspace["measurements"][0]
        config = measurement["config"]
        spec = {"channels": workspace["channels"], "parameters": config.get("parameters", [])}
        observations = {o["name"]: o["data"] for o in workspace["observations"]}
    except (KeyError, IndexError, TypeError) as error:
        raise FastPathUnsupported(f"not a workspace the fast path reads: {error!r}") from None
    return build_arrays(spec, measurement, observations, modifier_settings, require_poi=require_poi, samples=samples)


def interpolation_codes(modifier_settings: dict | None) -> tuple:
    """``(normsys code, histosys code)`` of pyhf ``modifier_settings``, if covered here.

    >>> interpolation_codes({"normsys": {"interpcode": "code1"}})
    ('code1', 'code4p')
    """
    settings = modifier_settings or {}
    extra = set(settings) - {"normsys", "histosys"}
    if extra or any(set(v) - {"interpcode"} for v in settings.values()):
        raise FastPathUnsupported(f"modifier settings {settings!r}")
    normsys = settings.get("normsys", {}).get("interpcode", "code4")
    histosys = settings.get("histosys", {}).get("interpcode", "code4p")
    if normsys not in NORMSYS_CODES or histosys not in HISTOSYS_CODES:
        raise FastPathUnsupported(f"interpolation codes {normsys}/{histosys}")
    return normsys, histosys


@dataclasses.dataclass
class Channels:
    """The channels of a model in pyhf's order and where their bins lie in the main data.

    Attributes:
        channels: ``{name: (bins, {sample name: parsed sample})}``.
        names: Channel names, sorted (pyhf's order).
        offsets: ``{name: first global bin}``.
        n_bins: Main-data bins.
        width: Bins of the widest channel.
        slots: ``(channel, sample, parsed sample)`` in pyhf's loop order: sorted channels, then
            sorted samples.
    """

    channels: dict
    names: list
    offsets: dict
    n_bins: int
    width: int
    slots: list

    @classmethod
    def read(cls, spec: dict, parse) -> "Channels":
        """The channels of ``spec``, each sample read with ``parse``.

        Raises:
            FastPathUnsupported: A channel or sample named twice, samples of different bins.
        """
        channels = {}
        for channel in spec["channels"]:
            name = channel["name"]
            if name in channels:
                raise FastPathUnsupported(f"channel {name!r} appears twice")
            nbins = len(channel["samples"][0]["data"])
            by_name = {}
            for sample in channel["samples"]:
                if sample["name"] in by_name:
                    raise FastPathUnsupported(f"sample {sample['name']!r} appears twice in channel {name!r}")
                parsed = parse(sample)
                if len(parsed.nominal) != nbins:
                    raise FastPathUnsupported(f"sample {sample['name']!r} has the wrong number of bins")
                by_name[sample["name"]] = parsed
            channels[name] = (nbins, by_name)
        names = sorted(channels)
        offsets, n_bins = {}, 0
        for name in names:
            offsets[name] = n_bins
            n_bins += channels[name][0]
        width = max(channels[c][0] for c in names)
        slots = [(c, s, channels[c][1][s]) for c in names for s in sorted(channels[c][1])]
        return cls(channels, names, offsets, n_bins, width, slots)


def _build(spec, measurement, observations, require_poi, samples) -> PatchArrays:
    geometry = Channels.read(spec, samples.get if samples is not None else _parse_sample)
    reduced, staterror_rank = parsets.reduced_requirements(geometry.slots, geometry, spec.get("parameters", []))
    parameters = parsets.parameter_arrays(reduced, measurement["config"]["poi"], require_poi)
    tables = _slot_tables(geometry, reduced, parameters, staterror_rank)
    try:
        main_data = np.concatenate([np.asarray(observations[c], dtype=float) for c in geometry.names])
    except KeyError as error:
        raise FastPathUnsupported(f"no observations for channel {error}") from None
    if len(main_data) != geometry.n_bins:
        raise FastPathUnsupported("observations and channels have different numbers of bins")
    per_parameter = {key: getattr(parameters, key) for key in ("init", "lower", "upper", "fixed", "gauss", "sigma", "poisson", "tau", "aux")}
    return PatchArrays(
        **tables,
        **per_parameter,
        main_data=main_data,
        poi_index=parameters.poi_index,
        par_names=parameters.par_names,
        modifier_types=frozenset().union(*(p.types for _, _, p in geometry.slots)),
    )


def _slot_tables(geometry: Channels, reduced: dict, parameters, staterror_rank: dict) -> dict:
    """The per-slot tables of :class:`PatchArrays` (``nominal`` ... ``factor_par``).

    Raises:
        FastPathUnsupported: A shapefactor or shapesys shared by channels of different widths.
    """
    slots, offsets, start = geometry.slots, geometry.offsets, parameters.start
    S, width, n_bins, n_pars = len(slots), geometry.width, geometry.n_bins, len(parameters.init)
    # Histosys and normsys tables are parameter-major, as pyhf's: the likelihood gathers one
    # value per parameter (a cheap gradient) instead of one per (slot, modifier) entry.
    # In order of first occurrence, gathered in C (thousands of modifiers, ~100 names).
    hist_rows = {n: i for i, n in enumerate(dict.fromkeys(itertools.chain.from_iterable(p.hist_names for _, _, p in slots)))}
    norm_rows = {n: i for i, n in enumerate(dict.fromkeys(itertools.chain.from_iterable(p.norm_names for _, _, p in slots)))}
    Kh, Kn = len(hist_rows), len(norm_rows)
    Kf = max([len(p.scalar_factors) + len(p.bin_factors) + len(p.staterrors) for _, _, p in slots] + [0])
    out = {
        "nominal": np.zeros((S, width)),
        "bin_index": np.full((S, width), n_bins, dtype=np.int32),
        "hist_par": np.asarray([start[n] for n in hist_rows], dtype=np.int32),
        "hist_up": np.zeros((Kh, S, width)),
        "hist_dn": np.zeros((Kh, S, width)),
        "norm_par": np.asarray([start[n] for n in norm_rows], dtype=np.int32),
        "norm_hi": np.ones((Kn, S)),
        "norm_lo": np.ones((Kn, S)),
        "factor_par": np.full((S, width, Kf), n_pars, dtype=np.int32),
    }
    # One fancy assignment per table and channel width, not one per slot: a 1Lbb patch has 77
    # slots, and this runs for every patch.
    widths: dict = {}
    for k, (c, _, _) in enumerate(slots):
        widths.setdefault(geometry.channels[c][0], []).append(k)
    for nbins, members in widths.items():
        samples = [slots[k][2] for k in members]
        out["nominal"][members, :nbins] = np.stack([p.nominal for p in samples])
        first_bins = np.asarray([offsets[slots[k][0]] for k in members])
        out["bin_index"][members, :nbins] = first_bins[:, None] + np.arange(nbins)
        rows = _rows(hist_rows, [p.hist_names for p in samples])
        if rows.size:
            at = np.repeat(members, [len(p.hist_names) for p in samples])
            out["hist_up"][rows, at, :nbins] = np.concatenate([p.hist_up for p in samples])
            out["hist_dn"][rows, at, :nbins] = np.concatenate([p.hist_dn for p in samples])
    samples = [p for _, _, p in slots]
    rows = _rows(norm_rows, [p.norm_names for p in samples])
    if rows.size:
        at = np.repeat(np.arange(S), [len(p.norm_names) for p in samples])
        out["norm_hi"][rows, at] = np.concatenate([p.norm_hi for p in samples])
        out["norm_lo"][rows, at] = np.concatenate([p.norm_lo for p in samples])
    for k, (c, s, parsed) in enumerate(slots):
        nbins = geometry.channels[c][0]
        columns = [np.full(nbins, start[name]) for name in parsed.scalar_factors]
        for name, mtype in parsed.bin_factors:
            if reduced[name]["n_parameters"] < nbins:
                # pyhf would index past the parameter set into parameter 0.
                raise FastPathUnsupported(f"{mtype} {name!r} shared by channels of different widths")
            columns.append(start[name] + np.arange(nbins))
        for name, _ in parsed.staterrors:
            columns.append(start[name] + staterror_rank[name][offsets[c] : offsets[c] + nbins])
        for column, indices in enumerate(columns):
            out["factor_par"][k, :nbins, column] = indices
    return out


def _rows(rows: dict, names: list) -> np.ndarray:
    """The table rows of every name of every list in ``names``, in order, as one index array."""
    flat = itertools.chain.from_iterable(names)
    return np.fromiter(map(rows.__getitem__, flat), dtype=np.intp, count=sum(map(len, names)))
