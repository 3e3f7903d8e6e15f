"""The HistFactory likelihood in jax, with every patch-specific number an argument.

One compiled function per (interpolation codes, array shapes) serves every patch padded to the
same :class:`~pyhf_dist.fast.layout.Caps`: a new patch costs a host-to-device copy of its arrays,
not a trace and an XLA compilation as a new ``pyhf.Model`` on the jax backend does.

The arithmetic is pyhf 0.7's (``pyhf.interpolators``, ``pyhf.pdf._MainModel``,
``pyhf.constraints``): expected yields ``(nominal + sum of histosys deltas) * product of factors``
summed over samples; Poisson terms for the main data; Normal terms (width ``sigma``) and Poisson
terms (rate ``theta * tau``) for the auxiliary data. Two deliberate differences, both outside
pyhf's domain: exponentials are written as ``exp(alpha * log(base))`` so that the gradient at
``alpha = 0`` is the one-sided derivative rather than ``abs``'s zero, and expected yields are
floored at :data:`YIELD_FLOOR` so that a trial step of the optimizer into negative yields gets a
large finite penalty instead of a NaN.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["YIELD_FLOOR", "Functions", "functions", "device_layout", "code4_coefficients"]

#: Expected yields below this are treated as this (only reachable outside the physical region).
YIELD_FLOOR = 1e-10


def code4_coefficients(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """pyhf's code4 polynomial coefficients (``alpha0 = 1``) for factors ``hi``/``lo``: shape ``[..., 6]``."""
    a_inverse = np.array(
        [
            [15.0 / 16, -15.0 / 16, -7.0 / 16, -7.0 / 16, 1.0 / 16, -1.0 / 16],
            [3.0 / 2, 3.0 / 2, -9.0 / 16, 9.0 / 16, 1.0 / 16, 1.0 / 16],
            [-5.0 / 8, 5.0 / 8, 5.0 / 8, 5.0 / 8, -1.0 / 8, 1.0 / 8],
            [3.0 / -2, 3.0 / -2, -7.0 / -8, 7.0 / -8, -1.0 / 8, -1.0 / 8],
            [3.0 / 16, -3.0 / 16, -3.0 / 16, -3.0 / 16, 1.0 / 16, -1.0 / 16],
            [1.0 / 2, 1.0 / 2, -5.0 / 16, 5.0 / 16, 1.0 / 16, 1.0 / 16],
        ]
    )
    log_hi, log_lo = np.log(hi), np.log(lo)
    b = np.stack([hi - 1.0, lo - 1.0, log_hi * hi, -log_lo * lo, log_hi**2 * hi, log_lo**2 * lo])
    return np.moveaxis(np.tensordot(a_inverse, b, axes=1), 0, -1)


def device_layout(padded: dict, normsys_code: str):
    """Move one patch's padded arrays to the device once (later calls then copy nothing)."""
    import jax

    arrays = dict(padded)
    arrays["log_hi"] = np.log(arrays["norm_hi"])
    arrays["log_lo"] = np.log(arrays["norm_lo"])
    if normsys_code == "code4":
        arrays["norm_coef"] = code4_coefficients(arrays["norm_hi"], arrays["norm_lo"])
    del arrays["norm_hi"], arrays["norm_lo"]
    return jax.device_put(arrays)


