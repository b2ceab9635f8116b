"""Tests of the Diffusion Transformer: sizes and FLOPs of the paper's models (shapes only, nothing
materialised), the official initialisation, position table and patch order, conditioning,
remat, bfloat16 compute and input validation (on a tiny model)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import DiT
from diffusion_jax.models.dit import (
    DiTBlock,
    FinalLayer,
    dit_config,
    dit_timestep_embedding,
    sincos_2d_table,
    softmax_attention,
    tokenwise,
    unpatchify,
)

TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, out_channels=2)
NUM_CLASSES = 10


# Jitted with the (hashable) module static, so each configuration compiles once.
@functools.partial(jax.jit, static_argnames=("model",))
def _init(model, x, t, y=None):
    return model.init(jax.random.PRNGKey(0), x, t, y, train=False)


@functools.partial(jax.jit, static_argnames=("model",))
def _apply(model, params, x, t, y=None):
    return model.apply(params, x, t, y, train=False)


@functools.partial(jax.jit, static_argnames=("model",))
def _output_and_grad(model, params, x, t, y=None):
    """The output and the gradient of sum(output^2) with respect to the parameters."""

    def loss(p):
        out = model.apply(p, x, t, y, train=False)
        return jnp.sum(out**2), out

    return jax.grad(loss, has_aux=True)(params)[::-1]


def _random_params(model, x, t, y=None, seed=0):
    """Random N(0, 0.2^2) parameters of the right shapes, without compiling `init`.

    (The zero-initialised adaLN and output layers make a fresh DiT output exactly zero.)
    """
    shapes = jax.eval_shape(lambda: _init(model, x, t, y))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


def _random_params_of(module, *args, seed=0):
    """Random N(0, 0.2^2) parameters of a submodule called with float32 ``args``."""
    args = [jnp.asarray(a, jnp.float32) for a in args]
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


def _latent_model_shapes(name):
    """Parameter shapes of DiT-<name> on 32x32x4 latents, 1000 classes, learned sigma."""
    model = DiT(**dit_config(name), out_channels=8, num_classes=1000)
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    init = lambda x, t, y: model.init(jax.random.PRNGKey(0), x, t, y, train=False)
    return model, jax.eval_shape(init, x, t, y), (x, t, y)


def _count(tree):
    return sum(math.prod(p.shape) for p in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tiny():
    model = DiT(**TINY, num_classes=NUM_CLASSES)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
    t = jnp.array([0.0, 250.5, 999.0])
    y = jnp.array([3, 7, NUM_CLASSES])
    params = _random_params(model, x, t, y)
    return model, params, x, t, y


def test_param_count_xl2():
    # The paper's 675M. The official counts the frozen 256 x 1152 position table as a parameter;
    # here it is a constant, so the trainable count is 294,912 lower.
    model, shapes, _ = _latent_model_shapes("XL/2")
    table = sincos_2d_table(model.hidden_size, 32 // 2)
    assert table.size == 294_912
    assert _count(shapes) == 674_834_720
    assert _count(shapes) + table.size == 675_129_632


def test_param_count_s2():
    model, shapes, _ = _latent_model_shapes("S/2")
    assert _count(shapes) + sincos_2d_table(model.hidden_size, 16).size == 32_963_360


def test_flops_xl2():
    # The paper's 118.6 GFLOPs count multiply-adds; XLA counts 2 FLOPs per multiply-add.
    # Measured (jax 0.10.2, CPU, lowered without compiling): 237,879,721,984 = 2 x 118.94 G,
    # 0.3% above 2 x 118.6 G (XLA also counts the elementwise and softmax work). ~1.5 s.
    model, shapes, (x, t, y) = _latent_model_shapes("XL/2")
    lowered = jax.jit(lambda p, x, t, y: model.apply(p, x, t, y, train=False)).lower(
        shapes, x, t, y
    )
    flops = lowered.cost_analysis()["flops"]
    assert flops == pytest.approx(2 * 118.6e9, rel=0.02)


def test_dit_config():
    assert dit_config("XL/2") == dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)
    assert dit_config("DiT-B/4") == dict(hidden_size=768, depth=12, num_heads=12, patch_size=4)
    assert dit_config("L/8") == dict(hidden_size=1024, depth=24, num_heads=16, patch_size=8)
    assert dit_config("S/2") == dict(hidden_size=384, depth=12, num_heads=6, patch_size=2)
    with pytest.raises(ValueError, match="unknown DiT"):
        dit_config("XL/3")


def test_position_table_by_hand():
    # dim 8 on a 4x4 grid: each coordinate gets 4 channels [sin(pos w0), sin(pos w1),
    # cos(pos w0), cos(pos w1)] with w = (1, 10000^(-1/2) = 0.01); the COLUMN comes first
    # (the official meshgrid(grid_w, grid_h)). Token 6 = row 1, column 2.
    table = sincos_2d_table(8, 4)
    assert table.shape == (16, 8) and table.dtype == np.float32
    expected = [
        *[math.sin(2.0), math.sin(0.02), math.cos(2.0), math.cos(0.02)],  # column 2
        *[math.sin(1.0), math.sin(0.01), math.cos(1.0), math.cos(0.01)],  # row 1
    ]
    np.testing.assert_allclose(table[1 * 4 + 2], expected, rtol=1e-6)
    np.testing.assert_allclose(
        table[1 * 4 + 2, :4], [0.9092974, 0.01999867, -0.4161468, 0.9998], rtol=1e-6
    )


def test_model_adds_position_table(tiny):
    # With the patch embedding's output zero (zero input, zero bias), the first block sees
    # exactly the position table.
    model, params, x, t, y = tiny
    params = jax.tree.map(lambda a: a, params)  # a copy of the nested dicts
    params["params"]["x_embedder"]["bias"] = jnp.zeros_like(params["params"]["x_embedder"]["bias"])

    @jax.jit
    def first_block_input(params, x):
        seen = []

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, DiTBlock) and context.module.name == "blocks_0":
                seen.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply(params, x, t, y, train=False)
        assert len(seen) == 1
        return seen[0]

    tokens = first_block_input(params, jnp.zeros_like(x))
    expected = np.broadcast_to(sincos_2d_table(32, 4), (3, 16, 32))
    np.testing.assert_allclose(tokens, expected, rtol=1e-6, atol=1e-7)


def test_timestep_embedding_cos_first():
    # freqs exp(-ln(10000) k / 128), k = 0..127; cosines first.
    emb = dit_timestep_embedding(jnp.array([0.0, 3.0]), 256)
    assert emb.shape == (2, 256) and emb.dtype == jnp.float32
    np.testing.assert_array_equal(emb[0], np.r_[np.ones(128), np.zeros(128)])
    f1 = 10000 ** (-1 / 128)
    np.testing.assert_allclose(
        emb[1, [0, 1, 128, 129]],
        [math.cos(3), math.cos(3 * f1), math.sin(3), math.sin(3 * f1)],
        rtol=1e-5,
    )


def test_unpatchify_by_hand():
    # 2x2 grid of 2x2 patches, one channel: token k holds 10k + (p_row * 2 + p_col).
    tokens = jnp.array([[[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]])
    image = unpatchify(tokens, 2, 1)
    expected = [
        [0, 1, 10, 11],
        [2, 3, 12, 13],
        [20, 21, 30, 31],
        [22, 23, 32, 33],
    ]
    np.testing.assert_array_equal(image[0, :, :, 0], expected)
    # One 2x2 patch of two channels: features ordered (p_row, p_col, channel).
    image = unpatchify(jnp.arange(8).reshape(1, 1, 8), 2, 2)
    np.testing.assert_array_equal(image[0], [[[0, 1], [2, 3]], [[4, 5], [6, 7]]])


def _np_layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)


def _np_dense(p, x):
    """``x [..., in] @ kernel + bias`` with the kernel flattened to [in, out] (attention's
    kernels have head axes)."""
    kernel = np.asarray(p["kernel"], np.float64).reshape(x.shape[-1], -1)
    return x @ kernel + np.asarray(p["bias"], np.float64).reshape(-1)


def _np_silu(x):
    return x / (1 + np.exp(-x))


def test_block_and_final_layer_match_formulas():
    # The official block and final layer written out in float64 NumPy, for random parameters:
    # chunk order (shift, scale, gate), qkv channels [3, heads, head_dim], 1/sqrt(head_dim),
    # tanh GELU, LayerNorm eps 1e-6 without affine.
    B, T, D, heads = 2, 5, 8, 2
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (B, T, D)), np.float64)
    c = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (B, D)), np.float64)
    block = DiTBlock(num_heads=heads, mlp_ratio=2.0)
    p = _random_params_of(block, x, c, seed=1)["params"]
    mod = _np_dense(p["adaLN_modulation"], _np_silu(c))[:, None, :]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = np.split(mod, 6, -1)
    h = _np_layer_norm(x) * (1 + scale_msa) + shift_msa
    q, k, v = np.moveaxis(_np_dense(p["attn"]["qkv"], h).reshape(B, T, 3, heads, D // heads), 2, 0)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // heads)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attn = _np_dense(p["attn"]["proj"], np.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, T, D))
    x1 = x + gate_msa * attn
    h = _np_dense(p["mlp"]["fc1"], _np_layer_norm(x1) * (1 + scale_mlp) + shift_mlp)
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    expected = x1 + gate_mlp * _np_dense(p["mlp"]["fc2"], h)
    out = jax.jit(block.apply)(
        {"params": p}, jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32)
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)

    final = FinalLayer(patch_size=2, out_channels=3)
    p = _random_params_of(final, x, c, seed=2)["params"]
    shift, scale = np.split(_np_dense(p["adaLN_modulation"], _np_silu(c))[:, None, :], 2, -1)
    expected = _np_dense(p["linear"], _np_layer_norm(x) * (1 + scale) + shift)
    out = jax.jit(final.apply)(
        {"params": p}, jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32)
    )
    assert out.shape == (B, T, 2 * 2 * 3)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "features, axis, x_shape", [(6, -1, (2, 5, 4)), (6, (-2, -1), (3, 2, 2, 4))]
)
def test_tokenwise_same_params_and_values_as_the_layer(features, axis, x_shape):
    """A Dense layer over [B*T, *F] tokens: the parameters and values of the layer applied to
    x [B, T, *F] directly, its result [B, T, out]."""
    layer = nn.DenseGeneral(features, axis=axis)
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    feature_axes = 1 if axis == -1 else len(axis)
    params = layer.init(jax.random.PRNGKey(1), x)
    tokens = layer.init(jax.random.PRNGKey(1), x.reshape(-1, *x_shape[2:]))
    assert jax.tree.map(jnp.shape, tokens) == jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda a: a + 0.1, params)  # non-zero bias
    out = layer.apply(params, x)
    got = jax.jit(lambda p, x: tokenwise(lambda h: layer.apply(p, h), x, feature_axes))(params, x)
    assert got.shape == x_shape[:2] + (features,)
    np.testing.assert_allclose(got, out, rtol=1e-6, atol=1e-6)


def test_softmax_attention_values_and_gradient_by_hand():
    # Against float64 NumPy: out = P v with P = softmax(q k^T) over the keys, per head; and the
    # gradient of sum(out * g) with respect to q by the chain rule through the softmax,
    # dL = P * (dP - rowsum(dP * P)) with dP = g v^T, dq = dL k. Operands are heads-major
    # [B, H, T, d]; Tq != Tk != H so a swapped axis fails; logits of order 1e3 would overflow
    # exp without the row max subtracted.
    B, Tq, Tk, H, d = 2, 3, 5, 4, 2
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, g = (np.asarray(jax.random.normal(key, (B, H, Tq, d))) for key in keys[:2])
    k, v = (np.asarray(jax.random.normal(key, (B, H, Tk, d))) for key in keys[2:])
    q = q * 300.0
    logits = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k)
    assert np.abs(logits).max() > 100  # exp(100) already overflows float32
    P = np.exp(logits - logits.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bhkd->bhqd", P, v)
    dP = np.einsum("bhqd,bhkd->bhqk", g, v)
    dL = P * (dP - (dP * P).sum(-1, keepdims=True))
    expected_dq = np.einsum("bhqk,bhkd->bhqd", dL, k)

    @jax.jit
    def out_and_dq(q, k, v, g):
        out, vjp = jax.vjp(lambda q: softmax_attention(q, k, v), q)
        return out, vjp(g)[0]

    out, dq = out_and_dq(q, k, v, g)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dq, expected_dq, rtol=1e-4, atol=1e-4)


def test_fresh_init_float32_zero_output_and_official_init():
    model = DiT(patch_size=2, hidden_size=64, depth=1, num_heads=2, out_channels=2, num_classes=5)
    x, t, y = jnp.ones((1, 4, 4, 1)), jnp.array([10]), jnp.array([1])
    params = _init(model, x, t, y)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = _apply(model, params, x, t, y)
    assert out.shape == (1, 4, 4, 2) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)

    p = params["params"]
    # Patch conv: xavier-uniform over the [out, in*p*p] view, bound sqrt(6 / (4 + 64)) = 0.297
    # (flax's conv fans would give sqrt(6 / (4 + 256)) = 0.152).
    kernel = p["x_embedder"]["kernel"]
    assert kernel.shape == (2, 2, 1, 64)
    assert 0.25 < np.abs(kernel).max() <= math.sqrt(6 / 68)
    np.testing.assert_array_equal(p["x_embedder"]["bias"], 0.0)
    qkv = p["blocks_0"]["attn"]["qkv"]["kernel"]  # xavier: sqrt(6 / (64 + 192)) = 0.153
    assert 0.14 < np.abs(qkv).max() <= math.sqrt(6 / 256)
    np.testing.assert_array_equal(p["blocks_0"]["mlp"]["fc1"]["bias"], 0.0)
    for w in [
        p["y_embedder"]["embedding_table"]["embedding"],
        p["t_embedder"]["mlp_0"]["kernel"],
        p["t_embedder"]["mlp_2"]["kernel"],
    ]:
        assert 0.015 < np.std(w) < 0.025
    assert p["y_embedder"]["embedding_table"]["embedding"].shape == (6, 64)
    for zero in [
        p["blocks_0"]["adaLN_modulation"],
        p["final_layer"]["adaLN_modulation"],
        p["final_layer"]["linear"],
    ]:
        for a in jax.tree.leaves(zero):
            np.testing.assert_array_equal(a, 0.0)


def test_output_depends_on_t_and_y_per_example(tiny):
    model, params, x, t, y = tiny
    out = _apply(model, params, x, t, y)
    assert out.shape == (3, 8, 8, 2) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    # t matters.
    out_t = _apply(model, params, x, t.at[0].add(1.0), y)
    assert not np.allclose(out_t[0], out[0])
    # y matters: another class, and the null label, differ from class 3.
    out_y = _apply(model, params, x, t, jnp.array([4, 7, NUM_CLASSES]))
    out_null = _apply(model, params, x, t, jnp.array([NUM_CLASSES, 7, NUM_CLASSES]))
    assert not np.allclose(out_y[0], out[0]) and not np.allclose(out_null[0], out[0])
    # Per-example independence: changing examples 1 and 2 leaves example 0 unchanged.
    x2 = x.at[1:].set(-x[1:])
    out_other = _apply(model, params, x2, jnp.array([0.0, 5.0, 6.0]), jnp.array([3, 0, 1]))
    np.testing.assert_allclose(out_other[0], out[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out_other[1], out[1])


def test_remat_same_params_output_and_gradient(tiny):
    model, params, x, t, y = tiny
    remat = model.clone(remat=True)
    shapes = jax.eval_shape(lambda: _init(remat, x, t, y))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    # Each block is rematerialised: one remat (checkpoint) call per block in the jaxpr.
    for m, calls in [(model, 0), (remat, TINY["depth"])]:
        jaxpr = jax.make_jaxpr(lambda p, m=m: m.apply(p, x, t, y, train=False))(params)
        names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
        assert sum("remat" in n or "checkpoint" in n for n in names) == calls, names
    out, grad = _output_and_grad(model, params, x, t, y)
    out_r, grad_r = _output_and_grad(remat, params, x, t, y)
    np.testing.assert_array_equal(out_r, out)
    jax.tree.map(np.testing.assert_array_equal, grad_r, grad)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_blocks_same_params_output_and_gradient(tiny, remat):
    """``scan_blocks``: the same parameter tree, one scan (one block traced) instead of one
    block per layer, and the unrolled network's output and gradient to float32 round-off."""
    model, params, x, t, y = tiny
    model = model.clone(remat=remat)
    scanned = model.clone(scan_blocks=True)
    shapes = jax.eval_shape(lambda: _init(scanned, x, t, y))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    jaxpr = jax.make_jaxpr(lambda p: scanned.apply(p, x, t, y, train=False))(params)
    assert [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"] == [
        TINY["depth"]
    ]
    out, grad = _output_and_grad(model, params, x, t, y)
    out_s, grad_s = _output_and_grad(scanned, params, x, t, y)
    # Round-off relative to each array's largest entry (gradients here reach 1e3).
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * np.abs(b).max())
    close(out_s, out)
    jax.tree.map(close, grad_s, grad)
    # Each layer's own parameters: the blocks' gradients differ (a scan over one block's
    # parameters, or over the layers in the wrong order, would fail above or here).
    fc1 = [grad_s["params"][f"blocks_{i}"]["mlp"]["fc1"]["kernel"] for i in range(TINY["depth"])]
    assert not np.allclose(fc1[0], fc1[1], atol=1e-3 * np.abs(fc1[1]).max())


