"""The continuous objectives (EDM, flow matching) and their samplers against closed forms for
Gaussian data ``x0 ~ N(mean, std^2)``: the exact denoiser, the minimum of each loss, the exact
probability-flow ODE solution and the data moments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import likelihood, objectives, ode_sampling
from diffusion_jax import process as process_lib
from tests.closed_form import edm_exact_network, flow_exact_network, gaussian_posterior

MEAN, STD = 0.3, 0.6


def exact_network(objective, mean=MEAN, std=STD):
    if objective.name == "edm":
        return edm_exact_network(objective.sigma_data, mean, std)
    return flow_exact_network(mean, std)


def loss_minimum(objective, t):
    """The closed-form minimum over networks of the expected per-example loss at time t:
    EDM ``lambda(sigma) Var[x0 | x_t]``; flow ``Var[eps - x0 | x_t] = Var[x0 | x_t] / t^2``
    (``eps - x0 = x_t / t - x0 / t`` at fixed x_t)."""
    if objective.name == "edm":
        _, var = gaussian_posterior(1.0, t, 0.0, MEAN, STD)
        s_d = objective.sigma_data
        return (t**2 + s_d**2) / (t * s_d) ** 2 * var
    _, var = gaussian_posterior(1.0 - t, t, 0.0, MEAN, STD)
    return var / t**2


OBJECTIVES = [objectives.EDM(), objectives.Flow()]
TIMES = {"edm": (0.05, 0.5, 3.0), "flow": (0.1, 0.5, 0.9)}


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.name)
def test_loss_of_the_exact_network_is_the_closed_form_minimum_with_zero_gradient(objective):
    n = 400_000
    k0, k1 = jax.random.split(jax.random.PRNGKey(0))
    x0 = MEAN + STD * jax.random.normal(k0, (n, 1))
    noise = jax.random.normal(k1, (n, 1))

    @jax.jit
    def per_example_loss(params, t):
        t_batch = jnp.full((n,), t)
        x_t = objective.noisy(x0, t_batch, noise)
        output = exact_network(objective, *params)(*objective.network_inputs(x_t, t_batch))
        return objective.losses(output, x0, x_t, t_batch, noise)["loss"]

    def gradient_z_scores(params, t):
        """The mean gradient of the loss with respect to the exact network's mean and std,
        in standard errors of its Monte Carlo estimate (per-example gradients by jacfwd)."""
        per_example = np.stack(jax.jit(jax.jacfwd(per_example_loss))(params, t), axis=-1)
        return per_example.mean(0) / (per_example.std(0) / np.sqrt(n))

    for t in TIMES[objective.name]:
        losses = np.asarray(per_example_loss((MEAN, STD), t), np.float64)
        stderr = losses.std() / np.sqrt(n)
        assert losses.mean() == pytest.approx(loss_minimum(objective, t), abs=4 * stderr)
        # Zero gradient at the truth, to Monte Carlo error; far from zero off it.
        assert np.all(np.abs(gradient_z_scores((MEAN, STD), t)) < 4), t
        assert np.all(np.abs(gradient_z_scores((MEAN + 0.3, STD * 2.0), t)) > 8), t


def ode_error(objective, method, num_steps, z):
    """Largest error of the sampler's x0 against the exact ODE solution from ``x_start``."""
    process = objective.process
    t_max = float(objective.sampling_times(num_steps)[0])
    alpha, sigma = float(process.alpha(t_max)), float(process.sigma(t_max))
    x_start = alpha * MEAN + np.sqrt(alpha**2 * STD**2 + sigma**2) * z
    x0 = ode_sampling.sample(
        exact_network(objective),
        objective,
        z.shape,
        jax.random.PRNGKey(0),
        method=method,
        num_steps=num_steps,
        x_start=jnp.asarray(x_start, jnp.float32),
    )
    # The flow carries the standardised value z of x_start to the data: x0 = mean + std z.
    return float(np.max(np.abs(np.asarray(x0, np.float64) - (MEAN + STD * z))))


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.name)
@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2)])
def test_euler_and_heun_converge_to_the_exact_ode_solution_at_their_order(objective, method, order):
    z = np.linspace(-2.5, 2.5, 11).reshape(-1, 1)
    errors = [ode_error(objective, method, n, z) for n in (16, 32, 64)]
    rates = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
    assert np.all(np.abs(rates - order) < 0.35), (errors, rates)


