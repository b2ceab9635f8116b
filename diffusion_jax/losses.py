"""Likelihood terms, the variational bound and the training losses of Gaussian diffusion.

Units: the elementwise functions (``normal_kl``, ``discretized_gaussian_log_likelihood``) return
nats per element. Everything named ``*_bpd`` is in bits per dimension: the per-example mean over
all non-batch axes, divided by ``ln 2``. ``t`` is a zero-based int array ``[B]``.

The training losses are functions of the network's output, not of the network, so they can be
imported and tested without any model code.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax import noise as noise_lib  # `noise` names the training noise here
from diffusion_jax.diffusion import MEAN_TYPES, VAR_TYPES, check_option
from diffusion_jax.schedules import Schedule

LOSS_TYPES = ("simple", "vlb", "hybrid")
LOSS_WEIGHTINGS = ("none", "snr", "min_snr", "p2")
_LN2 = math.log(2.0)


def mean_over_dims(x):
    """Per-example mean over all but the first axis: ``[B, ...] -> [B]``."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by the original DDPM code."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale, *, exact_cdf: bool = False):
    """``log P(x)`` of 8-bit data under a Gaussian discretised into bins, elementwise, in nats.

    ``x`` holds 8-bit values mapped to [-1, 1] (``2v/255 - 1``), so each bin has width 2/255 and is
    centred on x; the bins at -1 and 1 extend to -inf and +inf.

    Args:
      x: data ``[B, ...]`` in [-1, 1].
      mean: Gaussian mean, same shape.
      log_scale: log of the standard deviation (not the variance), same shape.
      exact_cdf: use the exact normal CDF (``jax.scipy.special.ndtr``/``log_ndtr``, accurate in
        the tails) instead of the tanh approximation the original implementations use (the
        default, for bits/dim comparable with published numbers).
    """
    centered = x - mean
    inv_stdv = jnp.exp(-log_scale)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    if exact_cdf:
        ndtr = jax.scipy.special.ndtr
        log_cdf_plus = jax.scipy.special.log_ndtr(plus_in)
        log_one_minus_cdf_min = jax.scipy.special.log_ndtr(-min_in)
        # Difference of CDFs taken on the side of the mean where it does not cancel.
        cdf_delta = jnp.where(
            min_in > 0, ndtr(-min_in) - ndtr(-plus_in), ndtr(plus_in) - ndtr(min_in)
        )
        log_cdf_delta = jnp.log(jnp.maximum(cdf_delta, jnp.finfo(cdf_delta.dtype).tiny))
    else:
        cdf_plus = approx_standard_normal_cdf(plus_in)
        cdf_min = approx_standard_normal_cdf(min_in)
        log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
        log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
        log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def prior_bpd(schedule: Schedule, x0):
    """``KL(q(x_T | x0) || N(0, I))`` in bits/dim, ``[B]`` (no learnable part)."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = diffusion.q_mean_variance(schedule, x0, t)
    return mean_over_dims(normal_kl(mean, log_var, 0.0, 0.0)) / _LN2


def vb_terms_bpd(
    schedule: Schedule,
    model_output,
    x0,
    x_t,
    t,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
    exact_cdf: bool = False,
):
    """One term of the variational bound per example, in bits/dim, ``[B]``.

    ``L_0 = -log p(x0 | x_1)`` (discretised decoder) where ``t == 0``, otherwise
    ``L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))`` (DDPM eq. 5, zero-based t).
    """
    return _vb_terms_and_prediction(
        schedule,
        model_output,
        x0,
        x_t,
        t,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
        exact_cdf=exact_cdf,
    )[0]


def _vb_terms_and_prediction(
    schedule, model_output, x0, x_t, t, *, mean_type, var_type, clip_denoised, exact_cdf
):
    """``vb_terms_bpd`` and the ``p_mean_variance`` dict it was computed from."""
    true_mean, _, true_log_var = diffusion.q_posterior(schedule, x0, x_t, t)
    out = diffusion.p_mean_variance(
        schedule,
        model_output,
        x_t,
        t,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
    )
    kl = mean_over_dims(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
    decoder_nll = -mean_over_dims(
        discretized_gaussian_log_likelihood(
            x0, out["mean"], 0.5 * out["log_variance"], exact_cdf=exact_cdf
        )
    )
    return jnp.where(t == 0, decoder_nll, kl) / _LN2, out


# --- training losses ------------------------------------------------------------------------


def snr(schedule: Schedule, t):
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at ``t`` ``[B]``."""
    abar = schedule.alphas_cumprod[t]
    return abar / (1.0 - abar)


