import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from scipy import stats

from diffusion_jax import diffusion, losses
from diffusion_jax.schedules import Schedule

SCHED = Schedule.create("linear", 1000)


def test_normal_kl_hand_values():
    assert float(losses.normal_kl(0.3, -0.7, 0.3, -0.7)) == pytest.approx(0.0, abs=1e-7)
    assert float(losses.normal_kl(0.0, 0.0, 1.0, 0.0)) == pytest.approx(0.5)
    # KL(N(0, 1) || N(0, e)) = 0.5 (log e + 1/e - 1)
    assert float(losses.normal_kl(0.0, 0.0, 0.0, 1.0)) == pytest.approx(
        0.5 * (1 + math.exp(-1) - 1)
    )


def test_approx_cdf_is_close_to_exact():
    x = jnp.linspace(-6, 6, 1001)
    err = np.max(np.abs(losses.approx_standard_normal_cdf(x) - stats.norm.cdf(np.asarray(x))))
    assert 1e-5 < err < 5e-4  # it is an approximation, and a good one


def test_tanh_cdf_moves_each_bin_by_at_most_twice_its_cdf_error():
    """A bin's probability is a difference of two CDF values (one for the edge bins), so the
    tanh approximation changes it by at most twice the approximation's largest error."""
    z = np.linspace(-8, 8, 160_001)
    tanh_cdf = 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    cdf_error = np.max(np.abs(tanh_cdf - stats.norm.cdf(z)))  # 1.8e-4, at |z| = 2.59
    grid = jnp.arange(256) * 2 / 255 - 1
    mean = jnp.linspace(-1.2, 1.2, 25)[:, None]
    log_scale = jnp.log(jnp.array([1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0]))[:, None, None]
    x, mean, log_scale = jnp.broadcast_arrays(grid, mean, log_scale)
    bins = {
        exact: np.exp(
            np.asarray(
                losses.discretized_gaussian_log_likelihood(x, mean, log_scale, exact_cdf=exact),
                np.float64,
            )
        )
        for exact in (False, True)
    }
    worst = np.max(np.abs(bins[False] - bins[True]))
    # float32 rounding of the CDF values adds a few 1e-8; the bound is nearly attained.
    assert cdf_error < worst <= 2 * cdf_error + 1e-6


@pytest.mark.parametrize("exact_cdf", [False, True])
def test_discretized_likelihood_bins(exact_cdf):
    mean, scale = 0.1, 0.3
    x = jnp.array([-1.0, 2 * 100 / 255 - 1, 1.0])
    ll = losses.discretized_gaussian_log_likelihood(
        x, jnp.full(3, mean), jnp.full(3, math.log(scale)), exact_cdf=exact_cdf
    )
    if exact_cdf:
        cdf = stats.norm(mean, scale).cdf
    else:  # the tanh approximation, evaluated in float64
        cdf = lambda v: (
            0.5
            * (
                1
                + math.tanh(
                    math.sqrt(2 / math.pi) * (z := (v - mean) / scale)
                    + math.sqrt(2 / math.pi) * 0.044715 * z**3
                )
            )
        )
    expected = [
        math.log(cdf(-1 + 1 / 255)),  # the edge bin extends to -inf
        math.log(cdf(float(x[1]) + 1 / 255) - cdf(float(x[1]) - 1 / 255)),
        math.log(1 - cdf(1 - 1 / 255)),  # and to +inf at the top
    ]
    # float32 cancellation in 0.5 * (1 + tanh) near -1 costs the approximation a few 1e-5.
    np.testing.assert_allclose(ll, expected, rtol=1e-5 if exact_cdf else 1e-4)


def test_discretized_likelihood_sums_to_one_over_all_bins():
    grid = jnp.arange(256) * 2 / 255 - 1
    for exact in (False, True):
        ll = losses.discretized_gaussian_log_likelihood(
            grid, jnp.full(256, -0.4), jnp.full(256, math.log(0.2)), exact_cdf=exact
        )
        assert float(jnp.sum(jnp.exp(ll))) == pytest.approx(1.0, abs=1e-4)


