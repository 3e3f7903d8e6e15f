"""One patch's likelihood for a batch of parameter vectors and datasets at once.

The likelihood of :mod:`~pyhf_dist.runtime.fast.likelihood` evaluates one parameter vector per call;
vectorising it with ``jax.vmap`` turns its gathers into batched scatters in the gradient and its
code4 product into strided passes over large arrays, which on a CPU cost ten times the arithmetic.
Here the same HistFactory arithmetic (the interpolation helpers of
:mod:`~pyhf_dist.runtime.fast.likelihood`) is written for a leading batch axis:

* only what carries numbers is kept: the (sample, bin) entries that exist (the padded layout
  is twice as large on 1Lbb), histosys and normsys rows of real parameters; these compact
  arrays are padded again to sizes that grow in steps (:class:`BatchCaps`), so that the patches of
  a pallet share one compilation;
* yields reach their bins through a matrix product with a fixed one-hot table, not a scatter;
* the product of code4 normsys factors, the dominant cost, has a hand-written gradient
  (:func:`_code4_bwd`): each factor's derivative over the factor times the product, computed in
  one fused pass with the batch axis innermost.

Example:
    >>> model = BatchModel.from_problem(problem)  # doctest: +SKIP
    >>> values, gradients = kernels(model.codes)["value_and_grad"](theta, main, aux, model.arrays)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading

import numpy as np

from pyhf_dist.runtime.fast.likelihood import (
    YIELD_FLOOR,
    configure_jax,
    expected_for_poisson,
    histosys_coefficients,
    normsys_factors,
    poisson_terms,
    tree_product,
)

__all__ = ["BatchCaps", "BatchModel", "fisher_information", "kernels"]


@dataclasses.dataclass(frozen=True)
class BatchCaps:
    """Array sizes of one compiled batch likelihood.

    Attributes:
        bins: Main-data bins ``B``.
        entries: (sample, bin) entries ``E``.
        slots: Samples of channels carrying normsys factors ``S``.
        histosys: Histosys rows ``Kh``.
        normsys: Normsys rows ``Kn``.
        factors: One-parameter factors per entry ``Kf``.
        pars: Parameters ``n`` (index ``n`` is the constant 1).
    """

    bins: int
    entries: int
    slots: int
    histosys: int
    normsys: int
    factors: int
    pars: int

    def covers(self, other: "BatchCaps") -> bool:
        """Whether arrays of size ``other`` fit (same bins and factors, nothing larger)."""
        return (self.bins, self.factors) == (other.bins, other.factors) and all(
            getattr(self, f.name) >= getattr(other, f.name) for f in dataclasses.fields(self)
        )

    def around(self, other: "BatchCaps | None" = None) -> "BatchCaps":
        """Sizes covering this and ``other`` with ~4% headroom (bins and factors exact)."""
        merged = {
            f.name: max(getattr(self, f.name), getattr(other, f.name)) if other is not None else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }
        return BatchCaps(**{k: v if k in ("bins", "factors") else _round_up(v) for k, v in merged.items()})


def _round_up(n: int) -> int:
    # About 4% more, to a multiple of 4: the compact sizes of a pallet's patches vary little (on
    # 1Lbb by at most 7% in entries, 1 normsys row), and every slot of padding costs every
    # evaluation (the code4 product is the larger part of one).
    return 4 * math.ceil((n + max(2, n // 25)) / 4)


# Sizes in use per (codes, bins, factors) in this process: a patch that fits is padded to them.
_CAPS: dict = {}
_CAPS_LOCK = threading.Lock()


@dataclasses.dataclass
class BatchModel:
    """One patch's compact likelihood arrays (on the device) and their sizes.

    Attributes:
        arrays: The arrays the kernels take (``C``).
        n: Parameters of the model; those from ``n`` to ``caps.pars`` are padding (held at 0).
        caps: The padded sizes.
        codes: ``(normsys code, histosys code)``.
    """

    arrays: dict
    n: int
    caps: BatchCaps
    codes: tuple

    @classmethod
    def from_problem(cls, problem) -> "BatchModel":
        """The compact arrays of a :class:`~pyhf_dist.runtime.fast.fit.FitProblem`'s padded layout."""
        import jax

        configure_jax()
        codes = tuple(problem.functions.codes)
        L = {key: np.asarray(value) for key, value in problem.layout.items()}
        n = int(problem.n_pars)
        P = len(problem.init)
        B = L["bin_template"].shape[0]
        S, W = L["nominal"].shape
        bins = L["bin_index"].ravel()
        entries = np.flatnonzero(bins < B)
        slots, entry_slot = np.unique(entries // W, return_inverse=True)
        hist_rows = np.flatnonzero(L["hist_par"] != P)
        rows, hist_x = len(L["hist_par"]), L["hist_x"]  # X1 above X2
        norm_rows = np.flatnonzero(L["norm_par"] != P)
        factor_par = L["factor_par"].reshape(S * W, -1)[entries]
        sizes = BatchCaps(
            bins=B,
            entries=len(entries),
            slots=len(slots),
            histosys=len(hist_rows),
            normsys=len(norm_rows),
            factors=factor_par.shape[1],
            pars=n,
        )
        with _CAPS_LOCK:
            key = (codes, B, sizes.factors)
            caps = _CAPS.get(key)
            if caps is None or not caps.covers(sizes):
                caps = _CAPS[key] = sizes.around(caps)
        N1 = caps.pars  # index of the constant 1 in the compact parameter vector

        def remap(index):
            index = np.asarray(index)
            if np.any((index >= n) & (index != P)):
                raise ValueError("the layout refers to a padding parameter")
            return np.where(index == P, N1, index).astype(np.int32)

        def put(shape, value, fill=0.0, dtype=float):
            out = np.full(shape, fill, dtype=dtype)
            out[tuple(slice(0, k) for k in np.shape(value))] = value
            return out

        E, Kh, Kn, Sc = caps.entries, caps.histosys, caps.normsys, caps.slots
        onehot = np.zeros((E, B))
        onehot[np.arange(len(entries)), bins[entries]] = 1.0  # padding entries reach no bin
        arrays = {
            "nominal": put(E, L["nominal"].ravel()[entries]),
            "onehot": onehot,
            # Padding rows point at the constant 1 with zero tables: they add nothing.
            "hist_par": put(Kh, remap(L["hist_par"][hist_rows]), N1, np.int32),
            "hist_x1": put((Kh, E), hist_x[:rows][hist_rows][:, entries]),
            "hist_x2": put((Kh, E), hist_x[rows:][hist_rows][:, entries]),
            "norm_par": put(Kn, remap(L["norm_par"][norm_rows]), N1, np.int32),
            "log_hi": put((Kn, Sc), L["log_hi"][norm_rows][:, slots]),
            "log_lo": put((Kn, Sc), L["log_lo"][norm_rows][:, slots]),
            "entry_slot": put(E, entry_slot, 0, np.int32),
            "factor_par": put((E, caps.factors), remap(factor_par), N1, np.int32),
            "gauss": put(caps.pars, L["gauss"][:n], False, bool),
            "sigma": put(caps.pars, L["sigma"][:n], 1.0),
            "poisson": put(caps.pars, L["poisson"][:n], False, bool),
            "tau": put(caps.pars, L["tau"][:n], 1.0),
        }
        if codes[0] == "code4":
            # A padding row's coefficients are zero: its factor is 1 at any alpha.
            # The one-at-a-time layout's [Kn, 6, S] as this loop's [Kn, S, 6] (powers last).
            arrays["norm_coef"] = put((Kn, Sc, 6), L["norm_coef"][norm_rows][:, :, slots].transpose(0, 2, 1))
        return cls(arrays=jax.device_put(arrays), n=n, caps=caps, codes=codes)


def _yields(theta, C, codes):
    """Expected main data ``[N, B]`` for parameters ``theta`` ``[N, n]``."""
    import jax.numpy as jnp

    normsys_code, histosys_code = codes
    ext = jnp.concatenate([theta, jnp.ones(theta.shape[:-1] + (1,), theta.dtype)], axis=-1)
    c1, c2 = histosys_coefficients(jnp.take(ext, C["hist_par"], axis=-1), histosys_code)
    delta = c1 @ C["hist_x1"] + c2 @ C["hist_x2"]
    alpha = jnp.take(ext, C["norm_par"], axis=-1)
    if normsys_code == "code4":
        norm = _code4()(alpha.T, C["log_hi"], C["log_lo"], C["norm_coef"]).T
    else:
        norm = normsys_factors(alpha, C, normsys_code)
    per_entry = (C["nominal"] + delta) * jnp.take(norm, C["entry_slot"], axis=-1)
    factors = jnp.take(ext, C["factor_par"], axis=-1)
    for k in range(factors.shape[-1]):
        per_entry = per_entry * factors[..., k]
    return per_entry @ C["onehot"]


# --- code4 normsys with the batch axis last and a hand-written gradient -------------------------


def _code4_parts(at, coef):
    """Factors ``1 + sum_k c_k alpha^k`` inside ``|alpha| < 1`` (1 outside) and their derivatives.

    ``at`` is ``[Kn, N]``; the results are ``[Kn, S, N]``. Horner's scheme, the same polynomial
    as pyhf's code4 (see :func:`~pyhf_dist.runtime.fast.likelihood.code4_coefficients`).
    """
    import jax.numpy as jnp

    inside = ((at > -1) & (at < 1))[:, None, :]
    x = jnp.clip(at, -1.0, 1.0)[:, None, :]
    poly = coef[:, :, 5:6] * x
    slope = 6.0 * coef[:, :, 5:6]
    for k in (4, 3, 2, 1, 0):
        poly = (poly + coef[:, :, k : k + 1]) * x
        slope = slope * x + (k + 1.0) * coef[:, :, k : k + 1]
    return jnp.where(inside, 1.0 + poly, 1.0), jnp.where(inside, slope, 0.0)


def _code4_forward(at, log_hi, log_lo, coef):
    import jax.numpy as jnp

    # Outside |alpha| < 1 the factors are exponentials: their product is one exponential.
    outer = log_hi.T @ jnp.where(at >= 1, at, 0.0) + log_lo.T @ jnp.where(at <= -1, -at, 0.0)
    factors, _ = _code4_parts(at, coef)
    return jnp.exp(outer) * tree_product(factors, axis=0)


def _code4_fwd(at, log_hi, log_lo, coef):
    norm = _code4_forward(at, log_hi, log_lo, coef)
    return norm, (at, norm, log_hi, log_lo, coef)


def _code4_bwd(residuals, cotangent):
    import jax.numpy as jnp

    at, norm, log_hi, log_lo, coef = residuals
    weight = cotangent * norm
    factors, slopes = _code4_parts(at, coef)
    # d(product)/d(factor_r) = product / factor_r. A factor of exactly zero (a code4 polynomial
    # reaching zero: extreme hi/lo ratios) gets a zero gradient instead of a NaN; the value is
    # exact either way, and the minimizer only follows the gradient.
    ratio = slopes / jnp.where(factors != 0, factors, 1.0)
    inner = jnp.sum(ratio * weight[None], axis=1)
    outer = jnp.where(at >= 1, log_hi @ weight, 0.0) - jnp.where(at <= -1, log_lo @ weight, 0.0)
    return inner + outer, jnp.zeros_like(log_hi), jnp.zeros_like(log_lo), jnp.zeros_like(coef)


@functools.lru_cache(maxsize=None)
def _code4():
    import jax

    function = jax.custom_vjp(_code4_forward)
    function.defvjp(_code4_fwd, _code4_bwd)
    return function


def _twice_nll(theta, main, aux, C, codes):
    """``-2 log L`` per row, up to a constant of each row's data (as the one-at-a-time likelihood).

    Outside pyhf's domain — a bin with data whose expected yield is not positive, where pyhf's
    value is NaN or infinite — the value is ``+inf``: the engine's line search then steps back,
    as pyhf's minimizer does, instead of following the floored objective of the one-at-a-time
    likelihood there. (A toy with an empty bin otherwise leads it, through that bin's yield, to
    parameters at their bounds and yields of thousands below zero in the other bins.)
    """
    import jax.numpy as jnp

    yields = _yields(theta, C, codes)
    lam = expected_for_poisson(yields, main)
    gauss = -0.5 * jnp.square((aux - theta) / C["sigma"])
    rate = jnp.where(C["poisson"], theta * C["tau"], 1.0)
    pois = poisson_terms(jnp.where(C["poisson"], aux, 1.0), rate)
    value = -2.0 * (
        jnp.sum(poisson_terms(main, lam), axis=-1)
        + jnp.sum(jnp.where(C["gauss"], gauss, 0.0), axis=-1)
        + jnp.sum(jnp.where(C["poisson"], pois, 0.0), axis=-1)
    )
    outside = jnp.any((main > 0) & (yields < YIELD_FLOOR), axis=-1)
    return jnp.where(outside, jnp.inf, value)


def fisher_information(theta, C, codes):
    """Fisher information of ``-2 log L`` at one parameter vector ``theta`` ``[n]``: ``[n, n]``."""
    import jax
    import jax.numpy as jnp

    lam = jnp.maximum(_yields(theta[None], C, codes)[0], YIELD_FLOOR)
    jac = jax.jacrev(lambda t: _yields(t[None], C, codes)[0])(theta)
    constraint = jnp.where(C["gauss"], 1.0 / jnp.square(C["sigma"]), 0.0) + jnp.where(
        C["poisson"], C["tau"] / jnp.maximum(theta, YIELD_FLOOR), 0.0
    )
    return 2.0 * (jac.T @ (jac / lam[:, None]) + jnp.diag(constraint))


@functools.lru_cache(maxsize=None)
def kernels(codes: tuple) -> dict:
    """The jitted batch functions for interpolation ``codes`` (compiled per array sizes).

    Returns:
        ``{"value_and_grad": (theta, main, aux, C) -> (values [N], gradients [N, n]) (not jitted
        itself: it is traced into the optimizer's compiled loop), "value_and_grad_per_row": the
        same where every array of ``C`` has a leading axis of ``N`` rows (row ``i`` of ``theta``
        with model ``i``: patches of other structures in one batch),
        "twice_nll": (theta, main, aux, C) -> [N], "yields": (theta, C) -> [N, B],
        "fisher": (theta [n], C) -> [n, n]}``.
    """
    import jax

    configure_jax()
    codes = tuple(codes)

    def value_and_grad(theta, main, aux, C):
        def total(t):
            values = _twice_nll(t, main, aux, C, codes)
            return values.sum(), values

        # Rows are independent: the gradient of the sum is each row's gradient.
        (_, values), gradients = jax.value_and_grad(total, has_aux=True)(theta)
        return values, gradients

    def value_and_grad_per_row(theta, main, aux, C):
        def one(t, m, a, c):
            return _twice_nll(t[None], m[None], a[None], c, codes)[0]

        def total(t):
            values = jax.vmap(one)(t, main, aux, C)
            return values.sum(), values

        (_, values), gradients = jax.value_and_grad(total, has_aux=True)(theta)
        return values, gradients

    return {
        "value_and_grad": value_and_grad,
        "value_and_grad_per_row": value_and_grad_per_row,
        "twice_nll": jax.jit(lambda theta, main, aux, C: _twice_nll(theta, main, aux, C, codes)),
        "yields": jax.jit(lambda theta, C: _yields(theta, C, codes)),
        "fisher": jax.jit(lambda theta, C: fisher_information(theta, C, codes)),
    }
