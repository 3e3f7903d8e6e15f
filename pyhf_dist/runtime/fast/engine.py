"""The fast path's engine: :class:`FastHypotest`, one per worker and background workspace.

It turns a patch into a :class:`~pyhf_dist.runtime.fast.problem.FitProblem` on a compiled layout
(:mod:`~pyhf_dist.runtime.fast.layout`, :mod:`~pyhf_dist.runtime.fast.likelihood`), checks the first patch of
every structure against pyhf's own model, and runs the hypotests and upper limits of
:mod:`~pyhf_dist.runtime.fast.fit` and :mod:`~pyhf_dist.runtime.fast.limits` on it. The worker hooks
(:func:`for_state`, :func:`preload`, :func:`warm_up`) make and warm it.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading

import numpy as np

from pyhf_dist import cache
from pyhf_dist.runtime.fast.errors import FastPathUnsupported
from pyhf_dist.runtime.fast.likelihood import configure_jax
from pyhf_dist.runtime.reference import pyhf_model, use_numpy
from pyhf_dist.settings import DEFAULT_MODIFIER_SETTINGS

__all__ = ["FastHypotest", "GROUPS_ENV", "for_state", "groups_wanted", "preload", "warm_up"]

log = logging.getLogger(__name__)

# Tolerance of the structure check: pyhf and this module sum the same terms in other orders.
_LOGPDF_RTOL = 1e-9
#: A patch uses an existing layout of another shape only while that layout's tables are at most
#: this many times the size of its own, or small anyway (the padding is evaluated in every call of
#: every fit; tables of a few thousand entries cost nothing next to the call itself); otherwise it
#: gets a layout of its own, one more compilation per process. (1Lbb's: ~35 000 entries.)
_SHARE_LIMIT = 2.0
_SMALL_LAYOUT = 10_000
#: ``on``: a pack's patches are fitted together (:meth:`FastHypotest.hypotest_group`, ``upper_limit_group``)
#: on any device; ``off``: never; unset: where jax's default device is not the CPU (a GPU). On a CPU one
#: patch at a time is faster (a loop's row costs about one likelihood call; the group's checks take more fits).
GROUPS_ENV = "PYHF_DIST_GROUPS"


class FastHypotest:
    """Asymptotic hypotests of patches of one background workspace on the compiled likelihood.

    A patch applies to the whole workspace, as ``pyhf.PatchSet`` applies it (and as
    ``jsonpatch BkgOnly.json patch.json | pyhf cls`` does): it may add, remove or replace
    channels, samples, modifiers, observations and the measurement's POI and parameter settings
    (bounds, inits, fixed parameters). Patches of one shape share a compiled layout; a patch of
    another shape (a channel removed or added, another binning) gets a layout of its own, compiled
    once per process, or shares a larger one where the padding stays cheap.

    Args:
        workspace_spec: The background workspace (dict), as given to ``pyhf.Workspace``.
        modifier_settings: pyhf's ``modifier_settings``; ``None`` means code4/code4p.
        verify: Check the first patch of each structure against plain pyhf (leave on; tests
            switch it off to exercise the arithmetic alone).
        key: A digest of the workspace and settings (the worker context's); when given, the
            outcome of each structure's check is remembered on disk (:mod:`pyhf_dist.cache`)
            for later processes with the same workspace, settings and package versions.
        match_pyhf: Reproduce pyhf's own numbers (its fits' starting points, and plain pyhf
            where its minimizer stalls or its fits' noise decides a CLs value) instead of the
            certified converged fits.

    Raises:
        FastPathUnsupported: The workspace itself is outside what the fast path covers.
    """

    def __init__(
        self,
        workspace_spec: dict,
        modifier_settings: dict | None = None,
        *,
        verify: bool = True,
        key: str | None = None,
        match_pyhf: bool = False,
    ):
        from pyhf_dist.runtime.fast import layout

        self.modifier_settings = modifier_settings or copy.deepcopy(DEFAULT_MODIFIER_SETTINGS)
        self._codes = layout.interpolation_codes(self.modifier_settings)
        try:
            self._samples = layout.SampleCache(workspace_spec)
        except (KeyError, IndexError, TypeError) as error:
            raise FastPathUnsupported(f"not a workspace the fast path reads: {error!r}") from None
        self._workspace = workspace_spec
        self._verify = verify
        self._key = key
        self.match_pyhf = match_pyhf
        self._layouts: list = []
        self._verified: dict = {}
        # Re-entrant: the points fitted together (under the lock) build their problems with it.
        self._lock = threading.RLock()
        #: What the points of one structure share (:mod:`~pyhf_dist.runtime.fast.points`), by structure.
        self.point_groups: dict = {}

    @property
    def layouts(self) -> list:
        """The :class:`~pyhf_dist.runtime.fast.layout.Caps` of the layouts in use, in order of creation."""
        return list(self._layouts)

    def arrays(self, patch_operations: list | None, *, require_poi: bool = True):
        """The patched workspace and its :class:`~pyhf_dist.runtime.fast.layout.PatchArrays` (unpadded)."""
        from pyhf_dist.runtime.fast import layout

        spec = layout.apply_patch(self._workspace, patch_operations or [])
        arrays = layout.workspace_arrays(spec, self.modifier_settings, require_poi=require_poi, samples=self._samples)
        return spec, arrays

    def hypotest(self, patch_operations: list | None, poi_test: float = 1.0, test_stat: str = "qtilde") -> dict:
        """``pyhf.infer.hypotest(poi_test, ..., test_stat=..., return_expected_set=True)`` for one patch.

        Args:
            patch_operations: jsonpatch operations applied to the whole workspace (as
                ``pyhf.PatchSet.apply``); ``None`` for the background.
            poi_test: The POI value tested.
            test_stat: ``"qtilde"``, ``"q"`` or ``"q0"``.

        Returns:
            ``{"CLs_obs": float, "CLs_exp": [5 floats]}`` (CLs+b for ``q0``, as pyhf returns) and
            the fits' certificate: ``converged``, ``fits`` (per fit: ``twice_nll``,
            ``gradient``, ``converged``, ``start``) and, where pyhf's default minimizer stalls on
            the patch, ``pyhf_default``.

        Raises:
            FastPathUnsupported: The patch has something not covered, a fit did not converge, or
                its structure failed the check against pyhf. Its message is one line saying why.
        """
        from pyhf_dist.runtime.fast import fit

        try:
            with self._lock:
                result = fit.hypotest(self._problem(patch_operations), poi_test, test_stat, match_pyhf=self.match_pyhf)
        except FastPathUnsupported as error:
            log.info("fast path declined a patch (plain pyhf fits it): %s", error)
            raise
        return {key: value for key, value in result.items() if key not in ("qmu", "qmu_A")}

    def hypotest_points(self, patches: list, poi_test: float = 1.0, test_stat: str = "qtilde") -> list[dict | None]:
        """:meth:`hypotest` of patches that differ only in the yields they add, fitted together
        (:func:`pyhf_dist.runtime.fast.points.hypotests`); ``None`` for a patch to fit one at a time."""
        from pyhf_dist.runtime.fast import points

        with self._lock:
            return points.hypotests(self, patches, poi_test, test_stat)

    def hypotest_group(self, patches: list, poi_test: float = 1.0, test_stat: str = "qtilde") -> list[dict | None]:
        """:meth:`hypotest` of patches of any structures, fitted together in one compiled loop
        (:func:`pyhf_dist.runtime.fast.group.hypotests`); ``None`` for a patch to fit one at a time."""
        from pyhf_dist.runtime.fast import group

        with self._lock:
            return group.hypotests(self._problem, patches, poi_test, test_stat)

    def upper_limit_group(self, patches: list, test_stat: str = "qtilde", level: float = 0.05, scan=None) -> list[dict | None]:
        """:meth:`upper_limit` of patches of any structures, their searches in lockstep
        (:func:`pyhf_dist.runtime.fast.group_limits.upper_limits`); ``None`` for a patch to fit one at a time."""
        from pyhf_dist.runtime.fast import group_limits

        with self._lock:
            return group_limits.upper_limits(self._problem, patches, test_stat, level, scan)

    def upper_limit(
        self, patch_operations: list | None, test_stat: str = "qtilde", level: float = 0.05, scan=None
    ) -> dict:
        """``pyhf.infer.intervals.upper_limits.upper_limit(data, model, scan, level, test_stat=...)``
        for one patch (:func:`pyhf_dist.runtime.fast.limits.upper_limit`).

        With ``match_pyhf``, where the noise of pyhf's fits decides a CLs value the limit
        depends on (``mu = 0`` when the best fit lies at ``mu = 0``), that value is computed by
        plain pyhf.

        Returns:
            ``{"mu_up_obs": float, "mu_up_exp": [5 floats]}`` and the fits' certificate (as
            :meth:`hypotest`; the conditional fits of the search summarised in one entry).

        Raises:
            FastPathUnsupported: As :meth:`hypotest`.
            UpperLimitError: pyhf's search would test a POI value outside the POI bounds.
        """
        from pyhf_dist.runtime.fast import limits

        try:
            with self._lock:
                problem = self._problem(patch_operations)
                exact = self._pyhf_hypotest(patch_operations, test_stat) if self.match_pyhf else None
                result = limits.upper_limit(problem, test_stat, level, scan, exact=exact, match_pyhf=self.match_pyhf)
        except FastPathUnsupported as error:
            log.info("fast path declined a patch (plain pyhf fits it): %s", error)
            raise
        if result["exact_values"]:
            log.info("fast path: %d of %d POI values computed by plain pyhf", result["exact_values"], result["poi_values"])
        return {key: value for key, value in result.items() if key not in ("poi_values", "exact_values")}

    def _pyhf_hypotest(self, patch_operations, test_stat):
        """``mu -> (CLs_obs, [CLs_exp x5])`` of plain pyhf on numpy for the patch (model built on first use)."""
        built = []

        def hypotest(mu):
            import pyhf

            from pyhf_dist.runtime.fast import layout

            use_numpy()  # pyhf's own numbers: numpy and its default minimizer
            if not built:  # as plain pyhf builds them: the patch applied to the whole workspace
                spec = layout.apply_patch(self._workspace, patch_operations or [])
                built.extend(pyhf_model(spec, self.modifier_settings))
            model, data = built
            observed, expected = pyhf.infer.hypotest(mu, data, model, test_stat=test_stat, return_expected_set=True)
            return float(observed), [float(value) for value in expected]

        return hypotest

    def problem(self, patch_operations: list | None):
        """The patch's :class:`~pyhf_dist.runtime.fast.problem.FitProblem` (its structure checked against pyhf once).

        Raises:
            FastPathUnsupported: As :meth:`hypotest`, for the patch itself.
        """
        with self._lock:
            return self._problem(patch_operations)

    def warm_up(self) -> None:
        """Compile (or load from the cache) the likelihood for this workspace's layout.

        Uses the background-only model with room for a signal sample in every channel, so the
        first patch usually finds its layout compiled (patches that remove channels share it).
        Cheap to call more than once.
        """
        from pyhf_dist.runtime.fast import layout

        configure_jax()
        with self._lock:
            if self._layouts:
                return
            _, arrays = self.arrays(None, require_poi=False)
            sizes = arrays.sizes
            room = layout.Caps(
                bins=sizes.bins,
                slots=sizes.slots + len(self._workspace["channels"]),
                width=sizes.width,
                histosys=sizes.histosys,
                normsys=sizes.normsys,
                factors=sizes.factors + 1,
                pars=sizes.pars + 1,
            )
            caps = layout.Caps.around(room)
            self._layouts.append(caps)
            self._padded(arrays, caps)

    def _layout_for(self, sizes):
        """``(caps, layouts)``: the layout for ``sizes`` (a cheap enough one, one grown, a new one), all once compiled."""
        from pyhf_dist.runtime.fast import layout

        own = layout.Caps.around(sizes)
        limit = max(_SHARE_LIMIT * own.volume, _SMALL_LAYOUT)
        fitting = [caps for caps in self._layouts if caps.covers(sizes) and caps.volume <= limit]
        if fitting:
            return min(fitting, key=lambda caps: caps.volume), self._layouts
        for index, caps in enumerate(self._layouts):
            grown = caps.grown(sizes)
            if grown.volume <= limit:
                # One layout for both shapes: later patches of either need no other compilation.
                return grown, self._layouts[:index] + [grown] + self._layouts[index + 1:]
        return own, self._layouts + [own]

    def _padded(self, arrays, caps):
        """``(device layout, padded parameters, padded main data, functions)``, compiled for ``caps``."""
        from pyhf_dist.runtime.fast import executables, layout, likelihood

        padded = layout.pad(arrays, caps)
        params = layout.pad_parameters(arrays, caps)
        main = layout.pad_main(arrays, caps)
        device = likelihood.device_layout(padded, self._codes)
        functions = executables.for_layout(caps, self._codes, likelihood.functions(*self._codes), device, params, main)
        return device, params, main, functions

    def _problem(self, patch_operations):
        from pyhf_dist.runtime.fast.problem import FitProblem

        configure_jax()
        spec, arrays = self.arrays(patch_operations)
        caps, layouts = self._layout_for(arrays.sizes)
        device, params, main, functions = self._padded(arrays, caps)
        # Kept once compiled: a compilation that failed must not leave later patches a layout that needs it.
        self._layouts = layouts
        if self._verify:
            described = _structure(spec, arrays, caps, self._codes)
            if described not in self._verified:
                from pyhf_dist.runtime import timeouts

                # Once per structure, like its compilation (the check imports pyhf, builds its
                # model, compiles the logpdf): the worker's cost, outside the fit's timeout.
                with timeouts.paused():
                    checked = self._check_structure(described, spec, arrays, functions, device, params, main)
                self._verified[described] = checked
            if not self._verified[described]:
                raise FastPathUnsupported("this structure did not reproduce pyhf's model in the check")
        import jax

        return FitProblem(
            functions=functions,
            layout=device,
            init=params["init"],
            lower=params["lower"],
            upper=params["upper"],
            fixed=params["fixed"],
            main=jax.device_put(main),
            aux=jax.device_put(params["aux"]),
            poi_index=arrays.poi_index,
            n_pars=len(arrays.init),
        )

    def _check_structure(self, described, spec, arrays, functions, device, params, main) -> bool:
        """:meth:`_matches_pyhf`, or its remembered outcome for this workspace, settings and versions."""
        if self._key is None:
            return self._matches_pyhf(spec, arrays, functions, device, params, main)
        key = cache.digest(self._key, described, cache.versions("pyhf", "jax", "jaxlib", "numpy", "scipy"))
        # Workers meeting a structure together: one checks, the others take its outcome.
        with cache.exclusive("structure-" + key):
            remembered = cache.recall("structure", key)
            if remembered in ("same", "different"):
                return remembered == "same"
            same = self._matches_pyhf(spec, arrays, functions, device, params, main)
            cache.remember("structure", key, "same" if same else "different")
        return same

    def _matches_pyhf(self, spec, arrays, functions, device, params, main) -> bool:
        """Compare parameters, data and logpdf at the init and random points with pyhf's model.

        The model and data are pyhf's own for the patched workspace, ``pyhf.Workspace(spec)``,
        ``.model(modifier_settings=...)`` and ``.data(model)``: what a user fitting the patch
        with pyhf gets.
        """
        import pyhf

        previous = pyhf.tensorlib.name
        if previous != "numpy":
            pyhf.set_backend("numpy")
        try:
            try:
                # Validation changes no number; the scan validated the background, and plain pyhf
                # gives its own error on a patch it cannot read.
                model, data = pyhf_model(spec, self.modifier_settings, validate=False)
                data = np.asarray(data, dtype=float)
            except Exception as error:  # noqa: BLE001 - pyhf's own error comes with its fallback
                log.warning("fast path: pyhf cannot build this patch's model (%s); using plain pyhf", error)
                return False
            config = model.config
            n = len(arrays.init)
            bins = len(arrays.main_data)
            constrained = arrays.gauss | arrays.poisson
            same = (
                config.par_names == arrays.par_names
                and config.poi_index == arrays.poi_index
                and np.array_equal(config.suggested_init(), arrays.init)
                and np.array_equal(np.asarray(config.suggested_bounds(), dtype=float), np.stack([arrays.lower, arrays.upper], 1))
                and list(config.suggested_fixed()) == list(arrays.fixed)
                and len(data) == bins + len(config.auxdata)
                and np.array_equal(data[:bins], arrays.main_data)
                and np.allclose(config.auxdata, arrays.aux[constrained], rtol=1e-12, atol=0)
            )
            if not same:
                log.warning("fast path: parameters or data differ from pyhf's for this structure; using plain pyhf")
                return False
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
                ours = functions.logpdf(theta, main, params["aux"], device)
                if not np.isfinite(expected):
                    continue
                if not abs(ours - expected) <= _LOGPDF_RTOL * max(1.0, abs(expected)):
                    log.warning("fast path: logpdf %.12g differs from pyhf's %.12g; using plain pyhf", ours, expected)
                    return False
            return True
        finally:
            if previous != "numpy":
                pyhf.set_backend(previous)


def _structure(spec: dict, arrays, caps, codes) -> str:
    """What one check against pyhf vouches for: the layout, interpolation codes, modifier types,
    channels (names and bins), which parameters the measurement configures (and how), the POI.

    Deterministic across processes (it keys the remembered outcome): sorted, no sets.
    """
    config = spec["measurements"][0]["config"]
    channels = sorted((channel["name"], len(channel["samples"][0]["data"])) for channel in spec["channels"])
    configured = sorted((parameter["name"], sorted(parameter)) for parameter in config.get("parameters", []))
    return repr((caps, codes, sorted(arrays.modifier_types), channels, configured, config["poi"]))


def for_state(state) -> FastHypotest:
    """The :class:`FastHypotest` of a worker's :class:`~pyhf_dist.runtime.state.WorkerState` (made once)."""
    fast = state.memo.get("fast_hypotest")
    if fast is None:
        with state.lock:
            fast = state.memo.get("fast_hypotest")
            if fast is None:
                settings = state.settings
                fast = FastHypotest(state.workspace_spec, settings.modifier_settings, key=state.key,
                                    match_pyhf=settings.match_pyhf)
                state.memo["fast_hypotest"] = fast
    return fast


def groups_wanted() -> bool:
    """Whether a pack's patches are fitted together in one loop here (:data:`GROUPS_ENV`).

    >>> os.environ[GROUPS_ENV] = "on"; groups_wanted()
    True
    >>> os.environ[GROUPS_ENV] = "off"; groups_wanted()
    False
    >>> del os.environ[GROUPS_ENV]
    """
    choice = os.environ.get(GROUPS_ENV, "").strip().lower()
    if choice in ("on", "off"):
        return choice == "on"
    if choice:
        _ignored_setting(choice)
    import jax

    return jax.default_backend() != "cpu"


@functools.cache
def _ignored_setting(choice: str) -> None:
    # Asked for every record a worker makes: said once per process.
    log.warning("%s=%r is neither 'on' nor 'off'; left to the device", GROUPS_ENV, choice)


def preload() -> None:
    """Import and configure what the fast path runs on (jax, scipy's minimisation routines),
    nothing else."""
    from pyhf_dist.runtime.fast import fit, layout, lbfgsb, slsqp  # noqa: F401

    # Their checks, remembered per machine: scipy.optimize itself is imported only to make them.
    lbfgsb.direct()
    slsqp.direct()

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
