import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffusion_jax import diffusion
from diffusion_jax.schedules import Schedule

SCHED = Schedule.create("linear", 1000)


def _batch(key=0, shape=(4, 8, 8, 3)):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
    x0 = jax.random.uniform(k1, shape, minval=-1, maxval=1)
    noise = jax.random.normal(k2, shape)
    t = jax.random.randint(k3, (shape[0],), 0, 1000)
    return x0, noise, t


def test_posterior_is_the_conditional_of_the_joint():
    # q(x_{t-1} | x_t, x0) from Bayes: prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) on x_{t-1},
    # likelihood N(x_t; sqrt(alpha_t) x_{t-1}, beta_t).
    x0, noise, t = _batch(1)
    t = jnp.maximum(t, 1)
    x_t = diffusion.q_sample(SCHED, x0, t, noise)
    mean, var, log_var = diffusion.q_posterior(SCHED, x0, x_t, t)
    b = np.asarray(SCHED.betas, np.float64)[np.asarray(t)][:, None, None, None]
    abar_prev = np.asarray(SCHED.alphas_cumprod_prev, np.float64)[np.asarray(t)][
        :, None, None, None
    ]
    prior_prec, lik_prec = 1 / (1 - abar_prev), (1 - b) / b
    post_var = 1 / (prior_prec + lik_prec)
    post_mean = post_var * (
        prior_prec * np.sqrt(abar_prev) * x0 + np.sqrt(1 - b) / b * np.asarray(x_t)
    )
    np.testing.assert_allclose(mean, post_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.broadcast_to(var, x0.shape), np.broadcast_to(post_var, x0.shape), rtol=1e-4
    )
    np.testing.assert_allclose(np.exp(log_var), np.broadcast_to(var, log_var.shape), rtol=1e-4)


class TestJittedAndNot(chex.TestCase):
    """Each test runs twice: the function under test called as it is and under ``jax.jit``."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_q_sample_matches_formula(self):
        x0, noise, t = _batch()
        x_t = self.variant(diffusion.q_sample)(SCHED, x0, t, noise)
        abar = np.asarray(SCHED.alphas_cumprod)[np.asarray(t)][:, None, None, None]
        np.testing.assert_allclose(
            x_t, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, rtol=1e-5, atol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*diffusion.MEAN_TYPES)
    def test_parameterisations_round_trip(self, mean_type):
        x0, noise, t = _batch(2)
        t = jnp.maximum(t, 1) if mean_type == "mu" else t
        x_t = diffusion.q_sample(SCHED, x0, t, noise)
        target = diffusion.training_target(SCHED, x0, x_t, t, noise, mean_type)
        predict_x0 = self.variant(diffusion.predict_x0, static_argnums=4)
        np.testing.assert_allclose(predict_x0(SCHED, x_t, t, target, mean_type), x0, atol=2e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_learned_range_interpolates_log_variances(self):
        """``log var = f log beta_t + (1 - f) log beta~_t``, ``f = (v + 1) / 2``, at interior v,
        against float64 values from DDPM's linear betas (1e-4 to 0.02 over T = 1000); beta~_0
        is 0, so t = 0 takes log beta~_1 as the library's clipped log-variance does."""
        t = np.array([0, 1, 500, 999])
        v = np.array([-0.5, 0.0, 0.3])
        betas = np.linspace(1e-4, 0.02, 1000)
        abar = np.cumprod(1 - betas)
        posterior = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])  # beta~_t for t >= 1
        log_posterior = np.log(np.concatenate([posterior[:1], posterior]))
        f = (v + 1) / 2
        expected = f * np.log(betas)[t, None] + (1 - f) * log_posterior[t, None]  # [4, 3]

        variance_of = self.variant(diffusion.model_log_variance, static_argnums=4)
        x_t = jnp.zeros((4, 3))
        var_values = jnp.broadcast_to(jnp.asarray(v, jnp.float32), x_t.shape)
        var, log_var = variance_of(SCHED, x_t, jnp.asarray(t), var_values, "learned_range")
        np.testing.assert_allclose(log_var, expected, rtol=1e-6)
        np.testing.assert_allclose(var, np.exp(expected), rtol=1e-5)


