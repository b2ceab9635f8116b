"""Forward process, posterior and the model's reverse step p(x_{t-1} | x_t).

All functions are pure and elementwise over the non-batch axes: ``x`` arrays are ``[B, ...]``
(images are NHWC in [-1, 1]) and ``t`` is an int array ``[B]`` of zero-based timesteps of the
schedule passed in. Variances are per-element; log-variances are natural logs.

Parameterisations (``mean_type``), with ``abar = alphas_cumprod[t]``:
  - ``eps``: the noise, ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``;
  - ``x0``: the clean image;
  - ``v``: ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022);
  - ``mu``: the posterior mean ``mu(x_t, x0)`` itself.
Variances (``var_type``):
  - ``fixed_small``: the posterior variance ``beta~_t`` (clipped at t=0 in log space);
  - ``fixed_large``: ``beta_t``, with ``beta~_1`` at t=0 (Improved DDPM's choice, which gives a
    sensible decoder term; ``beta_0`` when T = 1, where there is no ``beta~_1``);
  - ``learned_range``: ``log var = f log beta_t + (1 - f) log beta~_t`` with ``f = (v + 1) / 2``
    where ``v`` is the second half of the model output's last axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule

MEAN_TYPES = ("eps", "x0", "v", "mu")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")


def check_option(kind: str, value: str, valid: tuple[str, ...]) -> str:
    """Returns ``value`` if it is one of ``valid``, else raises a ValueError naming both."""
    if value not in valid:
        raise ValueError(f"Unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


def extract(arr: jnp.ndarray, t: jnp.ndarray, x_shape) -> jnp.ndarray:
    """``arr[t]`` for ``t`` ``[B]``, reshaped to ``[B, 1, ..., 1]`` to broadcast against x."""
    t = jnp.asarray(t)
    if t.ndim != 1 or t.shape[0] != x_shape[0]:
        raise ValueError(f"t must have shape [B]=[{x_shape[0]}], got {t.shape}")
    return arr[t].reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


def q_mean_variance(schedule: Schedule, x0, t):
    """Mean, variance and log-variance of ``q(x_t | x0)``."""
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
    var = extract(1.0 - schedule.alphas_cumprod, t, x0.shape)
    log_var = extract(schedule.log_one_minus_alphas_cumprod, t, x0.shape)
    return mean, var, log_var


def q_sample(schedule: Schedule, x0, t, noise):
    """Draws ``x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)`` using ``noise``."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def q_posterior(schedule: Schedule, x0, x_t, t):
    """``q(x_{t-1} | x_t, x0)``: returns ``(mean, variance, log_variance_clipped)``."""
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    var = extract(schedule.posterior_variance, t, x_t.shape)
    log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    return mean, var, log_var


# --- conversions between parameterisations -------------------------------------------------


def x0_from_eps(schedule: Schedule, x_t, t, eps):
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )


def eps_from_x0(schedule: Schedule, x_t, t, x0):
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )


def x0_from_v(schedule: Schedule, x_t, t, v):
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t.shape) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
    )


def v_from_x0_eps(schedule: Schedule, x0, t, eps):
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * eps
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
    )


def x0_from_mu(schedule: Schedule, x_t, t, mu):
    """Inverts the posterior mean: ``x0 = (mu - coef2 x_t) / coef1``."""
    return (mu - extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t) / extract(
        schedule.posterior_mean_coef1, t, x_t.shape
    )


def predict_x0(schedule: Schedule, x_t, t, prediction, mean_type: str):
    """The x0 implied by a network ``prediction`` of kind ``mean_type``."""
    check_option("mean_type", mean_type, MEAN_TYPES)
    if mean_type == "eps":
        return x0_from_eps(schedule, x_t, t, prediction)
    if mean_type == "x0":
        return prediction
    if mean_type == "v":
        return x0_from_v(schedule, x_t, t, prediction)
    return x0_from_mu(schedule, x_t, t, prediction)


