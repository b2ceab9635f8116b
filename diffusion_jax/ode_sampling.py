"""Samplers of the continuous-time objectives (``objectives.EDM``, ``objectives.Flow``): Euler,
Heun and DPM-Solver++ on the probability-flow ODE, and EDM's stochastic sampler, each one
``lax.scan``.

The ODE is the one of the objective's process (``process.velocity``):
``dx/dt = alpha'(t) D(x, t) + sigma'(t) eps(x, t)`` with ``(D, eps) = objective.denoise(...)``,
integrated in the process's own time over ``objective.sampling_times(num_steps)``: for EDM
``dx/dsigma = (x - D) / sigma`` on Karras et al.'s grid (Euler there is DDIM), for flow
matching ``dx/dt = v`` on equal (shifted) steps of t. Methods (``METHODS``):
  - ``euler``: ``num_steps`` evaluations;
  - ``heun``: Heun's second-order method, the last step (to sigma = 0) Euler, as EDM's
    Algorithm 1: ``2 num_steps - 1`` evaluations;
  - ``edm_stochastic``: EDM's Algorithm 2: before each Heun step, noise raises the noise
    level ``r = sigma / alpha`` to ``r (1 + gamma)``, ``gamma = min(churn / N, sqrt 2 - 1)``
    where ``s_tmin <= r <= s_tmax`` (else 0), with noise of standard deviation
    ``s_noise sqrt(r_hat^2 - r^2)`` in ``x / alpha``; ``2 num_steps - 1`` evaluations;
  - ``dpmpp_2m``, ``dpmpp_3m``: DPM-Solver++ multistep of order 2 and 3 (``dpm_solver``) in
    ``lambda = log(alpha / sigma)`` of the process, on the same grid: ``num_steps``
    evaluations. Flow matching's first step leaves ``lambda = -inf`` (pure noise): it is exact
    there (first order is), and makes the next steps' extrapolation through it vanish, so they
    are of lower order.

``model_fn(x_in, noise_input) -> output`` is the bare network (the objective adds its
preconditioning); keys as in ``sampling.sample``: one key, or one per sample (``noise``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import dpm_solver, noise
from diffusion_jax import process as process_lib


@dataclasses.dataclass(frozen=True)
class Method:
    """``second_order``: Heun; ``stochastic``: adds noise before each step (EDM's churn);
    ``multistep``: the order of a DPM-Solver++ multistep method (0: none)."""

    second_order: bool = False
    stochastic: bool = False
    multistep: int = 0

    def num_evaluations(self, num_steps: int) -> int:
        return 2 * num_steps - 1 if self.second_order else num_steps


METHODS = {
    "euler": Method(),
    "heun": Method(second_order=True),
    "edm_stochastic": Method(second_order=True, stochastic=True),
    "dpmpp_2m": Method(multistep=2),
    "dpmpp_3m": Method(multistep=3),
}


def num_evaluations(method: str, num_steps: int) -> int:
    """Network evaluations of ``method`` over ``num_steps`` steps."""
    return _method(method).num_evaluations(num_steps)


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown sampling method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def velocity_fn(model_fn, objective):
    """``(x, t scalar) -> (dx/dt, x0)`` of the objective's probability-flow ODE, for the bare
    network ``model_fn`` (the objective preconditions it)."""

    def velocity(x, t):
        t_batch = jnp.full((x.shape[0],), t, x.dtype)
        output = model_fn(*objective.network_inputs(x, t_batch))
        x0, eps = objective.denoise(output, x, t_batch)
        return process_lib.velocity(objective.process, t_batch, x0, eps), x0

    return velocity


def _churn(process, x, t, gamma, z):
    """EDM's noise injection in ``x / alpha``: from ``r = sigma / alpha`` at ``t`` up to
    ``r (1 + gamma)``; returns ``(x_hat, t_hat)``."""
    ratio = process.sigma(t) / process.alpha(t)
    ratio_hat = ratio * (1.0 + gamma)
    t_hat = process.t_from_ratio(ratio_hat)
    scale = process.alpha(t_hat)
    x_hat = scale / process.alpha(t) * x + scale * jnp.sqrt(ratio_hat**2 - ratio**2) * z
    return x_hat, t_hat


@functools.partial(
    jax.jit,
    static_argnames=(
        "model_fn",
        "objective",
        "shape",
        "method",
        "num_steps",
        "churn",
        "s_tmin",
        "s_tmax",
        "s_noise",
    ),
)
def sample(
    model_fn,
    objective,
    shape,
    rng,
    *,
    method: str = "heun",
    num_steps: int = 18,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    x_start=None,
):
    """Samples ``x0`` ``[B, ...]`` float32 (not clipped) by integrating from ``t_max`` to 0.

    Args:
      model_fn: the network ``(x_in [B, ...], noise_input [B]) -> output``.
      objective: a continuous objective (``objectives.EDM`` or ``Flow``; hashable).
      shape: ``(B, H, W, C)``.
      rng: a key or one key per sample; with ``(start_key, chain_key) = split(rng)`` the
        starting noise comes from ``start_key`` and step i's churn noise from
        ``fold_in(chain_key, i)``.
      method: one of ``METHODS``; num_steps: N >= 1 steps of the time grid
        (``objective.sampling_times``).
      churn, s_tmin, s_tmax, s_noise: EDM's S_churn, S_tmin, S_tmax, S_noise
        (``edm_stochastic`` only; defaults: no churn).
      x_start: the state at ``t_max`` instead of ``sigma(t_max) normal(start_key)``.
    """
    method_ = _method(method)
    if (churn or s_noise != 1.0) and not method_.stochastic:
        raise ValueError(f"churn and s_noise apply to method 'edm_stochastic' only, not {method!r}")
    if objective.process is None:
        raise ValueError(
            f"objective {objective.name!r} has no continuous process; use diffusion_jax.sampling"
        )
    process = objective.process
    times = np.asarray(objective.sampling_times(num_steps), np.float64)
    with np.errstate(divide="ignore"):
        ratios = np.asarray(process.sigma(times)) / np.asarray(process.alpha(times))
    # No churn where the state is pure noise already (alpha = 0: flow matching at t = 1).
    churned = (ratios[:-1] >= s_tmin) & (ratios[:-1] <= s_tmax) & np.isfinite(ratios[:-1])
    gamma = np.where(churned, min(churn / num_steps, np.sqrt(2.0) - 1.0), 0.0)
    start_key, chain_key = noise.split(rng)
    if x_start is None:
        x_start = float(process.sigma(times[0])) * noise.normal(start_key, shape)
    elif tuple(x_start.shape) != tuple(shape):
        raise ValueError(f"x_start has shape {x_start.shape}, expected {tuple(shape)}")
    velocity = velocity_fn(model_fn, objective)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    # DPM-Solver++'s grid in lambda = log(alpha / sigma) (-inf at pure noise, inf at the data).
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas, sigmas = np.asarray(process.alpha(times)), np.asarray(process.sigma(times))
        lambdas = np.log(alphas) - np.log(sigmas)
        sigma_ratios = sigmas[1:] / sigmas[:-1]
    h = np.diff(lambdas)

    def step(state, i, t_cur, t_next, gamma_i, h_i, ratio_i, alpha_next, last=False):
        x, history = state
        if method_.stochastic:
            z = s_noise * noise.normal(noise.fold_in(chain_key, i), shape)
            x_hat, t_hat = _churn(process, x, t_cur, gamma_i, z)
            x, t_cur = jnp.where(gamma_i > 0, x_hat, x), jnp.where(gamma_i > 0, t_hat, t_cur)
        v, x0 = velocity(x, t_cur)
        if method_.multistep and not last:
            return dpm_solver.step(method_.multistep, x, x0, i, h_i, ratio_i, alpha_next, history)
        x_next = x + (t_next - t_cur) * v
        if method_.second_order and not last:
            v_next, _ = velocity(x_next, t_next)
            x_next = x + (t_next - t_cur) * 0.5 * (v + v_next)
        return x_next, history

    def body(state, xs):
        return step(state, *xs), None

    # Every step but the last in the scan; the last (to sigma = 0, lambda = inf) is Euler
    # outside it: x0 = D for every method.
    grid = (f32(times[:-1]), f32(times[1:]), f32(gamma), f32(h), f32(sigma_ratios), f32(alphas[1:]))
    history = dpm_solver.init_history(method_.multistep, x_start) if method_.multistep else None
    xs = (jnp.arange(num_steps - 1),) + tuple(a[:-1] for a in grid)
    state, _ = jax.lax.scan(body, (x_start, history), xs)
    last = tuple(a[-1] for a in grid)
    return step(state, num_steps - 1, *last, last=True)[0]
