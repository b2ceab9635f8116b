"""Tests of the DDPM U-Net: shapes, parameter counts, conditioning, dropout, validation; and of
its ADM options (AdaGN, multi-head attention, resampling ResBlocks, a label table without the
null label)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import UNet
from diffusion_jax.models.classifier import NoisyClassifier
from diffusion_jax.models.layers import AttnBlock, ResBlock, timestep_embedding
from diffusion_jax.models.unet import attn_heads

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


def _param_count(model, hw, channels=3, y=None):
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0),
            jnp.zeros((1, hw, hw, channels)),
            jnp.zeros((1,), jnp.int32),
            y,
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


# ---------------------------------------------------------------------------------------------
# ADM options (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021).


def test_param_count_improved_diffusion_cifar10():
    # improved-diffusion's CIFAR-10 flags: num_channels 128, num_res_blocks 3, learn_sigma,
    # dropout 0.3, attention at 16 and 8, num_heads 4, use_scale_shift_norm, channel_mult
    # (1, 2, 2, 2), conv resampling; their UNetModel has 52,546,438 parameters.
    model = UNet(
        ch=128,
        num_res_blocks=3,
        out_channels=6,
        dropout=0.3,
        attn_resolutions=(16, 8),
        num_heads=4,
        scale_shift_norm=True,
    )
    assert _param_count(model, 32) == 52_546_438


def test_param_count_adm_imagenet64():
    # guided-diffusion's ImageNet-64 model (README flags): 295,904,454 parameters.
    model = UNet(
        ch=192,
        ch_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attn_resolutions=(32, 16, 8),
        num_head_channels=64,
        resblock_updown=True,
        scale_shift_norm=True,
        out_channels=6,
        dropout=0.1,
        num_classes=1000,
        null_label=False,
    )
    assert _param_count(model, 64, y=jnp.zeros((1,), jnp.int32)) == 295_904_454


def _np_group_norm(x, p, groups, eps=1e-6):
    B, H, W, C = x.shape
    g = x.reshape(B, H, W, groups, C // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(x.shape) * p["scale"] + p["bias"]


def _np_conv3x3(x, p):
    H, W = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(xp[:, i : i + H, j : j + W] @ p["kernel"][i, j] for i in range(3) for j in range(3))
    return out + p["bias"]


def _np_swish(x):
    return x / (1 + np.exp(-x))


_NP_RESAMPLE = {
    None: lambda x: x,
    "down": lambda x: x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, -1).mean(
        axis=(2, 4)
    ),
    "up": lambda x: x.repeat(2, axis=1).repeat(2, axis=2),
}


def _np_resblock(p, x, temb, groups, scale_shift_norm, resample=None):
    """guided-diffusion's ResBlock._forward, written out in NumPy (float64)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x, temb = np.asarray(x, np.float64), np.asarray(temb, np.float64)
    h = _np_swish(_np_group_norm(x, p["norm1"], groups))
    h, x = _NP_RESAMPLE[resample](h), _NP_RESAMPLE[resample](x)
    h = _np_conv3x3(h, p["conv1"])
    emb = (_np_swish(temb) @ p["temb_proj"]["kernel"] + p["temb_proj"]["bias"])[:, None, None]
    if scale_shift_norm:
        scale, shift = np.split(emb, 2, axis=-1)
        h = _np_group_norm(h, p["norm2"], groups) * (1 + scale) + shift
    else:
        h = _np_group_norm(h + emb, p["norm2"], groups)
    h = _np_conv3x3(_np_swish(h), p["conv2"])
    return x + h


def _block_params(block, *args, seed=0, **kwargs):
    shapes = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), *args, **kwargs))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.mark.parametrize(
    "scale_shift_norm, resample", [(False, None), (True, None), (True, "down"), (False, "up")]
)
def test_resblock_matches_numpy(scale_shift_norm, resample):
    block = ResBlock(8, 0.0, num_groups=2, scale_shift_norm=scale_shift_norm, resample=resample)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 8))
    temb = jax.random.normal(jax.random.PRNGKey(2), (2, 16))
    params = _block_params(block, x, temb, train=False)
    proj = params["params"]["temb_proj"]["kernel"]
    assert proj.shape == (16, 16 if scale_shift_norm else 8)
    out = jax.jit(lambda p: block.apply(p, x, temb, train=False))(params)
    expected = _np_resblock(params["params"], x, temb, 2, scale_shift_norm, resample)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("resample", ["down", "up"])
def test_resampling_resblock_skip_path_resamples(resample):
    # With conv2 zero the residual branch is zero: the block is its resampled skip input.
    block = ResBlock(8, 0.0, num_groups=2, scale_shift_norm=True, resample=resample)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 8))
    temb = jax.random.normal(jax.random.PRNGKey(2), (2, 16))
    params = _block_params(block, x, temb, train=False)
    params["params"]["conv2"] = jax.tree.map(jnp.zeros_like, params["params"]["conv2"])
    out = jax.jit(lambda p: block.apply(p, x, temb, train=False))(params)
    np.testing.assert_allclose(out, _NP_RESAMPLE[resample](np.asarray(x)), rtol=1e-6, atol=1e-6)


