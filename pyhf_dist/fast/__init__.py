"""The compiled fast path: asymptotic hypotests of many patches on one compiled likelihood.

Plain pyhf builds a model per patch and, on the jax backend, traces and compiles it anew. Here a
patch becomes arrays (:mod:`~pyhf_dist.fast.layout`) padded to a layout shared by the pallet, fed
to a likelihood compiled once per process (:mod:`~pyhf_dist.fast.likelihood`, kept across runs in
a persistent XLA compilation cache) and fitted with preconditioned L-BFGS-B
(:mod:`~pyhf_dist.fast.fit`).

It never returns a number pyhf would not: anything it does not reproduce raises
:class:`FastPathUnsupported` (the worker then runs plain pyhf for that patch), and the first patch
of every new structure is checked against ``pyhf.Model.logpdf``, its parameters and auxdata;
a structure that fails the check is never fitted here.

Example:
    >>> fast = FastHypotest(workspace_spec)  # doctest: +SKIP
    >>> fast.hypotest(patch_operations, poi_test=1.0, test_stat="qtilde")  # doctest: +SKIP
    {'CLs_obs': 0.52..., 'CLs_exp': [...]}
"""

from __future__ import annotations

import contextlib
import logging
import threading

import numpy as np

from pyhf_dist import cache
from pyhf_dist.fast.errors import FastPathUnsupported
from pyhf_dist.fast.likelihood import CACHE_ENV, configure_jax

__all__ = ["FastHypotest", "FastPathUnsupported", "CACHE_ENV", "configure_jax", "for_state", "preload", "warm_up"]

log = logging.getLogger(__name__)

# Tolerance of the structure check: pyhf and this module sum the same terms in other orders.
_LOGPDF_RTOL = 1e-9


