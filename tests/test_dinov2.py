"""DINOv2 (diffusion_jax.dinov2): resampling, the network, its weight import and refusals.

Without torch: the resampling matrices against hand-derived rows, linear-ramp invariants and
PIL's own bicubic resize; the features of random weights against a float64 NumPy forward pass
of the official code written out here; transformers' key names against the official ones; the
one-line refusals of wrong files. With torch and transformers (the `peer` extra): our network
on random weights against transformers' ``Dinov2Model`` (a tiny config, and ViT-L/14 at one
224 x 224 image), imported from transformers' and from official names, with transformers'
position resampling and with the official one (its ``interpolate_pos_encoding`` call).
"""

import dataclasses
import json
import math
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from scipy.special import erf

from diffusion_jax import dinov2, inception

TINY2 = dataclasses.replace(dinov2.TINY, num_heads=2)  # two heads of 32 channels


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- Resampling ---


def test_pos_embed_matrix_rows_by_hand():
    # 4 -> 2 to the grid size: source coordinates 0.5 and 2.5, so Keys' weights (a = -0.75) at
    # distances 1.5, 0.5, 0.5, 1.5 are -3/32, 19/32, 19/32, -3/32, the taps -1 and 4 clamped.
    want = np.array([[16, 19, -3, 0], [0, -3, 19, 16]]) / 32
    np.testing.assert_allclose(dinov2.pos_embed_matrix(4, 2, 0.0), want, atol=1e-7)
    # With the official +0.1: coordinates (i + 0.5) * 4 / 2.1 - 0.5 = 19/42 and 33/14, i.e.
    # t = 19/42 after tap 0 and t = 5/14 after tap 2; Keys' weights at 1 + t, t, 1 - t, 2 - t
    # (exact fractions, rounded here), the clamped taps added to the edge columns.
    want = [
        [-0.101747246517655 + 0.655264685239175, 0.530534634488716, -0.084052073210236, 0],
        [0, -0.110696064139942, 0.769952623906706, 0.402241253644315 - 0.061497813411079],
    ]
    np.testing.assert_allclose(dinov2.pos_embed_matrix(4, 2, 0.1), want, atol=1e-6)
    # The table's own grid: used as it is (the official returns pos_embed unresampled).
    table = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    np.testing.assert_array_equal(dinov2.interpolate_pos_embed(table, (4, 4), 0.1), table)


def test_upsizing_reproduces_a_ramp():
    """Keys' kernel with a = -0.5 reproduces linear functions: away from the edges (where the
    cut-off kernel is renormalised) an 8-pixel ramp upsized to 224 takes the values of the
    output pixels' source coordinates (i + 0.5) * 8 / 224 - 0.5."""
    n_in = 8
    got = dinov2.resize_matrix(n_in, 224) @ np.arange(n_in, dtype=np.float64)
    coords = (np.arange(224) + 0.5) * n_in / 224 - 0.5
    inside = (coords >= 1) & (coords <= n_in - 2)
    np.testing.assert_allclose(got[inside], coords[inside], atol=1e-4)


@pytest.mark.parametrize("n_in", [8, 256, 224], ids=["up", "down", "same"])
def test_resize_matches_pil_bicubic(n_in):
    """PIL's bicubic resize of float ("F") images: the filter, its support when shrinking and
    the renormalised edges, computed by PIL (dgm-eval's ``pil_resize`` calls it so)."""
    x = np.random.default_rng(1).uniform(0, 255, (n_in, n_in + 3)).astype(np.float32)
    want = np.asarray(Image.fromarray(x, mode="F").resize((224, 224), Image.BICUBIC))
    got = dinov2.resize_matrix(n_in, 224) @ x @ dinov2.resize_matrix(n_in + 3, 224).T
    np.testing.assert_allclose(got, want, atol=2e-4)


# --- The network against a NumPy forward pass of the official code ---


def _torch_bicubic(n_in, n_out, scale):
    """PyTorch's ``upsample_bicubic2d`` (align_corners False) along one axis, from its
    source: ``cubic_convolution1``/``2`` with A = -0.75, indices clamped."""
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        s = (i + 0.5) * scale - 0.5
        f = math.floor(s)
        t = s - f
        for k, w in enumerate([far(t + 1), near(t), near(1 - t), far(2 - t)]):
            m[i, min(max(f - 1 + k, 0), n_in - 1)] += w
    return m


