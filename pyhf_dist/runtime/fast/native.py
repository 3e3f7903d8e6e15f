"""The likelihood's value and gradient in C, for the fits made one at a time on the CPU.

A fit calls the likelihood's value and gradient a few hundred times, one dataset at a time. The
compiled jax function (:class:`~pyhf_dist.runtime.fast.likelihood.Functions`) takes ~70 µs a call
on a 1Lbb patch: ~60 small XLA kernels, each with its fixed cost, on dense tables of which most
entries are zero. ``sparse_likelihood`` (C, built with the package) runs the same arithmetic on the
non-zero entries only, with the gradient written out: 24 µs on 1Lbb, 3 to 9 µs on the stau and
3L-eRJR pallets (``benchmarks/likelihood_call.py``).

It is a second implementation of one function, so every patch checks it against the jax one
(which the structure check holds to pyhf's model) before its fits use it: value and gradient at
pyhf's initial values and at a point away from them must agree to :data:`AGREEMENT`; a patch that
does not agree keeps the jax function, and says so once. The batched engine (toys, groups, GPU)
keeps jax. Set ``PYHF_DIST_LIKELIHOOD=jax`` to use jax everywhere; where the extension was not
built (no C compiler at install), jax is used with a one-line notice.

Example:
    >>> value_and_grad = for_patch(layout, codes, functions, init, main, aux, lower, upper, scale)  # doctest: +SKIP
    >>> value_and_grad(theta, main, aux)  # [-2 log L, gradient...]  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import logging
import os

import numpy as np

__all__ = ["AGREEMENT", "ENV", "available", "disagreement", "for_patch", "tables"]

log = logging.getLogger(__name__)

#: ``jax`` keeps the fits one at a time on the jax function.
ENV = "PYHF_DIST_LIKELIHOOD"
#: Largest difference between the C and jax values, relative to the value, and between their
#: gradients in the fits' Fisher-scaled coordinates, relative to the largest component: both are
#: float64 sums of the same terms in other orders. (Unscaled, a Poisson constraint's gradient
#: carries its factor's rounding: ~1e-5 absolute with the factors of 1e11 of 3L-eRJR, ~1e-15 in
#: the coordinates L-BFGS-B sees.)
AGREEMENT = 1e-10
_NORM_CODES = {"code1": 1, "code4": 4}
_HIST_CODES = {"code0": 0, "code2": 2, "code4p": 5}
_SAID: set = set()


def available() -> bool:
    """Whether the C likelihood is built and not switched off (:data:`ENV`)."""
    return _extension() is not None


def _extension():
    """The extension module, or ``None`` where it is switched off or was not built."""
    if os.environ.get(ENV, "").lower() == "jax":
        return None
    try:
        # By its full name: the extension is a leaf, not the package whose modules import this one.
        return importlib.import_module("pyhf_dist.runtime.fast.sparse_likelihood")
    except ImportError:
        _once("unbuilt", "the C likelihood is not built (no C compiler at install?): fits use jax's, slower")
        return None


def tables(layout: dict, codes: tuple) -> tuple | None:
    """The arguments of ``sparse_likelihood.Likelihood`` for one patch's padded ``layout`` (its
    device or host arrays) with the interpolation ``codes``, or ``None`` for codes it does not cover."""
    normsys, histosys = codes
    if normsys not in _NORM_CODES or histosys not in _HIST_CODES:
        return None
    host = {key: np.asarray(value) for key, value in layout.items()}
    return _tables(host, _NORM_CODES[normsys], _HIST_CODES[histosys])


def for_patch(layout: dict, codes: tuple, functions, init, main, aux, lower, upper, scale):
    """The C likelihood of one patch's ``layout`` as ``(theta, main, aux) -> [-2 log L, gradient...]``,
    or ``None`` (not built, switched off, other interpolation codes, or no agreement with
    ``functions.value_and_grad`` at the check points: ``init``, and ``init`` moved by ``scale``
    within ``[lower, upper]``, on the data ``main``, ``aux``)."""
    extension = _extension()
    arguments = tables(layout, codes) if extension is not None else None
    if arguments is None:
        return None
    try:
        likelihood = extension.Likelihood(*arguments)
    except ValueError as error:  # tables it cannot trust (its own check of every index)
        _once("refused", f"the C likelihood refused a patch's tables ({error}): its fits use jax's")
        return None
    n = arguments[0]

    def value_and_grad(theta, main, aux):
        out = np.empty(n + 1)
        likelihood(theta, main, aux, out)
        return out

    main, aux = np.ascontiguousarray(main, dtype=float), np.ascontiguousarray(aux, dtype=float)
    away = np.clip(init + 0.5 * scale * np.cos(np.arange(n)), lower, upper)
    for point in (np.asarray(init, dtype=float), away):
        difference = disagreement(value_and_grad(point, main, aux), functions.value_and_grad(point, main, aux, layout), scale)
        if not difference <= AGREEMENT:
            _once("disagrees", f"the C likelihood disagrees with jax's on a patch ({difference:.3g}): its fits use jax's")
            return None
    return value_and_grad


def disagreement(mine, theirs, scale) -> float:
    """How far apart two ``[-2 log L, gradient...]`` are (see :data:`AGREEMENT`): the larger of the
    values' relative difference and the gradients' largest difference in the coordinates scaled by
    ``scale``, relative to their largest component (NaN where either is not finite)."""
    mine, theirs = np.asarray(mine, dtype=float), np.asarray(theirs, dtype=float)
    if not (np.all(np.isfinite(mine)) and np.all(np.isfinite(theirs))):
        return float("nan")
    value = abs(mine[0] - theirs[0]) / max(1.0, abs(theirs[0]))
    mine_scaled, theirs_scaled = mine[1:] * scale, theirs[1:] * scale
    gradient = np.max(np.abs(mine_scaled - theirs_scaled), initial=0.0) / max(1.0, np.max(np.abs(theirs_scaled)))
    return float(max(value, gradient))


def _tables(host: dict, norm_code: int, hist_code: int) -> tuple:
    """The arguments of ``sparse_likelihood.Likelihood`` from a patch's padded layout (host arrays)."""
    n = len(host["gauss"])
    nominal = host["nominal"]
    width = nominal.shape[1]
    factor_par = host["factor_par"]
    factors = factor_par.shape[-1] if factor_par.ndim == 3 else 0
    bins = host["bin_template"].shape[0]

    # Histosys: X1 above X2, one row each per parameter entry; the non-zero cells of each row.
    hist_x, hist_par = host["hist_x"], host["hist_par"]
    rows = len(hist_par)
    x1, x2 = hist_x[:rows], hist_x[rows:]
    hist_rows, hist_cell = np.nonzero((x1 != 0) | (x2 != 0))
    hist_ptr = np.concatenate([[0], np.cumsum(np.bincount(hist_rows, minlength=rows))])

    # Normsys: the entries (row, slot) whose factor is not 1 everywhere, row by row; code4's
    # coefficients by power, then entry.
    log_hi, log_lo = host["log_hi"], host["log_lo"]
    used = (log_hi != 0) | (log_lo != 0)
    if norm_code == 4:
        coef = host["norm_coef"]  # [rows, 6, slots]
        used |= np.any(coef != 0, axis=1)
    norm_row, norm_slot = np.nonzero(used)
    norm_ptr = np.concatenate([[0], np.cumsum(np.bincount(norm_row, minlength=len(host["norm_par"])))])
    norm_coef = coef[norm_row, :, norm_slot].T if norm_code == 4 else np.zeros(0)

    bin_used = host.get("bin_used", np.ones(bins, dtype=bool))
    int32, f64 = np.int32, np.float64
    columns = (
        hist_par.astype(int32), hist_ptr.astype(int32), hist_cell.astype(int32),
        np.ascontiguousarray(x1[hist_rows, hist_cell], f64), np.ascontiguousarray(x2[hist_rows, hist_cell], f64),
        host["norm_par"].astype(int32), norm_ptr.astype(int32), norm_slot.astype(int32),
        np.ascontiguousarray(log_hi[norm_row, norm_slot], f64), np.ascontiguousarray(log_lo[norm_row, norm_slot], f64),
        np.ascontiguousarray(norm_coef, f64).ravel(),
        np.ascontiguousarray(nominal, f64).ravel(), host["bin_index"].astype(int32).ravel(),
        factor_par.astype(int32).ravel(),
        bin_used.astype(np.uint8), host["gauss"].astype(np.uint8), host["poisson"].astype(np.uint8),
        np.ascontiguousarray(host["sigma"], f64), np.ascontiguousarray(host["tau"], f64),
    )
    return n, bins, width, factors, norm_code, hist_code, columns


def _once(kind: str, message: str) -> None:
    """Log ``message`` the first time something of this ``kind`` happens in the process."""
    if kind not in _SAID:
        _SAID.add(kind)
        log.info(message)
