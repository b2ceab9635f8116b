"""Flow matching on the straight path (Lipman et al. 2023; Liu et al. 2023, rectified flow),
with Stable Diffusion 3's choices of training times (Esser et al. 2024).

``x_t = (1 - t) x0 + t eps`` on ``t in [0, 1]``; the network predicts the velocity
``v = eps - x0`` and is trained by the plain MSE to it. Training times are uniform, or
logit-normal (``t = sigmoid(m + s n)``, SD3's default m = 0, s = 1), then shifted by
``shift t / (1 + (shift - 1) t)`` (SD3 eq. 23: a shift > 1 puts more weight on high noise, for
higher resolutions; 1 is no shift), and the sampler's uniform time grid is shifted alike. The
network's time embedding receives ``1000 t``, the range of DDPM's timesteps, as SD3 does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffusion_jax import process as process_lib
from diffusion_jax.losses import mean_over_dims

TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclasses.dataclass(frozen=True)
class Flow:
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    name = "flow"
    reported = ("mse",)
    process = process_lib.RectifiedFlow()

    @classmethod
    def from_config(cls, config) -> Flow:
        return cls(**config.objective.flow.to_dict())

    def __post_init__(self):
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(
                f"Unknown time sampling {self.time_sampling!r}; valid: {', '.join(TIME_SAMPLINGS)}"
            )

    def sampling_times(self, num_steps: int):
        """The sampler's grid: ``num_steps`` equal steps from 1 to 0, shifted (float64 NumPy)."""
        return process_lib.uniform_times(self.process, num_steps, self.shift)

    def likelihood_times(self, num_steps: int):
        """The likelihood ODE's grid: the sampler's (shifted) times reversed, 0 to 1."""
        return self.sampling_times(num_steps)[::-1]

    def init_history(self):
        return None

    def update_history(self, history, t, terms):
        return history

    def draw(self, keys, history=None):
        """t ``[B]`` in (0, 1), one draw per key, shifted."""
        if self.time_sampling == "uniform":
            t = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)
        else:
            n = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
            t = jax.nn.sigmoid(self.logit_mean + self.logit_std * n)
        return process_lib.shift_times(t, self.shift), jnp.ones(keys.shape[0], jnp.float32)

    def noisy(self, x0, t, noise):
        return process_lib.marginal(self.process, x0, t, noise)

    def network_inputs(self, x_t, t):
        return x_t, 1000.0 * t

    def from_network_inputs(self, x_in, noise_input):
        return x_in, noise_input / 1000.0

    def sigma(self, t):
        return self.process.sigma(t)

    def noise_level(self, t):
        """``t / (1 - t)``: infinite at the pure noise of t = 1."""
        return t / (1.0 - t)

    @property
    def noise_level_range(self) -> tuple[float, float]:
        """From the data (t = 0) to the pure noise (t = 1)."""
        return 0.0, float("inf")

    def denoise(self, output, x_t, t):
        """``x0 = x_t - t v``, ``eps = x_t + (1 - t) v``."""
        t = process_lib.per_example(t, x_t)
        return x_t - t * output, x_t + (1.0 - t) * output

    def shift_eps(self, output, x_t, t, delta):
        """``v = eps - x0`` with ``x0 = (x_t - t eps) / (1 - t)``: v moves by ``delta / (1 - t)``.
        At t = 1 the noise prediction is ``x_t`` whatever v (pure noise, and a classifier of it
        has no gradient): the output is unchanged there."""
        alpha = 1.0 - process_lib.per_example(t, x_t)
        # The untaken branch of a where must stay finite too, or gradients through it are NaN.
        safe_alpha = jnp.where(alpha > 0, alpha, 1.0)
        return output + jnp.where(alpha > 0, delta / safe_alpha, 0.0)

    def losses(self, output, x0, x_t, t, noise):
        """``loss = mse = mean((v_hat - (eps - x0))^2)``."""
        if output.shape != x0.shape:
            raise ValueError(f"model output {output.shape} does not match x0 {x0.shape}")
        mse = mean_over_dims(jnp.square(output - (noise - x0)))
        return {"loss": mse, "mse": mse}

    def quarter(self, t):
        """Quarters of the training distribution of t (before the shift's change of time)."""
        unshifted = process_lib.shift_times(t, 1.0 / self.shift)
        if self.time_sampling == "uniform":
            cdf = unshifted
        else:
            logit = jnp.log(unshifted) - jnp.log1p(-unshifted)
            cdf = jax.scipy.special.ndtr((logit - self.logit_mean) / self.logit_std)
        return jnp.clip(jnp.floor(4.0 * cdf), 0, 3).astype(jnp.int32)
