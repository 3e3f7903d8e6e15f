"""The batched engine's compiled loop: many fits advancing together, one per slot of a batch.

The algorithm is described in :mod:`~pyhf_dist.runtime.fast.batched`: projected L-BFGS in
Fisher-scaled coordinates, an Armijo line search, an active set of parameters held at bounds.
Here are its parts: :func:`iteration` (one line-search trial of every slot), :func:`compiled`
(the jitted ``advance``, ``refill`` and ``empty`` of one kind of batch) and :func:`stream` (fits
through the slots of a batch, finished slots refilled by the host between calls). Its users:
:class:`~pyhf_dist.runtime.fast.batched.BatchFitter` (fits of one patch) and
:class:`~pyhf_dist.runtime.fast.group.GroupFitter` (fits of several patches, each slot its own).
"""

from __future__ import annotations

import functools

import numpy as np

from pyhf_dist.runtime.fast import quasi_newton
from pyhf_dist.runtime.fast.batch_model import kernels
from pyhf_dist.runtime.fast.problem import PROBE_RADIUS, SAME_MINIMUM

__all__ = [
    "CONVERGED",
    "MAX_EVALUATIONS",
    "PER_PATCH",
    "ROW_DATA",
    "compiled",
    "iteration",
    "stream",
]

#: Below this promised decrease a line search that cannot progress is at the floating-point
#: floor of the objective: converged.
STALL_TOLERANCE = 1e-6
#: An accepted step lowering -2 log L by less than this (relative to max(1, |value|)) makes no
#: progress; :data:`FLAT_STEPS` such steps or failed line searches in a row end a fit as
#: converged. This stops fits whose minimum lies where an expected yield reaches zero (a toy
#: with an empty bin that the nuisance parameters can empty too): the objective flattens into a
#: kink there and no step promises less, but its value is settled to this precision.
FLAT = 1e-9
FLAT_STEPS = 4
#: The objective is >= 0 wherever every expected yield is >= 0; it goes below only through
#: negative yields of empty bins, which pyhf allows (see
#: :func:`~pyhf_dist.runtime.fast.likelihood.expected_for_poisson`). Below -RUNAWAY a fit has left any
#: physical region (an empty bin expecting hundreds of events below zero, parameters at their
#: bounds): the likelihood has no minimum there, pyhf's minimizer stops wherever it fails, and
#: the fit is stopped and reported as such (:attr:`BatchResult.runaway`).
RUNAWAY = 1e3
#: Largest change of one parameter in a trial step, in standard deviations (scaled coordinates).
STEP_LIMIT = 2.0
#: Evaluations after which a fit is handed to the one-at-a-time minimizer.
MAX_EVALUATIONS = 400
#: Pairs of the L-BFGS memory.
MEMORY = 8
#: Armijo's sufficient-decrease constant.
ARMIJO = 1e-4
#: Slot states. A probe has JOINED once it is within PROBE_RADIUS of the minimum it was given;
#: RAN_AWAY: stopped below -RUNAWAY.
RUNNING, CONVERGED, FAILED, IDLE, RAN_AWAY, JOINED = 0, 1, 2, 3, 4, 5


#: Per-fit data a slot's state holds besides its iterate (filled in by ``refill``).
ROW_DATA = ("main", "aux", "nominal", "target", "target_f", "patch")
#: Constants that differ between the patches of a group (``compiled(..., per_patch=True)``).
PER_PATCH = ("lo", "hi", "scale", "fixed", "h0inv")


def stream(compiled, slots: int, device, rows_of: dict, consts: dict, arrays, progress=None) -> dict:
    """Run every fit (row of ``rows_of``: ``main``, ``aux``, ``x0``, ``pinned``, ...) through the
    ``slots`` of one batch with ``compiled = (advance, refill, empty)``, refilling finished slots;
    ``progress``, if given, is called with the fraction of the fits finished as they finish.

    Returns:
        Host arrays per fit: ``x`` (scaled), ``f``, ``g`` (scaled, zero where held), ``status``,
        ``evaluations``.
    """
    import jax

    advance, refill, empty = compiled
    count = len(rows_of["x0"])
    put = functools.partial(jax.device_put, device=device)
    state = empty({
        key: put(np.zeros((slots,) + rows_of[key].shape[1:], dtype=rows_of[key].dtype))
        for key in ROW_DATA if key in rows_of
    })
    owner = np.full(slots, -1)
    out = {
        "x": np.full(rows_of["x0"].shape, np.nan),
        "g": np.full(rows_of["x0"].shape, np.nan),
        "f": np.full(count, np.nan),
        "status": np.full(count, FAILED),
        "evaluations": np.zeros(count, dtype=int),
    }
    following, finished = 0, 0
    while True:
        idle = np.flatnonzero(owner < 0)
        if following < count and len(idle):
            take = idle[: count - following]
            fits = np.arange(following, following + len(take))
            following += len(take)
            owner[take] = fits
            mask = np.zeros(slots, dtype=bool)
            mask[take] = True
            rows = np.zeros(slots, dtype=int)
            rows[take] = fits
            # One transfer for all of them: 0.23 ms per refill against 0.32 ms an array at a time.
            state = refill(state, *put((mask, {key: value[rows] for key, value in rows_of.items()})))
        if not np.any(owner >= 0):
            break
        state = advance(state, consts, arrays)
        slot_status = np.asarray(state["status"])
        done = np.flatnonzero((owner >= 0) & (slot_status != RUNNING))
        if len(done):
            fits = owner[done]
            for key in ("x", "g", "f", "evaluations"):
                out[key][fits] = np.asarray(state[key])[done]
            out["status"][fits] = slot_status[done]
            owner[done] = -1
            finished += len(done)
            if progress is not None:
                progress(finished / count)
    return out


