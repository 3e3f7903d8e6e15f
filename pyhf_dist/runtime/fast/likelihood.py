"""The HistFactory likelihood in jax, with every patch-specific number an argument.

One compiled function per (interpolation codes, array shapes) serves every patch padded to the
same :class:`~pyhf_dist.runtime.fast.layout.Caps` (bins past a patch's own, marked by ``bin_used``, add
nothing): a new patch costs a host-to-device copy of its arrays, not a trace and an XLA
compilation as a new ``pyhf.Model`` on the jax backend does.

The arithmetic is pyhf 0.7's (``pyhf.interpolators``, ``pyhf.pdf._MainModel``,
``pyhf.constraints``): expected yields ``(nominal + sum of histosys deltas) * product of factors``
summed over samples; Poisson terms for the main data; Normal terms (width ``sigma``) and Poisson
terms (rate ``theta * tau``) for the auxiliary data. Two deliberate differences, both outside
pyhf's domain: exponentials are written as ``exp(alpha * log(base))`` so that the gradient at
``alpha = 0`` is the one-sided derivative rather than ``abs``'s zero, and expected yields of
bins with data are floored at :data:`YIELD_FLOOR` so that a trial step of the optimizer into
negative yields gets a large finite penalty instead of a NaN. (In a bin without events pyhf's
Poisson term is ``-lam``, finite for any ``lam``: its fits follow it to negative yields where the
nuisance parameters allow, and so do these; see :func:`expected_for_poisson`.)
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading

import numpy as np

from pyhf_dist.runtime.threads import start_xla_single_threaded

__all__ = [
    "CACHE_ENV",
    "YIELD_FLOOR",
    "Functions",
    "code4_coefficients",
    "configure_jax",
    "expected_for_poisson",
    "persistent_cache",
    "device_layout",
    "functions",
    "histosys_coefficients",
    "normsys_factors",
    "poisson_terms",
    "tree_product",
]

log = logging.getLogger(__name__)

#: Directory of the persistent XLA compilation cache (shared by all workers of a machine);
#: ``off`` disables it. Default: ``jax/`` in the pyhf-dist cache (:mod:`pyhf_dist.cache`).
CACHE_ENV = "PYHF_DIST_JAX_CACHE"

_CONFIGURED = False
_CONFIGURE_LOCK = threading.Lock()
#: The persistent compilation cache in use (``None``: none).
_CACHE_DIRECTORY: str | None = None

#: Expected yields of bins with data below this are treated as this (only reachable outside the
#: physical region).
YIELD_FLOOR = 1e-10


def expected_for_poisson(yields, data):
    """The expected yields the Poisson terms of ``data`` use: floored where ``data > 0``.

    Where ``data`` is zero, pyhf's term ``-lam`` is finite for negative yields too, and pyhf's
    minimizer goes there when the nuisance parameters can empty the bin (a toy with an empty bin
    often can): a floor would give a different minimum from pyhf's.
    """
    import jax.numpy as jnp

    return jnp.where(data > 0, jnp.maximum(yields, YIELD_FLOOR), yields)


def configure_jax() -> None:
    """Double precision and the persistent compilation cache; once per process, before compiling."""
    global _CONFIGURED, _CACHE_DIRECTORY
    with _CONFIGURE_LOCK:
        if _CONFIGURED:
            return
        import jax

        jax.config.update("jax_enable_x64", True)
        # A fit calls the compiled likelihood a few hundred times, one small computation each,
        # waiting for every result: run on the calling thread, each call skips a hand-over to
        # XLA's dispatch thread and back, which after the minimizer's own work in between costs
        # more than the computation (1Lbb: 15% less time per patch). Read when XLA's CPU client
        # starts, so it takes effect in a process that has not used jax yet (a worker).
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        start_xla_single_threaded()  # after the settings above: the client reads them as it starts
        directory = os.environ.get(CACHE_ENV)
        if not directory:
            from pyhf_dist import cache

            folder = cache.directory("jax")  # None: off, or unusable (said once, for every worker)
            directory = str(folder) if folder is not None else "off"
        if directory.lower() != "off":
            from pyhf_dist import cache

            # A cache that cannot take a file (full disk, quota, read-only) is not used: compiling
            # in memory, said once, rather than failing or warning at every compilation.
            unusable = cache.usable(directory)
            if unusable:
                log.warning("compile cache %s unusable (%s): compiling in memory instead", directory, unusable)
                directory = "off"
        if directory.lower() != "off":
            try:
                cache.guard_compile_cache(directory)
                jax.config.update("jax_compilation_cache_dir", directory)
                # The likelihood compiles in about a second, under jax's default threshold for
                # caching, but it is what every cold worker waits for: cache every compilation.
                jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
                _CACHE_DIRECTORY = directory
            except OSError as error:
                log.warning("jax compilation cache disabled: cannot use %s (%s)", directory, error)
        _CONFIGURED = True


def persistent_cache() -> str | None:
    """The directory of the persistent compilation cache in use, or ``None`` (after :func:`configure_jax`)."""
    return _CACHE_DIRECTORY


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


def device_layout(padded: dict, codes: tuple):
    """Move one patch's padded arrays to the device once (later calls then copy nothing).

    Precomputes the fixed tables of the interpolations (the ``X1``, ``X2`` of
    ``sum c1(alpha) X1 + c2(alpha) X2``) and pyhf's code4 coefficients.
    """
    import jax

    configure_jax()
    normsys_code, histosys_code = codes
    arrays = dict(padded)
    up, dn = arrays.pop("hist_up"), arrays.pop("hist_dn")
    rows = up.shape[0]
    if histosys_code == "code0":
        x1, x2 = up, dn
    elif histosys_code == "code2":
        x1, x2 = 0.5 * (up - dn), 0.5 * (up + dn)
    else:
        x1, x2 = 0.5 * (up + dn), 0.0625 * (up - dn)
    # X1 above X2 ([2 Kh, S W]): one matrix product for both, and one for its gradient.
    arrays["hist_x"] = np.concatenate([x1.reshape(rows, -1), x2.reshape(rows, -1)])
    hi, lo = arrays.pop("norm_hi"), arrays.pop("norm_lo")
    arrays["log_hi"], arrays["log_lo"] = np.log(hi), np.log(lo)
    if normsys_code == "code4":
        # [Kn, 6, S]: per parameter, the six coefficient rows over the slots (see normsys_factors).
        arrays["norm_coef"] = np.ascontiguousarray(np.moveaxis(code4_coefficients(hi, lo), -1, 1))
    return jax.device_put(arrays)


# The arithmetic shared by the likelihood of one dataset (:class:`Functions`) and of a batch of
# datasets (:mod:`pyhf_dist.runtime.fast.batched`). Leading axes of ``a`` and ``theta`` are batch axes.


def histosys_coefficients(a, code: str):
    """``(c1, c2)`` of pyhf's histosys interpolation ``c1(alpha) X1 + c2(alpha) X2`` (see :func:`device_layout`).

    Each interpolation is written as a sum over parameters of per-parameter scalar coefficients
    times fixed tables: two matrix products instead of branches over every (parameter, sample,
    bin), which makes the gradient cheap. The branches and their boundaries are pyhf's.
    """
    import jax.numpy as jnp

    if code == "code0":
        return jnp.where(a > 0, a, 0.0), jnp.where(a > 0, 0.0, a)
    if code == "code2":
        quad = jnp.where(a > 1, 2.0 * (a - 1.0), jnp.where(a >= -1, a * a, -2.0 * a))
        return quad, jnp.where(a > 1, a - 1.0, a)
    a2 = a * a
    inner = a2 * (a2 * (a2 * 3.0 - 10.0) + 15.0)
    return a, jnp.where(a > 1, 8.0 * a, jnp.where(a < -1, -8.0 * a, inner))


def normsys_factors(a, L, code: str):
    """Product over normsys parameters ``a`` (``[..., Kn]``) of pyhf's factors, per slot: ``[..., S]``.

    ``L`` holds the tables ``log_hi``, ``log_lo`` (``[Kn, S]``) and, for code4, ``norm_coef``
    (``[Kn, 6, S]``).
    """
    import jax.numpy as jnp

    # Outside |alpha| < 1 the factors are exponentials: a product of them is the exponential of
    # a sum, linear in the tables.
    if code == "code1":
        return jnp.exp(jnp.where(a > 0, a, 0.0) @ L["log_hi"] + jnp.where(a > 0, 0.0, -a) @ L["log_lo"])
    outer = jnp.where(a >= 1, a, 0.0) @ L["log_hi"] + jnp.where(a <= -1, -a, 0.0) @ L["log_lo"]
    # Inside, code4's polynomial can in principle reach zero or below: multiply those factors
    # directly, as pyhf does.
    inside = (a > -1) & (a < 1)
    clipped = jnp.clip(a, -1.0, 1.0)  # keeps the unused branch finite
    powers = jnp.stack([clipped**k for k in range(1, 7)], axis=-1)
    # The coefficients with the slots last: XLA's products over the six powers then run along
    # contiguous rows, which makes the likelihood's value and gradient ~20% cheaper (1Lbb) than
    # with the powers last.
    poly = jnp.einsum("rks,...rk->...rs", L["norm_coef"], powers)
    return jnp.exp(outer) * tree_product(jnp.where(inside[..., None], 1.0 + poly, 1.0), axis=-2)


def tree_product(x, axis: int = 0):
    """The product along ``axis`` as a tree of elementwise products.

    Its gradient is a few elementwise products too (``jnp.prod``'s is a costly cumulative product).
    """
    import jax.numpy as jnp

    x = jnp.moveaxis(x, axis, 0)
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.ones((1,) + x.shape[1:], x.dtype)])
        x = x[0::2] * x[1::2]
    return x[0] if x.shape[0] else jnp.ones(x.shape[1:], x.dtype)


def poisson_terms(n, lam):
    """log Poisson(n | lam) minus its value at lam = n, elementwise.

    Written n (log r - (r - 1)) with r = lam / n: the same up to a constant of the data, but the
    terms vanish at the minimum to full relative precision even for Poisson constraints with
    factors of 1e11, where lam - n would lose every digit of the parameter's deviation.
    """
    import jax.numpy as jnp

    positive = n > 0
    # The branch not taken is kept finite, gradient included: where() passes a NaN of it on
    # (0 * inf) to the gradient, as in a bin padded to a shared layout (n = lam = 0).
    excess = jnp.where(positive, lam / jnp.where(positive, n, 1.0) - 1.0, 0.0)
    return jnp.where(positive, n * (jnp.log1p(excess) - excess), -lam)


class Functions:
    """The jitted functions of one pair of interpolation codes.

    Attributes:
        value_and_grad: ``(theta, main, aux, L) -> [twice_nll, *gradient]`` in one array (one
            transfer to the host per evaluation): ``-2 log L`` up to a constant of the data (so
            differences on one dataset are pyhf's), with the floor.
        twice_nll: The same value alone.
        expected: ``(theta, L) -> (main expected data, auxdata expected per parameter)``.
        fisher_diagonal: ``(theta, L) -> diagonal of the Fisher information``.
        codes: ``(normsys code, histosys code)``.
    """

    def __init__(self, normsys_code: str, histosys_code: str):
        import jax
        import jax.numpy as jnp

        self.codes = (normsys_code, histosys_code)

        def yields(theta, L):
            extended = jnp.concatenate([theta, jnp.ones(1, theta.dtype)])
            shape = L["nominal"].shape
            c1, c2 = histosys_coefficients(extended[L["hist_par"]], histosys_code)
            delta = (jnp.concatenate([c1, c2]) @ L["hist_x"]).reshape(shape)
            norm = normsys_factors(extended[L["norm_par"]], L, normsys_code)
            factors = extended[L["factor_par"]]
            per_slot = (L["nominal"] + delta) * norm[:, None]
            for k in range(factors.shape[-1]):
                per_slot = per_slot * factors[..., k]
            n_bins = L["bin_template"].shape[0]
            flat = jnp.zeros(n_bins + 1, theta.dtype).at[L["bin_index"].ravel()].add(per_slot.ravel())
            return flat[:n_bins]

        def kernel(theta, main, aux, L):
            lam = expected_for_poisson(yields(theta, L), main)
            gauss = -0.5 * jnp.square((aux - theta) / L["sigma"])
            # Safe values off the mask: where() would otherwise pass NaN gradients through.
            rate = jnp.where(L["poisson"], theta * L["tau"], 1.0)
            pois = poisson_terms(jnp.where(L["poisson"], aux, 1.0), rate)
            main_terms = poisson_terms(main, lam)
            if "bin_used" in L:  # resolved when tracing: layouts padded in bins mask the padding
                main_terms = jnp.where(L["bin_used"], main_terms, 0.0)
            return (
                jnp.sum(main_terms)
                + jnp.sum(jnp.where(L["gauss"], gauss, 0.0))
                + jnp.sum(jnp.where(L["poisson"], pois, 0.0))
            )

        def twice_nll(theta, main, aux, L):
            return -2.0 * kernel(theta, main, aux, L)

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

        def value_and_grad(theta, main, aux, L):
            value, gradient = jax.value_and_grad(twice_nll)(theta, main, aux, L)
            return jnp.concatenate([value[None], gradient])

        self.value_and_grad = jax.jit(value_and_grad)
        self.twice_nll = jax.jit(twice_nll)
        self.expected = jax.jit(expected)
        self.fisher_diagonal = jax.jit(fisher_diagonal)

    def logpdf(self, theta, main, aux, L) -> float:
        """``log L`` as pyhf computes it, for checks against ``pyhf.Model.logpdf``.

        The compiled objective plus the data-only terms it leaves out, added here in float64
        with scipy as pyhf's numpy backend computes them. (Yields below :data:`YIELD_FLOOR`,
        where pyhf's value is NaN or astronomically negative, give other values.)
        """
        from scipy.special import gammaln, xlogy

        main, aux = np.asarray(main), np.asarray(aux)
        gauss, pois = np.asarray(L["gauss"]), np.asarray(L["poisson"])
        sigma = np.asarray(L["sigma"])
        used = np.asarray(L["bin_used"]) if "bin_used" in L else np.ones(main.shape, dtype=bool)
        constant = np.sum(np.where(used, xlogy(main, main) - main - gammaln(main + 1.0), 0.0))
        constant += np.sum(np.where(pois, xlogy(aux, aux) - aux - gammaln(aux + 1.0), 0.0))
        constant += np.sum(np.where(gauss, -np.log(sigma) - 0.5 * math.log(2.0 * math.pi), 0.0))
        # Indexed on the host: indexing the device array would compile two operations.
        value = float(np.asarray(self.value_and_grad(theta, main, aux, L))[0])
        return -0.5 * value + float(constant)


@functools.lru_cache(maxsize=None)
def functions(normsys_code: str, histosys_code: str) -> Functions:
    """The (process-wide, lazily compiled) jitted functions for these interpolation codes."""
    configure_jax()
    return Functions(normsys_code, histosys_code)
