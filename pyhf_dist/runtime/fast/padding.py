"""Padding a patch's arrays to a layout shared by the patches of a pallet.

A :class:`Caps` is the array sizes one compiled likelihood takes; :func:`pad`,
:func:`pad_parameters` and :func:`pad_main` bring a :class:`~pyhf_dist.runtime.fast.layout.PatchArrays`
to those sizes with identity elements (zero yields, unit factors, fixed unconstrained parameters,
masked bins), so one compiled function serves every patch that fits the layout.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["Caps", "pad", "pad_main", "pad_parameters"]


@dataclasses.dataclass(frozen=True)
class Caps:
    """Array sizes of one compiled layout (the patches it serves are padded to them).

    Attributes:
        bins: Main-data bins ``B`` (bins past a patch's own are padding, left out of the likelihood).
        slots: (channel, sample) pairs ``S``.
        width: Bins of the widest channel ``W`` (a slot's bins are padded to it).
        histosys: Histosys parameters ``Kh`` (rows of the histosys tables).
        normsys: Normsys parameters ``Kn``.
        factors: One-parameter factors per slot bin ``Kf`` (normfactor, lumi, staterror...).
        pars: Parameters ``P``.
    """

    bins: int
    slots: int
    width: int
    histosys: int
    normsys: int
    factors: int
    pars: int

    def covers(self, other: "Caps") -> bool:
        """Whether arrays of size ``other`` fit into this layout (nothing larger).

        >>> Caps(14, 60, 3, 100, 40, 4, 130).covers(Caps(13, 50, 3, 90, 40, 3, 120))
        True
        """
        return all(getattr(self, f.name) >= getattr(other, f.name) for f in dataclasses.fields(self))

    def grown(self, other: "Caps") -> "Caps":
        """A layout covering this one and sizes ``other`` (with headroom where it had to grow).

        >>> Caps(14, 60, 3, 100, 40, 4, 130).grown(Caps(15, 50, 3, 90, 40, 3, 120))
        Caps(bins=15, slots=60, width=3, histosys=100, normsys=44, factors=4, pars=132)
        """
        if self.covers(other):
            return self
        room = Caps.around(other)
        return Caps(**{f.name: max(getattr(self, f.name), getattr(room, f.name)) for f in dataclasses.fields(self)})

    @property
    def volume(self) -> int:
        """Entries of the per-evaluation tables: what padding to this layout costs in every evaluation.

        >>> Caps(bins=2, slots=3, width=2, histosys=1, normsys=1, factors=1, pars=4).volume
        23
        """
        return self.slots * self.width * (self.histosys + self.factors + 1) + self.normsys * self.slots + self.bins

    @classmethod
    def around(cls, sizes: "Caps") -> "Caps":
        """A layout for ``sizes`` with room for the other patches of a pallet.

        Patches of a pallet typically differ by a few samples, modifiers or parameters: a small
        margin keeps one compiled shape for the whole pallet while padding (which costs time in
        every evaluation) stays small. Bins and channel width are kept exact.
        """
        return cls(
            bins=sizes.bins,
            width=sizes.width,
            slots=_round_up(sizes.slots),
            histosys=_round_up(sizes.histosys),
            normsys=_round_up(sizes.normsys),
            factors=sizes.factors + 1,
            pars=_round_up(sizes.pars),
        )


def _round_up(n: int) -> int:
    # About 10% more, to a multiple of 4.
    return 4 * math.ceil((n + max(2, n // 10)) / 4)


def pad(arrays: PatchArrays, caps: Caps) -> dict:
    """The arrays of one patch padded to ``caps``, as the dict the compiled likelihood takes.

    Padding slots have zero yield; padding histosys entries zero deltas; padding normsys entries
    ``hi = lo = 1``; padding factors the constant 1; padding parameters are fixed at 0 with no
    constraint; padding bins are masked out (``bin_used``). None of them changes the likelihood.
    """
    if not caps.covers(arrays.sizes):
        raise ValueError(f"arrays of sizes {arrays.sizes} do not fit the layout {caps}")
    S, W, P = caps.slots, caps.width, caps.pars
    s, w = arrays.nominal.shape
    n = len(arrays.init)
    B = caps.bins

    def remap(index):
        # index n ("the constant 1") moves to P, the constant's place in the padded layout.
        return np.where(index == n, P, index).astype(np.int32)

    out = {
        "nominal": np.zeros((S, W)),
        "bin_index": np.full((S, W), B, dtype=np.int32),
        "hist_par": np.full(caps.histosys, P, dtype=np.int32),
        "hist_up": np.zeros((caps.histosys, S, W)),
        "hist_dn": np.zeros((caps.histosys, S, W)),
        "norm_par": np.full(caps.normsys, P, dtype=np.int32),
        "norm_hi": np.ones((caps.normsys, S)),
        "norm_lo": np.ones((caps.normsys, S)),
        "factor_par": np.full((S, W, caps.factors), P, dtype=np.int32),
        "gauss": np.zeros(P, dtype=bool),
        "sigma": np.ones(P),
        "poisson": np.zeros(P, dtype=bool),
        "tau": np.ones(P),
        # Only its shape is used: it tells the compiled function the number of bins.
        "bin_template": np.zeros(B),
        # The patch's own bins; padding bins (a layout shared with patches of more bins) add nothing.
        "bin_used": np.arange(B) < len(arrays.main_data),
    }
    kh, kn, kf = len(arrays.hist_par), len(arrays.norm_par), arrays.factor_par.shape[2]
    out["nominal"][:s, :w] = arrays.nominal
    out["bin_index"][:s, :w] = arrays.bin_index
    out["hist_par"][:kh] = arrays.hist_par
    out["hist_up"][:kh, :s, :w] = arrays.hist_up
    out["hist_dn"][:kh, :s, :w] = arrays.hist_dn
    out["norm_par"][:kn] = arrays.norm_par
    out["norm_hi"][:kn, :s] = arrays.norm_hi
    out["norm_lo"][:kn, :s] = arrays.norm_lo
    out["factor_par"][:s, :w, :kf] = remap(arrays.factor_par)
    for key in ("gauss", "sigma", "poisson", "tau"):
        out[key][:n] = getattr(arrays, key)
    return out


def pad_parameters(arrays: PatchArrays, caps: Caps) -> dict:
    """Initial values, bounds, fixed flags and observed auxdata padded to ``caps.pars``."""
    P, n = caps.pars, len(arrays.init)
    out = {"init": np.zeros(P), "lower": np.zeros(P), "upper": np.zeros(P), "fixed": np.ones(P, dtype=bool), "aux": np.zeros(P)}
    for key in out:
        out[key][:n] = getattr(arrays, key)
    return out


def pad_main(arrays: PatchArrays, caps: Caps) -> np.ndarray:
    """Observed main data padded with zeros to ``caps.bins`` (the padding is masked out)."""
    main = np.zeros(caps.bins)
    main[: len(arrays.main_data)] = arrays.main_data
    return main
