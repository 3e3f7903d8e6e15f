"""Patches of different structures fitted together on the batched engine.

:class:`~pyhf_dist.runtime.fast.batched.BatchFitter` advances many fits of *one* patch in one
compiled loop; the patches of a published pallet differ in more than their data: other signal
samples, other modifiers and their data, other parameters, other fixed parameters. Here each
slot of the loop fits its own patch:

* every patch's compact arrays (:class:`~pyhf_dist.runtime.fast.batch_model.BatchModel`) are
  padded to one set of sizes (the patches of a pallet share them) and stacked, as are its
  bounds, fixed parameters, Fisher scaling and starting inverse Hessian; a slot reads those of
  its patch (padding parameters are held at 0 and reach no bin);
* the iterations are the batched engine's (:func:`~pyhf_dist.runtime.fast.loop.iteration`),
  so a patch's fit is the one it gets alone.

:class:`GroupFitter` makes any fits of the group's patches; :class:`GroupScan` makes the fits of
their asymptotic hypotests, and of the POI values an upper-limit search tries, with the starts and
the checks of the one-at-a-time path (:class:`~pyhf_dist.runtime.fast.fit.PoiScan`). A patch is
answered only where every check passes; anything else (a fit that does not converge, two starts
that find different minima, a free fit above a conditional one) leaves it ``None``, for the
one-at-a-time path, which handles those cases. One patch's failure costs the others nothing: its
slots are its own.

Example:
    >>> scan = GroupScan([engine.problem(patch) for patch in patches])  # doctest: +SKIP
    >>> answers = scan.hypotests(1.0)  # one dict, or None, per patch  # doctest: +SKIP
"""

from __future__ import annotations

import logging

import numpy as np

from pyhf_dist.protocol import SMALLEST_GROUP
from pyhf_dist.runtime.fast import loop
from pyhf_dist.runtime.fast.batch_model import BatchModel
from pyhf_dist.runtime.fast.batched import BatchFitter
from pyhf_dist.runtime.fast.errors import FastPathUnsupported
from pyhf_dist.runtime.fast.problem import ACCEPT_GRADIENT, SAME_MINIMUM

__all__ = ["GROUP_TOLERANCE", "GroupFits", "GroupFitter", "GroupScan", "group_size", "hypotests", "scan_of"]

log = logging.getLogger(__name__)

#: Convergence of a group's fits (the decrease of -2 log L the next step promises): where the
#: one-at-a-time path's L-BFGS-B stops, so that both give the same minima to ~1e-10.
GROUP_TOLERANCE = 1e-11


class GroupFits:
    """Minima of fits of a group's patches (one row per fit).

    Attributes:
        theta: ``[N, P]`` parameters at the minima, padded (a patch's own are its first
            ``n_pars``); NaN rows where a fit did not converge.
        twice_nll: ``[N]`` ``-2 log L`` there, up to a constant of each dataset (as the
            one-at-a-time path's).
        gradient: ``[N]`` the largest projected gradient component per standard deviation.
        converged: ``[N]`` converged with a gradient below
            :data:`~pyhf_dist.runtime.fast.problem.ACCEPT_GRADIENT`.
        evaluations: ``[N]`` evaluations of the likelihood.
    """

    def __init__(self, theta, twice_nll, gradient, converged, evaluations):
        self.theta, self.twice_nll, self.gradient = theta, twice_nll, gradient
        self.converged, self.evaluations = converged, evaluations

    def rows(self, start: int, stop: int) -> GroupFits:
        """The fits of rows ``start:stop``."""
        return self._at(slice(start, stop))

    def _at(self, rows) -> GroupFits:
        return GroupFits(self.theta[rows], self.twice_nll[rows], self.gradient[rows], self.converged[rows],
                         self.evaluations[rows])