def _np_attention(p, x, groups, num_heads):
    """Multi-head self-attention written out in NumPy (float64), head by head."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    B, H, W, C = x.shape
    d = C // num_heads
    h = _np_group_norm(x, p["norm"], groups).reshape(B, H * W, C)
    q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in "qkv")
    heads = []
    for i in range(num_heads):
        s = slice(i * d, (i + 1) * d)
        logits = np.einsum("bqc,bkc->bqk", q[..., s], k[..., s]) / np.sqrt(d)
        w = np.exp(logits - logits.max(axis=-1, keepdims=True))
        heads.append(np.einsum("bqk,bkc->bqc", w / w.sum(axis=-1, keepdims=True), v[..., s]))
    out = np.concatenate(heads, axis=-1) @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    return x + out.reshape(x.shape)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_multihead_attention_matches_numpy(num_heads):
    block = AttnBlock(num_groups=2, num_heads=num_heads)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 16))
    params = _block_params(block, x)
    out = jax.jit(block.apply)(params, x)
    expected = _np_attention(params["params"], x, 2, num_heads)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


class _DDPMAttnBlock(nn.Module):
    """The single-head AttnBlock as it was before heads were added, verbatim."""

    num_groups: int = 32

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        h = nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-6, name="norm")(x)

        def proj(name):
            return nn.Dense(C, name=name)

        q = proj("q")(h).reshape(B, H * W, C)
        k = proj("k")(h).reshape(B, H * W, C)
        v = proj("v")(h).reshape(B, H * W, C)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (C**-0.5), axis=-1)
        h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(B, H, W, C)
        return x + proj("proj_out")(h)


def test_one_head_attention_is_the_ddpm_block_bit_for_bit():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 32))
    params = _block_params(AttnBlock(num_groups=4), x)
    new = jax.jit(AttnBlock(num_groups=4).apply)(params, x)
    old = jax.jit(_DDPMAttnBlock(num_groups=4).apply)(params, x)
    np.testing.assert_array_equal(new, old)


def test_num_head_channels_sets_the_heads():
    assert attn_heads(UNet(num_heads=3, num_head_channels=8), 32) == 4
    assert attn_heads(UNet(num_heads=3), 32) == 3
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    init = lambda model: jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), x, t, train=False)
    )
    # Attention over 16 channels at 8x8 and 32 at 4x4: 8 channels per head override num_heads
    # 3, which alone does not divide 16; 12 channels per head do not divide either.
    init(UNet(**{**TINY, "attn_resolutions": (8, 4)}, num_heads=3, num_head_channels=8))
    with pytest.raises(ValueError, match="cannot have 3 heads"):
        init(UNet(**TINY, num_heads=3))
    with pytest.raises(ValueError, match="num_head_channels=12"):
        init(UNet(**TINY, num_head_channels=12))


def test_resblock_updown_unet_shapes_and_layers():
    model = UNet(**TINY, out_channels=6, resblock_updown=True, scale_shift_norm=True)
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,), jnp.int32)
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(jax.random.PRNGKey(0), x, t, train=False)
    )
    assert out.shape == (2, 8, 8, 6)
    params = variables["params"]
    for name, c in (("down_0_downsample", 16), ("up_1_upsample", 32)):
        assert set(params[name]) == {"norm1", "conv1", "temb_proj", "norm2", "conv2"}
        assert params[name]["conv1"]["kernel"].shape == (3, 3, c, c)
        assert params[name]["temb_proj"]["kernel"].shape == (64, 2 * c)  # AdaGN: 2 * c
    # The classifier's trunk is the same layers under the same names.
    clf = NoisyClassifier(num_classes=3, **TINY, resblock_updown=True, scale_shift_norm=True)
    clf_params = jax.eval_shape(lambda: clf.init(jax.random.PRNGKey(0), x, t, train=False))
    trunk = {k: v for k, v in clf_params["params"].items() if k not in ("norm_out", "head")}
    assert jax.tree.map(lambda s: s.shape, trunk) == jax.tree.map(
        lambda s: s.shape, {k: params[k] for k in trunk}
    )


def test_label_table_without_null_label():
    model = UNet(**TINY, num_classes=10, null_label=False)
    x, t = jnp.zeros((3, 8, 8, 3)), jnp.array([5, 5, 5])
    y = jnp.array([0, 3, 9])
    params = _random_params(model, x, t, y)
    assert params["params"]["label_emb"]["embedding"].shape == (10, 4 * TINY["ch"])
    assert np.all(np.isfinite(_apply(model, params, x, t, y)))
    # Label 10 (the null label of a num_classes + 1 table) is refused with concrete labels ...
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*null_label=False"):
        model.apply(params, x, t, jnp.array([0, 3, 10]), train=False)
    # ... and under jit, where labels cannot be checked, it poisons its example with NaN.
    out = _apply(model, params, x, t, jnp.array([0, 3, 10]))
    assert np.all(np.isfinite(out[:2])) and np.all(np.isnan(out[2]))
