"""The DPM-Solver++ multistep update (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its
third-order form), one step of it for any process ``x_t = alpha_t x0 + sigma_t eps``.

In ``lambda = log(alpha / sigma)`` the probability-flow ODE reads
``d(x / sigma) / d lambda = e^lambda D`` (D the x0 prediction), whose exact solution from
``lambda`` to ``lambda + h`` is ``x' = (sigma' / sigma) x + sigma' int e^lambda D``. DPM-Solver++
integrates D extrapolated through the current and past predictions exactly:
``x' = (sigma' / sigma) x - alpha' phi_1 D_0 + alpha' C``, ``phi_1 = expm1(-h)``, with ``C = 0``
(first order, DDIM), ``C = -phi_1 / (2 r_0) (D_0 - D_1)`` (2M) or ``C = phi_2 d_1 - 2 phi_3 d_2``
(3M: the quadratic through three predictions; ``phi_2 = phi_1 / h + 1``,
``phi_3 = phi_2 / h - 1/2``, ``d_2 = ((D_0 - D_1) / r_0 - (D_1 - D_2) / r_1) / (r_0 + r_1)``
is ``h^2 D'' / 2`` and ``d_1 = (D_0 - D_1) / r_0 + r_0 d_2`` is ``h D'``), where ``r_k = h_k / h``
are the past steps in lambda. While the history is short the step is of lower order.

Used by ``sampling`` (DDPM's discrete grid) and ``ode_sampling`` (the continuous processes).
"""

from __future__ import annotations

import jax.numpy as jnp


def init_history(order: int, x):
    """The history of an ``order``-step method before its first step: ``(past_x0 [order-1,
    ...], past_h [order-1])``, newest first (placeholders: step ``i`` uses ``min(i, order-1)``
    of them)."""
    return (jnp.zeros((order - 1,) + x.shape, x.dtype), jnp.ones((order - 1,), x.dtype))


def step(order: int, x, x0, i, h, sigma_ratio, alpha_next, history):
    """One DPM-Solver++ step of ``order`` (2 or 3) from ``x`` with x0 prediction ``x0``.

    Args:
      x, x0: the state and its x0 prediction ``[B, ...]``.
      i: the index of this step in the chain (0 first; int scalar, may be traced).
      h: the step in lambda (> 0), ``sigma_ratio = sigma_next / sigma`` and ``alpha_next``:
        scalars of the grid.
      history: ``init_history`` or the previous step's.
    Returns:
      ``(x_next, history)``.
    """
    phi_1 = jnp.expm1(-h)
    x_next = sigma_ratio * x - alpha_next * phi_1 * x0
    past_x0, past_h = history
    r_0 = past_h[0] / h
    d1_0 = (x0 - past_x0[0]) / r_0
    correction = jnp.where(i >= 1, -0.5 * phi_1 * d1_0, 0.0)
    if order >= 3:
        r_1 = past_h[1] / h
        d_2 = (d1_0 - (past_x0[0] - past_x0[1]) / r_1) / (r_0 + r_1)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        correction = jnp.where(i >= 2, phi_2 * (d1_0 + r_0 * d_2) - 2.0 * phi_3 * d_2, correction)
    history = (
        jnp.concatenate([x0[None], past_x0[:-1]]),
        jnp.concatenate([jnp.reshape(h, (1,)).astype(past_h.dtype), past_h[:-1]]),
    )
    return x_next + alpha_next * correction, history
