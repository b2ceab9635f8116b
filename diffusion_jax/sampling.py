"""Reverse-chain samplers, each one jitted ``lax.scan`` over the timesteps.

``model_fn(x_t, t) -> output`` is any function (a network with its parameters closed over, a
closed-form denoiser, a guided combination of several networks). It is called with the
timestep of the *original* process, ``schedule.timestep_map[t]``, so a network trained on T
steps samples a respaced schedule (``schedules.respace``) unchanged. ``model_fn`` is a static
argument: it must be hashable, and a new function object means a new compilation. To sample
with changing parameters without recompiling, call the sampler inside your own ``jax.jit``
that takes the parameters as an argument, as the README's library example does.

Every method walks the K steps of ``schedule`` (the grid: a respaced schedule's kept
timesteps) from ``start_step`` down to 0, calling the network only at those timesteps, and ends
the same way: the sample is the model's x0 prediction at step 0, no noise added. A method is
one step rule with its own scan carry (``METHODS``); every scan iteration is one network
evaluation. With ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``, the x0 prediction
``D(x_t, t)`` (clipped or thresholded) and the noise ``eps_hat = (x_t - alpha_t D) / sigma_t``
it implies, the deterministic methods solve the probability-flow ODE of the process, which in
``lambda_t = log(alpha_t / sigma_t)`` reads ``d(x / sigma) / d lambda = e^lambda D`` and in
``x~ = x / alpha``, ``s = sigma / alpha = e^-lambda`` reads ``dx~ / ds = eps_hat``. Methods, and
the network evaluations of a K-step chain (``num_evaluations``):

  - ``ancestral`` (K): ``x_{t-1} ~ p(x_{t-1} | x_t)`` (DDPM Algorithm 2) with the model's
    variance (``learned_range`` included);
  - ``ddim`` (K): DDIM (Song et al. 2021) with ``eta``: ``eta=0`` is deterministic, the Euler
    method of the ODE in ``(x~, s)``; ``eta=1`` over all steps equals ancestral sampling with
    ``fixed_small`` variance;
  - ``dpmpp_2m`` (K): DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the exact integral in
    lambda of ``D`` extrapolated linearly through the current and the previous grid step's
    predictions; the first step (no history; also the first after ``start_step``) is first
    order, a DDIM step;
  - ``dpmpp_3m`` (K): the same with ``D`` extrapolated quadratically through three steps
    (first and second order for the first two steps);
  - ``heun`` (2K - 1): EDM's deterministic sampler (Karras et al. 2022, Algorithm 1) on the
    ODE in ``(x~, s)``: an Euler step from t to t-1 (as DDIM), the network at t-1 on its
    result, then the step with the mean of both slopes; two evaluations per step, one for the
    last, since the x0 prediction at step 0 is EDM's Euler step to ``s = 0``.

The ODE solvers' order shows on Gaussian data (``tests/test_sampler_convergence.py``).
Options: ``learned_range`` variance is used by ``ancestral`` and ignored by the rest;
a ``mu`` (posterior mean) prediction converts to x0 with the schedule's posterior
coefficients, which is exact only on the schedule the network was trained on (on a respaced
one the network still predicts the mean of its own one-step posterior, not of the longer
respaced step: ``config_lib`` rejects that combination);
with ``mu``, ``ancestral`` uses the predicted mean as it is. Every method works from an
intermediate ``x_start`` (``start_step`` indexes the grid), records trajectories and
interpolates.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, dpm_solver, noise
from diffusion_jax.diffusion import check_option
from diffusion_jax.schedules import Schedule


def dynamic_threshold(x0, percentile: float):
    """Dynamic thresholding of an x0 prediction (Saharia et al. 2022, Imagen, Sec. 2.3).

    Per example, ``s = max(1, quantile(|x0|, percentile))``; returns ``clip(x0, -s, s) / s``,
    which lies in [-1, 1] (equal to ``x0`` where ``|x0| <= 1`` everywhere).
    """
    flat = jnp.abs(x0).reshape(x0.shape[0], -1)
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


@dataclasses.dataclass(frozen=True)
class _Chain:
    """What every step rule uses: the model, the process and the options of one sampler call."""

    model_fn: Callable
    schedule: Schedule
    mean_type: str
    var_type: str
    clip_denoised: bool
    dynamic_threshold: float
    eta: float
    draw_noise: Callable  # t -> the noise of grid step t

    def denoise(self, x_t, t):
        """One network evaluation at grid step ``t`` (a scalar).

        Returns ``pred_x0`` (thresholded or clipped as asked), ``pred_eps`` (the noise it
        implies), ``mean`` (of ``p(x_{t-1} | x_t)``) and ``log_variance``.
        """
        t_batch = jnp.full((x_t.shape[0],), t, dtype=jnp.int32)
        output = self.model_fn(x_t, self.schedule.timestep_map[t_batch])
        out = diffusion.p_mean_variance(
            self.schedule,
            output,
            x_t,
            t_batch,
            mean_type=self.mean_type,
            var_type=self.var_type,
        )
        x0 = out["pred_x0"]
        if self.dynamic_threshold:
            x0 = dynamic_threshold(x0, self.dynamic_threshold)
        elif self.clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        if self.mean_type != "mu":
            out["mean"] = diffusion.q_posterior(self.schedule, x0, x_t, t_batch)[0]
        out["pred_x0"] = x0
        out["pred_eps"] = diffusion.eps_from_x0(self.schedule, x_t, t_batch, x0)
        return out

    def abar(self, t):
        """``(abar_t, abar_{t-1})`` of grid step ``t``; ``abar_{-1} = 1``."""
        return self.schedule.alphas_cumprod[t], self.schedule.alphas_cumprod_prev[t]


# --- step rules -------------------------------------------------------------------------------
# step(chain, carry, t, i, stage) -> (carry, pred_x0): one network evaluation at grid step t, the
# i-th step of this chain (0 at start_step); stage < Method.stages numbers the evaluations of a
# step. carry["x"] holds x_t before step t's first stage and x_{t-1} after its last; the chain
# replaces it by pred_x0 after step 0.


def _ancestral_step(chain, carry, t, i, stage):
    out = chain.denoise(carry["x"], t)
    x_prev = out["mean"] + jnp.exp(0.5 * out["log_variance"]) * chain.draw_noise(t)
    return {"x": x_prev}, out["pred_x0"]


def _ddim_step(chain, carry, t, i, stage):
    out = chain.denoise(carry["x"], t)
    abar, abar_prev = chain.abar(t)
    x_prev = jnp.sqrt(abar_prev) * out["pred_x0"]
    if chain.eta:
        sigma = chain.eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        x_prev = x_prev + sigma * chain.draw_noise(t)
    else:
        sigma = 0.0
    x_prev = x_prev + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * out["pred_eps"]
    return {"x": x_prev}, out["pred_x0"]


def _half_log_snr(abar):
    return 0.5 * (jnp.log(abar) - jnp.log1p(-abar))


def _dpmpp_step(order, chain, carry, t, i, stage):
    """DPM-Solver++ multistep of ``order`` (2 or 3) from ``x_t`` to ``x_{t-1}``
    (``dpm_solver.step``), of lower order while history is short."""
    out = chain.denoise(carry["x"], t)
    x0 = out["pred_x0"]
    abar, abar_prev = chain.abar(t)
    # The step out of t = 0 (to abar = 1, h = inf) is replaced by the x0 prediction; keep its
    # unused arithmetic finite.
    h = jnp.where(t > 0, _half_log_snr(abar_prev) - _half_log_snr(abar), 1.0)
    x_prev, history = dpm_solver.step(
        order,
        carry["x"],
        x0,
        i,
        h,
        jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)),
        jnp.sqrt(abar_prev),
        carry["history"],
    )
    return {"x": x_prev, "history": history}, x0


def _dpmpp_init(order, x):
    return {"x": x, "history": dpm_solver.init_history(order, x)}


def _heun_step(chain, carry, t, i, stage):
    """Stage 0: the network at ``(x_t, t)`` and the Euler step to ``x'_{t-1}``; stage 1: the
    network at ``(x'_{t-1}, t-1)`` and the step from ``x_t`` with the mean slope."""
    predictor = stage == 0
    out = chain.denoise(jnp.where(predictor, carry["x"], carry["x_euler"]), t - stage)
    abar, abar_prev = chain.abar(t)
    # x~_{t-1} = x~_t + (s_{t-1} - s_t) slope, in x = alpha x~.
    slope = jnp.where(predictor, out["pred_eps"], 0.5 * (carry["slope"] + out["pred_eps"]))
    step = jnp.sqrt(1.0 - abar_prev) - jnp.sqrt(abar_prev * (1.0 - abar) / abar)
    x_prev = jnp.sqrt(abar_prev / abar) * carry["x"] + step * slope
    carry = {
        "x": jnp.where(predictor, carry["x"], x_prev),
        "x_euler": jnp.where(predictor, x_prev, carry["x_euler"]),
        "slope": jnp.where(predictor, out["pred_eps"], carry["slope"]),
    }
    return carry, out["pred_x0"]


def _heun_init(x):
    return {"x": x, "x_euler": jnp.zeros_like(x), "slope": jnp.zeros_like(x)}


@dataclasses.dataclass(frozen=True)
class Method:
    """A sampling method: its scan carry, its step rule and what it needs.

    ``init(x_start) -> carry`` (a dict holding the sample as ``"x"``); ``step`` as above;
    ``stages``: network evaluations per step (the last step, at t = 0, has one);
    ``min_steps``: the fewest grid steps at which the method is itself (a shorter chain, e.g.
    from a low ``start_step``, runs its lower-order start); ``uses_eta``: takes DDIM's eta.
    """

    init: Callable
    step: Callable
    stages: int = 1
    min_steps: int = 1
    uses_eta: bool = False

    def num_evaluations(self, num_steps: int) -> int:
        """Network evaluations of a chain of ``num_steps`` grid steps."""
        return self.stages * (num_steps - 1) + 1


def _state_init(x):
    return {"x": x}


METHODS = {
    "ancestral": Method(_state_init, _ancestral_step),
    "ddim": Method(_state_init, _ddim_step, uses_eta=True),
    "dpmpp_2m": Method(
        functools.partial(_dpmpp_init, 2), functools.partial(_dpmpp_step, 2), min_steps=3
    ),
    "dpmpp_3m": Method(
        functools.partial(_dpmpp_init, 3), functools.partial(_dpmpp_step, 3), min_steps=4
    ),
    "heun": Method(_heun_init, _heun_step, stages=2, min_steps=2),
}
SAMPLING_METHODS = tuple(METHODS)


def num_evaluations(method: str, num_steps: int) -> int:
    """Network evaluations of ``method`` over ``num_steps`` grid steps (K, or 2K - 1 for heun)."""
    return METHODS[check_option("sampling method", method, SAMPLING_METHODS)].num_evaluations(
        num_steps
    )


def _run_chain(chain, method, x_start, start_step, *, record_every):
    """Runs grid steps ``start_step, ..., 0`` from ``x_start``, one evaluation per iteration.

    Returns ``(x0, trajectory)`` where ``trajectory`` is None or holds ``x_t``/``pred_x0``
    ``[N, ...]`` and ``t`` ``[N]`` for every ``record_every``-th step (the first one included).
    """
    # (step index i, stage) of every evaluation; the step at t = 0 has one stage.
    num_evaluations = method.num_evaluations(start_step + 1)
    step_index = np.repeat(np.arange(start_step + 1), method.stages)[:num_evaluations]
    stages = np.tile(np.arange(method.stages), start_step + 1)[:num_evaluations]
    num_records = 0 if record_every is None else -(-(start_step + 1) // record_every)

    def body(carry, xs):
        state, records = carry
        i, stage = xs
        t = start_step - i
        x_t = state["x"]
        state, pred_x0 = method.step(chain, state, t, i, stage)
        state["x"] = jnp.where(t == 0, pred_x0, state["x"])
        if num_records:
            records = jax.lax.cond(
                (stage == 0) & (i % record_every == 0),
                lambda r: {
                    "x_t": r["x_t"].at[i // record_every].set(x_t),
                    "pred_x0": r["pred_x0"].at[i // record_every].set(pred_x0),
                    "t": r["t"].at[i // record_every].set(t),
                },
                lambda r: r,
                records,
            )
        return (state, records), None

    records = None
    if num_records:
        empty = jnp.zeros((num_records,) + x_start.shape, x_start.dtype)
        records = {"x_t": empty, "pred_x0": empty, "t": jnp.zeros((num_records,), jnp.int32)}
    xs = (jnp.asarray(step_index, jnp.int32), jnp.asarray(stages, jnp.int32))
    (state, records), _ = jax.lax.scan(body, (method.init(x_start), records), xs)
    return state["x"], records


def _make_chain(
    model_fn, schedule, start_step, draw_noise, *, method, eta, dynamic_threshold, **options
):
    """Checks the options; returns the ``Method`` and the ``_Chain`` of one sampler call."""
    if not 0 <= start_step < schedule.num_timesteps:
        raise ValueError(f"start_step must lie in [0, {schedule.num_timesteps}), got {start_step}")
    check_option("sampling method", method, SAMPLING_METHODS)
    check_option("mean_type", options["mean_type"], diffusion.MEAN_TYPES)
    check_option("var_type", options["var_type"], diffusion.VAR_TYPES)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta and not METHODS[method].uses_eta:
        raise ValueError(f"eta={eta} applies to method 'ddim' only, not {method!r}")
    if not 0.0 <= dynamic_threshold <= 1.0:
        raise ValueError(f"dynamic_threshold must lie in [0, 1] (0: off), got {dynamic_threshold}")
    chain = _Chain(
        model_fn,
        schedule,
        eta=eta,
        dynamic_threshold=dynamic_threshold,
        draw_noise=draw_noise,
        **options,
    )
    return METHODS[method], chain


_STATIC = (
    "model_fn",
    "shape",
    "method",
    "mean_type",
    "var_type",
    "clip_denoised",
    "dynamic_threshold",
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
    dynamic_threshold: float = 0.0,
    method: str = "ancestral",
    eta: float = 0.0,
    x_start=None,
    start_step: int | None = None,
    record_every: int | None = None,
):
    """Samples ``x0`` by running the reverse chain of ``schedule``.

    Args:
      model_fn: ``(x_t [B, ...], t [B]) -> output`` (see the module docstring).
      schedule: the process to reverse (full or respaced): its K steps are the grid.
      shape: ``(B, H, W, C)`` of the samples.
      rng: a PRNG key, or one key per sample (``uint32 [B, 2]`` or typed ``[B]``; then sample
        i depends on key i alone, whatever the batch: see ``diffusion_jax.noise``). With
        ``(start_key, chain_key) = split(rng)``, step t's noise comes from
        ``fold_in(chain_key, t)`` and the starting noise from ``start_key``.
      mean_type, var_type: the network's parameterisation (``diffusion`` module).
      clip_denoised: clip the predicted x0 to [-1, 1] at each step.
      dynamic_threshold: if > 0, instead threshold the predicted x0 dynamically at this
        percentile of ``|x0|`` (``dynamic_threshold()``; Imagen uses 0.995).
      method: one of ``SAMPLING_METHODS`` (module docstring); eta: DDIM's noise scale (0 =
        deterministic), for ``ddim`` only.
      x_start: start from this ``x_t`` (``shape``) at grid step ``start_step`` instead of pure
        noise at ``K - 1``: samples from ``p(x0 | x_t)`` (DDPM Fig. 7). ``start_step`` is static.
      record_every: also return the trajectory every that many grid steps (DDPM Fig. 6).

    Returns:
      ``x0`` ``[B, ...]`` float32 (the last x0 prediction: clipped only as asked), or
      ``(x0, trajectory)`` with ``record_every``: ``trajectory = {"x_t", "pred_x0": [N, B, ...],
      "t": [N]}``, N = ceil(steps / every), the state and x0 prediction at each recorded step.
    """
    if start_step is None:
        start_step = schedule.num_timesteps - 1
    init_key, chain_key = noise.split(rng)
    method_, chain = _make_chain(
        model_fn,
        schedule,
        start_step,
        lambda t: noise.normal(noise.fold_in(chain_key, t), shape),
        method=method,
        eta=eta,
        dynamic_threshold=dynamic_threshold,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
    )
    if record_every is not None and record_every < 1:
        raise ValueError(f"record_every must be >= 1, got {record_every}")
    if x_start is None:
        x_start = noise.normal(init_key, shape)
    elif tuple(x_start.shape) != tuple(shape):
        raise ValueError(f"x_start has shape {x_start.shape}, expected {tuple(shape)}")
    x0, records = _run_chain(chain, method_, x_start, start_step, record_every=record_every)
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
        "dynamic_threshold",
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
    dynamic_threshold: float = 0.0,
    method: str = "ancestral",
    eta: float = 0.0,
):
    """Interpolates between images through the latent ``x_t`` (DDPM Fig. 9).

    Both images are encoded with ``q(x_t | x0)`` at ``t = start_step``, the latents mixed as
    ``(1 - lam) x_t^a + lam x_t^b`` and decoded by the reverse chain. The reverse noise is the
    same for every ``lam``, so the decodings differ only through the latent (a deterministic
    method decodes each latent to one image).

    Keys: with ``(key_a, key_b, sample_key) = split(rng, 3)``,
    ``x_t^a = q_sample(x0_a, t, normal(key_a))`` (``x_t^b`` likewise) and the reverse chain
    draws the noise ``sample`` draws with ``sample_key``: ``lam = 0`` decodes exactly
    ``sample(model_fn, schedule, x0_a.shape, sample_key, x_start=x_t^a, start_step=t)``.

    Args:
      x0_a, x0_b: ``[B, ...]`` images in [-1, 1]; lambdas: ``[L]`` mixing weights in [0, 1].

    Returns:
      ``[L, B, ...]`` decoded images.
    """
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

    method_, chain = _make_chain(
        model_fn,
        schedule,
        start_step,
        shared_noise,
        method=method,
        eta=eta,
        dynamic_threshold=dynamic_threshold,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
    )
    x0, _ = _run_chain(chain, method_, flat, start_step, record_every=None)
    return x0.reshape(latents.shape)