class FastHypotest:
    """Asymptotic hypotests of patches of one background workspace on the compiled likelihood.

    Args:
        workspace_spec: The background workspace (dict), as given to ``pyhf.Workspace``.
        modifier_settings: pyhf's ``modifier_settings``; ``None`` means code4/code4p.
        verify: Check the first patch of each structure against plain pyhf (leave on; tests
            switch it off to exercise the arithmetic alone).
        key: A digest of the workspace and settings (the worker context's); when given, the
            outcome of each structure's check is remembered on disk (:mod:`pyhf_dist.cache`)
            for later processes with the same workspace, settings and package versions.

    Raises:
        FastPathUnsupported: The workspace itself is outside what the fast path covers.
    """

    def __init__(
        self, workspace_spec: dict, modifier_settings: dict | None = None, *, verify: bool = True, key: str | None = None
    ):
        from pyhf_dist.fast import layout

        try:
            self._measurement = workspace_spec["measurements"][0]
            self._base = {
                "channels": workspace_spec["channels"],
                "parameters": self._measurement["config"].get("parameters", []),
            }
            self._observations = {o["name"]: o["data"] for o in workspace_spec["observations"]}
        except (KeyError, IndexError, TypeError) as error:
            raise FastPathUnsupported(f"not a workspace the fast path reads: {error!r}") from None
        self.modifier_settings = modifier_settings or {
            "normsys": {"interpcode": "code4"},
            "histosys": {"interpcode": "code4p"},
        }
        self._codes = layout.interpolation_codes(self.modifier_settings)
        self._samples = layout.SampleCache(self._base)
        self._verify = verify
        self._key = key
        self._caps = None
        self._verified: dict = {}
        self._lock = threading.Lock()

    def arrays(self, patch_operations: list | None, *, require_poi: bool = True):
        """The patched spec and its :class:`~pyhf_dist.fast.layout.PatchArrays` (unpadded)."""
        from pyhf_dist.fast import layout

        spec = layout.apply_patch(self._base, patch_operations or [])
        arrays = layout.build_arrays(
            spec,
            self._measurement,
            self._observations,
            self.modifier_settings,
            require_poi=require_poi,
            samples=self._samples,
        )
        return spec, arrays

    def hypotest(self, patch_operations: list | None, poi_test: float = 1.0, test_stat: str = "qtilde") -> dict:
        """``pyhf.infer.hypotest(poi_test, ..., test_stat=..., return_expected_set=True)`` for one patch.

        Args:
            patch_operations: jsonpatch operations applied to ``{"channels", "parameters"}``
                (as ``Workspace.model(patches=[operations])``); ``None`` for the background.
            poi_test: The POI value tested.
            test_stat: ``"qtilde"``, ``"q"`` or ``"q0"``.

        Returns:
            ``{"CLs_obs": float, "CLs_exp": [5 floats]}`` (CLs+b for ``q0``, as pyhf returns).

        Raises:
            FastPathUnsupported: The patch has something not covered, a fit did not converge, or
                its structure failed the check against pyhf.
        """
        from pyhf_dist.fast import fit

        try:
            with self._lock:
                result = fit.hypotest(self._problem(patch_operations), poi_test, test_stat)
        except FastPathUnsupported as error:
            log.info("fast path declined a patch (plain pyhf fits it): %s", error)
            raise
        return {"CLs_obs": result["CLs_obs"], "CLs_exp": result["CLs_exp"]}

    def problem(self, patch_operations: list | None):
        """The patch's :class:`~pyhf_dist.fast.fit.FitProblem` (its structure checked against pyhf once).

        Raises:
            FastPathUnsupported: As :meth:`hypotest`, for the patch itself.
        """
        with self._lock:
            return self._problem(patch_operations)

    def warm_up(self) -> None:
        """Compile (or load from the persistent cache) the likelihood for this workspace's layout.

        Uses the background-only model with room for a signal sample in every channel, so the
        first patch usually finds its layout compiled. Cheap to call more than once.
        """
        from pyhf_dist.fast import layout, likelihood

        configure_jax()
        with self._lock:
            if self._caps is not None:
                return
            _, arrays = self.arrays(None, require_poi=False)
            sizes = arrays.sizes
            room = layout.Caps(
                bins=sizes.bins,
                slots=sizes.slots + len(self._base["channels"]),
                width=sizes.width,
                histosys=sizes.histosys,
                normsys=sizes.normsys,
                factors=sizes.factors + 1,
                pars=sizes.pars + 1,
            )
            self._caps = layout.Caps.around(room)
            padded = layout.pad(arrays, self._caps)
            params = layout.pad_parameters(arrays, self._caps)
            device = likelihood.device_layout(padded, self._codes)
            functions = likelihood.functions(*self._codes)
            # Workers that start together on a layout not compiled yet take turns: the first
            # compiles into the persistent cache, the others load from it instead of compiling too.
            key = cache.digest(repr((self._caps, self._codes)), cache.versions("jax", "jaxlib"))
            first = likelihood.persistent_cache() is not None and cache.recall("compiled", key) is None
            with cache.exclusive("compile-" + key) if first else contextlib.nullcontext():
                functions.value_and_grad(params["init"], arrays.main_data, params["aux"], device)
                functions.expected(params["init"], device)
                functions.fisher_diagonal(params["init"], device)
                if first:
                    cache.remember("compiled", key, "yes")

    def _problem(self, patch_operations):
        from pyhf_dist.fast import fit, layout, likelihood

        configure_jax()
        spec, arrays = self.arrays(patch_operations)
        sizes = arrays.sizes
        if self._caps is None:
            self._caps = layout.Caps.around(sizes)
        elif not self._caps.covers(sizes):
            if self._caps.bins != sizes.bins:
                raise FastPathUnsupported("patch changes the number of bins")
            self._caps = self._caps.grown(sizes)
        padded = layout.pad(arrays, self._caps)
        params = layout.pad_parameters(arrays, self._caps)
        device = likelihood.device_layout(padded, self._codes)
        functions = likelihood.functions(*self._codes)
        if self._verify:
            signature = (self._caps, self._codes, arrays.modifier_types)
            if signature not in self._verified:
                self._verified[signature] = self._check_structure(signature, spec, arrays, functions, device, params)
            if not self._verified[signature]:
                raise FastPathUnsupported("this structure did not reproduce pyhf's model in the check")
        import jax

        return fit.FitProblem(
            functions=functions,
            layout=device,
            init=params["init"],
            lower=params["lower"],
            upper=params["upper"],
            fixed=params["fixed"],
            main=jax.device_put(arrays.main_data),
            aux=jax.device_put(params["aux"]),
            poi_index=arrays.poi_index,
            n_pars=len(arrays.init),
        )

    def _check_structure(self, signature, spec, arrays, functions, device, params) -> bool:
        """:meth:`_matches_pyhf`, or its remembered outcome for this workspace, settings and versions."""
        if self._key is None:
            return self._matches_pyhf(spec, arrays, functions, device, params)
        caps, codes, types = signature
        # Sorted: a frozenset's order (and repr) changes with each process's string hashing.
        described = repr((caps, codes, sorted(types)))
        key = cache.digest(self._key, described, cache.versions("pyhf", "jax", "jaxlib", "numpy", "scipy"))
        # Workers meeting a structure together: one checks, the others take its outcome.
        with cache.exclusive("structure-" + key):
            remembered = cache.recall("structure", key)
            if remembered in ("same", "different"):
                return remembered == "same"
            same = self._matches_pyhf(spec, arrays, functions, device, params)
            cache.remember("structure", key, "same" if same else "different")
        return same

    def _matches_pyhf(self, spec, arrays, functions, device, params) -> bool:
        """Compare parameters, auxdata and logpdf at the init and random points with ``pyhf.Model``."""
        import pyhf

        previous = pyhf.tensorlib.name
        if previous != "numpy":
            pyhf.set_backend("numpy")
        try:
            model = pyhf.Model(
                spec,
                validate=False,
                poi_name=self._measurement["config"]["poi"],
                modifier_settings=self.modifier_settings,
            )
            config = model.config
            n = len(arrays.init)
            constrained = arrays.gauss | arrays.poisson
            same = (
                config.par_names == arrays.par_names
                and config.poi_index == arrays.poi_index
                and np.array_equal(config.suggested_init(), arrays.init)
                and np.array_equal(np.asarray(config.suggested_bounds(), dtype=float), np.stack([arrays.lower, arrays.upper], 1))
                and list(config.suggested_fixed()) == list(arrays.fixed)
                and np.allclose(config.auxdata, arrays.aux[constrained], rtol=1e-12, atol=0)
            )
            if not same:
                log.warning("fast path: parameters differ from pyhf's for this structure; using plain pyhf")
                return False
            data = np.concatenate([arrays.main_data, config.auxdata])
            rng = np.random.default_rng(7)
            points = [arrays.init]
            for _ in range(3):
                # Nuisance parameters around 0 reach past +-1 to exercise every interpolation branch.
                around_zero = arrays.init + rng.uniform(-1.6, 1.6, n)
                around_one = arrays.init * rng.uniform(0.8, 1.2, n)
                points.append(np.clip(np.where(arrays.init == 0, around_zero, around_one), arrays.lower, arrays.upper))
            for point in points:
                expected = float(model.logpdf(point, data)[0])
                theta = params["init"].copy()
                theta[:n] = point
                ours = functions.logpdf(theta, arrays.main_data, params["aux"], device)
                if not np.isfinite(expected):
                    continue
                if not abs(ours - expected) <= _LOGPDF_RTOL * max(1.0, abs(expected)):
                    log.warning("fast path: logpdf %.12g differs from pyhf's %.12g; using plain pyhf", ours, expected)
                    return False
            return True
        finally:
            if previous != "numpy":
                pyhf.set_backend(previous)


def for_state(state) -> FastHypotest:
    """The :class:`FastHypotest` of a worker's :class:`~pyhf_dist.worker.WorkerState` (made once)."""
    fast = state.cache.get("fast_hypotest")
    if fast is None:
        with state.lock:
            fast = state.cache.get("fast_hypotest")
            if fast is None:
                fast = FastHypotest(state.workspace_spec, state.settings.modifier_settings, key=state.key)
                state.cache["fast_hypotest"] = fast
    return fast


def preload() -> None:
    """Import and configure what the fast path runs on (jax, scipy's minimizer), nothing else."""
    import scipy.optimize  # noqa: F401

    from pyhf_dist.fast import fit, layout  # noqa: F401

    configure_jax()
    import jax

    jax.devices()  # starts the XLA CPU client


def warm_up(state) -> None:
    """Worker start-up hook: compile the likelihood before the first task arrives.

    For scans that will take the fast path (``backend="jax"``, asymptotic hypotests); does nothing
    otherwise, and never raises (a workspace the fast path cannot read is simply fitted by pyhf).
    """
    if not state.settings.fast_path:
        return
    try:
        for_state(state).warm_up()
    except FastPathUnsupported as error:
        log.info("fast path not used for this workspace: %s", error)