def test_eps_and_v_identities():
    x0, noise, t = _batch(3)
    t = jnp.minimum(t, 900)  # x0 from eps amplifies float32 error by 1/sqrt(abar) near T
    x_t = diffusion.q_sample(SCHED, x0, t, noise)
    np.testing.assert_allclose(diffusion.eps_from_x0(SCHED, x_t, t, x0), noise, atol=2e-3)
    v = diffusion.v_from_x0_eps(SCHED, x0, t, noise)
    np.testing.assert_allclose(diffusion.x0_from_v(SCHED, x_t, t, v), x0, atol=1e-5)


def test_p_mean_variance_with_true_eps_gives_true_posterior():
    x0, noise, t = _batch(4)
    t = jnp.clip(t, 1, 900)
    x_t = diffusion.q_sample(SCHED, x0, t, noise)
    out = diffusion.p_mean_variance(SCHED, noise, x_t, t, mean_type="eps", var_type="fixed_small")
    true_mean, true_var, true_log_var = diffusion.q_posterior(SCHED, x0, x_t, t)
    np.testing.assert_allclose(out["mean"], true_mean, atol=1e-4)
    np.testing.assert_allclose(
        out["log_variance"], jnp.broadcast_to(true_log_var, x0.shape), rtol=1e-6
    )
    np.testing.assert_allclose(out["pred_eps"], noise, atol=2e-3)


def test_variance_types():
    x_t = jnp.zeros((3, 2, 2, 1))
    t = jnp.array([0, 1, 999])
    _, small = diffusion.model_log_variance(SCHED, x_t, t, None, "fixed_small")
    _, large = diffusion.model_log_variance(SCHED, x_t, t, None, "fixed_large")
    plvc = np.asarray(SCHED.posterior_log_variance_clipped)
    np.testing.assert_allclose(small[:, 0, 0, 0], plvc[[0, 1, 999]], rtol=1e-6)
    # fixed_large: beta_t, except t=0 which uses the posterior variance at t=1.
    np.testing.assert_allclose(
        large[:, 0, 0, 0], [plvc[1], np.log(SCHED.betas[1]), np.log(SCHED.betas[999])], rtol=1e-6
    )
    # learned_range interpolates between them: v=-1 -> posterior, v=+1 -> beta.
    for v, expected in ((-1.0, plvc[[0, 1, 999]]), (1.0, np.log(SCHED.betas)[[0, 1, 999]])):
        _, lr = diffusion.model_log_variance(SCHED, x_t, t, jnp.full(x_t.shape, v), "learned_range")
        np.testing.assert_allclose(lr[:, 0, 0, 0], expected, rtol=1e-6)


def test_clip_denoised_and_output_checks():
    x_t = jnp.full((2, 4, 4, 3), 3.0)
    t = jnp.array([5, 10])
    out = diffusion.p_mean_variance(
        SCHED, x_t * 10, x_t, t, mean_type="x0", var_type="fixed_large", clip_denoised=True
    )
    assert float(out["pred_x0"].max()) == 1.0
    with pytest.raises(ValueError, match="does not match"):
        diffusion.p_mean_variance(
            SCHED, x_t[..., :2], x_t[..., :2], t, mean_type="eps", var_type="learned_range"
        )
    with pytest.raises(ValueError, match="even number"):
        diffusion.p_mean_variance(SCHED, x_t, x_t, t, mean_type="eps", var_type="learned_range")
    with pytest.raises(ValueError, match="valid: eps, x0, v, mu"):
        diffusion.p_mean_variance(SCHED, x_t, x_t, t, mean_type="epsilon", var_type="fixed_large")
    with pytest.raises(ValueError, match="var_type"):
        diffusion.p_mean_variance(SCHED, x_t, x_t, t, mean_type="eps", var_type="learned")
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        diffusion.q_sample(SCHED, x_t, jnp.array(3), x_t)


def test_vmap_over_independent_batches():
    x0, noise, t = _batch(5)
    stacked = jax.vmap(lambda a, b: diffusion.q_sample(SCHED, a, t, b))(
        jnp.stack([x0, -x0]), jnp.stack([noise, noise])
    )
    np.testing.assert_allclose(
        stacked[1], diffusion.q_sample(SCHED, -x0, t, noise), rtol=1e-6, atol=1e-7
    )
