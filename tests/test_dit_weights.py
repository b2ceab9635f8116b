"""Importing DiT weights (diffusion_jax.dit_weights): official and diffusers state dicts.

Without torch: a random state dict with the official key names and shapes, converted and run,
equals a float64 NumPy forward pass of the official DiT written out here (and, with the
diffusers constants, of diffusers' DiT); the same weights in diffusers' layout give the same
params; files (.safetensors, config.json) and the one-line refusals. With torch and diffusers
installed (the `peer` extra): our DiT on converted random weights equals diffusers'
``DiTTransformer2DModel`` on the same input, t and labels.
"""

import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import dit_weights, state_dicts
from diffusion_jax.dit_weights import DiTWeightsError
from diffusion_jax.models import DiT
from diffusion_jax.models.dit import NUMERICS, DiTBlock, sincos_2d_table

# The small config: 8x8x4 latents, patch 2, 2 blocks, 2 heads x 16 dims, 10 classes, learned
# sigma (out_channels 8).
SIZE, P, C, D, DEPTH, HEADS, CLASSES = 8, 2, 4, 32, 2, 2, 10
OUT = 2 * C


def official_shapes(depth=DEPTH, d=D, classes=CLASSES, channels=C) -> dict[str, tuple[int, ...]]:
    """The official state dict's keys and shapes (models.py: DiT with learn_sigma)."""
    out = 2 * channels
    shapes = {
        "x_embedder.proj.weight": (d, channels, P, P),
        "x_embedder.proj.bias": (d,),
        "pos_embed": (1, (SIZE // P) ** 2, d),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (P * P * out, d),
        "final_layer.linear.bias": (P * P * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        b = f"blocks.{i}"
        shapes |= {
            f"{b}.attn.qkv.weight": (3 * d, d),
            f"{b}.attn.qkv.bias": (3 * d,),
            f"{b}.attn.proj.weight": (d, d),
            f"{b}.attn.proj.bias": (d,),
            f"{b}.mlp.fc1.weight": (4 * d, d),
            f"{b}.mlp.fc1.bias": (4 * d,),
            f"{b}.mlp.fc2.weight": (d, 4 * d),
            f"{b}.mlp.fc2.bias": (d,),
            f"{b}.adaLN_modulation.1.weight": (6 * d, d),
            f"{b}.adaLN_modulation.1.bias": (6 * d,),
        }
    return shapes


def random_official(seed=0, **kw) -> dict[str, np.ndarray]:
    """Random weights (N(0, 1) / sqrt(fan_in), biases N(0, 0.1^2)) in the official layout; the
    position table is the real one."""
    rng = np.random.default_rng(seed)
    sd = {}
    for k, shape in official_shapes(**kw).items():
        if k == "pos_embed":
            sd[k] = sincos_2d_table(shape[-1], SIZE // P)[None]
        elif k.endswith("embedding_table.weight"):
            sd[k] = rng.standard_normal(shape).astype(np.float32)
        else:
            fan_in = math.prod(shape[1:]) or 10
            sd[k] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
    return sd


def to_diffusers(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The official state dict in diffusers' layout (what its convert_dit_to_diffusers.py
    does: embedders copied into every block, qkv split into to_q/to_k/to_v)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(depth):
        b, t = f"blocks.{i}", f"transformer_blocks.{i}"
        emb = f"{t}.norm1.emb"
        q, k, v = np.split(sd[f"{b}.attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[f"{b}.attn.qkv.bias"], 3)
        out |= {
            f"{emb}.timestep_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"],
            f"{emb}.timestep_embedder.linear_1.bias": sd["t_embedder.mlp.0.bias"],
            f"{emb}.timestep_embedder.linear_2.weight": sd["t_embedder.mlp.2.weight"],
            f"{emb}.timestep_embedder.linear_2.bias": sd["t_embedder.mlp.2.bias"],
            f"{emb}.class_embedder.embedding_table.weight": sd["y_embedder.embedding_table.weight"],
            f"{t}.norm1.linear.weight": sd[f"{b}.adaLN_modulation.1.weight"],
            f"{t}.norm1.linear.bias": sd[f"{b}.adaLN_modulation.1.bias"],
            f"{t}.attn1.to_q.weight": q,
            f"{t}.attn1.to_k.weight": k,
            f"{t}.attn1.to_v.weight": v,
            f"{t}.attn1.to_q.bias": qb,
            f"{t}.attn1.to_k.bias": kb,
            f"{t}.attn1.to_v.bias": vb,
            f"{t}.attn1.to_out.0.weight": sd[f"{b}.attn.proj.weight"],
            f"{t}.attn1.to_out.0.bias": sd[f"{b}.attn.proj.bias"],
            f"{t}.ff.net.0.proj.weight": sd[f"{b}.mlp.fc1.weight"],
            f"{t}.ff.net.0.proj.bias": sd[f"{b}.mlp.fc1.bias"],
            f"{t}.ff.net.2.weight": sd[f"{b}.mlp.fc2.weight"],
            f"{t}.ff.net.2.bias": sd[f"{b}.mlp.fc2.bias"],
        }
    return {k: np.copy(v) for k, v in out.items()}


# --- A float64 NumPy forward pass of the official DiT (models.py), written out. ---


def _np_forward(sd, x, t, y, heads, *, freq_shift=0, mlp_eps=1e-6):
    """x [B, H, W, C] NHWC -> [B, H, W, OUT], in float64 from the state dict's names.
    ``freq_shift``/``mlp_eps``: 0/1e-6 the official constants, 1/1e-5 diffusers'."""
    w = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    lin = lambda h, k: h @ w[f"{k}.weight"].T + w[f"{k}.bias"]
    silu = lambda a: a / (1 + np.exp(-a))

    def ln(h, eps):
        mu = h.mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + eps)

    B, H, _, _ = x.shape
    g = H // P
    # Patches [B, g*g, C*P*P] in the conv weight's (in, kh, kw) order, row-major over the grid.
    patches = x.reshape(B, g, P, g, P, C).transpose(0, 1, 3, 5, 2, 4).reshape(B, g * g, -1)
    wconv = w["x_embedder.proj.weight"].reshape(D, -1)
    h = patches @ wconv.T + w["x_embedder.proj.bias"] + w["pos_embed"][0]

    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - freq_shift))
    args = np.asarray(t, np.float64)[:, None] * freqs[None]
    temb = np.concatenate([np.cos(args), np.sin(args)], -1)
    c = lin(silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + w["y_embedder.embedding_table.weight"][y]

    hd = D // heads
    for i in range(DEPTH):
        b = f"blocks.{i}"
        mod = lin(silu(c), f"{b}.adaLN_modulation.1")
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in np.split(mod, 6, -1))
        a = ln(h, 1e-6) * (1 + sc1) + sh1
        qkv = lin(a, f"{b}.attn.qkv").reshape(B, -1, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, -1, D)
        h = h + g1 * lin(o, f"{b}.attn.proj")
        m = ln(h, mlp_eps) * (1 + sc2) + sh2
        m = lin(m, f"{b}.mlp.fc1")
        m = 0.5 * m * (1 + np.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m**3)))
        h = h + g2 * lin(m, f"{b}.mlp.fc2")
    shift, scale = np.split(lin(silu(c), "final_layer.adaLN_modulation.1"), 2, -1)
    h = ln(h, 1e-6) * (1 + scale[:, None]) + shift[:, None]
    h = lin(h, "final_layer.linear")  # [B, g*g, P*P*OUT], features (p, q, c)
    return h.reshape(B, g, g, P, P, OUT).transpose(0, 1, 3, 2, 4, 5).reshape(B, H, H, OUT)


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, SIZE, SIZE, C)).astype(np.float32)
    t = np.array([0.0, 1.5, 500.0, 999.0], np.float32)
    y = np.array([0, 3, 9, CLASSES], np.int32)  # the last: the null label
    return x, t, y


