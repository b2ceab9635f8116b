"""Noise processes in continuous time: the marginal ``x_t = alpha(t) x0 + sigma(t) eps``.

A process is described once by ``alpha(t)``, ``sigma(t)`` and their time derivatives; everything
a sampler or a likelihood needs follows from them:
  - the log signal-to-noise ratio ``log_snr(t) = 2 log(alpha / sigma)``;
  - the conversions between the data prediction ``x0`` and the noise prediction ``eps`` at fixed
    ``(x_t, t)`` (``eps_from_x0``, ``x0_from_eps``);
  - the probability-flow ODE ``dx/dt = alpha'(t) E[x0 | x_t] + sigma'(t) E[eps | x_t]``: the
    expected velocity of the straight conditional paths ``t -> alpha(t) x0 + sigma(t) eps``
    (Lipman et al. 2023; Song et al. 2021 in its score form), whose flow has the marginals of
    the process (``velocity``).

Time runs from the data (``t = t_min``, ``sigma = 0``) to the prior (``t = t_max``). The
processes here are continuous; DDPM's discrete schedules (``schedules.Schedule``, whole-number
timesteps, respacing) are the discrete family, and both share the conversions above through
``alpha`` and ``sigma``. Processes are frozen dataclasses: hashable, so a sampler can take one as
a static argument, and free of arrays; their functions of ``t`` take NumPy arrays (time grids,
built in float64 on the host) as well as jnp ones.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class VarianceExploding:
    """``alpha = 1, sigma = t``: EDM's process (Karras et al. 2022), time is the noise level.

    ``t`` runs from 0 (data) to ``sigma_max``; samplers start at ``sigma_max`` (EDM: 80).
    """

    sigma_max: float = 80.0

    @property
    def t_max(self) -> float:
        return self.sigma_max

    t_min = 0.0

    def alpha(self, t):
        return 0.0 * t + 1.0

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return 0.0 * t

    def d_sigma(self, t):
        return 0.0 * t + 1.0

    def t_from_ratio(self, ratio):
        """The time at which ``sigma / alpha`` equals ``ratio``."""
        return ratio


@dataclasses.dataclass(frozen=True)
class RectifiedFlow:
    """``alpha = 1 - t, sigma = t`` on ``t in [0, 1]``: the straight path of flow matching and
    rectified flow (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024, Stable Diffusion 3).

    At ``t = 1`` the marginal is pure noise (``alpha = 0``); the velocity of the path is
    ``eps - x0``.
    """

    t_min = 0.0
    t_max = 1.0

    def alpha(self, t):
        return 1.0 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return 0.0 * t - 1.0

    def d_sigma(self, t):
        return 0.0 * t + 1.0

    def t_from_ratio(self, ratio):
        """The time at which ``sigma / alpha = t / (1 - t)`` equals ``ratio``."""
        return ratio / (1.0 + ratio)


PROCESSES = {"variance_exploding": VarianceExploding, "rectified_flow": RectifiedFlow}


def per_example(a, x):
    """A time-dependent coefficient (scalar or ``[B]``) shaped to broadcast against ``x``
    ``[B, ...]``, in ``x``'s dtype."""
    a = jnp.asarray(a, x.dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def marginal(process, x0, t, noise):
    """``x_t = alpha(t) x0 + sigma(t) noise``; ``t`` scalar or ``[B]``."""
    return per_example(process.alpha(t), x0) * x0 + per_example(process.sigma(t), x0) * noise


def log_snr(process, t):
    """``log(alpha(t)^2 / sigma(t)^2)``, decreasing in ``t``."""
    return 2.0 * (jnp.log(process.alpha(t)) - jnp.log(process.sigma(t)))


def eps_from_x0(process, x_t, t, x0):
    """The noise implied by a data prediction: ``(x_t - alpha x0) / sigma`` (needs sigma > 0)."""
    return (x_t - per_example(process.alpha(t), x_t) * x0) / per_example(process.sigma(t), x_t)


def x0_from_eps(process, x_t, t, eps):
    """The data implied by a noise prediction: ``(x_t - sigma eps) / alpha`` (needs alpha > 0)."""
    return (x_t - per_example(process.sigma(t), x_t) * eps) / per_example(process.alpha(t), x_t)


def velocity(process, t, x0, eps):
    """``dx/dt = alpha'(t) x0 + sigma'(t) eps`` from the predictions ``x0`` and ``eps`` at t."""
    return per_example(process.d_alpha(t), x0) * x0 + per_example(process.d_sigma(t), x0) * eps


def karras_times(process, num_steps: int, sigma_min: float, sigma_max: float, rho: float):
    """EDM's time grid (Karras et al. 2022, eq. 5), as times of ``process``: ``num_steps``
    noise levels ``(smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho`` of
    ``sigma / alpha``, then the data end ``t_min``. float64 ``[num_steps + 1]``, decreasing."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = np.arange(num_steps, dtype=np.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    ratios = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho
    times = np.asarray(process.t_from_ratio(ratios), np.float64)
    return np.append(times, process.t_min)


def uniform_times(process, num_steps: int, shift: float = 1.0):
    """``num_steps`` equal steps of time from ``t_max`` to ``t_min``, each time then shifted
    as ``shift t / (1 + (shift - 1) t)`` (Esser et al. 2024, eq. 23: more steps at high noise
    for shift > 1; 1 leaves them). float64 ``[num_steps + 1]``, decreasing."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = np.linspace(process.t_max, process.t_min, num_steps + 1, dtype=np.float64)
    return shift_times(t, shift)


def shift_times(t, shift: float):
    """``shift t / (1 + (shift - 1) t)`` for times in [0, 1] (identity at shift 1)."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)