def _numpy_features(sd, images, heads, offset=0.1):
    """float64 ``DinoVisionTransformer.forward`` (official names) on EDM2's preprocessing,
    the resize done by PIL."""
    w = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    resized = np.stack(
        [
            np.stack(
                [
                    np.asarray(
                        Image.fromarray(img[..., c].astype(np.float32), mode="F").resize(
                            (224, 224), Image.BICUBIC
                        )
                    )
                    for c in range(3)
                ],
                -1,
            )
            for img in images
        ]
    )
    x = (resized / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    n, p, d = len(x), 14, w["cls_token"].shape[-1]
    g = 224 // p
    # Patches in the Conv2d weight's (in, kh, kw) order, row-major over the grid.
    patches = x.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(n, g * g, -1)
    tokens = patches @ w["patch_embed.proj.weight"].reshape(d, -1).T + w["patch_embed.proj.bias"]
    pos = w["pos_embed"][0]
    side = math.isqrt(len(pos) - 1)
    r = _torch_bicubic(side, g, 1 / ((g + offset) / side))
    patch_pos = np.einsum("ai,bj,ijd->abd", r, r, pos[1:].reshape(side, side, d))
    cls = np.broadcast_to(w["cls_token"][0] + pos[0], (n, 1, d))
    h = np.concatenate([cls, tokens + patch_pos.reshape(1, g * g, d)], axis=1)

    def ln(v, key):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-6) * w[f"{key}.weight"] + w[f"{key}.bias"]

    lin = lambda v, key: v @ w[f"{key}.weight"].T + w[f"{key}.bias"]
    hd = d // heads
    for i in range(1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))):
        b = f"blocks.{i}"
        qkv = lin(ln(h, f"{b}.norm1"), f"{b}.attn.qkv").reshape(n, -1, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = np.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(hd)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        out = np.einsum("nhqk,nkhd->nqhd", att, v).reshape(n, -1, d)
        h = h + w[f"{b}.ls1.gamma"] * lin(out, f"{b}.attn.proj")
        m = lin(ln(h, f"{b}.norm2"), f"{b}.mlp.fc1")
        m = 0.5 * m * (1 + erf(m / math.sqrt(2)))
        h = h + w[f"{b}.ls2.gamma"] * lin(m, f"{b}.mlp.fc2")
    return ln(h, "norm")[:, 0]


@pytest.fixture(scope="module")
def tiny():
    sd = dinov2.random_state_dict(TINY2, seed=3)
    params, config = dinov2.params_from_state_dict(sd, num_heads=2)
    assert config == TINY2
    return sd, params


@pytest.mark.parametrize("size", [8, 256], ids=["up", "down"])
def test_features_match_a_numpy_forward_pass_of_the_official_code(tiny, size):
    sd, params = tiny
    images = _images((2, size, size, 3))
    got = np.asarray(dinov2.features(params, images, TINY2))
    want = _numpy_features(sd, images, heads=2)
    assert got.shape == (2, 64)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=1e-5 * scale)
    if size == 8:  # a grey image is its grey level copied to the three channels
        grey = images[..., :1]
        np.testing.assert_allclose(
            dinov2.features(params, grey, TINY2),
            dinov2.features(params, np.repeat(grey, 3, axis=-1), TINY2),
            atol=1e-6 * scale,
        )


def test_every_matmul_and_convolution_runs_at_highest_precision(tiny):
    _, params = tiny
    text = dinov2._features.lower(params, _images((1, 8, 8, 3)), config=TINY2).as_text()
    ops = [line for line in text.splitlines() if "dot_general" in line or "convolution" in line]
    assert len(ops) > 2 * TINY2.depth
    assert all("HIGHEST" in line for line in ops), [op for op in ops if "HIGHEST" not in op][0]


# --- Weight files ---


