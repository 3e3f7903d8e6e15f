"""The batched fitting engine: many maximum-likelihood fits of one patch in one compiled loop.

One fit on the fast path (:meth:`~pyhf_dist.runtime.fast.fit.FitProblem.fit`) drives scipy's L-BFGS-B
from Python: each of its ~200 evaluations crosses from Python to XLA and back, which costs far
more than the arithmetic. Pseudo-experiments are the same model with other data, so here many
fits advance together inside XLA, each in a *slot* of a batch:

* **Algorithm** — projected L-BFGS in the Fisher-scaled coordinates of the fast path, whose
  starting inverse Hessian is the inverse Fisher information at a reference point (for toys, the
  parameters they were generated from; the minima of the toys scatter around it). Bounds are
  pyhf's: a parameter at a bound whose gradient points outwards is held there (an active set),
  and the step of the others is the exact solution of the quadratic model with those held, a Schur
  complement of the inverse (:data:`MAX_HELD` at once); parameters fixed by the model, and the POI
  of a conditional fit, are held likewise. Steps are projected onto the bounds; an Armijo line
  search with safeguarded quadratic backtracking accepts them. A fit has converged when the
  decrease its next step promises (``g . H^-1 g``, in ``-2 log L``) is below :data:`TOLERANCE`.
* **Streaming batches** — a compiled call advances every slot a few iterations
  (:mod:`~pyhf_dist.runtime.fast.loop`); finished slots are refilled with the next fits by the host between calls,
  so a slow fit holds one slot, not a whole batch.
* **Fallback** — a fit that does not converge here (more than :data:`MAX_HELD` parameters at
  bounds, :data:`MAX_EVALUATIONS` evaluations, a line search that cannot progress away from a
  minimum) is redone one at a time by :meth:`~pyhf_dist.runtime.fast.problem.FitProblem.minimum`,
  and continued (:meth:`~pyhf_dist.runtime.fast.problem.FitProblem.continued`) where it does not
  converge there either; one that then ends below ``-RUNAWAY`` or with a bin of no events
  expecting fewer than -100 events (:func:`emptied`) has no minimum: it runs away, as the batched
  engine's own fits below ``-RUNAWAY``.

It runs wherever jax runs: on a GPU when jax sees one (large batches), on CPU otherwise
(batches of up to :data:`CPU_BATCH` slots, fewer for large models, whose arrays stay in the
processor's caches: :func:`default_batch`).

API (also for other callers, e.g. upper limits)::

    fitter = BatchFitter(problem)                    # a FitProblem of the fast path
    result = fitter.fit(main, aux, poi_values=None)  # main [N, bins], aux [N, >= n_pars]
    result.theta        # [N, n_pars] parameters at the minima, in pyhf's order
    result.twice_nll    # [N] -2 log L at the minima, up to a constant of each dataset
    result.converged    # [N] bool; result.evaluations [N]; result.fallbacks (count)

``poi_values`` holds one value per fit: a number fixes the POI there (a conditional fit, as
``pyhf.infer.mle.fixed_poi_fit``), NaN leaves it free (``pyhf.infer.mle.fit``). Fits start from
the suggested initial values (the POI set for conditional fits), as pyhf's, unless ``start`` is
given; ``metric_at`` chooses the reference point of the starting inverse Hessian (default: the
suggested initial values).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from pyhf_dist.runtime.fast import loop
from pyhf_dist.runtime.fast.batch_model import BatchModel, kernels
from pyhf_dist.runtime.fast.loop import MAX_EVALUATIONS
from pyhf_dist.runtime.fast.quasi_newton import MAX_HELD

__all__ = [
    "BatchFitter",
    "BatchResult",
    "CPU_BATCH",
    "GPU_BATCH",
    "MAX_EVALUATIONS",
    "MAX_HELD",
    "TOLERANCE",
    "default_batch",
]

log = logging.getLogger(__name__)

#: Convergence: the decrease of -2 log L the next quasi-Newton step promises. pyhf's SLSQP
#: stops at changes of ~1e-6 (its toys' statistics agree with these to ~1e-6 on 1Lbb); test
#: statistics are wanted to ~1e-4.
TOLERANCE = 1e-7
#: Slots of a batch on a CPU, at most, and on a GPU.
CPU_BATCH = 64
GPU_BATCH = 4096
#: On a CPU, slots times parameters at most (cache-sized: each slot keeps an L-BFGS memory of
#: 2 x 8 vectors of its parameters, and the slots' arrays stay in a core's cache). Models with more
#: parameters get fewer slots, a power of two: 1,000 toys of each hypothesis in each of two
#: processes on two cores took 10.7-13.6 s with 32 slots against 12.0-16.0 s with 64 for a 1Lbb
#: patch (126 parameters), 13.7-16.8 against 15.5-18.5 s for a stau patch (120); 3L-eRJR (70)
#: ran faster with 64.
CPU_SLOT_PARAMETERS = 4608
#: Iterations per compiled call between refills, on a CPU and on a GPU.
CPU_STEPS = 8
GPU_STEPS = 32


def default_batch(device=None, parameters: int | None = None) -> tuple[int, int]:
    """``(slots, iterations per call)`` for ``device`` (default: jax's default device) and a model
    of ``parameters`` parameters.

    >>> import jax
    >>> default_batch(jax.devices("cpu")[0], parameters=132)
    (32, 8)
    >>> default_batch(jax.devices("cpu")[0], parameters=72)
    (64, 8)
    """
    import jax

    device = device or jax.devices()[0]
    if device.platform == "cpu":
        slots = CPU_BATCH
        while parameters and slots > 8 and slots * parameters > CPU_SLOT_PARAMETERS:
            slots //= 2
        return slots, CPU_STEPS
    return GPU_BATCH, GPU_STEPS


@dataclasses.dataclass
class BatchResult:
    """Minima of a batch of fits.

    Attributes:
        theta: ``[N, n_pars]`` parameters (NaN rows where a fit failed).
        twice_nll: ``[N]`` ``-2 log L`` at the minima up to a constant of each dataset (the fast
            path's objective: differences between fits of one dataset are pyhf's).
        converged: ``[N]``.
        evaluations: ``[N]`` evaluations of the likelihood in the batch (fallback fits not counted).
        fallbacks: Fits redone one at a time.
        runaway: ``[N]`` fits stopped below ``-RUNAWAY``, or redone one at a time without
            converging and then found to follow data without a minimum (see
            :meth:`BatchFitter.fit`; not converged; their point and value are where they stopped).
        joined: ``[N]`` probes stopped in the basin of the minimum they were given (not
            converged; see :meth:`BatchFitter.fit`).
    """

    theta: np.ndarray
    twice_nll: np.ndarray
    converged: np.ndarray
    evaluations: np.ndarray
    fallbacks: int = 0
    runaway: np.ndarray | None = None
    joined: np.ndarray | None = None


class BatchFitter:
    """Batches of fits of one :class:`~pyhf_dist.runtime.fast.fit.FitProblem`.

    Args:
        problem: The patch on the fast path (its layout, bounds, fixed parameters, scaling).
        device: Where to run (default: jax's default device, a GPU when there is one).
        batch: Slots per batch (default :func:`default_batch`).
        steps: Iterations per compiled call (default :func:`default_batch`).
        fallback: Redo fits that do not converge one at a time, on ``problem`` (else they are
            reported).
        tolerance: The convergence threshold (default :data:`TOLERANCE`).
    """

    def __init__(
        self,
        problem,
        *,
        device=None,
        batch: int | None = None,
        steps: int | None = None,
        fallback: bool = True,
        tolerance: float = TOLERANCE,
    ):
        import jax

        self.problem = problem
        self.device = device or jax.devices()[0]
        self.model = BatchModel.from_problem(problem)
        default_slots, default_steps = default_batch(self.device, self.model.caps.pars)
        self.batch = int(batch or default_slots)
        self.steps = int(steps or default_steps)
        self.fallback = fallback
        n, cap = self.model.n, self.model.caps.pars
        self.n = n
        self.poi_index = int(problem.poi_index)

        def pad(values, fill):
            out = np.full(cap, fill, dtype=np.asarray(values).dtype)
            out[:n] = np.asarray(values)[:n]
            return out

        self.scale = pad(problem.scale, 1.0)
        self.fixed = pad(problem.fixed, True)
        self.init = pad(problem.init, 0.0)
        self.lower = pad(problem.lower, 0.0)
        self.upper = pad(problem.upper, 0.0)
        #: The model's arrays on the fitter's device.
        self.device_arrays = jax.device_put(self.model.arrays, self.device)
        self._consts_base = jax.device_put(
            {
                "lo": self.lower / self.scale,
                "hi": self.upper / self.scale,
                "scale": self.scale,
                "fixed": self.fixed,
                "tolerance": float(tolerance),
            },
            self.device,
        )
        self._metrics: dict = {}

    # ----------------------------------------------------------------------------------- API

    def fit(self, main, aux, poi_values=None, start=None, metric_at=None, nominal=None, known=None,
            fallback: bool | None = None, progress=None) -> BatchResult:
        """Minimise ``-2 log L`` for every dataset (row) of ``main`` and ``aux``.

        Args:
            main: ``[N, bins]`` main data.
            aux: ``[N, k]`` auxiliary data per parameter (``k >= n_pars``: the fast path's
                parameter order, as ``FitProblem.aux``; entries of unconstrained parameters are
                ignored).
            poi_values: ``[N]``: the POI value of each conditional fit, NaN for a free fit;
                ``None``: all free.
            start: ``[N, >= n_pars]`` starting points (default: the suggested initial values);
                fixed parameters are held at their suggested values whatever ``start`` says.
            metric_at: ``[>= n_pars]`` the reference point of the starting inverse Hessian.
            nominal: ``[N, entries]`` each fit's own nominal yields (``model.arrays["nominal"]``
                with other values: models that differ from this one in their yields alone, such
                as signal hypotheses of one template); ``None``: this model's.
            known: ``(theta [N, >= n_pars], twice_nll [N])``: a minimum already found for each fit
                (the same data and POI value); the fits are then probes of its basin, as the
                one-at-a-time path's further starts: a fit stops (``joined``) once it is within
                :data:`~pyhf_dist.runtime.fast.problem.PROBE_RADIUS` of that minimum in every
                coordinate without having gone below it, and is fitted to its own minimum
                otherwise. Rows with an infinite value are plain fits.
            fallback: Redo a fit that does not converge here one at a time (default: the
                fitter's own ``fallback``); ``False`` reports it as lost instead (for further
                starts, whose fit already has a minimum).
            progress: Called with the fraction of the fits finished in the batch, as they finish.

        Returns:
            A :class:`BatchResult`.
        """
        main = np.atleast_2d(np.asarray(main, dtype=float))
        count = main.shape[0]
        n, cap = self.n, self.model.caps.pars
        aux_rows = np.zeros((count, cap))
        aux_rows[:, :n] = np.asarray(aux, dtype=float).reshape(count, -1)[:, :n]
        poi = np.full(count, np.nan) if poi_values is None else np.asarray(poi_values, dtype=float).reshape(count)
        theta0 = np.tile(self.init, (count, 1))
        if start is not None:
            # Where a fit starts, not the model: fixed parameters stay at their suggested values.
            given = np.asarray(start, dtype=float).reshape(count, -1)[:, :n]
            theta0[:, :n] = np.where(self.fixed[:n], self.init[:n], given)
        pinned = np.zeros((count, cap), dtype=bool)
        conditional = ~np.isnan(poi)
        theta0[conditional, self.poi_index] = poi[conditional]
        pinned[conditional, self.poi_index] = True
        x0 = np.clip(theta0 / self.scale, self.lower / self.scale, self.upper / self.scale)
        x0 = np.where(self.fixed | pinned, theta0 / self.scale, x0)
        reference = self.init if metric_at is None else np.concatenate([np.asarray(metric_at, dtype=float)[:n], self.init[n:]])
        if nominal is not None:
            nominal = np.asarray(nominal, dtype=float).reshape(count, -1)
        target = None
        if known is not None:
            target_theta = np.tile(self.init, (count, 1))
            target_theta[:, :n] = np.asarray(known[0], dtype=float).reshape(count, -1)[:, :n]
            target = (target_theta / self.scale, np.asarray(known[1], dtype=float).reshape(count))
        theta, values, status, evaluations = self._stream(x0, main, aux_rows, pinned, reference, nominal, target,
                                                          progress)
        converged = status == loop.CONVERGED
        runaway = status == loop.RAN_AWAY
        joined = status == loop.JOINED
        fallbacks = 0
        if self.fallback if fallback is None else fallback:
            for i in np.flatnonzero(~converged & ~runaway & ~joined):
                fallbacks += 1
                redone = self._one_at_a_time(main[i], aux_rows[i], theta0[i], poi[i])
                theta[i], values[i], converged[i], runaway[i] = redone
        lost = ~converged & ~runaway & ~joined
        theta[lost] = np.nan
        values[lost] = np.nan
        return BatchResult(theta[:, :n], values, converged, evaluations, fallbacks, runaway, joined)

    def yields(self, theta) -> np.ndarray:
        """Expected main data ``[N, bins]`` at the parameters ``theta`` (``[N, >= n_pars]``; rows
        of NaN give NaN), computed a batch of rows at a time (one shape: one compilation)."""
        import jax

        theta = np.atleast_2d(np.asarray(theta, dtype=float))
        rows = np.tile(self.init, (self.batch, 1))
        compute = kernels(self.model.codes)["yields"]
        out = np.zeros((len(theta), self.model.caps.bins))
        for first in range(0, len(theta), self.batch):
            block = theta[first : first + self.batch, : self.n]
            rows[:] = self.init
            rows[: len(block), : self.n] = block
            found = compute(jax.device_put(rows, self.device), self.device_arrays)
            out[first : first + len(block)] = np.asarray(found)[: len(block)]
        return out

    # ------------------------------------------------------------------------------ internals

    def metric(self, reference):
        """Inverse Fisher information at ``reference`` over the free parameters (scaled), on the device."""
        import jax

        key = reference.tobytes()
        if key not in self._metrics:
            fisher = np.asarray(kernels(self.model.codes)["fisher"](reference, self.device_arrays))
            fisher = fisher * np.outer(self.scale, self.scale)
            free = ~self.fixed
            block = fisher[np.ix_(free, free)]
            # A parameter nothing depends on (zero information) gets unit curvature: its
            # gradient is zero, so it never moves, whatever the metric says.
            flat = np.diag(block) <= 1e-12 * max(1.0, float(np.max(np.diag(block), initial=1.0)))
            block = block + np.diag(flat.astype(float))
            inverse = np.zeros_like(fisher)
            try:
                inverse[np.ix_(free, free)] = np.linalg.inv(block)
            except np.linalg.LinAlgError:
                inverse[np.ix_(free, free)] = np.linalg.pinv(block)
            if not np.all(np.isfinite(inverse)):
                inverse = np.diag(np.where(free, 1.0 / np.maximum(np.diag(fisher), 1e-12), 0.0))
            self._metrics[key] = jax.device_put(inverse, self.device)
        return self._metrics[key]

    def _stream(self, x0, main, aux, pinned, reference, nominal=None, target=None, progress=None):
        """Run every fit through the slots of one batch; returns host arrays."""
        # Always the full batch, however few fits, and plain fits as probes of a minimum at
        # +inf, which they never join: one compiled loop per process and device for both (each
        # compilation takes seconds: 1Lbb toys on an empty cache started 4 s sooner so).
        compiled = loop.compiled(self.model.codes, self.batch, self.steps, nominal is not None)
        rows_of = {"main": main, "aux": aux, "x0": x0, "pinned": pinned}
        if nominal is not None:
            rows_of["nominal"] = nominal
        rows_of["target"], rows_of["target_f"] = target if target is not None else (x0, np.full(len(x0), np.inf))
        consts = dict(self._consts_base, h0inv=self.metric(reference))
        out = loop.stream(compiled, self.batch, self.device, rows_of, consts, self.device_arrays, progress)
        theta = out["x"] * self.scale
        return theta, out["f"], out["status"], out["evaluations"]

    def _one_at_a_time(self, main, aux, theta0, poi):
        """A fit redone by the one-at-a-time minimizer: ``(theta, value, converged, runaway)``.

        One that does not converge there either is continued (:meth:`FitProblem.continued`). A fit
        that ends below ``-RUNAWAY`` or :func:`emptied` runs away: the data have no minimum, and
        the point and value are where it stopped. Otherwise one that has not converged now is
        lost (NaN).
        """
        problem = self.problem
        n = self.n
        full_aux = np.array(problem.aux, dtype=float)
        full_aux[:n] = aux[:n]
        start = np.array(problem.init, dtype=float)
        start[:n] = theta0[:n]
        poi_value = None if np.isnan(poi) else float(poi)
        out = self.init.copy()
        found = problem.minimum(main, full_aux, {"init": start}, poi_value)
        if not found.converged:
            found = problem.continued(main, full_aux, found, poi_value)
        expected = np.asarray(problem.functions.expected(found.theta, problem.layout)[0])
        if found.value < -loop.RUNAWAY or emptied(main, expected):
            out[:n] = found.theta[:n]
            return out, found.value, False, True
        if found.converged:
            out[:n] = found.theta[:n]
            return out, found.value, True, False
        return np.full(len(self.init), np.nan), np.nan, False, False


def emptied(main, expected) -> np.ndarray:
    """Whether a bin of no events in ``main`` expects fewer than ``NO_MINIMUM_YIELD`` events in
    ``expected`` (per row, for ``[N, bins]``): the fit has followed data without a minimum, as far as
    the bounds let it (:mod:`pyhf_dist.runtime.toys`, the criterion for plain pyhf's fits too).
    """
    from pyhf_dist.runtime.toys import NO_MINIMUM_YIELD

    with np.errstate(invalid="ignore"):
        return np.any((np.asarray(main) == 0) & (np.asarray(expected) < NO_MINIMUM_YIELD), axis=-1)