class Functions:
    """The jitted functions of one pair of interpolation codes.

    Attributes:
        value_and_grad: ``(theta, main, aux, L) -> (twice_nll, gradient)``: ``-2 log L`` up to
            a constant of the data (so differences on one dataset are pyhf's), with the floor.
        twice_nll: The same value alone.
        expected: ``(theta, L) -> (main expected data, auxdata expected per parameter)``.
        fisher_diagonal: ``(theta, L) -> diagonal of the Fisher information``.
    """

    def __init__(self, normsys_code: str, histosys_code: str):
        import jax
        import jax.numpy as jnp
        from jax.scipy.special import xlogy


        def histosys(alpha, up, dn):
            a = alpha[..., None]
            if histosys_code == "code0":
                return jnp.where(a > 0, a * up, a * dn)
            if histosys_code == "code2":
                # pyhf's code2 on (lo, nom, hi) = (nom - dn, nom, nom + up), branches as in pyhf.
                quad = 0.5 * (up - dn)
                lin = 0.5 * (up + dn)
                return jnp.where(
                    a >= -1,
                    jnp.where(a > 1, (a - 1.0) * (lin + 2 * quad), a * a * quad + a * lin),
                    a * (lin - 2 * quad),
                )
            # code4p
            sym = 0.5 * (up + dn)
            asym = 0.0625 * (up - dn)
            a2 = a * a
            inner = a2 * (a2 * (a2 * 3.0 - 10.0) + 15.0) * asym + a * sym
            return jnp.where(a < -1, a * dn, jnp.where(a > 1, a * up, inner))

        def normsys(alpha, L):
            up = jnp.exp(alpha * L["log_hi"])
            down = jnp.exp(-alpha * L["log_lo"])
            if normsys_code == "code1":
                return jnp.where(alpha > 0, up, down)
            coef = L["norm_coef"]
            inner_alpha = jnp.clip(alpha, -1.0, 1.0)  # keeps the unused branch finite
            powers = jnp.stack([inner_alpha**k for k in range(1, 7)], axis=-1)
            inner = 1.0 + jnp.sum(coef * powers, axis=-1)
            return jnp.where(alpha >= 1, up, jnp.where(alpha > -1, inner, down))

        def yields(theta, L):
            extended = jnp.concatenate([theta, jnp.ones(1, theta.dtype)])
            delta = histosys(extended[L["hist_par"]], L["hist_up"], L["hist_dn"]).sum(axis=1)
            norm = normsys(extended[L["norm_par"]], L).prod(axis=1)
            direct = extended[L["factor_par"]].prod(axis=-1)
            per_slot = (L["nominal"] + delta) * norm[:, None] * direct
            n_bins = L["bin_template"].shape[0]
            flat = jnp.zeros(n_bins + 1, theta.dtype).at[L["bin_index"].ravel()].add(per_slot.ravel())
            return flat[:n_bins]

        def poisson(n, lam):
            # log Poisson(n | lam) minus its value at lam = n: the same up to a constant of the
            # data, but terms near zero at the minimum keep -2 log L (and q = a difference of two
            # such values) precise even where the yields or Poisson constraints are large.
            return xlogy(n, lam / jnp.where(n > 0, n, 1.0)) - (lam - n)

        def kernel(theta, main, aux, L, floor):
            lam = yields(theta, L)
            if floor:
                lam = jnp.maximum(lam, YIELD_FLOOR)
            gauss = -0.5 * jnp.square((aux - theta) / L["sigma"])
            # Safe values off the mask: where() would otherwise pass NaN gradients through.
            rate = jnp.where(L["poisson"], theta * L["tau"], 1.0)
            pois = poisson(jnp.where(L["poisson"], aux, 1.0), rate)
            return (
                jnp.sum(poisson(main, lam))
                + jnp.sum(jnp.where(L["gauss"], gauss, 0.0))
                + jnp.sum(jnp.where(L["poisson"], pois, 0.0))
            )

        def twice_nll(theta, main, aux, L):
            return -2.0 * kernel(theta, main, aux, L, True)

        def expected(theta, L):
            aux = jnp.where(L["gauss"], theta, jnp.where(L["poisson"], theta * L["tau"], 0.0))
            return yields(theta, L), aux

        def fisher_diagonal(theta, L):
            lam = jnp.maximum(yields(theta, L), YIELD_FLOOR)
            jac = jax.jacrev(yields)(theta, L)
            main = jnp.sum(jnp.square(jac) / lam[:, None], axis=0)
            constraint = jnp.where(L["gauss"], 1.0 / jnp.square(L["sigma"]), 0.0) + jnp.where(
                L["poisson"], L["tau"] / jnp.maximum(theta, YIELD_FLOOR), 0.0
            )
            return main + constraint

        self.value_and_grad = jax.jit(jax.value_and_grad(twice_nll))
        self.twice_nll = jax.jit(twice_nll)
        self._kernel = jax.jit(functools.partial(kernel, floor=False))
        self.expected = jax.jit(expected)
        self.fisher_diagonal = jax.jit(fisher_diagonal)

    def logpdf(self, theta, main, aux, L) -> float:
        """``log L`` as pyhf computes it (no yield floor), for checks against ``pyhf.Model.logpdf``.

        The data-only terms left out of the compiled kernel are added here in float64 with
        scipy, as pyhf's numpy backend computes them.
        """
        from scipy.special import gammaln, xlogy

        main, aux = np.asarray(main), np.asarray(aux)
        gauss, pois = np.asarray(L["gauss"]), np.asarray(L["poisson"])
        sigma = np.asarray(L["sigma"])
        constant = np.sum(xlogy(main, main) - main - gammaln(main + 1.0))
        constant += np.sum(np.where(pois, xlogy(aux, aux) - aux - gammaln(aux + 1.0), 0.0))
        constant += np.sum(np.where(gauss, -np.log(sigma) - 0.5 * math.log(2.0 * math.pi), 0.0))
        return float(self._kernel(theta, main, aux, L)) + float(constant)


@functools.lru_cache(maxsize=None)
def functions(normsys_code: str, histosys_code: str) -> Functions:
    """The (process-wide, lazily compiled) jitted functions for these interpolation codes."""
    return Functions(normsys_code, histosys_code)