# Measured errors at 16/32/64 steps (EDM's grid): dpmpp_2m 1.15e-1, 2.41e-2, 5.41e-3 (rates
# 2.25, 2.16); dpmpp_3m 1.51e-1, 6.89e-3, 7.70e-4 (rates 4.45, 3.16).
@pytest.mark.parametrize("method, order", [("dpmpp_2m", 2), ("dpmpp_3m", 3)])
def test_dpm_solver_converges_at_its_order_on_edms_grid(method, order):
    z = np.linspace(-2.5, 2.5, 11).reshape(-1, 1)
    errors = [ode_error(objectives.EDM(), method, n, z) for n in (16, 32, 64)]
    rates = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
    assert rates[0] > order - 0.35 and abs(rates[1] - order) < 0.35, (errors, rates)


def test_dpm_solver_on_the_flow_path_converges_below_its_order():
    """On flow matching's even grid in t, the last steps before the data keep a step of
    log 2 in lambda whatever their number, and the first step starts at lambda = -inf: the
    solvers converge, but not at their order (measured at 16/32/64 steps: dpmpp_2m 1.62e-2,
    7.86e-3, 2.58e-3; dpmpp_3m 3.15e-2, 1.15e-2, 2.93e-3; euler 3.22e-2 at 64)."""
    z = np.linspace(-2.5, 2.5, 11).reshape(-1, 1)
    for method in ("dpmpp_2m", "dpmpp_3m"):
        errors = [ode_error(objectives.Flow(), method, n, z) for n in (16, 32, 64)]
        assert np.all(np.diff(errors) < 0) and errors[-1] < 5e-3, (method, errors)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.name)
def test_edm_stochastic_sampler_reproduces_the_data_moments(objective):
    n = 20_000
    samples = ode_sampling.sample(
        exact_network(objective),
        objective,
        (n, 1),
        jax.random.PRNGKey(1),
        method="edm_stochastic",
        num_steps=256,  # EDM's grid at 32 steps widens the exact model's samples by 5%
        churn=40.0,
        s_tmin=0.05,
        s_tmax=50.0,
        s_noise=1.003,
    )
    samples = np.asarray(samples, np.float64).ravel()
    assert samples.mean() == pytest.approx(MEAN, abs=4 * STD / np.sqrt(n))
    assert samples.std() == pytest.approx(STD, rel=0.02)


def test_churn_changes_the_samples_and_none_is_heun():
    objective = objectives.EDM()
    kwargs = dict(num_steps=8, x_start=None)
    args = (exact_network(objective), objective, (64, 1), jax.random.PRNGKey(2))
    heun = ode_sampling.sample(*args, method="heun", **kwargs)
    no_churn = ode_sampling.sample(*args, method="edm_stochastic", **kwargs)
    churned = ode_sampling.sample(*args, method="edm_stochastic", churn=10.0, **kwargs)
    np.testing.assert_array_equal(np.asarray(heun), np.asarray(no_churn))
    assert np.max(np.abs(np.asarray(churned) - np.asarray(heun))) > 0.01


def test_sampler_options_of_another_method_are_refused():
    objective = objectives.Flow()
    with pytest.raises(ValueError, match="churn and s_noise apply to method 'edm_stochastic'"):
        ode_sampling.sample(
            exact_network(objective), objective, (2, 1), jax.random.PRNGKey(0), churn=1.0
        )
    with pytest.raises(ValueError, match="Unknown sampling method 'ancestral'"):
        ode_sampling.sample(
            exact_network(objective), objective, (2, 1), jax.random.PRNGKey(0), method="ancestral"
        )