def loss_weight(
    schedule: Schedule,
    t,
    *,
    mean_type: str,
    weighting: str,
    min_snr_gamma: float = 5.0,
    p2_k: float = 1.0,
    p2_gamma: float = 1.0,
):
    """Per-example factor ``[B]`` applied to the MSE of the ``mean_type`` target.

    Weightings are defined on the x0-space error ``||x0 - x0_hat||^2`` and converted to the
    target's space, so they mean the same for every parameterisation:
      - ``none``: 1 (plain MSE on the target: DDPM's L_simple for eps);
      - ``snr``: ``SNR(t)`` on the x0 error (equals ``none`` for eps);
      - ``min_snr``: ``min(SNR(t), gamma)`` on the x0 error (Hang et al. 2023);
      - ``p2``: ``SNR(t) / (k + SNR(t))^gamma`` on the x0 error, i.e. ``1 / (k + SNR)^gamma`` on
        the eps error (Choi et al. 2022).
    The x0 error relates to the target error by ``err_eps^2 = SNR err_x0^2``,
    ``err_v^2 = (1 + SNR) err_x0^2`` and ``err_mu^2 = coef1_t^2 err_x0^2``.
    """
    check_option("mean_type", mean_type, MEAN_TYPES)
    check_option("loss weighting", weighting, LOSS_WEIGHTINGS)
    if weighting == "none":
        return jnp.ones(t.shape, jnp.float32)
    s = snr(schedule, t)
    if weighting == "snr":
        x0_weight = s
    elif weighting == "min_snr":
        x0_weight = jnp.minimum(s, min_snr_gamma)
    else:
        x0_weight = s / (p2_k + s) ** p2_gamma
    target_scale = {
        "eps": s,
        "x0": jnp.ones_like(s),
        "v": 1.0 + s,
        "mu": jnp.square(schedule.posterior_mean_coef1[t]),
    }[mean_type]
    # SNR is 0 only where abar_t underflows float32 (betas near 1 over many steps).
    safe_scale = jnp.where(target_scale > 0, target_scale, 1.0)
    return jnp.where(target_scale > 0, x0_weight / safe_scale, 1.0)


def training_losses(
    schedule: Schedule,
    model_output,
    x0,
    x_t,
    t,
    noise,
    *,
    mean_type: str = "eps",
    var_type: str = "fixed_large",
    loss_type: str = "simple",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    p2_k: float = 1.0,
    p2_gamma: float = 1.0,
    vlb_weight: float = 0.001,
    exact_cdf: bool = False,
):
    """Per-example training losses ``[B]`` of a network output for ``x_t = q_sample(x0, t, noise)``.

    Loss types:
      - ``simple``: the weighted MSE on the ``mean_type`` target (DDPM's L_simple for eps);
      - ``vlb``: ``T * L_t`` in bits/dim, an unbiased estimate of the full bound
        ``L_vlb = sum_t L_t`` for uniform t (multiply by importance weights otherwise);
      - ``hybrid``: ``simple + vlb_weight * T * L_t`` with the mean's gradient stopped in the VLB
        term (Improved DDPM, vlb_weight=0.001), so the VLB only trains the variance.
    For a fixed variance the VLB term of ``hybrid`` carries no gradient.

    Returns:
      dict of ``[B]`` arrays: ``loss`` (what to average and differentiate), ``mse`` (unweighted
      MSE on the target) and, for ``vlb``/``hybrid``, ``vlb_bpd`` (the term ``L_t``, bits/dim).
    """
    check_option("loss_type", loss_type, LOSS_TYPES)
    check_option("var_type", var_type, VAR_TYPES)
    prediction, _ = diffusion.split_model_output(model_output, var_type)
    target = diffusion.training_target(schedule, x0, x_t, t, noise, mean_type)
    if prediction.shape != target.shape:
        raise ValueError(
            f"model output {model_output.shape} does not match x0 {x0.shape} "
            f"for var_type={var_type!r}"
        )
    mse = mean_over_dims(jnp.square(target - prediction))
    terms = {"mse": mse}
    loss = jnp.zeros_like(mse)
    if loss_type in ("simple", "hybrid"):
        loss = mse * loss_weight(
            schedule,
            t,
            mean_type=mean_type,
            weighting=weighting,
            min_snr_gamma=min_snr_gamma,
            p2_k=p2_k,
            p2_gamma=p2_gamma,
        )
    if loss_type in ("vlb", "hybrid"):
        vlb_output = (
            diffusion.stop_gradient_mean(model_output, var_type)
            if loss_type == "hybrid"
            else model_output
        )
        vb = vb_terms_bpd(
            schedule,
            vlb_output,
            x0,
            x_t,
            t,
            mean_type=mean_type,
            var_type=var_type,
            exact_cdf=exact_cdf,
        )
        scale = schedule.num_timesteps * (vlb_weight if loss_type == "hybrid" else 1.0)
        loss = loss + scale * vb
        terms["vlb_bpd"] = vb
    terms["loss"] = loss
    return terms


# --- timestep sampling ----------------------------------------------------------------------