def _apply(params, kwargs, x, t, y):
    return np.asarray(
        jax.jit(lambda p, x, t, y: DiT(**kwargs).apply({"params": p}, x, t, y, train=False))(
            params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)
        )
    )


def _rel_err(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_from_official_matches_a_numpy_forward_pass():
    sd = random_official()
    params, kwargs = dit_weights.convert(sd, num_heads=HEADS)
    assert kwargs == dict(
        patch_size=P,
        hidden_size=D,
        depth=DEPTH,
        num_heads=HEADS,
        out_channels=OUT,
        mlp_ratio=4.0,
        num_classes=CLASSES,
        numerics="official",
    )
    x, t, y = _inputs()
    want = _np_forward(sd, x, t, y, HEADS)
    got = _apply(params, kwargs, x, t, y)
    assert got.shape == (4, SIZE, SIZE, OUT)
    assert _rel_err(got, want) < 1e-5
    # The diffusers constants change the output (so the comparison above can tell them apart).
    assert _rel_err(_np_forward(sd, x, t, y, HEADS, freq_shift=1, mlp_eps=1e-5), want) > 1e-3


def test_from_diffusers_gives_the_official_params_and_diffusers_numerics():
    sd = random_official(seed=2)
    params_off = dit_weights.from_official(sd, num_heads=HEADS)
    params, kwargs = dit_weights.convert(to_diffusers(sd), num_heads=HEADS)
    assert kwargs["numerics"] == "diffusers"
    jax.tree.map(np.testing.assert_array_equal, params, params_off)
    x, t, y = _inputs()
    want = _np_forward(sd, x, t, y, HEADS, freq_shift=1, mlp_eps=1e-5)
    assert _rel_err(_apply(params, kwargs, x, t, y), want) < 1e-5


def test_heads_from_the_paper_sizes_and_refusals():
    sd = random_official(depth=1, d=384)
    assert dit_weights.dit_kwargs(sd)["num_heads"] == 6  # DiT-S
    with pytest.raises(DiTWeightsError, match="pass num_heads"):
        dit_weights.from_official(random_official())
    with pytest.raises(DiTWeightsError, match="does not divide"):
        dit_weights.from_official(random_official(), num_heads=3)

    sd = random_official()
    sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    with pytest.raises(DiTWeightsError, match="unused key 'blocks.0.attn.extra'"):
        dit_weights.from_official(sd, num_heads=HEADS)
    sd = random_official()
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(DiTWeightsError, match="missing key 'blocks.1.mlp.fc2.bias'"):
        dit_weights.from_official(sd, num_heads=HEADS)
    sd = random_official()
    sd["blocks.1.mlp.fc2.bias"] = np.zeros(D + 1, np.float32)
    with pytest.raises(DiTWeightsError, match="'blocks.1.mlp.fc2.bias' gives blocks_1/mlp/fc2"):
        dit_weights.from_official(sd, num_heads=HEADS)
    sd = random_official()
    sd["pos_embed"] = sd["pos_embed"] + 0.01
    with pytest.raises(DiTWeightsError, match="'pos_embed' differs from the 2-D sin-cos"):
        dit_weights.from_official(sd, num_heads=HEADS)

    sd = to_diffusers(random_official())
    sd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"][0] += 1e-3
    with pytest.raises(DiTWeightsError, match="linear_2.bias' differs from 'transformer_blocks.0"):
        dit_weights.from_diffusers(sd, num_heads=HEADS)
    sd = to_diffusers(random_official())
    del sd["transformer_blocks.1.ff.net.2.weight"]
    with pytest.raises(DiTWeightsError, match="missing key 'transformer_blocks.1.ff.net.2.weight'"):
        dit_weights.from_diffusers(sd, num_heads=HEADS)
    with pytest.raises(DiTWeightsError, match="not a DiT state dict"):
        dit_weights.convert({"conv.weight": np.zeros(3)})


def test_load_params_from_files(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    sd = random_official(seed=3)
    save_file(sd, tmp_path / "official.safetensors")
    params, kwargs = dit_weights.load_params(tmp_path / "official.safetensors", num_heads=HEADS)
    jax.tree.map(np.testing.assert_array_equal, params, dit_weights.from_official(sd, HEADS))
    assert kwargs["numerics"] == "official"

    # diffusers' layout: transformer/{config.json, diffusion_pytorch_model.safetensors}.
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(to_diffusers(sd), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": HEADS}))
    params_d, kwargs_d = dit_weights.load_params(folder / "diffusion_pytorch_model.safetensors")
    assert kwargs_d == kwargs | {"numerics": "diffusers"}
    jax.tree.map(np.testing.assert_array_equal, params_d, params)
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 2, "norm_eps": 1e-6}))
    with pytest.raises(DiTWeightsError, match="norm_eps=1e-06"):
        dit_weights.load_params(folder / "diffusion_pytorch_model.safetensors")

    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    (tmp_path / "DiT-XL-2-256x256.pt").write_bytes(b"a PyTorch file")
    with pytest.raises(ImportError, match="install torch to read .pt, or convert to safetensors"):
        dit_weights.load_params(tmp_path / "DiT-XL-2-256x256.pt")
    with pytest.raises(state_dicts.WeightsNotFoundError, match="no DiT weights at"):
        dit_weights.load_params(tmp_path / "DiT-XL-2-512x512.pt")