def training_target(schedule: Schedule, x0, x_t, t, noise, mean_type: str):
    """What a network of kind ``mean_type`` should output for this ``(x0, x_t, t, noise)``."""
    check_option("mean_type", mean_type, MEAN_TYPES)
    if mean_type == "eps":
        return noise
    if mean_type == "x0":
        return x0
    if mean_type == "v":
        return v_from_x0_eps(schedule, x0, t, noise)
    return q_posterior(schedule, x0, x_t, t)[0]


def split_model_output(model_output, var_type: str):
    """Splits the network output into ``(prediction, var_values or None)``.

    For ``learned_range`` the last axis holds ``2C`` channels: the mean prediction then ``v``.
    """
    check_option("var_type", var_type, VAR_TYPES)
    if var_type != "learned_range":
        return model_output, None
    channels = model_output.shape[-1]
    if channels % 2:
        raise ValueError(
            f"learned_range needs an even number of output channels (prediction + v), got "
            f"{channels}"
        )
    return jnp.split(model_output, 2, axis=-1)


def model_log_variance(schedule: Schedule, x_t, t, var_values, var_type: str):
    """``(variance, log_variance)`` of ``p(x_{t-1} | x_t)`` for the given ``var_type``."""
    check_option("var_type", var_type, VAR_TYPES)
    if var_type == "fixed_small":
        log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
        log_var = jnp.broadcast_to(log_var, x_t.shape)
        # At t=0 the exact posterior variance (0) is used for the value, the clipped one for logs.
        var = jnp.broadcast_to(extract(schedule.posterior_variance, t, x_t.shape), x_t.shape)
        return var, log_var
    if var_type == "fixed_large":
        # posterior_log_variance_clipped[0] is log beta~_1 (log beta_0 when T == 1).
        large_log = jnp.concatenate(
            [schedule.posterior_log_variance_clipped[:1], schedule.log_betas[1:]]
        )
        log_var = jnp.broadcast_to(extract(large_log, t, x_t.shape), x_t.shape)
        return jnp.exp(log_var), log_var
    min_log = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    max_log = extract(schedule.log_betas, t, x_t.shape)
    frac = (var_values + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
    return jnp.exp(log_var), log_var


def p_mean_variance(
    schedule: Schedule,
    model_output,
    x_t,
    t,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
):
    """Mean and variance of the model's ``p(x_{t-1} | x_t)`` from a network's output.

    Args:
      schedule: the process (possibly respaced; ``t`` indexes it).
      model_output: ``[B, ..., C]`` (``[B, ..., 2C]`` for ``learned_range``).
      x_t: ``[B, ..., C]``.
      t: int ``[B]``.
      mean_type, var_type: see the module docstring.
      clip_denoised: clip the predicted x0 to [-1, 1] before forming the mean (for ``mu``
        predictions, the mean is used as predicted and only ``pred_x0`` is clipped).

    Returns:
      dict with ``mean``, ``variance``, ``log_variance`` (all ``x_t.shape``), ``pred_x0`` and
      ``pred_eps`` (the noise implied by ``pred_x0``).
    """
    check_option("mean_type", mean_type, MEAN_TYPES)
    prediction, var_values = split_model_output(model_output, var_type)
    if prediction.shape != x_t.shape:
        raise ValueError(
            f"model output {model_output.shape} does not match x_t {x_t.shape} "
            f"for var_type={var_type!r}"
        )
    variance, log_variance = model_log_variance(schedule, x_t, t, var_values, var_type)
    pred_x0 = predict_x0(schedule, x_t, t, prediction, mean_type)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    if mean_type == "mu":
        mean = prediction
    else:
        mean = q_posterior(schedule, pred_x0, x_t, t)[0]
    return {
        "mean": mean,
        "variance": variance,
        "log_variance": log_variance,
        "pred_x0": pred_x0,
        "pred_eps": eps_from_x0(schedule, x_t, t, pred_x0),
    }


def stop_gradient_mean(model_output, var_type: str):
    """The output with its mean part frozen (Improved DDPM's hybrid loss): only ``v`` learns."""
    if var_type != "learned_range":
        return jax.lax.stop_gradient(model_output)
    prediction, var_values = split_model_output(model_output, var_type)
    return jnp.concatenate([jax.lax.stop_gradient(prediction), var_values], axis=-1)