@functools.cache
def compiled(codes: tuple, slots: int, steps: int, own_nominal: bool = False, per_patch: bool = False):
    """``(advance, refill, empty)``, jitted, for interpolation ``codes`` and ``slots``; with
    ``own_nominal``, each slot's fit has its own nominal yields (the slot state's ``nominal``);
    where the rows carry ``target`` and ``target_f``, each slot's fit is a probe of that known
    minimum (seen when tracing); with ``per_patch``, the model arrays and the constants of :data:`PER_PATCH` have a leading
    axis of patches and each slot's fit reads those of its own (the slot state's ``patch``)."""
    import jax
    import jax.numpy as jnp

    value_and_grad = kernels(codes)["value_and_grad_per_row" if per_patch else "value_and_grad"]

    def empty(rows):
        n = rows["aux"].shape[1]
        zeros = jnp.zeros((slots, n))
        # Typed, not weak as a Python scalar makes them: the state advance() returns is typed, and
        # a first call with weak types traced and compiled the loop a second time.
        infinite = jnp.full(slots, jnp.inf, zeros.dtype)
        return {
            "x": zeros, "f": infinite, "g": zeros, "d": zeros, "alpha": jnp.zeros(slots),
            "S": jnp.zeros((slots, MEMORY, n)), "Y": jnp.zeros((slots, MEMORY, n)), "rho": jnp.zeros((slots, MEMORY)),
            "active": jnp.zeros((slots, n), bool), "status": jnp.full(slots, IDLE, jnp.int32),
            "evaluations": jnp.zeros(slots, jnp.int32), "decrement": infinite,
            "flat": jnp.zeros(slots, jnp.int32), "pinned": jnp.zeros((slots, n), bool), **rows,
        }

    def refill(state, mask, rows):
        fresh = empty({key: rows[key] for key in ROW_DATA if key in rows})
        fresh.update(x=rows["x0"], pinned=rows["pinned"], status=jnp.zeros(slots, jnp.int32))

        def pick(new, old):
            shape = (slots,) + (1,) * (old.ndim - 1)
            return jnp.where(mask.reshape(shape), new, old)

        return jax.tree_util.tree_map(pick, fresh, state)

    def advance(state, consts, C):
        if per_patch:
            # A slot keeps its patch until it is refilled between calls: its arrays are gathered
            # once per call, not in every evaluation.
            which = state["patch"]
            C = jax.tree_util.tree_map(lambda array: array[which], C)
            consts = dict(consts, **{key: consts[key][which] for key in PER_PATCH})

        def evaluate(x, s):
            model = dict(C, nominal=s["nominal"]) if own_nominal else C
            values, gradients = value_and_grad(x * consts["scale"], s["main"], s["aux"], model)
            return values, gradients * consts["scale"]

        def body(carry):
            count, s = carry
            return count + 1, iteration(s, consts, evaluate)

        def cond(carry):
            count, s = carry
            return (count < steps) & jnp.any(s["status"] == RUNNING)

        return jax.lax.while_loop(cond, body, (0, state))[1]

    return jax.jit(advance), jax.jit(refill), jax.jit(empty)