# --- Parity with diffusers' PyTorch DiTTransformer2DModel (the `peer` extra). ---


def _randomised_diffusers_dit(seed=0):
    """diffusers' DiT of the small config with every weight random (it zero-initialises the
    adaLN and output layers), its per-block embedder copies equal to block 0's."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=D // HEADS,
        in_channels=C,
        out_channels=OUT,
        num_layers=DEPTH,
        sample_size=SIZE,
        patch_size=P,
        num_embeds_ada_norm=CLASSES,
    ).eval()
    sd = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    new = {}
    for k, v in sd.items():
        fan_in = math.prod(v.shape[1:]) if v.ndim > 1 else 10
        scale = 1.0 if "embedding_table" in k else 1 / math.sqrt(fan_in)
        new[k] = torch.randn(v.shape, generator=gen) * scale
    for k in new:
        if ".norm1.emb." in k:
            new[k] = new["transformer_blocks.0." + k.split(".", 2)[2]].clone()
    model.load_state_dict(new)
    return torch, model


def test_parity_with_diffusers_dit_transformer():
    torch, model = _randomised_diffusers_dit()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    params, kwargs = dit_weights.convert(sd, num_heads=HEADS)
    x, t, y = _inputs()
    with torch.no_grad():
        want = model(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),  # NCHW
            timestep=torch.from_numpy(t),
            class_labels=torch.from_numpy(y.astype(np.int64)),
        ).sample.numpy()
    want = want.transpose(0, 2, 3, 1)  # [B, H, W, 2C]
    got = _apply(params, kwargs, x, t, y)
    assert got.shape == want.shape == (4, SIZE, SIZE, OUT)
    err = _rel_err(got, want)
    print(f"parity: max abs {np.max(np.abs(got - want)):.3g}, rel {err:.3g}")
    assert err < 1e-5
    # The official constants would not match: the numerics attribute is what makes it equal.
    got_official = _apply(params, kwargs | {"numerics": "official"}, x, t, y)
    assert _rel_err(got_official, want) > 1e-3


def test_block_parity_with_diffusers_where_the_norm_epsilons_matter():
    """One block on activations of variance ~1e-6, where LayerNorm eps 1e-5 against 1e-6
    changes the output by tens of percent (the whole-model test cannot see it: the position
    table keeps the activations' variance near 1)."""
    torch, model = _randomised_diffusers_dit()
    block = model.transformer_blocks[0]
    with torch.no_grad():  # a small attention output keeps the MLP norm's input small too
        block.attn1.to_out[0].weight.mul_(1e-3)
        block.attn1.to_out[0].bias.mul_(1e-3)
    params = dit_weights.from_diffusers(
        {k: v.numpy() for k, v in model.state_dict().items()}, num_heads=HEADS
    )
    _, t, y = _inputs()
    h = 1e-3 * np.random.default_rng(4).standard_normal((4, (SIZE // P) ** 2, D))
    h = h.astype(np.float32)
    with torch.no_grad():
        tt, yy = torch.from_numpy(t), torch.from_numpy(y.astype(np.int64))
        c = block.norm1.emb(tt, yy, hidden_dtype=torch.float32).numpy()
        want = block(torch.from_numpy(h), timestep=tt, class_labels=yy).numpy()

    def ours(numerics):
        eps = NUMERICS[numerics]["mlp_norm_eps"]
        return np.asarray(
            DiTBlock(HEADS, 4.0, jnp.float32, eps).apply({"params": params["blocks_0"]}, h, c)
        )

    assert _rel_err(ours("diffusers"), want) < 1e-5
    assert _rel_err(ours("official"), want) > 1e-2


def test_pt_checkpoints_with_torch(tmp_path):
    """A released .pt (a plain state dict) and a train.py checkpoint (its "ema" entry, beside
    the args Namespace) load; `convert` writes a .safetensors that loads without torch."""
    torch = pytest.importorskip("torch")
    import argparse

    sd = random_official(seed=5)
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    want = dit_weights.from_official(sd, HEADS)
    torch.save(tensors, tmp_path / "plain.pt")
    train = {"model": {}, "ema": tensors, "opt": {}, "args": argparse.Namespace(model="DiT-S/2")}
    torch.save(train, tmp_path / "train.pt")
    for name in ("plain.pt", "train.pt"):
        params, _ = dit_weights.load_params(tmp_path / name, num_heads=HEADS)
        jax.tree.map(np.testing.assert_array_equal, params, want)
    dit_weights.main(["convert", str(tmp_path / "train.pt"), str(tmp_path / "c.safetensors")])
    params, _ = dit_weights.load_params(tmp_path / "c.safetensors", num_heads=HEADS)
    jax.tree.map(np.testing.assert_array_equal, params, want)
