"""The quasi-Newton direction of the batched engine (:mod:`~pyhf_dist.runtime.fast.batched`), per slot.

The L-BFGS two-loop recursion over the parameters that move, with the starting inverse Hessian
restricted to them by a Schur complement (parameters held at bounds or at a fixed POI value stay
where they are): small dense solves written elementwise over the slots of a batch. Also the
update of each slot's L-BFGS memory (:func:`remember`).
"""

from __future__ import annotations

__all__ = ["MAX_HELD", "direction", "held_solve", "remember", "spd_solve"]

#: Parameters held at bounds (or at a fixed POI value) beyond the model's fixed ones, at once.
MAX_HELD = 4


def direction(g, S, Y, rho, held, bound, pinned, h0inv):
    """The L-BFGS step over the free parameters (``held`` and ``bound`` ones stay), and whether it exists."""
    import jax.numpy as jnp

    import jax

    free = ~held & ~bound
    memory = rho.shape[1]

    # Loops rather than unrolled Python: the compiled program stays small (compilation time).
    def newest_first(j, carry):
        q, coefficients = carry
        i = memory - 1 - j
        a = rho[:, i] * jnp.sum(S[:, i] * q, -1)
        return q - a[:, None] * Y[:, i], coefficients.at[:, i].set(a)

    q, coefficients = jax.lax.fori_loop(0, memory, newest_first, (jnp.where(free, g, 0.0), jnp.zeros_like(rho)))
    r, solvable = held_solve(q, bound | pinned, h0inv)

    def oldest_first(i, r):
        b = rho[:, i] * jnp.sum(Y[:, i] * r, -1)
        return r + S[:, i] * (coefficients[:, i] - b)[:, None]

    r = jax.lax.fori_loop(0, memory, oldest_first, jnp.where(free, r, 0.0))
    return -jnp.where(free, r, 0.0), solvable


def held_solve(q, held, h0inv):
    """``(H restricted to the parameters not held)^-1 q`` from ``H^-1``, for up to MAX_HELD held.

    With ``z = H^-1 q``, the solution keeping the held ones at zero is
    ``z - H^-1[:, A] (H^-1[A, A])^-1 z[A]`` (a Schur complement): a ``k x k`` solve per slot.
    ``h0inv`` is one ``[n, n]`` matrix for every slot, or ``[slots, n, n]``, one per slot.
    """
    import jax.numpy as jnp

    k = MAX_HELD
    n = held.shape[-1]
    per_slot = h0inv.ndim == 3
    z = jnp.einsum("sn,snm->sm", q, h0inv) if per_slot else q @ h0inv
    # The first k held indices, in order, from a running count: XLA's top_k on a CPU sorts, and
    # cost as much as the rest of an iteration's algebra (1Lbb, 64 slots: 0.43 of 0.9 ms).
    rank = jnp.cumsum(held, axis=-1) - 1
    picks = held[:, None, :] & (rank[:, None, :] == jnp.arange(k)[None, :, None])  # [slots, k, n]
    valid = jnp.any(picks, axis=-1)
    order = jnp.sum(jnp.where(picks, jnp.arange(n), 0), axis=-1)
    # [slots, k, n]: rows of a symmetric matrix
    columns = jnp.take_along_axis(h0inv, order[:, :, None], axis=1) if per_slot else jnp.take(h0inv, order, axis=0)
    block = jnp.take_along_axis(columns, order[:, None, :], axis=2)
    block = jnp.where(valid[:, :, None] & valid[:, None, :], block, jnp.eye(k))
    z_held = jnp.where(valid, jnp.take_along_axis(z, order, axis=1), 0.0)
    solution = spd_solve(block, z_held)
    return z - jnp.einsum("skn,sk->sn", columns, solution), jnp.sum(held, axis=-1) <= k


def spd_solve(matrix, rhs):
    """Solve ``k x k`` symmetric positive definite systems per slot, unrolled (``k`` is small).

    Elementwise over slots: a batched LAPACK call per slot costs more than the arithmetic.
    """
    import jax.numpy as jnp

    k = matrix.shape[-1]
    lower = [[None] * k for _ in range(k)]
    for j in range(k):
        pivot = matrix[:, j, j] - sum(lower[j][p] ** 2 for p in range(j))
        pivot = jnp.sqrt(jnp.maximum(pivot, 1e-300))
        lower[j][j] = pivot
        for i in range(j + 1, k):
            lower[i][j] = (matrix[:, i, j] - sum(lower[i][p] * lower[j][p] for p in range(j))) / pivot
    forward = []
    for i in range(k):
        forward.append((rhs[:, i] - sum(lower[i][p] * forward[p] for p in range(i))) / lower[i][i])
    solution = [None] * k
    for i in reversed(range(k)):
        solution[i] = (forward[i] - sum(lower[p][i] * solution[p] for p in range(i + 1, k))) / lower[i][i]
    return jnp.stack(solution, axis=-1)


def remember(s, accepted, step, y, moving):
    """The L-BFGS memory of ``s`` with the pair ``(step, y)`` pushed where a step was
    ``accepted`` with positive curvature: ``(S, Y, rho)``; ``y`` is kept on the ``moving``
    parameters only. The newest pair last; ``rho = 0`` marks an empty entry."""
    import jax.numpy as jnp

    sy = jnp.sum(step * y, -1)
    curvature = sy > 1e-10 * jnp.sqrt(jnp.sum(step * step, -1) * jnp.sum(y * y, -1))
    update = accepted & curvature

    def push(memory, item):
        shape = (-1,) + (1,) * (memory.ndim - 1)
        return jnp.where(update.reshape(shape), jnp.concatenate([memory[:, 1:], item[:, None]], 1), memory)

    return push(s["S"], step), push(s["Y"], jnp.where(moving, y, 0.0)), push(s["rho"], 1.0 / jnp.where(update, sy, 1.0))