class GroupFitter:
    """Fits of several patches (:class:`~pyhf_dist.runtime.fast.problem.FitProblem`) in one loop.

    Args:
        problems: The patches. They must share one padded layout (the patches of a pallet do,
            also those that remove a channel: its bins are masked) and the interpolation codes.
        device, batch, steps: As :class:`~pyhf_dist.runtime.fast.batched.BatchFitter`.
        tolerance: The convergence threshold (default :data:`GROUP_TOLERANCE`).

    Raises:
        FastPathUnsupported: The patches cannot share one compiled loop (say which differ).
    """

    def __init__(self, problems: list, *, device=None, batch: int | None = None, steps: int | None = None,
                 tolerance: float = GROUP_TOLERANCE):
        import jax
        import jax.numpy as jnp

        if not problems:
            raise ValueError("a group needs at least one patch")
        self.problems = list(problems)
        # First every patch's sizes (they grow the sizes its layout shares), then the members at
        # the sizes that cover them all.
        for problem in self.problems:
            BatchModel.from_problem(problem)
        self.members = [BatchFitter(problem, device=device, batch=batch, steps=steps, fallback=False,
                                    tolerance=tolerance) for problem in self.problems]
        first = self.members[0]
        for member in self.members[1:]:
            if (member.model.codes, member.model.caps) != (first.model.codes, first.model.caps):
                raise FastPathUnsupported(
                    "patches with other bins, factors per yield or interpolation codes cannot be fitted in one group"
                )
        self.device, self.batch, self.steps = first.device, first.batch, first.steps
        self.codes, self.pars = first.model.codes, first.model.caps.pars
        self.bins = first.model.caps.bins
        # The compiled loop is specialised to the number of patches it holds (seconds of
        # compilation each): padded with copies of the last patch, which no row reads, to a power
        # of two, the groups of a scan (packs of shrinking sizes) share a few compilations.
        held = self.members + [self.members[-1]] * (group_size(len(self.members)) - len(self.members))
        stack = lambda values: np.stack([np.asarray(value) for value in values])
        self._arrays = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *[m.device_arrays for m in held])
        self._consts = jax.device_put(
            {
                "lo": stack([m.lower / m.scale for m in held]),
                "hi": stack([m.upper / m.scale for m in held]),
                "scale": stack([m.scale for m in held]),
                "fixed": stack([m.fixed for m in held]),
                "h0inv": stack([m.metric(m.init) for m in held]),
                "tolerance": float(tolerance),
            },
            self.device,
        )

    def padded(self, values, fill: float = 0.0) -> np.ndarray:
        """Rows of per-parameter values (each at least as long as its patch's parameters) as
        ``[N, P]``, padded with ``fill``."""
        out = np.full((len(values), self.pars), fill, dtype=float)
        for row, value in enumerate(values):
            value = np.asarray(value, dtype=float)
            size = min(len(value), self.pars)
            out[row, :size] = value[:size]
        return out

    def fit(self, patch, main, aux, poi_values=None, start=None) -> GroupFits:
        """Minimise ``-2 log L`` of patch ``patch[i]`` for dataset ``(main[i], aux[i])``, every
        row in one loop.

        Args:
            patch: ``[N]`` the index (in ``problems``) of each fit's patch.
            main: ``[N, bins]`` main data.
            aux: ``N`` rows of auxiliary data in each patch's parameter order (as ``FitProblem.aux``).
            poi_values: ``[N]`` the POI value of each conditional fit, NaN for a free fit;
                ``None``: all free.
            start: ``N`` starting points (default: each patch's suggested initial values); fixed
                parameters are held at their suggested values whatever it says.

        Returns:
            :class:`GroupFits`.
        """
        patch = np.asarray(patch, dtype=np.int32).reshape(-1)
        count = len(patch)
        members = [self.members[i] for i in patch]
        main = np.asarray(main, dtype=float).reshape(count, self.bins)
        aux = self.padded(aux)
        poi = np.full(count, np.nan) if poi_values is None else np.asarray(poi_values, dtype=float).reshape(count)
        init = np.stack([m.init for m in members])
        fixed = np.stack([m.fixed for m in members])
        scale = np.stack([m.scale for m in members])
        lower, upper = np.stack([m.lower for m in members]), np.stack([m.upper for m in members])
        theta0 = init if start is None else np.where(fixed, init, self.padded(start))
        pinned = np.zeros((count, self.pars), dtype=bool)
        rows = np.arange(count)
        conditional = ~np.isnan(poi)
        poi_index = np.array([m.poi_index for m in members], dtype=int)
        theta0[rows[conditional], poi_index[conditional]] = poi[conditional]
        pinned[rows[conditional], poi_index[conditional]] = True
        x0 = np.where(fixed | pinned, theta0 / scale, np.clip(theta0 / scale, lower / scale, upper / scale))
        compiled = loop.compiled(self.codes, self.batch, self.steps, per_patch=True)
        rows_of = {"main": main, "aux": aux, "x0": x0, "pinned": pinned, "patch": patch}
        out = loop.stream(compiled, self.batch, self.device, rows_of, self._consts, self._arrays)
        x, g = out["x"], out["g"]
        # Only the components pointing into the box count at a bound (as the one-at-a-time certificate).
        outwards = ((x <= lower / scale) & (g > 0)) | ((x >= upper / scale) & (g < 0))
        gradient = np.max(np.abs(np.where(outwards | fixed | pinned, 0.0, g)), axis=1, initial=0.0)
        gradient = np.where(np.isfinite(gradient), gradient, np.inf)
        converged = (out["status"] == loop.CONVERGED) & (gradient <= ACCEPT_GRADIENT)
        theta = np.where(converged[:, None], x * scale, np.nan)
        values = np.where(converged, out["f"], np.nan)
        return GroupFits(theta, values, gradient, converged, out["evaluations"])


