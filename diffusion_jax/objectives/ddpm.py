"""DDPM's objective (Ho et al. 2020; Nichol & Dhariwal 2021): whole-number timesteps of a beta
schedule, eps/x0/v/mu predictions, fixed or learned-range variances, the simple/vlb/hybrid
losses with SNR weightings, uniform or importance-sampled timesteps.

Everything is delegated to ``diffusion``, ``losses`` and ``schedules``, which define it; this
class only bundles the options that travel together (the config's ``diffusion.*`` group).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, losses, schedules

# The fields that are keyword arguments of losses.training_losses, under the same names.
_LOSS_OPTIONS = (
    "mean_type",
    "var_type",
    "loss_type",
    "weighting",
    "min_snr_gamma",
    "p2_k",
    "p2_gamma",
    "vlb_weight",
)


@dataclasses.dataclass(frozen=True)
class DDPM:
    """``t`` is an int32 timestep in ``[0, T)`` of ``schedule``; the network gets it as is."""

    schedule: schedules.Schedule
    mean_type: str = "eps"
    var_type: str = "fixed_large"
    loss_type: str = "simple"
    weighting: str = "none"
    min_snr_gamma: float = 5.0
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    vlb_weight: float = 0.001
    importance_sampling: bool = False

    name = "ddpm"
    process = None

    @classmethod
    def from_config(cls, config) -> DDPM:
        d = config.diffusion
        return cls(
            schedules.Schedule.create(d.schedule, d.num_timesteps),
            mean_type=d.mean_type,
            var_type=d.var_type,
            loss_type=d.loss_type,
            weighting=d.loss_weighting,
            min_snr_gamma=d.min_snr_gamma,
            p2_k=d.p2_k,
            p2_gamma=d.p2_gamma,
            vlb_weight=d.vlb_weight,
            importance_sampling=d.timestep_sampling == "importance",
        )

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def reported(self) -> tuple[str, ...]:
        return ("mse", "vlb_bpd") if self.loss_type in ("vlb", "hybrid") else ("mse",)

    def init_history(self) -> losses.LossHistory | None:
        """The state of importance-sampled timesteps (None when t is uniform)."""
        return losses.LossHistory.create(self.num_timesteps) if self.importance_sampling else None

    def update_history(self, history, t, terms):
        return None if history is None else history.update(t, terms["vlb_bpd"])

    def draw(self, keys, history=None):
        """t int32 ``[B]``, uniform over ``[0, T)`` (one ``randint`` per key), or drawn from the
        loss history with importance weights ``1 / (T p(t))`` (``losses.sample_timesteps``)."""
        T = self.num_timesteps
        if history is None:
            t = jax.vmap(lambda k: jax.random.randint(k, (), 0, T))(keys)
            return t.astype(jnp.int32), jnp.ones(keys.shape[0], jnp.float32)
        t, w = jax.vmap(lambda k: losses.sample_timesteps(k, 1, T, history))(keys)
        return t[:, 0], w[:, 0]

    def noisy(self, x0, t, noise):
        return diffusion.q_sample(self.schedule, x0, t, noise)

    def network_inputs(self, x_t, t):
        return x_t, t

    def from_network_inputs(self, x_in, noise_input):
        return x_in, noise_input

    def sigma(self, t):
        """``sqrt(1 - abar_t)`` ``[B]``, the noise's coefficient in ``x_t``."""
        return self.schedule.sqrt_one_minus_alphas_cumprod[t]

    def noise_level(self, t):
        """``sqrt((1 - abar_t) / abar_t)`` ``[B]`` (computed in float64 with the schedule)."""
        return self.schedule.sqrt_recipm1_alphas_cumprod[t]

    @property
    def noise_level_range(self) -> tuple[float, float]:
        """The noise levels of timesteps 0 and T - 1."""
        levels = self.schedule.sqrt_recipm1_alphas_cumprod
        return float(levels[0]), float(levels[-1])

    def denoise(self, output, x_t, t):
        prediction, _ = diffusion.split_model_output(output, self.var_type)
        x0 = diffusion.predict_x0(self.schedule, x_t, t, prediction, self.mean_type)
        return x0, diffusion.eps_from_x0(self.schedule, x_t, t, x0)

    def shift_eps(self, output, x_t, t, delta):
        """The output whose noise prediction is this one's plus ``delta``: eps directly, x0, v
        and mu through eps; a learned variance half unchanged."""
        prediction, var_values = diffusion.split_model_output(output, self.var_type)
        if self.mean_type == "eps":
            shifted = prediction + delta
        else:
            _, eps = self.denoise(output, x_t, t)
            eps = eps + delta
            x0 = diffusion.x0_from_eps(self.schedule, x_t, t, eps)
            shifted = diffusion.training_target(self.schedule, x0, x_t, t, eps, self.mean_type)
        return shifted if var_values is None else jnp.concatenate([shifted, var_values], axis=-1)

    def losses(self, output, x0, x_t, t, noise):
        options = {name: getattr(self, name) for name in _LOSS_OPTIONS}
        return losses.training_losses(self.schedule, output, x0, x_t, t, noise, **options)

    def quarter(self, t):
        return t * 4 // self.num_timesteps