def test_exact_cdf_is_accurate_in_the_tails():
    # Mean far from the bin: the approximate path floors at 1e-12, the exact one does not.
    ll = losses.discretized_gaussian_log_likelihood(
        jnp.array([0.0]), jnp.array([0.9]), jnp.array([math.log(0.1)]), exact_cdf=True
    )
    expected = math.log(stats.norm.cdf(-8.9608) - stats.norm.cdf(-9.0392))
    assert float(ll[0]) == pytest.approx(expected, rel=1e-3)


def test_prior_bpd_closed_form():
    x0 = jnp.array([[0.5, -1.0]])
    abar = float(SCHED.alphas_cumprod[-1])
    per_dim = [0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar * v**2) for v in (0.5, -1.0)]
    assert float(losses.prior_bpd(SCHED, x0)[0]) == pytest.approx(
        np.mean(per_dim) / math.log(2), rel=1e-3
    )


def test_vb_terms_zero_for_true_posterior_and_decoder_at_t0():
    key = jax.random.PRNGKey(0)
    x0 = jnp.round((jax.random.uniform(key, (3, 4, 4, 3)) * 2 - 1) * 127.5) / 127.5
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.array([0, 5, 600])
    x_t = diffusion.q_sample(SCHED, x0, t, noise)
    # The true x0 as an "x0" prediction with the posterior variance gives KL = 0 for t > 0.
    vb = losses.vb_terms_bpd(SCHED, x0, x0, x_t, t, mean_type="x0", var_type="fixed_small")
    np.testing.assert_allclose(vb[1:], 0.0, atol=1e-5)
    # At t = 0 it is the decoder NLL: mean = x0, std = sqrt(beta~_1) ~ 0.0071, bin +-1/255.
    std = math.exp(0.5 * float(SCHED.posterior_log_variance_clipped[0]))
    interior = -math.log(stats.norm.cdf(1 / 255 / std) - stats.norm.cdf(-1 / 255 / std))
    edge = -math.log(stats.norm.cdf(1 / 255 / std))
    x_np = np.asarray(x0[0])
    is_edge = (np.abs(x_np) > 0.999).mean()
    expected = (is_edge * edge + (1 - is_edge) * interior) / math.log(2)
    assert float(vb[0]) == pytest.approx(expected, rel=2e-3)