def test_scanned_blocks_under_a_users_own_mesh(tiny):
    """Traced under a mesh without the library's axes (a user's own), the scanned blocks leave
    the split to GSPMD: the unrolled network's output, no error on a missing axis."""
    model, params, x, t, y = tiny
    scanned = model.clone(scan_blocks=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("replicas",))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        out_s = jax.jit(lambda p: scanned.apply(p, x, t, y, train=False))(params)
    out = model.apply(params, x, t, y, train=False)
    np.testing.assert_allclose(out_s, out, atol=1e-6 * np.abs(out).max())


def test_bfloat16_compute(tiny):
    model, params, x, t, y = tiny
    out = _apply(model, params, x, t, y)
    out_bf16 = _apply(model.clone(dtype=jnp.bfloat16), params, x, t, y)
    assert out_bf16.dtype == jnp.float32
    scale = np.abs(out).max()
    np.testing.assert_allclose(out_bf16, out, atol=0.05 * scale)
    assert not np.array_equal(out_bf16, out)


@pytest.mark.parametrize(
    "kwargs, x_shape, t_shape, y, match",
    [
        (dict(patch_size=3), (2, 8, 8, 1), (2,), None, "patch_size=3 must divide"),
        (dict(num_heads=3), (2, 8, 8, 1), (2,), None, "num_heads=3 must divide hidden_size"),
        ({}, (2, 8, 6, 1), (2,), None, "square"),
        ({}, (2, 8, 8), (2,), None, r"\[B, H, W, C\]"),
        ({}, (2, 8, 8, 1), (2, 1), None, r"t must have shape \[B\]"),
        ({}, (2, 8, 8, 1), (3,), None, r"t must have shape \[B\]"),
        ({}, (2, 8, 8, 1), (2,), jnp.zeros(2, jnp.int32), "num_classes=None"),
        (dict(num_classes=10), (2, 8, 8, 1), (2,), None, "class-conditional"),
        (dict(num_classes=10), (2, 8, 8, 1), (2,), jnp.zeros(3, jnp.int32), "y must have shape"),
    ],
)
def test_validation(kwargs, x_shape, t_shape, y, match):
    model = DiT(**{**TINY, **kwargs})
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(
            lambda: model.init(
                jax.random.PRNGKey(0), jnp.zeros(x_shape), jnp.zeros(t_shape), y, train=False
            )
        )