class GroupScan:
    """The asymptotic hypotests of a group's patches at any POI values, fits shared and checked.

    The fits are those of :class:`~pyhf_dist.runtime.fast.fit.PoiScan`, from the same starts:
    the fit at ``mu = 0`` and the free fit to the observed data, each also from the other's
    minimum; the Asimov data from the fit at ``mu = 0``; the free fit to them from the point they
    were generated from; per tested value, the fit to the observed data from the initial values,
    from the free fit's minimum and from the minimum at ``mu = 0``, and the fit to the Asimov data
    from the initial values, from the point the data were generated from and from the observed
    data's minimum at that value; where a patch is
    tested at several values, both also from the minima interpolated between the nearest ones.
    Every start of a fit must reach one minimum, and the answer is the one from the initial
    values. (The one-at-a-time path's fits take fewer starts until it has seen two minima. This
    loop's steps are not L-BFGS-B's: on 3L-eRJR patches the same start can end in a minimum
    0.005 above the one L-BFGS-B finds, which the further starts lead to.)

    Args:
        problems: The patches (see :class:`GroupFitter`).
        test_stat: ``"qtilde"`` or ``"q"``.
        fitter: A :class:`GroupFitter` of ``problems`` (default: made here).

    Attributes:
        answerable: ``[patches]`` whether a patch's shared fits passed every check (the others
            get ``None`` from :meth:`statistics` and :meth:`hypotests`).
    """

    def __init__(self, problems: list, test_stat: str = "qtilde", fitter: GroupFitter | None = None):
        from pyhf_dist.runtime.fast.fit import fit_name

        if test_stat not in ("qtilde", "q"):
            raise FastPathUnsupported(f"test statistic {test_stat!r} in a group (qtilde and q only)")
        self.fitter = fitter or GroupFitter(problems)
        self.problems, self.test_stat = list(problems), test_stat
        count = len(problems)
        index = np.arange(count)
        self.background_name = fit_name("observed", 0.0)
        poi = np.array([p.poi_index for p in problems])
        # The measurement's own initial values are the only start (PoiScan adds the constraints'
        # centres where they differ), and mu = 0 lies inside every POI range.
        self.answerable = np.array([
            np.array_equal(p.nominal, p.init) and p.lower[p.poi_index] <= 0.0 <= p.upper[p.poi_index] for p in problems
        ])
        observed = _data([p.main for p in problems], [p.aux for p in problems], index)
        inits = [p.init for p in problems]
        free_fit, conditional = np.full(count, np.nan), np.zeros(count)
        background, free = self._fit_blocks([(index, observed, conditional, inits), (index, observed, free_fit, inits)])
        # The second start of each: the other's minimum. Where both starts reach one minimum the
        # first one's is the answer (as the one-at-a-time path's probes); where not, the patch
        # has several minima and is fitted one at a time.
        background_again, free_again = self._fit_blocks([
            (index, observed, conditional, list(free.theta)), (index, observed, free_fit, list(background.theta)),
        ])
        self.answerable &= (
            _same(background, background_again) & _same(free, free_again)
            & (free.twice_nll <= background.twice_nll + SAME_MINIMUM)
        )
        self.asimov = [
            tuple(np.asarray(part) for part in p.functions.expected(_own(p, theta), p.layout)) if ok else (p.main, p.aux)
            for p, theta, ok in zip(problems, background.theta, self.answerable)
        ]
        generating = list(np.where(self.answerable[:, None], background.theta, 0.0))
        (asimov_free,) = self._fit_blocks([(index, self._asimov_rows(index), free_fit, generating)])
        self.answerable &= asimov_free.converged
        self.shared = {self.background_name: background, "observed free": free, "asimov free": asimov_free}
        self.muhat = np.array([free.theta[i, poi[i]] for i in index])
        self.muhat_a = np.array([asimov_free.theta[i, poi[i]] for i in index])
        self.pyhf_default = [
            p.pyhf_default(0.0, float(background.twice_nll[i]), self.background_name) if self.answerable[i] else None
            for i, p in enumerate(problems)
        ]

    def _fit_blocks(self, blocks: list) -> list[GroupFits]:
        """Blocks of fits, all in one loop: each ``(patches, (main, aux), POI values, starts)``
        with one row per fit (NaN POI value: a free fit); a :class:`GroupFits` per block."""
        found = self.fitter.fit(
            np.concatenate([patches for patches, _, _, _ in blocks]),
            np.concatenate([data[0] for _, data, _, _ in blocks]),
            [row for _, data, _, _ in blocks for row in data[1]],
            np.concatenate([values for _, _, values, _ in blocks]),
            start=[row for _, _, _, starts in blocks for row in starts],
        )
        out, at = [], 0
        for patches, _, _, _ in blocks:
            out.append(found.rows(at, at + len(patches)))
            at += len(patches)
        return out

    def _asimov_rows(self, patches) -> tuple:
        return _data([a[0] for a in self.asimov], [a[1] for a in self.asimov], patches)

    def statistics(self, mus: list) -> list[list[dict] | None]:
        """The test statistics and CLs of each patch at its POI values, as the one-at-a-time path's.

        Args:
            mus: Per patch, the POI values to test (any number, each patch its own).

        Returns:
            Per patch, one dict per value (``qmu``, ``qmu_A``, ``CLs_obs``, ``CLs_exp`` and the
            certificate of that value's fits, ``converged`` and ``fits``), or ``None`` where a
            check failed at any of its values.
        """
        from pyhf_dist.runtime.fast.fit import (
            asymptotic_cls,
            asymptotic_statistic,
            fit_name,
        )

        # Patches whose shared fits failed a check are not fitted again: they are None anyway.
        patches = np.array([i for i, values in enumerate(mus) if self.answerable[i] for _ in values], dtype=int)
        tested = np.array([float(mu) for i, values in enumerate(mus) if self.answerable[i] for mu in values])
        if not len(patches):
            return [[] if self.answerable[i] else None for i in range(len(mus))]
        free, asimov_free = self.shared["observed free"], self.shared["asimov free"]
        observed = _data([p.main for p in self.problems], [p.aux for p in self.problems], patches)
        asimov = self._asimov_rows(patches)
        init = [self.problems[i].init for i in patches]
        fitted, on_asimov = self._fit_blocks([(patches, observed, tested, init), (patches, asimov, tested, init)])
        # Further starts: the free fit's minimum and the fit's at mu = 0 for the observed data;
        # the observed data's minimum at the same value and the point the data were generated
        # from (the fit's at mu = 0) for the Asimov data; where a patch has other values, the
        # minimum interpolated between its nearest ones (the start of the one-at-a-time search's
        # fits). On a likelihood with several minima they may lead elsewhere than pyhf's start:
        # then the patch is left to the one-at-a-time path.
        near = [_interpolated(patches, tested, part) for part in (fitted, on_asimov)]
        has = [np.flatnonzero(np.isfinite(start[:, 0])) for start in near]
        generating = list(self.shared[self.background_name].theta[patches])
        from_free, from_background, asimov_again, asimov_generating, observed_near, asimov_near = self._fit_blocks([
            (patches, observed, tested, list(free.theta[patches])),
            (patches, observed, tested, generating),
            (patches, asimov, tested, list(np.where(fitted.converged[:, None], fitted.theta, 0.0))),
            (patches, asimov, tested, generating),
            (patches[has[0]], _subset(observed, has[0]), tested[has[0]], list(near[0][has[0]])),
            (patches[has[1]], _subset(asimov, has[1]), tested[has[1]], list(near[1][has[1]])),
        ])
        agree = [_same(fitted, from_background), _same(on_asimov, asimov_generating)]
        for k, (part, from_near) in enumerate(((fitted, observed_near), (on_asimov, asimov_near))):
            agree[k][has[k]] &= _same(part._at(has[k]), from_near)
        clean = (
            self.answerable[patches] & _same(fitted, from_free) & _same(on_asimov, asimov_again) & agree[0] & agree[1]
            & (free.twice_nll[patches] <= fitted.twice_nll + SAME_MINIMUM)
            & (asimov_free.twice_nll[patches] <= on_asimov.twice_nll + SAME_MINIMUM)
        )
        out: list = [[] if self.answerable[i] else None for i in range(len(mus))]
        for row, (i, mu) in enumerate(zip(patches, tested)):
            if out[i] is None:
                continue
            if not clean[row]:
                out[i] = None
                continue
            tmu = fitted.twice_nll[row] - free.twice_nll[i]
            tmu_a = on_asimov.twice_nll[row] - asimov_free.twice_nll[i]
            if mu == 0.0:  # the background the Asimov data were made from (as PoiScan)
                tmu_a = 0.0
                tmu = 0.0 if self.test_stat == "qtilde" else tmu
            qmu = asymptotic_statistic(self.test_stat, mu, tmu, self.muhat[i])
            qmu_a = asymptotic_statistic(self.test_stat, mu, tmu_a, self.muhat_a[i])
            answer = asymptotic_cls(qmu, qmu_a, self.test_stat, powerless_is_one=True)
            answer.update(qmu=qmu, qmu_A=qmu_a, converged=True, fits={
                **{name: _certificate(self.shared[name], i, start) for name, start in (
                    (self.background_name, "init"), ("observed free", "init"), ("asimov free", "generating point"))},
                fit_name("asimov", mu): _certificate(on_asimov, row, "init"),
                fit_name("observed", mu): _certificate(fitted, row, "init"),
            })
            if self.pyhf_default[i] is not None:
                answer["pyhf_default"] = dict(self.pyhf_default[i])
            out[i].append(answer)
        return out

    def hypotests(self, poi_test: float = 1.0) -> list[dict | None]:
        """Each patch's hypotest at ``poi_test`` (as :func:`~pyhf_dist.runtime.fast.fit.hypotest`),
        or ``None`` for a patch to fit one at a time."""
        found = self.statistics([[float(poi_test)]] * len(self.problems))
        return [None if values is None else {k: v for k, v in values[0].items() if k not in ("qmu", "qmu_A")}
                for values in found]


