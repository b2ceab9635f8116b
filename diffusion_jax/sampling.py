"""Reverse-chain samplers, each one jitted ``lax.scan`` over the timesteps.

``model_fn(x_t, t) -> output`` is any function (a network with its parameters closed over, a
closed-form denoiser, a guided combination of several networks). It is called with the
timestep of the *original* process, ``schedule.timestep_map[t]``, so a network trained on T
steps samples a respaced schedule (``schedules.respace``) unchanged. ``model_fn`` is a static
argument: it must be hashable, and a new function object means a new compilation. To sample
with changing parameters without recompiling, call the sampler inside your own ``jax.jit``
that takes the parameters as an argument, as the README's library example does.

Methods:
  - ``ancestral``: ``x_{t-1} ~ p(x_{t-1} | x_t)`` (DDPM Algorithm 2), no noise at the last step;
  - ``ddim``: DDIM (Song et al. 2021) with ``eta``: ``eta=0`` is deterministic, ``eta=1`` over
    all steps equals ancestral sampling with ``fixed_small`` variance.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, noise
from diffusion_jax.diffusion import check_option, extract
from diffusion_jax.schedules import Schedule

SAMPLING_METHODS = ("ancestral", "ddim")


def _reverse_step(
    model_fn,
    schedule,
    x_t,
    t,
    *,
    method,
    mean_type,
    var_type,
    clip_denoised,
    eta,
    draw_noise,
):
    """One step ``x_t -> x_{t-1}`` with noise ``draw_noise(t)``; returns ``(x_{t-1}, pred_x0)``."""
    t_batch = jnp.full((x_t.shape[0],), t, dtype=jnp.int32)
    output = model_fn(x_t, schedule.timestep_map[t_batch])
    out = diffusion.p_mean_variance(
        schedule,
        output,
        x_t,
        t_batch,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
    )
    step_noise = draw_noise(t)
    not_last = (t > 0).astype(x_t.dtype)
    if method == "ancestral":
        x_prev = out["mean"] + not_last * jnp.exp(0.5 * out["log_variance"]) * step_noise
    else:
        abar = extract(schedule.alphas_cumprod, t_batch, x_t.shape)
        abar_prev = extract(schedule.alphas_cumprod_prev, t_batch, x_t.shape)
        sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * out["pred_eps"]
        x_prev = jnp.sqrt(abar_prev) * out["pred_x0"] + direction + not_last * sigma * step_noise
    return x_prev, out["pred_x0"]


def _run_chain(model_fn, schedule, x_start, start_step, *, record_every, draw_noise, **step_kw):
    """Runs steps ``start_step, ..., 0`` from ``x_start``; step t's noise is ``draw_noise(t)``.

    Returns ``(x0, trajectory)`` where ``trajectory`` is None or holds ``x_t``/``pred_x0``
    ``[N, ...]`` and ``t`` ``[N]`` for every ``record_every``-th step (the first one included).
    """
    steps = jnp.arange(start_step, -1, -1, dtype=jnp.int32)
    num_records = 0 if record_every is None else -(-(start_step + 1) // record_every)

    def body(carry, i):
        x_t, records = carry
        t = steps[i]
        x_prev, pred_x0 = _reverse_step(
            model_fn,
            schedule,
            x_t,
            t,
            draw_noise=draw_noise,
            **step_kw,
        )
        if num_records:
            records = jax.lax.cond(
                i % record_every == 0,
                lambda r: {
                    "x_t": r["x_t"].at[i // record_every].set(x_t),
                    "pred_x0": r["pred_x0"].at[i // record_every].set(pred_x0),
                    "t": r["t"].at[i // record_every].set(t),
                },
                lambda r: r,
                records,
            )
        return (x_prev, records), None

    records = None
    if num_records:
        empty = jnp.zeros((num_records,) + x_start.shape, x_start.dtype)
        records = {"x_t": empty, "pred_x0": empty, "t": jnp.zeros((num_records,), jnp.int32)}
    (x0, records), _ = jax.lax.scan(body, (x_start, records), jnp.arange(start_step + 1))
    return x0, records


def _check_sampler_options(schedule, start_step, method, mean_type, var_type, eta):
    if not 0 <= start_step < schedule.num_timesteps:
        raise ValueError(f"start_step must lie in [0, {schedule.num_timesteps}), got {start_step}")
    check_option("sampling method", method, SAMPLING_METHODS)
    check_option("mean_type", mean_type, diffusion.MEAN_TYPES)
    check_option("var_type", var_type, diffusion.VAR_TYPES)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")


_STATIC = (
    "model_fn",
    "shape",
    "method",
    "mean_type",
    "var_type",
    "clip_denoised",
    "eta",
    "start_step",
    "record_every",
)


@functools.partial(jax.jit, static_argnames=_STATIC)
def sample(
    model_fn,
    schedule: Schedule,
    shape,
    rng,
    *,
    mean_type: str = "eps",
    var_type: str = "fixed_large",
    clip_denoised: bool = True,
    method: str = "ancestral",
    eta: float = 0.0,
    x_start=None,
    start_step: int | None = None,
    record_every: int | None = None,
):
    """Samples ``x0`` by running the reverse chain of ``schedule``.

    Args:
      model_fn: ``(x_t [B, ...], t [B]) -> output`` (see the module docstring).
      schedule: the process to reverse (full or respaced).
      shape: ``(B, H, W, C)`` of the samples.
      rng: a PRNG key, or one key per sample (``uint32 [B, 2]`` or typed ``[B]``; then sample
        i depends on key i alone, whatever the batch: see ``diffusion_jax.noise``). With
        ``(start_key, chain_key) = split(rng)``, step t's noise comes from
        ``fold_in(chain_key, t)`` and the starting noise from ``start_key``.
      mean_type, var_type: the network's parameterisation (``diffusion`` module).
      clip_denoised: clip the predicted x0 to [-1, 1] at each step.
      method: ``ancestral`` or ``ddim``; eta: DDIM's noise scale (0 = deterministic).
      x_start: start from this ``x_t`` (``shape``) at step ``start_step`` instead of pure noise at
        ``T - 1``: samples from ``p(x0 | x_t)`` (DDPM Fig. 7). ``start_step`` is static.
      record_every: also return the trajectory every that many steps (DDPM Fig. 6).

    Returns:
      ``x0`` ``[B, ...]`` float32 (not clipped), or ``(x0, trajectory)`` with ``record_every``:
      ``trajectory = {"x_t", "pred_x0": [N, B, ...], "t": [N]}``, N = ceil(steps / every).
    """
    if start_step is None:
        start_step = schedule.num_timesteps - 1
    _check_sampler_options(schedule, start_step, method, mean_type, var_type, eta)
    if record_every is not None and record_every < 1:
        raise ValueError(f"record_every must be >= 1, got {record_every}")
    init_key, chain_key = noise.split(rng)
    if x_start is None:
        x_start = noise.normal(init_key, shape)
    elif tuple(x_start.shape) != tuple(shape):
        raise ValueError(f"x_start has shape {x_start.shape}, expected {tuple(shape)}")
    x0, records = _run_chain(
        model_fn,
        schedule,
        x_start,
        start_step,
        record_every=record_every,
        draw_noise=lambda t: noise.normal(noise.fold_in(chain_key, t), shape),
        method=method,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
        eta=eta,
    )
    return x0 if record_every is None else (x0, records)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model_fn",
        "start_step",
        "method",
        "mean_type",
        "var_type",
        "clip_denoised",
        "eta",
    ),
)
def interpolate(
    model_fn,
    schedule: Schedule,
    x0_a,
    x0_b,
    lambdas,
    rng,
    *,
    start_step: int,
    mean_type: str = "eps",
    var_type: str = "fixed_large",
    clip_denoised: bool = True,
    method: str = "ancestral",
    eta: float = 0.0,
):
    """Interpolates between images through the latent ``x_t`` (DDPM Fig. 9).

    Both images are encoded with ``q(x_t | x0)`` at ``t = start_step``, the latents mixed as
    ``(1 - lam) x_t^a + lam x_t^b`` and decoded by the reverse chain. The reverse noise is the
    same for every ``lam``, so the decodings differ only through the latent.

    Keys: with ``(key_a, key_b, sample_key) = split(rng, 3)``,
    ``x_t^a = q_sample(x0_a, t, normal(key_a))`` (``x_t^b`` likewise) and the reverse chain
    draws the noise ``sample`` draws with ``sample_key``: ``lam = 0`` decodes exactly
    ``sample(model_fn, schedule, x0_a.shape, sample_key, x_start=x_t^a, start_step=t)``.

    Args:
      x0_a, x0_b: ``[B, ...]`` images in [-1, 1]; lambdas: ``[L]`` mixing weights in [0, 1].

    Returns:
      ``[L, B, ...]`` decoded images.
    """
    _check_sampler_options(schedule, start_step, method, mean_type, var_type, eta)
    if x0_a.shape != x0_b.shape:
        raise ValueError(f"x0_a {x0_a.shape} and x0_b {x0_b.shape} must have the same shape")
    key_a, key_b, sample_key = jax.random.split(rng, 3)
    _, chain_key = jax.random.split(sample_key)  # as in sample()
    t_batch = jnp.full((x0_a.shape[0],), start_step, dtype=jnp.int32)
    x_t_a = diffusion.q_sample(schedule, x0_a, t_batch, jax.random.normal(key_a, x0_a.shape))
    x_t_b = diffusion.q_sample(schedule, x0_b, t_batch, jax.random.normal(key_b, x0_b.shape))
    lam = jnp.asarray(lambdas, jnp.float32).reshape((-1,) + (1,) * x0_a.ndim)
    latents = (1.0 - lam) * x_t_a + lam * x_t_b
    num_lambdas = latents.shape[0]
    flat = latents.reshape((-1,) + x0_a.shape[1:])

    def shared_noise(t):
        step_noise = jax.random.normal(jax.random.fold_in(chain_key, t), x0_a.shape, jnp.float32)
        return jnp.tile(step_noise, (num_lambdas,) + (1,) * (x0_a.ndim - 1))

    x0, _ = _run_chain(
        model_fn,
        schedule,
        flat,
        start_step,
        record_every=None,
        draw_noise=shared_noise,
        method=method,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
        eta=eta,
    )
    return x0.reshape(latents.shape)