def to_transformers(sd, legacy=True):
    """The official state dict with transformers' ``Dinov2Model`` names, written out: the
    legacy ones (``attention.attention.query``, as in the facebook/dinov2-* files) or 5.x's
    (``attention.q_proj``)."""
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, t = f"blocks.{i}", f"encoder.layer.{i}"
        names = [
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
        ]
        if not legacy:
            names = ["attention.q_proj", "attention.k_proj", "attention.v_proj"]
        out_name = "attention.output.dense" if legacy else "attention.o_proj"
        for kind in ("weight", "bias"):
            for name, part in zip(names, np.split(sd[f"{b}.attn.qkv.{kind}"], 3), strict=True):
                out[f"{t}.{name}.{kind}"] = part
            out[f"{t}.{out_name}.{kind}"] = sd[f"{b}.attn.proj.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{t}.{n}.{kind}"] = sd[f"{b}.{n}.{kind}"]
        out[f"{t}.layer_scale1.lambda1"] = sd[f"{b}.ls1.gamma"]
        out[f"{t}.layer_scale2.lambda1"] = sd[f"{b}.ls2.gamma"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "5.x"])
def test_transformers_names_give_the_official_params(tiny, legacy):
    sd, params = tiny
    got, config = dinov2.params_from_state_dict(to_transformers(sd, legacy), num_heads=2)
    assert config == TINY2
    jax.tree.map(np.testing.assert_array_equal, got, params)


def test_files_load_and_bad_ones_are_one_line(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    sd = dinov2.random_state_dict(dinov2.TINY, seed=0)
    np.savez(tmp_path / "official.npz", **sd)
    params, config = dinov2.load_params(tmp_path / "official.npz")
    assert config == dinov2.TINY  # one head of 64 channels, from the width
    # transformers' folder: its config.json gives the heads.
    (tmp_path / "hf").mkdir()
    save_file(to_transformers(sd), tmp_path / "hf" / "model.safetensors")
    hf_config = {"num_attention_heads": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-6}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))
    _, config = dinov2.load_params(tmp_path / "hf" / "model.safetensors")
    assert config == dataclasses.replace(dinov2.TINY, num_heads=2)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_config, "hidden_act": "relu"}))
    with pytest.raises(dinov2.Dinov2WeightsError, match="hidden_act='relu'; this ViT has 'gelu'"):
        dinov2.load_params(tmp_path / "hf" / "model.safetensors")

    def refused(state, match, **kw):
        np.savez(tmp_path / "bad.npz", **state)
        with pytest.raises(dinov2.Dinov2WeightsError, match=match) as e:
            dinov2.load_params(tmp_path / "bad.npz", **kw)
        assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path / "bad.npz"))

    less = {k: v for k, v in sd.items() if k != "blocks.1.ls2.gamma"}
    refused(less, r"missing key 'blocks.1.ls2.gamma': not a DINOv2 ViT")
    refused({**sd, "register_tokens": np.zeros((1, 4, 64))}, "unexpected key 'register_tokens'")
    refused({**sd, "norm.bias": np.zeros(63)}, r"'norm.bias' has shape \(63,\), expected \(64,\)")
    refused(inception.random_state_dict(0), "not a DINOv2 state dict: neither")
    refused(sd, "num_heads=3 does not divide the width 64", num_heads=3)
    big = dinov2.random_state_dict(dataclasses.replace(dinov2.TINY, hidden_size=40), seed=0)
    refused(big, "width 40 is not a multiple of 64 .* pass num_heads")
    with pytest.raises(dinov2.state_dicts.WeightsNotFoundError, match=dinov2.OFFICIAL_URL):
        dinov2.load_params(tmp_path / "nope.pth")
    (tmp_path / "w.pth").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match="pip install torch, or use facebook/dinov2-large"):
        dinov2.load_params(tmp_path / "w.pth")


# --- Peer: transformers' Dinov2Model on the same (random) weights ---