def group_size(patches: int) -> int:
    """The number of patches a group's compiled loop holds: the next power of two, at least
    :data:`~pyhf_dist.protocol.SMALLEST_GROUP`.

    >>> [group_size(n) for n in (1, 4, 5, 8, 9, 125)]
    [4, 4, 8, 8, 16, 128]
    """
    return max(SMALLEST_GROUP, 1 << (patches - 1).bit_length())


def hypotests(problem_of, patches: list, poi_test: float = 1.0, test_stat: str = "qtilde") -> list[dict | None]:
    """The hypotest of each patch (its jsonpatch operations) in one :class:`GroupScan`, as
    :func:`~pyhf_dist.runtime.fast.fit.hypotest`, or ``None`` for a patch to fit one at a time:
    every patch, where the group cannot share a loop or holds fewer than
    :data:`~pyhf_dist.protocol.SMALLEST_GROUP` patches. ``problem_of`` makes a patch's
    :class:`~pyhf_dist.runtime.fast.problem.FitProblem`. Never raises for a patch.
    """
    out: list[dict | None] = [None] * len(patches)
    group, indices = scan_of(problem_of, patches, test_stat)
    if group is None:
        return out
    try:
        answers = group.hypotests(poi_test)
    except (FastPathUnsupported, ValueError, np.linalg.LinAlgError) as error:
        log.info("fast path: %d patches not fitted together (%s); one at a time", len(indices), error)
        return out
    for index, answer in zip(indices, answers):
        out[index] = answer
    return out


