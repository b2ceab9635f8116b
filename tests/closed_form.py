"""Exact denoisers and moments for Gaussian (and Gaussian-mixture) data, used as references.

For data ``x0 ~ N(m, s^2)`` per dimension, ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` is
Gaussian and the MSE-optimal noise prediction is linear in ``x_t``:
``E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar)``.
For a mixture, it is the responsibility-weighted sum of the components' predictions.
"""

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_eps_fn(alphas_cumprod, mean, std):
    """Optimal eps-predictor ``(x_t, t) -> eps_hat`` for data ``N(mean, std^2)`` per dim."""
    abar_all = jnp.asarray(alphas_cumprod, jnp.float32)

    def eps_fn(x_t, t):
        abar = abar_all[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
        var_t = abar * std**2 + 1.0 - abar
        return jnp.sqrt(1.0 - abar) * (x_t - jnp.sqrt(abar) * mean) / var_t

    return eps_fn


def _mixture_terms(weights, means, stds):
    """``(x_t [B, D], alpha, sigma) -> (log_joint [B, K], x0_k [B, K, D], eps_k [B, K, D])`` for
    ``x_t = alpha x0 + sigma eps`` (``alpha``, ``sigma`` scalars or ``[B, 1]``): ``log pi_k +
    log N(x_t; alpha m_k, alpha^2 s_k^2 + sigma^2)`` and component k's exact x0 and eps."""
    log_w = jnp.log(jnp.asarray(weights, jnp.float32))
    means = jnp.asarray(means, jnp.float32)
    stds = jnp.asarray(stds, jnp.float32)

    def terms(x_t, alpha, sigma):
        # [B, 1, 1] against [B, K, D]
        alpha, sigma = jnp.expand_dims(alpha, -1), jnp.expand_dims(sigma, -1)
        var_t = alpha**2 * stds**2 + sigma**2
        centered = x_t[:, None, :] - alpha * means
        log_lik = -0.5 * jnp.sum(centered**2 / var_t + jnp.log(2 * jnp.pi * var_t), axis=-1)
        x0_k = means + alpha * stds**2 * centered / var_t
        return log_w + log_lik, x0_k, sigma * centered / var_t

    return terms


def mixture_denoiser(weights, means, stds):
    """``(x_t [B, D], alpha, sigma, y [B]) -> (x0, eps)``: for a mixture with one component
    per class (weights ``[K]``; means, stds ``[K, D]``), the exact predictions of class ``y``
    (component y's Gaussian ones) and, for ``y == K`` (the null label), the unconditional
    mixture's: one network that is both p(x | y) and p(x)."""
    terms = _mixture_terms(weights, means, stds)
    num_classes = len(weights)

    def denoise(x_t, alpha, sigma, y):
        log_joint, x0_k, eps_k = terms(x_t, alpha, sigma)
        resp = jnp.where(
            (y == num_classes)[:, None],
            jax.nn.softmax(log_joint, axis=-1),
            jax.nn.one_hot(y, num_classes),
        )
        return jnp.einsum("bk,bkd->bd", resp, x0_k), jnp.einsum("bk,bkd->bd", resp, eps_k)

    return denoise


def mixture_log_posterior(weights, means, stds):
    """``(x_t, alpha, sigma, y) -> log p(y | x_t)`` ``[B]``: the exact noisy-data classifier of
    the mixture, ``log_softmax_k(log pi_k + log N(x_t; alpha m_k, alpha^2 s_k^2 + sigma^2))``."""
    terms = _mixture_terms(weights, means, stds)

    def log_prob_fn(x_t, alpha, sigma, y):
        log_post = jax.nn.log_softmax(terms(x_t, alpha, sigma)[0], axis=-1)
        return jnp.take_along_axis(log_post, y[:, None], axis=-1)[:, 0]

    return log_prob_fn


def _at_timesteps(alphas_cumprod, fn):
    """``fn(x_t, alpha, sigma, *rest)`` as a function of DDPM timesteps ``(x_t, t [B], *rest)``:
    ``alpha = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)``."""
    abar_all = jnp.asarray(alphas_cumprod, jnp.float32)

    def at_t(x_t, t, *rest):
        abar = abar_all[t][:, None]
        return fn(x_t, jnp.sqrt(abar), jnp.sqrt(1.0 - abar), *rest)

    return at_t


def mixture_eps_fn(alphas_cumprod, weights, means, stds):
    """Optimal eps-predictor ``(x_t, t) -> eps`` for a mixture of diagonal Gaussians.

    weights ``[K]``; means, stds ``[K, D]``; x_t ``[B, D]``.
    """
    eps_fn = class_conditional_eps_fn(alphas_cumprod, weights, means, stds)
    return lambda x_t, t: eps_fn(x_t, t, jnp.full(x_t.shape[:1], len(weights), jnp.int32))


def class_conditional_eps_fn(alphas_cumprod, weights, means, stds):
    """``(x_t, t, y) -> eps``: ``mixture_denoiser``'s eps at DDPM timesteps."""
    at_t = _at_timesteps(alphas_cumprod, mixture_denoiser(weights, means, stds))
    return lambda x_t, t, y: at_t(x_t, t, y)[1]


def class_log_posterior_fn(alphas_cumprod, weights, means, stds):
    """``(x_t, t, y) -> log p(y | x_t)`` ``[B]``: ``mixture_log_posterior`` at DDPM timesteps."""
    return _at_timesteps(alphas_cumprod, mixture_log_posterior(weights, means, stds))


def ancestral_moments(betas, mean, std, *, var_type, num_steps=None):
    """Exact mean/variance per dim of ancestral samples with the optimal Gaussian eps-predictor.

    With no clipping every step is affine in x_t plus Gaussian noise, so starting from
    ``x_{T-1} ~ N(0, 1)`` the result is Gaussian with moments propagated here in float64.
    """
    betas = np.asarray(betas, np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
    if var_type == "fixed_small":
        step_var = post_var
    else:
        step_var = np.append(post_var[1], betas[1:])
    m, v = 0.0, 1.0
    for t in range(len(betas) - 1, -1, -1):
        var_t = abar[t] * std**2 + 1 - abar[t]
        # eps_hat = g (x_t - sqrt(abar) mean);  x0_hat = a x_t + b
        g = np.sqrt(1 - abar[t]) / var_t
        a = np.sqrt(1 / abar[t]) - np.sqrt(1 / abar[t] - 1) * g
        b = np.sqrt(1 / abar[t] - 1) * g * np.sqrt(abar[t]) * mean
        slope = coef1[t] * a + coef2[t]
        m = slope * m + coef1[t] * b
        v = slope**2 * v + (step_var[t] if t > 0 else 0.0)
    return m, v


def ddim_moments(betas, mean, std):
    """Exact mean/variance per dim of deterministic DDIM (eta=0) samples, as above."""
    abar = np.cumprod(1 - np.asarray(betas, np.float64))
    abar_prev = np.append(1.0, abar[:-1])
    m, v = 0.0, 1.0
    for t in range(len(abar) - 1, -1, -1):
        g = np.sqrt(1 - abar[t]) / (abar[t] * std**2 + 1 - abar[t])
        a = np.sqrt(1 / abar[t]) - np.sqrt(1 / abar[t] - 1) * g
        b = np.sqrt(1 / abar[t] - 1) * g * np.sqrt(abar[t]) * mean
        # x_prev = sqrt(abar_prev) (a x + b) + sqrt(1 - abar_prev) g (x - sqrt(abar) mean)
        slope = np.sqrt(abar_prev[t]) * a + np.sqrt(1 - abar_prev[t]) * g
        offset = np.sqrt(abar_prev[t]) * b - np.sqrt(1 - abar_prev[t]) * g * np.sqrt(abar[t]) * mean
        m, v = slope * m + offset, slope**2 * v
    return m, v


def probability_flow_x0(alphas_cumprod, x_start, top, bottom, mean, std):
    """Where a deterministic sampler with the optimal eps-predictor of ``N(mean, std^2)`` per
    dimension ends without discretisation error (float64): the probability-flow ODE from
    ``x_start`` at step ``top`` to step ``bottom``, then the exact x0 prediction there.

    Both marginals are Gaussian and the flow is monotone, so it conserves
    ``z = (x_t - sqrt(abar_t) mean) / sqrt(abar_t std^2 + 1 - abar_t)``; the x0 prediction at
    ``bottom`` is ``mean + sqrt(abar) std^2 z / sqrt(abar std^2 + 1 - abar)``. ``mean`` and
    ``std`` broadcast against ``x_start`` (one component per example, say).
    """
    abar = np.asarray(alphas_cumprod, np.float64)
    var = lambda a: a * std**2 + 1 - a
    z = (np.asarray(x_start, np.float64) - np.sqrt(abar[top]) * mean) / np.sqrt(var(abar[top]))
    return mean + np.sqrt(abar[bottom]) * std**2 * z / np.sqrt(var(abar[bottom]))


GRID_8BIT = np.arange(256) / 127.5 - 1  # the 8-bit values v as 2v/255 - 1


def expected_bound_bpd(betas, var_type, pmf, mean, std):
    """Exact expected variational bound (bits/dim) of the affine eps-predictor of
    ``N(mean, std^2)`` (``gaussian_eps_fn``, no clipping, exact normal CDF) on 8-bit data whose
    pixel values (pooled over dimensions and examples) have the distribution ``pmf`` ``[256]``
    over ``GRID_8BIT``.

    Every term is a per-dimension expectation of a function of one pixel value, so the bound
    averaged over dimensions depends on the data only through ``pmf``: the KL terms through its
    first two moments (closed form), the decoder term through a one-dimensional Gaussian
    integral over the noise (Gauss-Hermite quadrature). Returns ``(prior, decoder L_0,
    [L_1 .. L_{T-1}])``.
    """
    from scipy import stats

    betas = np.asarray(betas, np.float64)
    p, grid = np.asarray(pmf, np.float64), GRID_8BIT
    e1, e2 = (p * grid).sum(), (p * grid**2).sum()
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
    # The model's x0 prediction is a x_t + b (the continuous Gaussian's posterior mean).
    g = np.sqrt(1 - abar) / (abar * std**2 + 1 - abar)
    a = np.sqrt(1 / abar) - np.sqrt(1 / abar - 1) * g
    b = np.sqrt(1 / abar - 1) * g * np.sqrt(abar) * mean
    # E[(x0 - a x_t - b)^2] with x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
    c = 1 - a * np.sqrt(abar)
    err2 = c**2 * e2 - 2 * c * b * e1 + b**2 + a**2 * (1 - abar)
    log_var_q = np.log(np.append(post_var[1], post_var[1:]))
    model_var = post_var if var_type == "fixed_small" else np.append(post_var[1], betas[1:])
    log_var_p = np.log(np.append(post_var[1], model_var[1:]))
    kl = 0.5 * (
        -1
        + log_var_p
        - log_var_q
        + np.exp(log_var_q - log_var_p)
        + coef1**2 * err2 / np.exp(log_var_p)
    )
    # Decoder: mean a_0 x_1 + b_0 (coef1[0] = 1, coef2[0] = 0), std exp(0.5 log_var_p[0]).
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    x1 = np.sqrt(abar[0]) * grid[:, None] + np.sqrt(1 - abar[0]) * nodes[None, :]
    mean0, std0 = a[0] * x1 + b[0], np.exp(0.5 * log_var_p[0])
    upper = np.where(grid[:, None] > 0.999, np.inf, grid[:, None] + 1 / 255)
    lower = np.where(grid[:, None] < -0.999, -np.inf, grid[:, None] - 1 / 255)
    bin_prob = stats.norm.cdf((upper - mean0) / std0) - stats.norm.cdf((lower - mean0) / std0)
    # Far-out quadrature nodes (weights < 1e-30) can underflow the bin probability.
    decoder = -(p[:, None] * weights[None, :] * np.log(np.maximum(bin_prob, 1e-300))).sum()
    prior = 0.5 * (-1 - np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * e2)
    ln2 = np.log(2.0)
    return prior / ln2, decoder / ln2, kl[1:] / ln2


def gaussian_posterior(alpha, sigma, x_t, mean, std):
    """``(E[x0 | x_t], Var[x0 | x_t])`` for ``x_t = alpha x0 + sigma eps`` and data
    ``x0 ~ N(mean, std^2)``: ``mean + alpha std^2 (x_t - alpha mean) / v`` and
    ``std^2 sigma^2 / v`` with ``v = alpha^2 std^2 + sigma^2``."""
    v = alpha**2 * std**2 + sigma**2
    return mean + alpha * std**2 * (x_t - alpha * mean) / v, std**2 * sigma**2 / v


def gaussian_denoiser(mean, std):
    """``(x_t, alpha, sigma) -> (x0, eps)``: the exact predictions for ``N(mean, std^2)`` data,
    ``E[eps | x_t] = sigma (x_t - alpha mean) / (alpha^2 std^2 + sigma^2)`` (finite at
    sigma = 0)."""

    def denoise(x_t, alpha, sigma):
        x0, _ = gaussian_posterior(alpha, sigma, x_t, mean, std)
        return x0, sigma * (x_t - alpha * mean) / (alpha**2 * std**2 + sigma**2)

    return denoise


def edm_inputs_undone(sigma_data, x_in, noise_input):
    """``(x_t, alpha, sigma)`` of EDM's network inputs ``(c_in x_t, ln(sigma) / 4)`` (Karras et
    al., Table 1): ``alpha = 1``, ``sigma`` ``[B, 1, ...]``."""
    sigma = jnp.exp(4.0 * noise_input).reshape((-1,) + (1,) * (x_in.ndim - 1))
    return x_in * jnp.sqrt(sigma**2 + sigma_data**2), 1.0, sigma


def flow_inputs_undone(x_in, noise_input):
    """``(x_t, alpha, sigma)`` of flow matching's network inputs ``(x_t, 1000 t)``:
    ``alpha = 1 - t``, ``sigma = t`` ``[B, 1, ...]``."""
    t = (noise_input / 1000.0).reshape((-1,) + (1,) * (x_in.ndim - 1))
    return x_in, 1.0 - t, t


def edm_network(sigma_data, denoiser):
    """The network ``F(c_in x, ln(sigma) / 4, *y)`` whose EDM-preconditioned output
    ``c_skip x + c_out F`` is the x0 of ``denoiser(x_t, alpha, sigma, *y) -> (x0, eps)``,
    written out from Karras et al.'s Table 1 coefficients."""

    def network(x_in, noise_input, *y):
        x, alpha, sigma = edm_inputs_undone(sigma_data, x_in, noise_input)
        x0, _ = denoiser(x, alpha, sigma, *y)
        total = sigma**2 + sigma_data**2
        c_skip, c_out = sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total)
        return (x0 - c_skip * x) / c_out

    return network


def flow_network(denoiser):
    """The velocity ``E[eps - x0 | x_t]`` of ``x_t = (1 - t) x0 + t eps`` from
    ``denoiser(x_t, alpha, sigma, *y) -> (x0, eps)``, as a network of ``(x_t, 1000 t, *y)``."""

    def network(x, noise_input, *y):
        x0, eps = denoiser(*flow_inputs_undone(x, noise_input), *y)
        return eps - x0

    return network


def edm_exact_network(sigma_data, mean, std):
    """``edm_network`` of the exact denoiser of ``N(mean, std^2)`` data."""
    return edm_network(sigma_data, gaussian_denoiser(mean, std))


def flow_exact_network(mean, std):
    """``flow_network`` of the exact denoiser of ``N(mean, std^2)`` data."""
    return flow_network(gaussian_denoiser(mean, std))