def _transformers_model(config: dinov2.Dinov2Config, seed=0):
    """transformers' ``Dinov2Model`` of ``config``'s sizes, every parameter random (nothing
    left at an initial value that could hide a mistake)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", minversion="5")
    hf_config = transformers.Dinov2Config(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        mlp_ratio=config.mlp_dim // config.hidden_size,
        image_size=config.pos_grid * config.patch_size,
        patch_size=config.patch_size,
        layer_norm_eps=1e-6,
        attn_implementation="eager",
    )
    model = transformers.Dinov2Model(hf_config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, v in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "lambda1")):
                new = 0.5 + torch.rand(v.shape, generator=gen)
            elif v.ndim >= 2 and "embeddings." not in name:
                new = torch.randn(v.shape, generator=gen) / math.sqrt(math.prod(v.shape[1:]))
            elif name.endswith("bias"):
                new = 0.1 * torch.randn(v.shape, generator=gen)
            else:  # tokens and positions
                new = torch.randn(v.shape, generator=gen)
            v.copy_(new)
    return torch, model


def _official_interpolation(torch, offset):
    """The official ``interpolate_pos_encoding``'s resampling, for transformers' embeddings."""

    def interpolate(self, embeddings, height, width):
        pos = self.position_embeddings
        side = math.isqrt(pos.shape[1] - 1)
        gh, gw = height // self.patch_size, width // self.patch_size
        table = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        scale = ((gh + offset) / side, (gw + offset) / side)
        resampled = torch.nn.functional.interpolate(table, scale_factor=scale, mode="bicubic")
        return torch.cat([pos[:, :1], resampled.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], 1)

    return interpolate


def to_official(state):
    """transformers' (5.x) state dict with the official names, written out."""
    out = {}
    for key, value in state.items():
        key = (
            key.replace("embeddings.cls_token", "cls_token")
            .replace("embeddings.mask_token", "mask_token")
            .replace("embeddings.position_embeddings", "pos_embed")
            .replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
            .replace("encoder.layer.", "blocks.")
            .replace("attention.o_proj", "attn.proj")
            .replace("layer_scale1.lambda1", "ls1.gamma")
            .replace("layer_scale2.lambda1", "ls2.gamma")
            .replace("layernorm.", "norm.")
        )
        out[key] = value
    for key in [k for k in out if ".attention.q_proj." in k]:
        parts = [out.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[key.replace("attention.q_proj", "attn.qkv")] = np.concatenate(parts)
    return out


@pytest.mark.parametrize("config", [TINY2, dinov2.VIT_L14], ids=["tiny", "vitl14"])
def test_parity_with_transformers_dinov2_model(config, monkeypatch):
    torch, model = _transformers_model(config)
    x = np.asarray(dinov2.preprocess(_images((1, 224, 224, 3), seed=5)))  # a 16 x 16 grid
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    official = to_official(state)
    assert set(official) == set(dinov2.official_shapes(config))
    params, cfg = dinov2.params_from_state_dict(state, num_heads=config.num_heads)
    from_official, _ = dinov2.params_from_state_dict(official, num_heads=config.num_heads)
    jax.tree.map(np.testing.assert_array_equal, from_official, params)
    for offset in (0.0, 0.1):  # transformers' resampling of the positions, then the official
        if offset:
            interpolate = _official_interpolation(torch, offset)
            monkeypatch.setattr(type(model.embeddings), "interpolate_pos_encoding", interpolate)
        with torch.no_grad():
            want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).pooler_output.numpy()
        net = dinov2.Dinov2(dataclasses.replace(cfg, interpolate_offset=offset))
        got = np.asarray(jax.jit(net.apply)({"params": params}, x)[:, 0])
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"{config.hidden_size} wide, offset {offset}: max|diff| / max|feature| {err:.2e}")
        assert err < 1e-5


@pytest.mark.parametrize("n_in", [8, 256])
def test_resize_matches_torch_antialiased_bicubic(n_in):
    """EDM2's resize. Torch's float kernel shrinks up to 0.005 (of 255) away from PIL's, which
    ours follows within 1e-4 (``test_resize_matches_pil_bicubic``)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).uniform(0, 255, (1, 3, n_in, n_in)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=(224, 224), mode="bicubic", antialias=True
    ).numpy()
    m = dinov2.resize_matrix(n_in, 224)
    np.testing.assert_allclose(np.einsum("oh,nchw,pw->ncop", m, x, m), want, atol=1e-2)
