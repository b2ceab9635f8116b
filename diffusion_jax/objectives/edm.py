"""EDM's objective (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Table 1 and section 5).

Variance-exploding process ``x_t = x0 + sigma eps`` with the noise level itself as time
(``t = sigma``). The network ``F`` is wrapped in the preconditioning
``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with
``c_skip = s_d^2 / (sigma^2 + s_d^2)``, ``c_out = sigma s_d / sqrt(sigma^2 + s_d^2)``,
``c_in = 1 / sqrt(sigma^2 + s_d^2)``, ``c_noise = ln(sigma) / 4`` (``s_d`` = ``sigma_data``).
Training draws ``ln sigma ~ N(p_mean, p_std^2)`` and minimises
``lambda(sigma) ||D - x0||^2`` with ``lambda = (sigma^2 + s_d^2) / (sigma s_d)^2``, which is
the plain MSE of ``F`` against its effective target ``(x0 - c_skip x) / c_out``. Defaults are
the paper's: ``sigma_data = 0.5``, ``p_mean = -1.2``, ``p_std = 1.2``; the sampler's grid
``sigma_min = 0.002``, ``sigma_max = 80``, ``rho = 7``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import jax.scipy.special

from diffusion_jax import process as process_lib
from diffusion_jax.losses import mean_over_dims


@dataclasses.dataclass(frozen=True)
class EDM:
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    name = "edm"
    reported = ("mse",)

    @classmethod
    def from_config(cls, config) -> EDM:
        return cls(**config.objective.edm.to_dict())

    @property
    def process(self) -> process_lib.VarianceExploding:
        return process_lib.VarianceExploding(sigma_max=self.sigma_max)

    def sampling_times(self, num_steps: int):
        """The sampler's grid: EDM's ``num_steps`` noise levels, then 0 (float64 NumPy)."""
        return process_lib.karras_times(
            self.process, num_steps, self.sigma_min, self.sigma_max, self.rho
        )

    def likelihood_times(self, num_steps: int):
        """The likelihood ODE's grid: EDM's noise levels from sigma_min up to sigma_max (the
        sampler's rho-spaced grid reversed, without its final 0, where the preconditioning is
        singular; float64 NumPy ``[num_steps + 1]``)."""
        return self.sampling_times(num_steps + 1)[-2::-1]

    def init_history(self):
        return None

    def update_history(self, history, t, terms):
        return history

    def draw(self, keys, history=None):
        """sigma ``[B]``: ``exp(p_mean + p_std n)``, ``n`` one standard normal per key."""
        n = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
        return jnp.exp(self.p_mean + self.p_std * n), jnp.ones(keys.shape[0], jnp.float32)

    def noisy(self, x0, t, noise):
        return process_lib.marginal(self.process, x0, t, noise)

    def _coefficients(self, sigma, x):
        sigma = process_lib.per_example(sigma, x)
        s_d = self.sigma_data
        total = sigma**2 + s_d**2
        c_skip = s_d**2 / total
        c_out = sigma * s_d / jnp.sqrt(total)
        c_in = 1.0 / jnp.sqrt(total)
        return c_skip, c_out, c_in

    def network_inputs(self, x_t, t):
        _, _, c_in = self._coefficients(t, x_t)
        return c_in * x_t, jnp.log(t) / 4.0

    def from_network_inputs(self, x_in, noise_input):
        sigma = jnp.exp(4.0 * noise_input)
        _, _, c_in = self._coefficients(sigma, x_in)
        return x_in / c_in, sigma

    def sigma(self, t):
        return self.process.sigma(t)

    def noise_level(self, t):
        """sigma itself (``alpha = 1``)."""
        return self.process.sigma(t)

    @property
    def noise_level_range(self) -> tuple[float, float]:
        """From the data (0) to the sampler's start ``sigma_max``."""
        return 0.0, float(self.sigma_max)

    def denoise(self, output, x_t, t):
        c_skip, c_out, _ = self._coefficients(t, x_t)
        x0 = c_skip * x_t + c_out * output
        return x0, process_lib.eps_from_x0(self.process, x_t, t, x0)

    def shift_eps(self, output, x_t, t, delta):
        """``D = x_t - sigma eps`` moves by ``-sigma delta``, so ``F`` by ``-sigma delta / c_out
        = -delta / (c_in s_d)`` (finite at sigma = 0)."""
        _, _, c_in = self._coefficients(t, x_t)
        return output - delta / (c_in * self.sigma_data)

    def losses(self, output, x0, x_t, t, noise):
        """``loss = lambda(sigma) mean((D - x0)^2)``; ``mse = mean((D - x0)^2)`` (x0 space)."""
        if output.shape != x0.shape:
            raise ValueError(f"model output {output.shape} does not match x0 {x0.shape}")
        denoised, _ = self.denoise(output, x_t, t)
        mse = mean_over_dims(jnp.square(denoised - x0))
        weight = (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2
        return {"loss": weight * mse, "mse": mse}

    def quarter(self, t):
        """Quarters of the training distribution of ``ln sigma`` (its normal CDF times 4)."""
        cdf = jax.scipy.special.ndtr((jnp.log(t) - self.p_mean) / self.p_std)
        return jnp.clip(jnp.floor(4.0 * cdf), 0, 3).astype(jnp.int32)
