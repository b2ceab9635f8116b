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


def _mixture_terms(alphas_cumprod, weights, means, stds):
    """``(x_t [B, D], t [B]) -> (log_joint [B, K], eps_k [B, K, D])``: ``log pi_k + log
    N(x_t; sqrt(abar) m_k, abar s_k^2 + 1 - abar)`` and component k's optimal eps."""
    abar_all = jnp.asarray(alphas_cumprod, jnp.float32)
    log_w = jnp.log(jnp.asarray(weights, jnp.float32))
    means = jnp.asarray(means, jnp.float32)
    stds = jnp.asarray(stds, jnp.float32)

    def terms(x_t, t):
        abar = abar_all[t][:, None, None]  # [B, 1, 1] against [B, K, D]
        var_t = abar * stds**2 + 1.0 - abar
        centered = x_t[:, None, :] - jnp.sqrt(abar) * means
        log_lik = -0.5 * jnp.sum(centered**2 / var_t + jnp.log(2 * jnp.pi * var_t), axis=-1)
        return log_w + log_lik, jnp.sqrt(1.0 - abar) * centered / var_t

    return terms


def mixture_eps_fn(alphas_cumprod, weights, means, stds):
    """Optimal eps-predictor for a mixture of diagonal Gaussians.

    weights ``[K]``; means, stds ``[K, D]``; x_t ``[B, D]``.
    """
    terms = _mixture_terms(alphas_cumprod, weights, means, stds)

    def eps_fn(x_t, t):
        log_joint, eps_k = terms(x_t, t)
        return jnp.einsum("bk,bkd->bd", jax.nn.softmax(log_joint, axis=-1), eps_k)

    return eps_fn


def class_conditional_eps_fn(alphas_cumprod, weights, means, stds):
    """``(x_t, t, y) -> eps``: for a mixture with one component per class, the optimal
    predictor of class ``y`` (component y's Gaussian one) and, for ``y == K`` (the null
    label), the unconditional mixture's: one network that is both p(x | y) and p(x)."""
    terms = _mixture_terms(alphas_cumprod, weights, means, stds)
    num_classes = len(weights)

    def eps_fn(x_t, t, y):
        log_joint, eps_k = terms(x_t, t)
        resp = jnp.where(
            (y == num_classes)[:, None],
            jax.nn.softmax(log_joint, axis=-1),
            jax.nn.one_hot(y, num_classes),
        )
        return jnp.einsum("bk,bkd->bd", resp, eps_k)

    return eps_fn


def class_log_posterior_fn(alphas_cumprod, weights, means, stds):
    """``(x_t, t, y) -> log p(y | x_t)`` ``[B]``: the exact noisy-data classifier of the
    mixture, ``log_softmax_k(log pi_k + log N(x_t; sqrt(abar) m_k, abar s_k^2 + 1 - abar))``."""
    terms = _mixture_terms(alphas_cumprod, weights, means, stds)

    def log_prob_fn(x_t, t, y):
        log_post = jax.nn.log_softmax(terms(x_t, t)[0], axis=-1)
        return jnp.take_along_axis(log_post, y[:, None], axis=-1)[:, 0]

    return log_prob_fn


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


def edm_exact_network(sigma_data, mean, std):
    """The network ``F(c_in x, ln(sigma) / 4)`` whose EDM-preconditioned output
    ``c_skip x + c_out F`` is the exact denoiser of ``N(mean, std^2)`` data, written out from
    Karras et al.'s Table 1 coefficients (sigma recovered from the noise input)."""

    def network(x_in, noise_input):
        sigma = jnp.exp(4.0 * noise_input).reshape((-1,) + (1,) * (x_in.ndim - 1))
        total = sigma**2 + sigma_data**2
        x = x_in * jnp.sqrt(total)
        x0, _ = gaussian_posterior(1.0, sigma, x, mean, std)
        c_skip, c_out = sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total)
        return (x0 - c_skip * x) / c_out

    return network


def flow_exact_network(mean, std):
    """The velocity ``E[eps - x0 | x_t]`` of ``x_t = (1 - t) x0 + t eps`` for ``N(mean, std^2)``
    data, as a network of ``(x_t, 1000 t)``."""

    def network(x, noise_input):
        t = (noise_input / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
        x0, _ = gaussian_posterior(1.0 - t, t, x, mean, std)
        # E[eps | x_t] = t (x_t - (1 - t) mean) / ((1 - t)^2 std^2 + t^2): finite at t = 0.
        eps = t * (x - (1.0 - t) * mean) / ((1.0 - t) ** 2 * std**2 + t**2)
        return eps - x0

    return network
