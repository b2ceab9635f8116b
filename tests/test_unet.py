"""Tests of the DDPM U-Net: shapes, parameter counts, conditioning, dropout, validation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import UNet
from diffusion_jax.models.layers import timestep_embedding

TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)


# Jitted with the (hashable) module static, so each configuration compiles once; op-by-op
# Flax is an order of magnitude slower on CPU.
@functools.partial(jax.jit, static_argnames=("model",))
def _init(model, x, t, y=None):
    return model.init(jax.random.PRNGKey(0), x, t, y, train=False)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, params, x, t, y=None, *, train=False, rng=None):
    rngs = None if rng is None else {"dropout": rng}
    return model.apply(params, x, t, y, train=train, rngs=rngs)


def _random_params(model, x, t, y=None, seed=0):
    """Random N(0, 0.2^2) parameters of the right shapes, without compiling `init`.

    (Zero-initialised output layers would make a freshly initialised model output zeros.)
    """
    shapes = jax.eval_shape(lambda: _init(model, x, t, y))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


def _param_count(model, hw, channels=3):
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0),
            jnp.zeros((1, hw, hw, channels)),
            jnp.zeros((1,), jnp.int32),
            train=False,
        )
    )
    return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes))


@pytest.fixture(scope="module")
def tiny():
    model = UNet(**TINY, out_channels=6, dropout=0.5)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1, maxval=1)
    t = jnp.array([0, 999])
    params = _random_params(model, x, t)
    return model, params, x, t


def test_param_count_cifar10():
    # Ho et al. 2020 report 35.7M parameters for the CIFAR-10 model.
    assert _param_count(UNet(), 32) == 35_746_307


def test_param_count_256():
    # The 256x256 (CelebA-HQ / LSUN) models: the paper's 114M.
    assert _param_count(UNet(ch_mult=(1, 1, 2, 2, 4, 4)), 256) == 113_673_219


def test_init_float32_params_zero_output():
    # Smaller still: compiling `init` (one PRNG split per parameter) dominates this test.
    model = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, num_groups=2, dtype=jnp.bfloat16)
    x, t = jnp.ones((1, 4, 4, 3)), jnp.array([10])
    params = _init(model, x, t)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    # The output conv is zero-initialised, as in the reference.
    np.testing.assert_array_equal(_apply(model, params, x, t), 0.0)


def test_output_shape_dtype(tiny):
    model, params, x, t = tiny
    out = _apply(model, params, x, t)
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32
    out16 = _apply(UNet(**TINY, out_channels=6, dtype=jnp.bfloat16), params, x, t)
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(out16, out, atol=0.1 * float(jnp.abs(out).max()))


def test_deterministic_without_train(tiny):
    model, params, x, t = tiny
    a = _apply(model, params, x, t)
    b = _apply(model, params, x, t)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a).mean()) > 0


def test_dropout_depends_on_rng(tiny):
    model, params, x, t = tiny
    run = lambda seed: _apply(model, params, x, t, train=True, rng=jax.random.PRNGKey(seed))
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))
    assert not np.allclose(run(0), _apply(model, params, x, t))


def test_class_conditioning():
    model = UNet(**TINY, num_classes=10)
    x = jnp.zeros((3, 8, 8, 3))
    t = jnp.array([5, 5, 5])
    y = jnp.array([0, 3, 10])  # 10 == num_classes: the "no label" token
    params = _random_params(model, x, t, y)
    assert params["params"]["label_emb"]["embedding"].shape == (11, 4 * TINY["ch"])
    out = _apply(model, params, x, t, y)
    assert np.all(np.isfinite(out))
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[1], out[2])
    with pytest.raises(ValueError, match="class-conditional"):
        _apply(model, params, x, t)
    with pytest.raises(ValueError, match="num_classes=None"):
        UNet(**TINY).init(jax.random.PRNGKey(0), x, t, y, train=False)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 8, 8), "NHWC"),
        ((2, 8, 16, 3), "square"),
        ((2, 7, 7, 3), "divisible"),
    ],
)
def test_bad_input_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        _init(UNet(**TINY), jnp.zeros(shape), jnp.zeros((2,)))


def test_bad_t_shape():
    with pytest.raises(ValueError, match="t must have shape"):
        _init(UNet(**TINY), jnp.zeros((2, 8, 8, 3)), jnp.zeros((3,)))


def test_jit_int_and_float_timesteps_agree(tiny):
    model, params, x, t = tiny
    np.testing.assert_allclose(
        _apply(model, params, x, t.astype(jnp.float32)),
        _apply(model, params, x, t),
        rtol=1e-5,
        atol=1e-5,
    )


def test_timestep_embedding_values():
    # dim 8: frequencies 10000**(-k/3), k = 0..3; sines then cosines.
    t = 7.0
    freqs = np.array([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
    expected = np.concatenate([np.sin(t * freqs), np.cos(t * freqs)])
    np.testing.assert_allclose(
        timestep_embedding(jnp.array([t]), 8)[0], expected, rtol=1e-5, atol=1e-6
    )


def test_model_feeds_timestep_embedding_to_first_dense(tiny):
    model, params, x, t = tiny
    capture = jax.jit(
        lambda p: model.apply(
            p,
            x,
            t,
            train=False,
            mutable=["intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name == "temb_dense0",
        )
    )
    _, state = capture(params)
    dense = params["params"]["temb_dense0"]
    expected = timestep_embedding(t, TINY["ch"]) @ dense["kernel"] + dense["bias"]
    np.testing.assert_allclose(
        state["intermediates"]["temb_dense0"]["__call__"][0], expected, rtol=1e-5, atol=1e-5
    )