def scan_of(problem_of, patches: list, test_stat: str = "qtilde") -> tuple[GroupScan | None, list[int]]:
    """``(group, indices)``: the :class:`GroupScan` of the patches the fast path reads (``problem_of``
    makes a patch's :class:`~pyhf_dist.runtime.fast.problem.FitProblem`) and their indices in
    ``patches``; ``None`` where they are fewer than :data:`~pyhf_dist.protocol.SMALLEST_GROUP` or
    cannot share a loop. The other patches are fitted one at a time, where each gets its own
    record and reason."""
    problems, indices = [], []
    for index, operations in enumerate(patches):
        try:
            problems.append(problem_of(operations))
        except FastPathUnsupported:
            continue
        indices.append(index)
    if len(problems) < SMALLEST_GROUP:
        return None, indices
    try:
        return GroupScan(problems, test_stat), indices
    except (FastPathUnsupported, ValueError, np.linalg.LinAlgError) as error:
        log.info("fast path: %d patches not fitted together (%s); one at a time", len(problems), error)
        return None, indices


def _same(first: GroupFits, second: GroupFits) -> np.ndarray:
    """Per row, whether two starts of a fit converged to one minimum."""
    return first.converged & second.converged & (np.abs(first.twice_nll - second.twice_nll) <= SAME_MINIMUM)


