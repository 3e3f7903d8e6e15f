"""The compiled fast path: asymptotic hypotests and upper limits (:mod:`~pyhf_dist.runtime.fast.limits`) of
many patches on one compiled likelihood.

Plain pyhf builds a model per patch and, on the jax backend, traces and compiles it anew. Here a
patch (applied to the whole workspace, as ``pyhf.PatchSet`` applies it) becomes arrays
(:mod:`~pyhf_dist.runtime.fast.layout`) padded to a layout shared by the patches of its shape, fed to a
likelihood compiled once per layout and process (:mod:`~pyhf_dist.runtime.fast.likelihood`, kept across
runs in a persistent XLA compilation cache) and fitted with preconditioned L-BFGS-B
(:mod:`~pyhf_dist.runtime.fast.fit`); fits made one at a time call the same likelihood in C
(:mod:`~pyhf_dist.runtime.fast.native`), checked against the compiled one on every patch.

Its answers are converged fits, certified fit by fit (:mod:`~pyhf_dist.runtime.fast.fit`): the lowest
``-2 log L`` within pyhf's bounds, not the point where pyhf's default minimizer happens to stop;
with ``match_pyhf`` it reproduces pyhf's own numbers instead. What it does not cover raises
:class:`FastPathUnsupported` with a one-line reason (the worker then runs plain pyhf for that
patch and records why), and the first patch of every new structure is checked against pyhf's own
model of the patched workspace (parameters, data, ``logpdf``); a structure that fails the check is
never fitted here.

Example:
    >>> fast = FastHypotest(workspace_spec)  # doctest: +SKIP
    >>> fast.hypotest(patch_operations, poi_test=1.0, test_stat="qtilde")  # doctest: +SKIP
    {'CLs_obs': 0.52..., 'CLs_exp': [...], 'converged': True, 'fits': {...}}
"""

from pyhf_dist.runtime.fast.engine import GROUPS_ENV, FastHypotest, for_state, groups_wanted, preload, warm_up
from pyhf_dist.runtime.fast.errors import FastPathUnsupported
from pyhf_dist.runtime.fast.likelihood import CACHE_ENV, configure_jax

__all__ = [
    "FastHypotest", "FastPathUnsupported", "CACHE_ENV", "GROUPS_ENV", "configure_jax", "for_state", "groups_wanted",
    "preload", "warm_up",
]
