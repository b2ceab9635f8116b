"""Likelihood of the continuous objectives through the probability-flow ODE.

For the ODE ``dx/dt = v(x, t)`` of an objective's process (``ode_sampling``), the instantaneous
change of variables (Chen et al. 2018; Song et al. 2021, Appendix D.2) gives
``log p_0(x_0) = log p_T(x_T) + int_{t_0}^{T} div v(x_t, t) dt`` along the ODE's path from the
data ``x_0`` to ``x_T``. The divergence is Hutchinson's estimate ``z^T (dv/dx) z`` with one
Rademacher probe ``z`` per example for the whole path (one Jacobian-vector product per network
evaluation); its expectation is the exact trace, and for a field that is elementwise in ``x``
it is the exact trace. Both integrals run together, with Heun's method, over
``objective.likelihood_times(num_steps)`` (from ``t_0`` near the data up to ``t_max``).

The prior ``p_T`` is ``N(0, sigma(t_max)^2 I)``: exact for flow matching (``alpha(1) = 0``);
for EDM's variance-exploding process it neglects the data's variance next to
``sigma_max^2 = 6400``. For 8-bit images, ``x_0`` is dequantised as in score_sde (Song et al.
2021): ``x = 2 (v + u) / 256 - 1`` with ``u ~ U[0, 1)`` per dimension, so a density on
[-1, 1] gives bits/dim as ``-log2 p(x) / D + 7`` (each of the 256 bins has width 2/256).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from diffusion_jax import noise, ode_sampling

_LN2 = math.log(2.0)


def _drift_and_divergence(model_fn, objective, probe):
    """``(x, t scalar) -> (dx/dt [B, ...], div [B])`` with Hutchinson's divergence."""
    velocity = ode_sampling.velocity_fn(model_fn, objective)

    def drift_and_divergence(x, t):
        v, jvp, _ = jax.jvp(lambda y: velocity(y, t), (x,), (probe,), has_aux=True)
        return v, jnp.sum((jvp * probe).reshape(x.shape[0], -1), axis=-1)

    return drift_and_divergence


@functools.partial(jax.jit, static_argnames=("model_fn", "objective", "num_steps"))
def ode_log_likelihood(model_fn, objective, x0, rng, *, num_steps: int = 128):
    """``log p(x0)`` in nats per example ``[B]`` (a density: no dequantisation here).

    Args:
      model_fn: the network ``(x_in, noise_input) -> output`` (the objective preconditions).
      objective: a continuous objective (``objectives.EDM`` or ``Flow``).
      x0: ``[B, ...]`` points at which to evaluate the model's density.
      rng: a key, or one key per example (then example i depends on key i only): the
        Rademacher probe of the divergence.
      num_steps: Heun steps over ``objective.likelihood_times(num_steps)`` (2 evaluations each).

    Returns:
      ``{"log_likelihood": [B], "prior": [B], "delta": [B]}``: ``log p(x0) = prior + delta``,
      with ``prior = log p_T(x_T)`` and ``delta`` the integrated divergence.
    """
    process = objective.process
    times = jnp.asarray(objective.likelihood_times(num_steps), x0.dtype)
    probe = noise.rademacher(rng, x0.shape, x0.dtype)
    field = _drift_and_divergence(model_fn, objective, probe)

    def heun(carry, ts):
        x, delta = carry
        t, t_next = ts
        v, div = field(x, t)
        x_euler = x + (t_next - t) * v
        v_next, div_next = field(x_euler, t_next)
        x = x + (t_next - t) * 0.5 * (v + v_next)
        return (x, delta + (t_next - t) * 0.5 * (div + div_next)), None

    zeros = jnp.zeros((x0.shape[0],), x0.dtype)
    (x_T, delta), _ = jax.lax.scan(heun, (x0, zeros), (times[:-1], times[1:]))
    sigma_T = float(process.sigma(process.t_max))
    dims = math.prod(x0.shape[1:])
    squares = jnp.sum(jnp.square(x_T / sigma_T).reshape(x0.shape[0], -1), axis=-1)
    prior = -0.5 * squares - dims * (math.log(sigma_T) + 0.5 * math.log(2 * math.pi))
    return {"log_likelihood": prior + delta, "prior": prior, "delta": delta}


def dequantize(images, rng):
    """score_sde's uniform dequantisation ``2 (v + u) / 256 - 1`` of 8-bit images, ``u ~ U[0,
    1)`` per dimension from ``rng`` (a key or one key per example); float32 in [-1, 1).

    ``images``: uint8 values ``v``, or floats on the data pipeline's grid ``2 v / 255 - 1``."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        images = jnp.round((images + 1.0) * 127.5)
    u = noise.uniform(rng, images.shape)
    return 2.0 * (images.astype(jnp.float32) + u) / 256.0 - 1.0


def bits_per_dim(log_likelihood, dims: int):
    """bits/dim of dequantised 8-bit data on [-1, 1] from its density ``log p`` (nats, ``[B]``):
    ``-log p / (D ln 2) + 7``, each of 256 bins of width 2/256."""
    return -log_likelihood / (dims * _LN2) + 7.0
