import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import schedules
from diffusion_jax.schedules import Schedule


@pytest.mark.parametrize("name", schedules.BETA_SCHEDULES)
def test_betas_shape_range_and_dtype(name):
    betas = schedules.get_betas(name, 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    # Never 1: abar would reach 0 and the x0 prediction divide by sqrt(abar) = 0.
    assert np.all(betas > 0) and np.all(betas < 1)


def test_linear_matches_ddpm_and_abar_T():
    betas = schedules.get_betas("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # log abar_T = sum log(1 - beta) = -(sum b + sum b^2/2 + sum b^3/3 + ...); with the sums of
    # the linear sequence in closed form: sum b = T (b0 + b1) / 2 = 10.05, and
    # sum b^2 = T (b0^2 + b0 b1 + b1^2) / 3 + O(1/T) terms.
    b0, b1, T = 1e-4, 0.02, 1000
    step = (b1 - b0) / (T - 1)
    k = np.arange(T)
    s1 = T * (b0 + b1) / 2
    s2 = T * b0**2 + 2 * b0 * step * k.sum() + step**2 * (k**2).sum()
    s3 = np.sum((b0 + step * k) ** 3)
    log_abar = -(s1 + s2 / 2 + s3 / 3)
    sched = Schedule.from_betas(betas)
    # Fourth-order term: sum b^4 / 4 ~ 8e-6 relative.
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(np.exp(log_abar), rel=2e-5)
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(4.036e-5, rel=1e-3)


def test_linear_scales_with_num_timesteps():
    betas = schedules.get_betas("linear", 4000)
    assert betas[0] == pytest.approx(2.5e-5) and betas[-1] == pytest.approx(0.005)
    unscaled = schedules.get_betas("linear", 4000, scale_to_timesteps=False)
    assert unscaled[-1] == pytest.approx(0.02)


def test_cosine_is_clipped_and_follows_formula():
    betas = schedules.get_betas("cosine", 1000)
    assert betas.max() == pytest.approx(0.999)
    abar = np.cumprod(1 - betas)
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    assert abar[499] == pytest.approx(f(500) / f(0), rel=1e-12)
    assert np.all(np.isfinite(np.asarray(Schedule.from_betas(betas).sqrt_recipm1_alphas_cumprod)))


def test_unknown_schedule_and_bad_args():
    with pytest.raises(ValueError, match="valid: linear, cosine"):
        schedules.get_betas("cosin", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.get_betas("linear", 0)
    with pytest.raises(ValueError, match="Unexpected arguments"):
        schedules.get_betas("cosine", 10, beta_end=0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        schedules.get_betas("linear", 10)  # 0.02 * 1000 / 10 = 2 > 1


@pytest.mark.parametrize("name", ["cosine", "jsd"])
@pytest.mark.parametrize("T", [1, 20, 1000])
def test_schedules_ending_at_beta_one_are_clipped(name, T):
    """Both formulas end at beta = 1 (abar_T = 0); they are clipped at 0.999 as in Improved
    DDPM, the rest of the sequence untouched."""
    betas = schedules.get_betas(name, T)
    assert betas[-1] == 0.999 and np.all(betas < 1)
    if name == "jsd":
        np.testing.assert_array_equal(betas[:-1], 1.0 / np.arange(T, 1, -1))


def test_parameterised_schedules_reject_a_beta_of_one():
    # Scaled linear at T = 20 ends at 0.02 * 1000 / 20 = 1: rejected, not clipped (the end
    # points are the user's choice); T = 21 is the shortest valid one.
    with pytest.raises(ValueError, match=r"beta_end=1\.0 .* must lie in \(0, 1\)"):
        schedules.get_betas("linear", 20)
    assert schedules.get_betas("linear", 21)[-1] == pytest.approx(0.02 * 1000 / 21)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        schedules.get_betas("const", 50, beta_end=1.0, scale_to_timesteps=False)


def test_schedule_fields_hand_derived():
    betas = schedules.get_betas("linear", 1000)
    s = Schedule.from_betas(betas)
    assert all(
        getattr(s, f).dtype == jnp.float32
        for f in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1")
    )
    b0, b1 = betas[0], betas[1]
    assert float(s.posterior_variance[0]) == 0.0
    assert float(s.posterior_variance[1]) == pytest.approx(b0 * b1 / (b0 + b1 - b0 * b1), rel=1e-6)
    assert float(s.posterior_log_variance_clipped[0]) == pytest.approx(
        np.log(b0 * b1 / (b0 + b1 - b0 * b1)), rel=1e-6
    )
    # At t=0 the posterior mean is x0 itself: coef1 = 1, coef2 = 0.
    assert float(s.posterior_mean_coef1[0]) == pytest.approx(1.0)
    assert float(s.posterior_mean_coef2[0]) == 0.0
    np.testing.assert_array_equal(np.asarray(s.timestep_map), np.arange(1000))
    assert s.num_timesteps == 1000


def test_schedule_is_a_pytree_usable_under_jit():
    s = Schedule.create("cosine", 50)
    f = jax.jit(lambda sched, t: sched.alphas_cumprod[t])
    assert float(f(s, 3)) == pytest.approx(float(s.alphas_cumprod[3]))
    leaves = jax.tree_util.tree_leaves(s)
    assert len(leaves) == 15


def test_from_betas_rejects_bad_betas():
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        Schedule.from_betas(np.array([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        Schedule.from_betas(np.array([0.1, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        Schedule.from_betas(np.ones((2, 2)) * 0.1)


def test_respace_all_steps_is_identity():
    betas = schedules.get_betas("linear", 100)
    full = Schedule.from_betas(betas)
    same = schedules.respace(betas, range(100))
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(same), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_respace_keeps_marginals_and_maps_timesteps():
    betas = schedules.get_betas("cosine", 1000)
    kept = schedules.space_timesteps(1000, 50)
    sub = schedules.respace(betas, kept)
    assert sub.num_timesteps == 50
    np.testing.assert_array_equal(np.asarray(sub.timestep_map), kept)
    full = Schedule.from_betas(betas)
    np.testing.assert_allclose(
        np.asarray(sub.alphas_cumprod), np.asarray(full.alphas_cumprod)[kept], rtol=1e-5
    )


def test_space_timesteps_variants():
    np.testing.assert_array_equal(schedules.space_timesteps(1000, 2), [0, 999])
    even = schedules.space_timesteps(1000, 100)
    assert len(even) == 100 and even[0] == 0 and even[-1] == 999
    np.testing.assert_array_equal(schedules.space_timesteps(1000, "ddim50"), np.arange(0, 1000, 20))
    quad = schedules.space_timesteps(1000, "quad20")
    assert quad[0] == 0 and np.all(np.diff(quad) > 0) and np.diff(quad)[0] < np.diff(quad)[-1]
    sections = schedules.space_timesteps(300, "10,5")
    assert len(sections) == 15 and sections[0] == 0 and sections[9] == 149 and sections[-1] == 299
    with pytest.raises(ValueError, match="cannot keep"):
        schedules.space_timesteps(10, 11)
    with pytest.raises(ValueError, match="gives"):
        schedules.space_timesteps(1000, "ddim300")