def iteration(s, consts, evaluate):
    """One line-search trial of every running slot, and a new direction where it was accepted.

    ``consts`` holds the bounds ``lo`` and ``hi`` (scaled), the ``fixed`` parameters, the starting
    inverse Hessian ``h0inv`` and the ``tolerance``: one set for every slot (``[n]``, ``[n, n]``),
    or one per slot (``[slots, n]``, ``[slots, n, n]``: slots fitting different patches, see
    :mod:`~pyhf_dist.runtime.fast.group`). ``evaluate(x, s)`` gives each slot's value and gradient
    in the scaled coordinates.
    """
    import jax.numpy as jnp

    lo, hi, h0inv = consts["lo"], consts["hi"], consts["h0inv"]
    held = consts["fixed"] | s["pinned"]  # fixed: [n] for every slot, or [slots, n]
    running = s["status"] == RUNNING
    x, f, g = s["x"], s["f"], s["g"]
    trial = jnp.where(held, x, jnp.clip(x + s["alpha"][:, None] * s["d"], lo, hi))
    f_trial, g_trial = evaluate(trial, s)
    g_trial = jnp.where(held, 0.0, g_trial)
    step = trial - x
    predicted = jnp.sum(g * step, -1)
    finite = jnp.isfinite(f_trial) & jnp.all(jnp.isfinite(g_trial), -1)
    fresh = jnp.isinf(f)
    moved = jnp.any(step != 0, -1)
    accept = running & finite & (fresh | (moved & (f_trial <= f + ARMIJO * predicted)))

    # Stored masked to the parameters that move (fixed, pinned and bound ones do not; a change of
    # the bound set clears the memory below), so the two-loop recursion needs no masks.
    moving = ~held & ~(((trial <= lo) & (g_trial > 0)) | ((trial >= hi) & (g_trial < 0)))
    S, Y, rho = quasi_newton.remember(s, accept & ~fresh, step, g_trial - g, moving)
    x = jnp.where(accept[:, None], trial, x)
    f = jnp.where(accept, f_trial, f)
    g = jnp.where(accept[:, None], g_trial, g)

    # Rejected: backtrack to the minimum of the quadratic through f, its slope and f_trial,
    # kept within [0.1, 0.5] of the step.
    reject = running & ~accept
    excess = f_trial - f - predicted
    shrink = jnp.where(finite & (excess > 0), jnp.clip(-predicted / (2.0 * jnp.where(excess > 0, excess, 1.0)), 0.1, 0.5), 0.1)
    alpha = jnp.where(reject, s["alpha"] * shrink, 0.0)
    stalled = reject & ((alpha < 1e-10) | ~moved)
    has_memory = jnp.any(rho != 0, -1)
    restart = stalled & has_memory

    bound = ~held & (((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0)))
    changed = jnp.any(bound != s["active"], -1)
    rho = jnp.where((restart | (accept & changed))[:, None], 0.0, rho)
    direction, solvable = quasi_newton.direction(g, S, Y, rho, held, bound, s["pinned"], h0inv)
    renew = accept | restart
    d = jnp.where(renew[:, None], direction, s["d"])
    # A trial step moves no parameter by more than STEP_LIMIT (standard deviations, in these
    # coordinates): fits stay in the basin of their starting point, as pyhf's do.
    longest = jnp.max(jnp.abs(direction), -1)
    first = jnp.minimum(1.0, STEP_LIMIT / jnp.where(longest > 0, longest, 1.0))
    alpha = jnp.where(renew, first, alpha)
    decrement = jnp.where(renew, -jnp.sum(g * direction, -1), s["decrement"])

    evaluations = s["evaluations"] + running
    progress = accept & ~fresh & (s["f"] - f_trial > FLAT * jnp.maximum(1.0, jnp.abs(f_trial)))
    flat = jnp.where(progress, 0, s["flat"] + ((accept & ~fresh) | stalled))
    converged = (
        (renew & (decrement < consts["tolerance"]))
        | (stalled & ~has_memory & (s["decrement"] < STALL_TOLERANCE))
        | (flat >= FLAT_STEPS)
    )
    failed = (
        (stalled & ~has_memory & ~converged)
        | (fresh & ~finite)
        | (renew & ~solvable)
        | (evaluations >= MAX_EVALUATIONS)
    )
    # Below zero the fit is following an empty bin's yield below zero; one that fails there, or
    # goes on below -RUNAWAY, has no minimum to find.
    runaway = (f < -RUNAWAY) | (failed & (f < 0))
    status = jnp.where(running & converged, CONVERGED, jnp.where(running & failed, FAILED, s["status"]))
    status = jnp.where(running & runaway, RAN_AWAY, status)
    if "target" in s:  # probes (resolved when tracing): stop in the basin of the known minimum
        near = jnp.max(jnp.abs(x - s["target"]), -1) < PROBE_RADIUS
        joined = running & accept & ~fresh & near & (f >= s["target_f"] - SAME_MINIMUM)
        status = jnp.where(joined & (status == RUNNING), JOINED, status)
    out = dict(s)
    out.update(
        x=x, f=f, g=g, d=d, alpha=alpha, S=S, Y=Y, rho=rho, active=jnp.where(renew[:, None], bound, s["active"]),
        status=status, evaluations=evaluations, decrement=decrement, flat=flat,
    )
    return out
