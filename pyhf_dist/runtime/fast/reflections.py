"""Further starts for toy fits where one nuisance parameter gives the likelihood two basins.

A systematic variation given on one side only (a histosys whose down variation is the nominal,
as for many jet-energy-resolution uncertainties) moves the expected yields by a function of its
parameter that is mostly even: pyhf's polynomial interpolation between −1 and +1 lowers the
yields on the side without a variation as it raises them on the other. The data of a toy can then
be fitted about as well with that parameter on either side of zero, and its likelihood has a
minimum on each side, a fraction of a unit of ``−2 log L`` apart. A fit ends in whichever its path
reaches first; pyhf's SLSQP and the batched engine take different paths, so each can stop in the
higher one. On 1Lbb ``C1N2_Wh_hbb_700_150`` (1,000 toys of each hypothesis, seed 1) fits of 16
toys ended up to 1.0 above a minimum on the other side of such a parameter.

So every fit of a toy is looked at once more: its minimum with one such parameter reflected
through zero (:func:`reflected_starts`). Where ``−2 log L`` there lies within :data:`WINDOW` of the
minimum, the other basin may be lower, and a probe of the minimum starts there
(:func:`~pyhf_dist.runtime.fast.toystats.toy_statistics` keeps the lower minimum, and starts the
toy's other fit from a minimum that moved). The parameters
looked at are those whose effect on some bin is mostly even (:func:`even_parameters`); their
reflections are evaluated in blocks of :data:`BLOCK` points on the batched likelihood.
"""

from __future__ import annotations

import weakref

import numpy as np

from pyhf_dist.runtime.fast.batch_model import kernels

__all__ = ["BLOCK", "EVEN_RATIO", "EVEN_SIZE", "SHIFT", "WINDOW", "even_parameters", "reflected_starts"]

#: A parameter is looked at when, in some bin, the even part of its effect on the expected yield
#: (at ±0.5 or ±1 from its initial value) is this many times the odd part, and at least
#: :data:`EVEN_SIZE` of the bin's Poisson standard deviation.
EVEN_RATIO = 2.0
#: Smaller even parts cannot hold two basins a visible distance apart (``−2 log L`` changes by
#: about the square of this). On 1Lbb ``C1N2_Wh_hbb_700_150`` 19 of 124 nuisance parameters pass
#: both; of the fits lowered by reflections of any parameter (1,000 toys of each hypothesis), all
#: but one reflected one of them (its ratio: 1.97), the smallest even part among them 0.13.
EVEN_SIZE = 0.1
#: A parameter is reflected only where its fitted value lies this far from zero: closer, the
#: reflection is a step inside one basin, which the fit's own convergence already covers.
SHIFT = 0.2
#: A reflection within this of the minimum's ``−2 log L`` is probed. The reflections that led to
#: lower minima on 1Lbb lay from 0.42 below to 0.16 above it; about one in 75 reflections (of
#: every parameter) lies within 0.2.
WINDOW = 0.2
#: Points per compiled evaluation (one shape: compiled once per process and model).
BLOCK = 256

#: :func:`even_parameters` of each fitter, for as long as the fitter lives.
_EVEN_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def even_parameters(fitter) -> np.ndarray:
    """Indices of the free, Gaussian-constrained nuisance parameters of ``fitter``'s model
    whose effect on some bin's expected yield is mostly even (:data:`EVEN_RATIO`)."""
    known = _EVEN_PARAMETERS.get(fitter)
    if known is not None:
        return known
    problem = fitter.problem
    n = fitter.n
    gauss = np.asarray(problem.layout["gauss"], dtype=bool)[:n]
    candidates = np.flatnonzero(gauss & ~np.asarray(fitter.fixed[:n], dtype=bool))
    candidates = candidates[candidates != fitter.poi_index]
    ratio, size = np.zeros(len(candidates)), np.zeros(len(candidates))
    for step in (0.5, 1.0):
        points = np.tile(fitter.init, (2 * len(candidates) + 1, 1))
        points[1 + 2 * np.arange(len(candidates)), candidates] += step
        points[2 + 2 * np.arange(len(candidates)), candidates] -= step
        points = np.clip(points, fitter.lower, fitter.upper)
        found = fitter.yields(points)
        nominal, up, down = found[0], found[1::2], found[2::2]
        even = np.abs(up + down - 2.0 * nominal) / 2.0
        odd = np.abs(up - down) / 2.0
        # A bin the parameter hardly moves does not count (relative 1e-3 of its yield).
        floor = 1e-3 * np.abs(nominal) + 1e-12
        ratio = np.maximum(ratio, np.max(even / (odd + floor), axis=1, initial=0.0))
        size = np.maximum(size, np.max(even / np.sqrt(np.maximum(nominal, 1e-3)), axis=1, initial=0.0))
    _EVEN_PARAMETERS[fitter] = candidates[(ratio > EVEN_RATIO) & (size >= EVEN_SIZE)]
    return _EVEN_PARAMETERS[fitter]


def reflected_starts(fitter, main, aux, theta, values, slots) -> tuple[np.ndarray, np.ndarray, int]:
    """Starts of further fits: each minimum ``theta[slot]`` with one parameter of
    :func:`even_parameters` reflected through zero, where ``−2 log L`` there (with its toy's data)
    lies within :data:`WINDOW` of ``values[slot]``.

    Args:
        fitter: The :class:`~pyhf_dist.runtime.fast.batched.BatchFitter` of the toys.
        main, aux: ``[toys, ...]`` the toys' data (:func:`~pyhf_dist.runtime.fast.toystats.split_samples`).
        theta, values: ``[fits, n_pars]`` and ``[fits]``, the minima found so far: fit ``slot`` is
            one of toy ``slot % toys`` (each toy's conditional fit, then its free fit).
        slots: The fits to look at (indices into ``theta``).

    Returns:
        ``(slots, starts, evaluations)``: the fit of each start (a fit may have several), the
        starting points, and the number of reflected points evaluated.
    """
    parameters = even_parameters(fitter)
    slots = np.asarray(slots, dtype=int)
    rows = slots % len(main)
    which, parameter = np.nonzero(np.abs(theta[np.ix_(slots, parameters)]) > SHIFT) if len(parameters) else ((), ())
    if not len(which):
        return np.zeros(0, dtype=int), np.zeros((0, theta.shape[1])), 0
    function = kernels(fitter.model.codes)["twice_nll"]
    n, cap = fitter.n, fitter.model.caps.pars
    main = np.asarray(main, dtype=float)
    aux_rows = np.zeros((len(main), cap))
    aux_rows[:, :n] = np.asarray(aux, dtype=float)[:, :n]
    found_slots, found_starts = [], []
    for begin in range(0, len(which), BLOCK):
        # One shape for every call (compiled once): the last block is padded with its first point.
        index = np.resize(np.arange(begin, min(begin + BLOCK, len(which))), BLOCK)
        slot, row, reflected = slots[which[index]], rows[which[index]], parameters[parameter[index]]
        points = np.tile(fitter.init, (BLOCK, 1))
        points[:, :n] = theta[slot, :n]
        points[np.arange(BLOCK), reflected] *= -1.0
        points = np.clip(points, fitter.lower, fitter.upper)
        value = np.asarray(function(points, main[row], aux_rows[row], fitter.device_arrays))
        size = min(BLOCK, len(which) - begin)
        near = np.flatnonzero(np.isfinite(value[:size]) & (value[:size] <= values[slot[:size]] + WINDOW))
        found_slots.append(slot[near])
        found_starts.append(points[near, : theta.shape[1]])
    return np.concatenate(found_slots), np.concatenate(found_starts), len(which)
