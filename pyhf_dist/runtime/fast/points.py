"""Hypotests of many signal points of one template together, on the batched engine.

A reinterpretation scan (signal yields from another tool, one point per row, see
:mod:`pyhf_dist.signals`) gives patches that differ only in the yields of the samples they add:
the same channels, modifiers and parameters. Such points are one model with other nominal yields,
so their fits advance together in the batched engine's compiled loop (each fit with its own
nominal yields, :meth:`~pyhf_dist.runtime.fast.batched.BatchFitter.fit`) instead of one scipy call
per fit, which on a small model costs far more than its arithmetic (~7 ms of CPU per point one at
a time on a 3-bin model).

**The same certified answers** as :func:`~pyhf_dist.runtime.fast.fit.hypotest`, from the same starts:

* The conditional fit at ``mu = 0`` (it makes the Asimov data) is one fit for the whole group:
  with the POI at 0 every added yield is multiplied by 0 (checked on the arrays), so the
  likelihood is the same function for every point. It is made once, one at a time and certified
  (:class:`~pyhf_dist.runtime.fast.fit.PoiScan`), with pyhf's stall check and the Asimov data.
* Per point, in the loop: the free fit from pyhf's initial values and from that fit's minimum;
  the fit at the tested value from the initial values and from the free fit's minimum; the fit at
  ``mu = 0`` again from the free fit's minimum (it must find no lower minimum than the shared
  one); the fit at the tested value to the Asimov data from the initial values and from the point
  the data were generated from. The free fit to the Asimov data is that point (evaluated, not
  fitted).
* A point is answered here only when everything is clean: every fit converged in the loop with a
  projected gradient below :data:`~pyhf_dist.runtime.fast.problem.ACCEPT_GRADIENT` (per standard
  deviation, as the one-at-a-time certificate), the starts of each fit reach one minimum, and the
  free fit lies below every conditional one. Anything else (several minima, a stalled fit) gives
  ``None``: the caller fits that point one at a time, which handles those cases.

Example:
    >>> results = hypotests(engine, [patch_1, patch_2, ...], 1.0, "qtilde")  # doctest: +SKIP
    >>> results[0]["CLs_obs"], results[1] is None  # None: fit this point one at a time  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np

from pyhf_dist.protocol import SMALLEST_GROUP
from pyhf_dist.runtime.fast.errors import FastPathUnsupported
from pyhf_dist.runtime.fast.problem import ACCEPT_GRADIENT, SAME_MINIMUM

__all__ = ["GROUP_TOLERANCE", "hypotests", "structure_key"]

log = logging.getLogger(__name__)

#: Convergence of the loop's fits: the decrease of -2 log L the next step promises. L-BFGS-B's
#: stopping rule on the one-at-a-time path (projected gradient 1e-5) ends about here, so both
#: paths give the same test statistics to ~1e-9.
GROUP_TOLERANCE = 1e-11


def structure_key(operations) -> tuple[str, np.ndarray] | None:
    """``(key, yields)`` of a patch that adds samples; patches with one key differ in the yields only.

    The key is the patch with each added sample's ``data`` replaced by its length; the yields are
    those data, in order. ``None`` for a patch that does anything else (it is fitted one at a time).

    >>> add = {"op": "add", "path": "/channels/0/samples/-", "value": {"name": "s", "data": [1.0, 2.0], "modifiers": []}}
    >>> key, yields = structure_key([add])
    >>> yields.tolist(), key == structure_key([{**add, "value": {**add["value"], "data": [3, 4]}}])[0]
    ([1.0, 2.0], True)
    """
    found = _shape(operations)
    return None if found is None else (json.dumps(found[0], sort_keys=True), found[1])


def _shape(operations) -> tuple[list, np.ndarray] | None:
    """``(the patch without its added yields, the yields)``, or ``None`` (see :func:`structure_key`)."""
    if not operations:
        return None
    shape, yields = [], []
    for operation in operations:
        value = operation.get("value") if isinstance(operation, dict) else None
        if (
            operation.get("op") != "add"
            or "/samples/" not in str(operation.get("path", ""))
            or not isinstance(value, dict)
            or not isinstance(value.get("data"), list)
        ):
            return None
        shape.append({**operation, "value": {**value, "data": len(value["data"])}})
        yields.extend(value["data"])
    try:
        yields = np.asarray(yields, dtype=float)
    except (TypeError, ValueError):
        return None
    return (shape, yields) if np.all(np.isfinite(yields)) else None


def hypotests(engine, patches: list, poi_test: float, test_stat: str) -> list[dict | None]:
    """The hypotest of each patch (as :meth:`FastHypotest.hypotest`), or ``None`` where the point
    is to be fitted one at a time. Points of one :func:`structure_key` are fitted together.

    Never raises for a point: whatever stops a group leaves its points ``None``.
    """
    results: list[dict | None] = [None] * len(patches)
    # Grouped by comparing shapes (C-level equality, which stops at the first difference) rather
    # than by a text key: a published patch is ~100 kB of JSON, and its neighbours differ early.
    groups: list[tuple[list, list]] = []
    for index, operations in enumerate(patches):
        found = _shape(operations)
        if found is None:
            continue
        shape, yields = found
        group = next((members for first, members in groups if first == shape), None)
        if group is None:
            groups.append((shape, group := []))
        group.append((index, yields))
    for shape, members in groups:
        if len(members) < SMALLEST_GROUP:
            continue
        try:
            group = _group(engine, patches[members[0][0]], poi_test, test_stat)
            if group is None:
                continue
            answers = group.hypotests(np.stack([yields for _, yields in members]))
        except (FastPathUnsupported, ValueError, np.linalg.LinAlgError) as error:
            log.info("fast path: %d points not fitted together (%s); one at a time", len(members), error)
            continue
        for (index, _), answer in zip(members, answers):
            results[index] = answer
    return results


def _group(engine, operations, poi_test: float, test_stat: str):
    """The :class:`_Group` of the structure of ``operations`` (made once per engine), or ``None``
    where its points cannot be fitted together."""
    groups = engine.point_groups
    found_key = (structure_key(operations)[0], float(poi_test), test_stat)
    if found_key not in groups:
        try:
            groups[found_key] = _Group(engine, operations, float(poi_test), test_stat)
        except (_NotTogether, FastPathUnsupported) as reason:
            # Remembered: the next packs of this structure go one at a time without trying again.
            log.info("fast path: points of this structure are fitted one at a time (%s)", reason)
            groups[found_key] = None
    return groups[found_key]


class _NotTogether(Exception):
    """Why the points of a structure cannot be fitted together."""


class _Group:
    """What the points of one structure share: the model, where their yields go, the fit at mu=0."""

    def __init__(self, engine, operations, mu: float, test_stat: str):
        from pyhf_dist.runtime.fast.batched import BatchFitter
        from pyhf_dist.runtime.fast.fit import PoiScan

        if engine.match_pyhf or test_stat not in ("qtilde", "q"):
            raise _NotTogether("pyhf's own digits, or a test statistic whose Asimov data depend on the point")
        problem = engine.problem(operations)
        poi = problem.poi_index
        if not (problem.lower[poi] <= 0.0 < mu <= problem.upper[poi]):
            raise _NotTogether("the tested POI value or 0 lies outside the POI bounds")
        if not np.array_equal(problem.nominal, problem.init):
            raise _NotTogether("the measurement sets initial values away from the constraints' centres")
        self.problem, self.mu, self.test_stat = problem, mu, test_stat
        self.fitter = BatchFitter(problem, fallback=False, tolerance=GROUP_TOLERANCE)
        self.entries, self.positions = _yield_entries(engine, operations, self.fitter.model, poi)
        self.base = np.asarray(self.fitter.model.arrays["nominal"])
        scan = PoiScan(problem, test_stat)
        background = scan.fits["observed mu=0"]
        if scan.several_minima or background.others:
            raise _NotTogether("the fit at mu=0 has several minima")
        self.background, self.pyhf_default = background, scan.pyhf_default
        self.asimov = scan.asimov_data
        kernels = _kernels(self.fitter.model.codes)
        self._evaluate, self._fisher_diagonal = kernels

    def hypotests(self, yields: np.ndarray) -> list[dict | None]:
        """One answer (or ``None``) per row of ``yields`` ``[G, K]``."""
        count = len(yields)
        nominal = np.tile(self.base, (count, 1))
        nominal[:, self.entries] = yields[:, self.positions]
        mu, init, n = self.mu, self.problem.init, self.fitter.n
        observed, asimov = (self.problem.main, self.problem.aux), self.asimov
        free, free_again, tested, asimov_tested = self._fits(
            nominal,
            [(observed, None, init), (observed, None, self.background.theta), (observed, mu, init), (asimov, mu, init)],
        )
        background_again, tested_again, asimov_again = self._fits(
            nominal, [(observed, 0.0, free.theta), (observed, mu, free.theta), (asimov, mu, self.background.theta)]
        )
        scale = self._scales(nominal)
        asimov_free = self._at(asimov, nominal, np.tile(self.background.theta[:n], (count, 1)), None, scale)
        gradients = {
            "free": self._at(observed, nominal, free.theta, None, scale)[1],
            "tested": self._at(observed, nominal, tested.theta, mu, scale)[1],
            "asimov tested": self._at(asimov, nominal, asimov_tested.theta, mu, scale)[1],
            "asimov free": asimov_free[1],
        }
        lowest_conditional = np.minimum(tested.twice_nll, self.background.value)
        clean = (
            np.all([part.converged for part in (free, free_again, tested, tested_again, background_again, asimov_tested,
                                                asimov_again)], axis=0)
            & (np.abs(free.twice_nll - free_again.twice_nll) <= SAME_MINIMUM)
            & (np.abs(tested.twice_nll - tested_again.twice_nll) <= SAME_MINIMUM)
            & (np.abs(asimov_tested.twice_nll - asimov_again.twice_nll) <= SAME_MINIMUM)
            & (np.abs(background_again.twice_nll - self.background.value) <= SAME_MINIMUM)
            & (free.twice_nll <= lowest_conditional + SAME_MINIMUM)
            & np.all([value <= ACCEPT_GRADIENT for value in gradients.values()], axis=0)
        )
        poi = self.problem.poi_index
        return [
            self._answer(
                {"free": free.twice_nll[i], "tested": tested.twice_nll[i], "asimov tested": asimov_tested.twice_nll[i],
                 "asimov free": asimov_free[0][i]},
                float(free.theta[i, poi]),
                {key: value[i] for key, value in gradients.items()},
            )
            if clean[i]
            else None
            for i in range(count)
        ]

    def _fits(self, nominal, fits: list) -> list:
        """For each ``(data, POI value or None, start)`` in ``fits``, that fit of every point, all
        in one call of the loop: a :class:`_Part` per entry."""
        count, n = len(nominal), self.fitter.n
        main = np.concatenate([np.tile(data[0], (count, 1)) for data, _, _ in fits])
        aux = np.concatenate([np.tile(np.asarray(data[1])[:n], (count, 1)) for data, _, _ in fits])
        poi = np.repeat([np.nan if value is None else value for _, value, _ in fits], count)
        start = np.concatenate([np.broadcast_to(np.asarray(begin)[..., :n], (count, n)) for _, _, begin in fits])
        result = self.fitter.fit(main, aux, poi, start=start, nominal=np.tile(nominal, (len(fits), 1)))
        return [_Part(result, k * count, (k + 1) * count) for k in range(len(fits))]

    def _scales(self, nominal) -> np.ndarray:
        """Per point, the one-at-a-time path's coordinates: 1 / sqrt(Fisher diagonal at the initial values)."""
        theta = np.zeros(self.fitter.model.caps.pars)
        theta[: self.fitter.n] = self.problem.init[: self.fitter.n]
        arrays = self.fitter.model.arrays
        fisher = _in_rows(lambda rows: self._fisher_diagonal(theta, rows, arrays), nominal)[0][:, : self.fitter.n]
        good = np.isfinite(fisher) & (fisher > 0)
        return np.where(good, 1.0 / np.sqrt(np.where(good, fisher, 1.0)), 1.0)

    def _at(self, data, nominal, theta, poi_value, scale):
        """``(-2 log L, projected gradient per standard deviation)`` at ``theta`` ``[G, n]``, per point."""
        fitter = self.fitter
        n, cap = fitter.n, fitter.model.caps.pars
        count = len(nominal)
        padded = np.zeros((count, cap))
        padded[:, :n] = theta[:, :n]
        aux = np.zeros((count, cap))
        aux[:, :n] = np.asarray(data[1])[:n]
        main = np.tile(np.asarray(data[0]), (count, 1))
        arrays = fitter.model.arrays
        values, gradients = _in_rows(lambda *rows: self._evaluate(*rows, arrays), padded, main, aux, nominal)
        gradient = np.asarray(gradients)[:, :n] * scale
        held = np.tile(fitter.fixed[:n], (count, 1))
        if poi_value is not None:
            held[:, fitter.poi_index] = True
        lower, upper = fitter.lower[:n], fitter.upper[:n]
        gradient = np.where(held | ((theta <= lower) & (gradient > 0)) | ((theta >= upper) & (gradient < 0)), 0.0, gradient)
        return np.asarray(values), np.max(np.abs(gradient), axis=1, initial=0.0)

    def _answer(self, values: dict, muhat: float, gradients: dict) -> dict:
        """The record of one point: CLs, the expected band and the certificate, as the one-at-a-time path's."""
        from pyhf_dist.runtime.fast.fit import asymptotic_cls, asymptotic_statistic, fit_name

        stat, mu = self.test_stat, self.mu
        qmu = asymptotic_statistic(stat, mu, values["tested"] - values["free"], muhat)
        asimov_muhat = float(self.background.theta[self.problem.poi_index])
        qmu_a = asymptotic_statistic(stat, mu, values["asimov tested"] - values["asimov free"], asimov_muhat)
        result = asymptotic_cls(qmu, qmu_a, stat, powerless_is_one=True)

        def certificate(name, start="init"):
            return {"twice_nll": float(values[name]), "gradient": float(gradients[name]), "converged": True, "start": start}

        result["converged"] = True
        # In the order the one-at-a-time path makes them.
        result["fits"] = {
            "observed mu=0": self.background.certificate(),
            "observed free": certificate("free"),
            "asimov free": certificate("asimov free", "generating point"),
            fit_name("asimov", mu): certificate("asimov tested"),
            fit_name("observed", mu): certificate("tested"),
        }
        if self.pyhf_default is not None:
            result["pyhf_default"] = dict(self.pyhf_default)
        return result