def test_process_conversions_and_time_grids():
    flow, ve = process_lib.RectifiedFlow(), process_lib.VarianceExploding()
    t = jnp.asarray([0.2, 0.7])
    x0, eps = jnp.asarray([[1.0], [-0.5]]), jnp.asarray([[0.3], [2.0]])
    x_t = process_lib.marginal(flow, x0, t, eps)
    np.testing.assert_allclose(x_t, [[0.8 * 1.0 + 0.2 * 0.3], [0.3 * -0.5 + 0.7 * 2.0]], 1e-6)
    np.testing.assert_allclose(process_lib.eps_from_x0(flow, x_t, t, x0), eps, rtol=1e-5)
    np.testing.assert_allclose(process_lib.x0_from_eps(flow, x_t, t, eps), x0, rtol=1e-5)
    np.testing.assert_allclose(process_lib.velocity(flow, t, x0, eps), eps - x0, rtol=1e-6)
    np.testing.assert_allclose(process_lib.log_snr(flow, t), 2 * np.log([0.8 / 0.2, 0.3 / 0.7]))
    # EDM's grid: 80, ..., 0.002, then 0 (Karras et al. eq. 5, rho = 7).
    grid = process_lib.karras_times(ve, 18, 0.002, 80.0, 7.0)
    i = np.arange(18)
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(grid, np.append(expected, 0.0), rtol=1e-12)
    # On the flow's process the same grid is of t = r / (1 + r).
    np.testing.assert_allclose(
        process_lib.karras_times(flow, 18, 0.002, 80.0, 7.0)[:-1], expected / (1 + expected)
    )
    # SD3's shift: shift 3 moves t = 0.5 to 0.75 and keeps the ends.
    np.testing.assert_allclose(process_lib.uniform_times(flow, 2, 3.0), [1.0, 0.75, 0.0])
    assert ode_sampling.num_evaluations("heun", 18) == 35
    assert ode_sampling.num_evaluations("euler", 18) == 18


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.name)
def test_ode_likelihood_of_the_exact_model_is_the_gaussian_density(objective):
    """The probability-flow ODE's log-likelihood of the exact model of Gaussian data equals
    the data's density within 0.01 bits/dim, at typical and atypical points (z up to 3).

    EDM's prior N(0, sigma_max^2) ignores the data's mean: off by about mean z / sigma_max
    nats per dimension (0.011 bits/dim at mean 0.3, z = 3), so its data are centred here."""
    dims, mean = 6, MEAN if objective.name == "flow" else 0.0
    z = np.linspace(-3, 3, 8 * dims).reshape(8, dims)
    x0 = jnp.asarray(mean + STD * z, jnp.float32)
    out = likelihood.ode_log_likelihood(
        exact_network(objective, mean), objective, x0, jax.random.PRNGKey(0), num_steps=256
    )
    exact = -0.5 * np.sum(z**2 + np.log(2 * np.pi * STD**2), -1)
    error_bits_per_dim = np.abs(np.asarray(out["log_likelihood"]) - exact) / (dims * np.log(2))
    assert np.max(error_bits_per_dim) < 0.01, error_bits_per_dim


def test_dequantised_bits_per_dim_of_a_uniform_density_is_8():
    """A density uniform on [-1, 1] (log p = -D ln 2) gives every 8-bit image 8 bits/dim, and
    dequantisation stays within the pixel's bin of width 2/256."""
    images = jnp.asarray(np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1))
    x = likelihood.dequantize(images, jax.random.PRNGKey(0))
    low = 2.0 * np.asarray(images, np.float64) / 256 - 1
    assert np.all((np.asarray(x) >= low) & (np.asarray(x) < low + 2 / 256))
    dims = 64
    bpd = likelihood.bits_per_dim(jnp.full((4,), -dims * np.log(2.0)), dims)
    np.testing.assert_allclose(bpd, 8.0, rtol=1e-6)