class TestTrainingLossesJittedAndNot(chex.TestCase):
    """Each test runs twice: ``training_losses`` called as it is and under ``jax.jit``."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*diffusion.MEAN_TYPES)
    def test_weightings_are_consistent_across_parameterisations(self, mean_type):
        # With the same x0-space error, weighted losses agree across parameterisations.
        key = jax.random.PRNGKey(2)
        x0 = jax.random.uniform(key, (4, 2, 2, 1), minval=-1, maxval=1)
        noise = jax.random.normal(jax.random.PRNGKey(3), x0.shape)
        t = jnp.array([10, 200, 500, 800])
        x_t = diffusion.q_sample(SCHED, x0, t, noise)
        x0_hat = x0 + 0.1
        eps_hat = diffusion.eps_from_x0(SCHED, x_t, t, x0_hat)
        prediction = {
            "eps": eps_hat,
            "x0": x0_hat,
            "v": diffusion.v_from_x0_eps(SCHED, x0_hat, t, eps_hat),
            "mu": diffusion.q_posterior(SCHED, x0_hat, x_t, t)[0],
        }[mean_type]
        snr = np.asarray(losses.snr(SCHED, t))
        x0_weights = {"snr": snr, "min_snr": np.minimum(snr, 5.0), "p2": snr / (1.0 + snr)}

        @self.variant
        def weighted_losses(prediction):
            return {
                weighting: losses.training_losses(
                    SCHED, prediction, x0, x_t, t, noise, mean_type=mean_type, weighting=weighting
                )["loss"]
                for weighting in x0_weights
            }

        chex.assert_trees_all_close(
            weighted_losses(prediction),
            {weighting: w * 0.01 for weighting, w in x0_weights.items()},
            rtol=2e-2,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_simple_loss_is_mse_of_eps(self):
        x0 = jnp.zeros((2, 3, 3, 1))
        noise = jnp.ones_like(x0)
        t = jnp.array([1, 2])
        x_t = diffusion.q_sample(SCHED, x0, t, noise)
        out = self.variant(losses.training_losses)(SCHED, noise * 0.5, x0, x_t, t, noise)
        np.testing.assert_allclose(out["loss"], [0.25, 0.25])
        np.testing.assert_allclose(out["mse"], [0.25, 0.25])


def test_hybrid_loss_gradients():
    key = jax.random.PRNGKey(4)
    x0 = jax.random.uniform(key, (4, 4, 4, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.PRNGKey(5), x0.shape)
    t = jnp.array([0, 3, 300, 999])
    x_t = diffusion.q_sample(SCHED, x0, t, noise)
    output = jnp.concatenate([noise * 0.9, jnp.zeros_like(noise)], axis=-1)

    def loss(out, loss_type):
        return losses.training_losses(
            SCHED, out, x0, x_t, t, noise, var_type="learned_range", loss_type=loss_type
        )["loss"].mean()

    g_hybrid = jax.grad(loss)(output, "hybrid")
    g_simple = jax.grad(loss)(output, "simple")
    g_vlb = jax.grad(loss)(output, "vlb")
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in (g_hybrid, g_simple, g_vlb))
    # The mean half of the hybrid gradient comes from L_simple only (VLB mean is frozen) ...
    np.testing.assert_allclose(g_hybrid[..., :3], g_simple[..., :3], rtol=1e-6)
    # ... while the variance half is trained only by the VLB term, weighted 0.001 (vs 1 in vlb).
    np.testing.assert_allclose(g_hybrid[..., 3:], 0.001 * g_vlb[..., 3:], rtol=1e-3, atol=1e-12)
    assert float(jnp.abs(g_simple[..., 3:]).max()) == 0.0
    out = losses.training_losses(
        SCHED, output, x0, x_t, t, noise, var_type="learned_range", loss_type="hybrid"
    )
    np.testing.assert_allclose(out["loss"], out["mse"] + out["vlb_bpd"], rtol=1e-5)


def test_loss_option_errors():
    x = jnp.zeros((1, 2, 2, 1))
    t = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="valid: simple, vlb, hybrid"):
        losses.training_losses(SCHED, x, x, x, t, x, loss_type="l2")
    with pytest.raises(ValueError, match="valid: none, snr, min_snr, p2"):
        losses.training_losses(SCHED, x, x, x, t, x, weighting="snr_trunc")


def test_loss_history_and_importance_sampling():
    T = 4
    hist = losses.LossHistory.create(T, history_per_term=2)
    t, w = losses.sample_timesteps(jax.random.PRNGKey(0), 8, T, hist)
    np.testing.assert_allclose(w, 1.0)  # uniform until warmed up
    hist = hist.update(
        jnp.array([0, 0, 0, 1, 1, 2, 2, 3, 3]),
        jnp.array([9.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]),
    )
    np.testing.assert_array_equal(hist.counts, [2, 2, 2, 2])
    np.testing.assert_allclose(hist.history[0], [1.0, 1.0])  # oldest (9) rolled out
    assert bool(hist.warmed_up)
    t, w = jax.jit(losses.sample_timesteps, static_argnums=(1, 2))(
        jax.random.PRNGKey(1), 20000, T, hist
    )
    freq = np.bincount(np.asarray(t), minlength=T) / 20000
    expected_p = np.array([1, 1, 2, 4]) / 8 * 0.999 + 0.001 / T
    np.testing.assert_allclose(freq, expected_p, atol=0.015)
    np.testing.assert_allclose(w, 1 / (T * expected_p[np.asarray(t)]), rtol=1e-5)
    # Importance weights keep the estimate unbiased: E[w f(t)] = mean_t f(t).
    f = np.array([1.0, 2.0, 3.0, 4.0])
    assert float(np.mean(np.asarray(w) * f[np.asarray(t)])) == pytest.approx(2.5, rel=0.03)