def _interpolated(patches: np.ndarray, tested: np.ndarray, fits: GroupFits) -> np.ndarray:
    """Per row, the minimum at its POI value interpolated linearly between the converged minima of
    the same patch's nearest other values on either side (beyond them: the nearest one's), as
    :meth:`~pyhf_dist.runtime.fast.fit.PoiScan.conditional` starts a search's fits; NaN rows
    where the patch has no other value."""
    out = np.full(fits.theta.shape, np.nan)
    for row, (patch, mu) in enumerate(zip(patches, tested)):
        others = np.flatnonzero((patches == patch) & (tested != mu) & fits.converged)
        if not len(others):
            continue
        below, above = others[tested[others] < mu], others[tested[others] > mu]
        if len(below) and len(above):
            low, high = below[np.argmax(tested[below])], above[np.argmin(tested[above])]
            weight = (mu - tested[low]) / (tested[high] - tested[low])
            out[row] = (1.0 - weight) * fits.theta[low] + weight * fits.theta[high]
        else:
            out[row] = fits.theta[others[np.argmin(np.abs(tested[others] - mu))]]
    return out


def _data(main: list, aux: list, patches) -> tuple:
    """``(main [rows, bins], aux rows)`` of ``patches`` (one row each) from per-patch data."""
    return np.stack([main[i] for i in patches]), [aux[i] for i in patches]


def _subset(data: tuple, rows) -> tuple:
    return data[0][rows], [data[1][r] for r in rows]


def _own(problem, theta) -> np.ndarray:
    """A group's padded parameters as the patch's own (its padded layout's length)."""
    out = np.array(problem.init, dtype=float)
    n = problem.n_pars
    out[:n] = theta[:n]
    return out


def _certificate(fits: GroupFits, row: int, start: str) -> dict:
    return {"twice_nll": float(fits.twice_nll[row]), "gradient": float(fits.gradient[row]), "converged": True,
            "start": start}