class _Part:
    """Rows ``start:stop`` of a :class:`~pyhf_dist.runtime.fast.batched.BatchResult`."""

    def __init__(self, result, start: int, stop: int):
        self.theta = result.theta[start:stop]
        self.twice_nll = result.twice_nll[start:stop]
        self.converged = result.converged[start:stop]


def _yield_entries(engine, operations, model, poi: int) -> tuple[np.ndarray, np.ndarray]:
    """Where a point's yields go in the model's nominal entries: ``(entries, positions)``, so that
    ``nominal[entries] = yields[positions]``.

    Found with two probe points whose yields are ``1, 2, 3, ...`` and ``2.5, 4.5, ...``: the
    entries that change are the added yields, and nothing else in the model may change.

    Raises:
        _NotTogether: The model depends on the yields otherwise (an uncertainty relative to
            them), or an added yield is not scaled by the POI.
    """
    from pyhf_dist.runtime.fast.batch_model import BatchModel

    count = len(_shape(operations)[1])
    probes = []
    for values in (np.arange(1.0, count + 1.0), 2.0 * np.arange(1.0, count + 1.0) + 0.5):
        probe = _with_yields(operations, values)
        probes.append({key: np.asarray(value) for key, value in BatchModel.from_problem(engine.problem(probe)).arrays.items()})
    first, second = probes
    reference = {key: np.asarray(value) for key, value in model.arrays.items()}
    if any(first[key].shape != reference[key].shape for key in reference) or any(
        not np.array_equal(first[key], second[key]) or not np.array_equal(first[key], reference[key])
        for key in reference
        if key != "nominal"
    ):
        raise _NotTogether("the model depends on the signal yields beyond its nominal yields")
    entries = np.flatnonzero(first["nominal"] != second["nominal"])
    positions = np.rint(first["nominal"][entries] - 1.0).astype(int)
    if sorted(positions.tolist()) != list(range(count)) or not np.allclose(second["nominal"][entries], 2.0 * (positions + 1.0) + 0.5):
        raise _NotTogether("the signal yields do not map one to one onto the model's entries")
    if not np.all(np.any(first["factor_par"][entries] == poi, axis=1)):
        raise _NotTogether("a signal yield is not scaled by the POI")
    return entries, positions