@flax.struct.dataclass
class LossHistory:
    """The last ``K`` values of ``L_t`` seen for each t (Improved DDPM's importance sampling).

    history: float32 ``[T, K]``; counts: int32 ``[T]`` (how many of the K slots are filled).
    """

    history: jnp.ndarray
    counts: jnp.ndarray

    @classmethod
    def create(cls, num_timesteps: int, history_per_term: int = 10) -> LossHistory:
        return cls(
            history=jnp.zeros((num_timesteps, history_per_term), jnp.float32),
            counts=jnp.zeros((num_timesteps,), jnp.int32),
        )

    @property
    def warmed_up(self):
        """True once every t has a full history (before that, t is drawn uniformly)."""
        return jnp.all(self.counts == self.history.shape[1])

    def update(self, t, losses) -> LossHistory:
        """Appends ``losses[i]`` to the history of ``t[i]``, in batch order (``[B]`` each)."""

        def add_one(i, state):
            history, counts = state
            ti, value = t[i], losses[i].astype(jnp.float32)
            full = counts[ti] == history.shape[1]
            shifted = jnp.where(full, jnp.roll(history[ti], -1), history[ti])
            slot = jnp.where(full, history.shape[1] - 1, counts[ti])
            history = history.at[ti].set(shifted.at[slot].set(value))
            counts = counts.at[ti].set(jnp.minimum(counts[ti] + 1, history.shape[1]))
            return history, counts

        history, counts = jax.lax.fori_loop(0, t.shape[0], add_one, (self.history, self.counts))
        return LossHistory(history=history, counts=counts)


def sample_timesteps(
    rng,
    batch_size: int,
    num_timesteps: int,
    history: LossHistory | None = None,
    *,
    uniform_prob: float = 0.001,
):
    """Draws t ``[B]`` and importance weights ``[B]`` (multiply per-example losses by them).

    Uniform (weights 1) without a history or before it is warmed up; afterwards
    ``p(t) ∝ sqrt(E[L_t^2])`` mixed with ``uniform_prob`` of the uniform distribution, and the
    weights ``1 / (T p(t))`` keep the loss an unbiased estimate of the uniform-t loss.
    """
    if history is None:
        t = jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
        return t, jnp.ones((batch_size,), jnp.float32)
    probs = jnp.sqrt(jnp.mean(jnp.square(history.history), axis=-1))
    probs = probs / jnp.maximum(jnp.sum(probs), 1e-30)
    probs = probs * (1.0 - uniform_prob) + uniform_prob / num_timesteps
    probs = jnp.where(history.warmed_up, probs, 1.0 / num_timesteps)
    t = jax.random.categorical(rng, jnp.log(probs), shape=(batch_size,)).astype(jnp.int32)
    return t, 1.0 / (num_timesteps * probs[t])


# --- the full bound -------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=("model_fn", "mean_type", "var_type", "clip_denoised", "exact_cdf"),
)
def bits_per_dim(
    model_fn,
    schedule: Schedule,
    x0,
    rng,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    exact_cdf: bool = False,
):
    """The full variational bound ``-log p(x0) <= L_prior + sum_t L_t`` per example, bits/dim.

    One ``lax.scan`` over all T steps of ``schedule`` (each term draws its own ``x_t`` with noise
    from ``fold_in(rng, t)``; with one key per example, example i's terms depend on key i
    alone, see ``diffusion_jax.noise``). ``model_fn(x_t, t_model)`` is called with
    ``t_model = schedule.timestep_map[t]``: the timestep of the original process, so a network
    trained on T steps evaluates the bound of a respaced (shorter) process as well.

    Args:
      model_fn: ``(x_t [B, ...], t [B]) -> output``; must be hashable (it is a static argument:
        to evaluate changing parameters without recompiling, call this inside your own
        ``jax.jit`` with the parameters as its argument).
      schedule: the process whose bound is computed.
      x0: data ``[B, ...]`` in [-1, 1] on the 8-bit grid.
      rng: PRNG key, or one key per example (``uint32 [B, 2]`` or typed ``[B]``).

    Returns:
      ``{"total_bpd": [B], "prior_bpd": [B], "terms_bpd": [B, T], "mse": [B, T]}`` where
      ``terms_bpd[:, t] = L_t`` and ``mse[:, t]`` is the squared error of the predicted x0.
    """
    num_timesteps = schedule.num_timesteps
    batch = x0.shape[0]

    def term(_, t):
        t_batch = jnp.full((batch,), t, dtype=jnp.int32)
        x_t = diffusion.q_sample(
            schedule, x0, t_batch, noise_lib.normal(noise_lib.fold_in(rng, t), x0.shape, x0.dtype)
        )
        output = model_fn(x_t, schedule.timestep_map[t_batch])
        vb, out = _vb_terms_and_prediction(
            schedule,
            output,
            x0,
            x_t,
            t_batch,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
            exact_cdf=exact_cdf,
        )
        return None, (vb, mean_over_dims(jnp.square(out["pred_x0"] - x0)))

    _, (terms, mse) = jax.lax.scan(term, None, jnp.arange(num_timesteps - 1, -1, -1))
    terms, mse = terms[::-1].T, mse[::-1].T
    prior = prior_bpd(schedule, x0)
    return {
        "total_bpd": jnp.sum(terms, axis=1) + prior,
        "prior_bpd": prior,
        "terms_bpd": terms,
        "mse": mse,
    }