#: Rows per call of the evaluation kernels: every call has this shape (one compilation).
ROWS = 64


def _in_rows(function, *arrays) -> list:
    """``function`` over the rows of ``arrays`` in calls of :data:`ROWS` rows (the last padded by
    repeating its first row): the outputs, concatenated, as host arrays."""
    count = len(arrays[0])
    parts = []
    for start in range(0, count, ROWS):
        chunk = [array[start : start + ROWS] for array in arrays]
        short = ROWS - len(chunk[0])
        if short:
            chunk = [np.concatenate([part, np.repeat(part[:1], short, axis=0)]) for part in chunk]
        out = function(*chunk)
        parts.append([np.asarray(each)[: ROWS - short] for each in (out if isinstance(out, tuple) else (out,))])
    return [np.concatenate(column) for column in zip(*parts)]


def _with_yields(operations, values) -> list:
    """``operations`` with the added samples' data replaced by ``values`` (in order)."""
    out, at = [], 0
    for operation in operations:
        size = len(operation["value"]["data"])
        out.append({**operation, "value": {**operation["value"], "data": [float(v) for v in values[at : at + size]]}})
        at += size
    return out


@functools.cache
def _kernels(codes: tuple):
    """``(evaluate, fisher_diagonal)`` for models with one nominal per row, jitted.

    ``evaluate(theta [G, n], main [G, B], aux [G, n], nominal [G, E], C) -> (values [G], gradients [G, n])``;
    ``fisher_diagonal(theta [n], nominal [G, E], C) -> [G, n]``.
    """
    import jax
    import jax.numpy as jnp

    from pyhf_dist.runtime.fast.batch_model import fisher_information, kernels

    value_and_grad = kernels(codes)["value_and_grad"]

    def evaluate(theta, main, aux, nominal, C):
        return value_and_grad(theta, main, aux, dict(C, nominal=nominal))

    def fisher_diagonal(theta, nominal, C):
        return jax.vmap(lambda row: jnp.diag(fisher_information(theta, dict(C, nominal=row), codes)))(nominal)

    return jax.jit(evaluate), jax.jit(fisher_diagonal)
