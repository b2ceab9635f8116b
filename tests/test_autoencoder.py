"""Tests of the KL autoencoder (diffusers' AutoencoderKL): shapes, the SD VAE's parameter count
(shapes only), the posterior and latent scaling, the weight importer's names and error paths on
random NumPy state dicts, and parity with diffusers' own AutoencoderKL on random weights (skipped
without torch and diffusers)."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import autoencoder_weights as aw
from diffusion_jax import state_dicts
from diffusion_jax.models.autoencoder import SD_VAE, AutoencoderKL

# Down factor 2: conv shortcuts in both directions, one down- and one upsampler, mid attention.
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
# Down factor 8 as the SD VAE, at tiny widths.
TINY8 = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
# diffusers' AutoencoderKL with the SD VAE's config, counted with torch (diffusers 0.42.1):
# sum(p.numel() for p in AutoencoderKL(block_out_channels=(128, 256, 512, 512),
# layers_per_block=2, down/up_block_types=4 x DownEncoderBlock2D/UpDecoderBlock2D).parameters()).
SD_VAE_PARAMETERS = 83_653_863


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


# Not jitted: a tiny network runs eagerly in about 0.1 s, while every jitted variant compiles
# for about a second.
def _apply(model, params, x, method="__call__", key=None):
    if method == "__call__":
        return model.apply(params, x, key)
    return model.apply(params, x, method=getattr(model, method))


@pytest.fixture(scope="module")
def tiny():
    model = AutoencoderKL(**TINY)
    return model, aw.from_diffusers(aw.random_state_dict(model, 0), model)


def test_sd_vae_parameter_count_and_names():
    model = AutoencoderKL()
    assert {k: getattr(model, k) for k in SD_VAE} == SD_VAE  # the defaults are the SD VAE
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert _count(params) == SD_VAE_PARAMETERS
    shapes = aw.state_dict_shapes(model)
    assert len(shapes) == 248
    assert shapes["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down_blocks.0.downsamplers.0.conv.weight"] == (128, 128, 3, 3)
    assert "encoder.down_blocks.3.downsamplers.0.conv.weight" not in shapes
    assert shapes["decoder.up_blocks.0.upsamplers.0.conv.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.up_blocks.3.resnets.2.conv2.weight"] == (128, 128, 3, 3)
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in shapes
    assert shapes["encoder.mid_block.attentions.0.to_out.0.weight"] == (512, 512)
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    mean, logvar = jax.eval_shape(
        lambda p, x: model.apply(p, x, method=model.encode), params, x
    )  # fmt: skip
    assert mean.shape == logvar.shape == (1, 8, 8, 4)


def test_shapes_down_factor_8():
    model = AutoencoderKL(**TINY8)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), minval=-1, maxval=1)
    params = aw.from_diffusers(aw.random_state_dict(model, 1), model)

    @jax.jit  # at 64 x 64 one compilation is quicker than running eagerly
    def encode_decode(params, x):
        mean, logvar = model.apply(params, x, method=model.encode)
        return mean, logvar, model.apply(params, mean, method=model.decode)

    mean, logvar, out = encode_decode(params, x)
    assert mean.shape == logvar.shape == (2, 8, 8, 4)
    assert mean.dtype == logvar.dtype == jnp.float32
    assert out.shape == (2, 64, 64, 3) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))


def test_call_posterior_and_latent_scaling(tiny):
    model, params = tiny
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 16, 16, 3), minval=-1, maxval=1)
    mean, logvar = _apply(model, params, x, "encode")
    assert mean.shape == (2, 8, 8, 4)
    recon, m, lv = _apply(model, params, x)
    np.testing.assert_array_equal(m, mean)
    np.testing.assert_array_equal(lv, logvar)
    np.testing.assert_allclose(recon, _apply(model, params, mean, "decode"), rtol=1e-6, atol=1e-6)
    key = jax.random.PRNGKey(3)
    sampled, _, _ = _apply(model, params, x, key=key)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(sampled, _apply(model, params, z, "decode"), rtol=1e-5, atol=1e-5)
    assert np.abs(sampled - recon).max() > 1e-3
    # Diffusion latents: (z - shift) * scale, and back.
    shifted = AutoencoderKL(**TINY, scaling_factor=0.5, shift_factor=0.25)
    latents = _apply(shifted, params, x, "encode_latents")
    np.testing.assert_allclose(latents, (mean - 0.25) * 0.5, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        _apply(shifted, params, latents, "decode_latents"),
        _apply(model, params, latents / 0.5 + 0.25, "decode"),
        rtol=1e-6,
        atol=1e-6,
    )
    assert AutoencoderKL().scaling_factor == 0.18215 and AutoencoderKL().shift_factor == 0.0


def test_logvar_clipped(tiny):
    model, params = tiny
    x = jnp.zeros((2, 16, 16, 3))
    bias = params["params"]["quant_conv"]["bias"]
    for value, clipped in ((100.0, 20.0), (-100.0, -30.0)):
        p = jax.tree.map(lambda a: a, params)
        p["params"]["quant_conv"]["bias"] = bias.at[4:].set(value)  # the log-variance half
        _, logvar = _apply(model, p, x, "encode")
        np.testing.assert_array_equal(logvar, clipped)


def test_input_validation(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="must be \\[B, H, W, 3\\]"):
        model.apply(params, jnp.zeros((1, 16, 16, 4)), method=model.encode)
    with pytest.raises(ValueError, match="divisible by 2"):
        model.apply(params, jnp.zeros((1, 15, 16, 3)), method=model.encode)
    with pytest.raises(ValueError, match="must be \\[B, H, W, 4\\]"):
        model.apply(params, jnp.zeros((1, 8, 8, 3)), method=model.decode)
    with pytest.raises(ValueError, match="norm_num_groups=32 must divide"):
        AutoencoderKL(block_out_channels=(16, 32)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3))
        )


# --- Importer: names, old names, and error paths (NumPy only). ---


def test_import_places_every_weight():
    model = AutoencoderKL(**TINY)
    state = aw.random_state_dict(model, 4)
    assert aw.model_kwargs(state) == dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        mid_block_attention=True,
    )
    p = aw.from_diffusers(state, model)["params"]
    w = state["encoder.down_blocks.1.resnets.0.conv1.weight"]  # [out, in, kh, kw]
    k = p["encoder"]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]  # [kh, kw, in, out]
    np.testing.assert_array_equal(k, w.transpose(2, 3, 1, 0))
    att = p["decoder"]["mid_block"]["attentions_0"]
    np.testing.assert_array_equal(
        att["to_out_0"]["kernel"], state["decoder.mid_block.attentions.0.to_out.0.weight"].T
    )
    np.testing.assert_array_equal(
        att["group_norm"]["scale"], state["decoder.mid_block.attentions.0.group_norm.weight"]
    )
    np.testing.assert_array_equal(
        p["decoder"]["up_blocks_0"]["upsamplers_0"]["conv"]["bias"],
        state["decoder.up_blocks.0.upsamplers.0.conv.bias"],
    )
    # Older files: query/key/value/proj_attn, possibly as 1x1 convolutions.
    old = {}
    for key, v in state.items():
        for new, name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
        key = key.replace("attentions.0.to_out.0.", "attentions.0.proj_attn.")
        old[key] = v[:, :, None, None] if "query.weight" in key else v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    assert aw.model_kwargs(old) == aw.model_kwargs(state)
    jax.tree.map(np.testing.assert_array_equal, aw.from_diffusers(old, model)["params"], p)


def test_import_errors_name_the_key():
    model = AutoencoderKL(**TINY)
    state = aw.random_state_dict(model, 5)

    extra = dict(state)
    extra["encoder.down_blocks.0.resnets.5.conv1.weight"] = np.zeros((32, 32, 3, 3), np.float32)
    with pytest.raises(aw.CheckpointError, match="unused key 'encoder.down_blocks.0.resnets.5"):
        aw.from_diffusers(extra, model)
    extra = dict(state, **{"decoder.conv_out.running_mean": np.zeros(3, np.float32)})
    with pytest.raises(aw.CheckpointError, match="unused key 'decoder.conv_out.running_mean'"):
        aw.from_diffusers(extra, model)

    for key in (
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.mid_block.attentions.0.to_v.bias",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "quant_conv.bias",
    ):
        missing = {k: v for k, v in state.items() if k != key}
        with pytest.raises(aw.CheckpointError, match=f"missing key '{key}'"):
            aw.from_diffusers(missing, model)
        # Reading the sizes off the shapes as well: the same error (or a key it needs).
        with pytest.raises(aw.CheckpointError, match=f"missing key '{key}'"):
            aw.from_diffusers(missing)
    missing = {k: v for k, v in state.items() if k != "encoder.conv_in.weight"}
    with pytest.raises(aw.CheckpointError, match="missing key 'encoder.conv_in.weight'"):
        aw.from_diffusers(missing)

    wrong = dict(state)
    wrong["encoder.mid_block.attentions.0.to_k.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(
        aw.CheckpointError,
        match=r"'encoder.mid_block.attentions.0.to_k.weight' has shape \(64, 32\), "
        r"expected \(64, 64\)",
    ):
        aw.from_diffusers(wrong, model)
    wrong = dict(state, **{"decoder.conv_out.weight": np.zeros((3, 32, 1, 1), np.float32)})
    with pytest.raises(aw.CheckpointError, match=r"expected \(3, 32, 3, 3\)"):
        aw.from_diffusers(wrong, model)

    both = dict(state)
    both["encoder.mid_block.attentions.0.query.weight"] = both[
        "encoder.mid_block.attentions.0.to_q.weight"
    ]
    with pytest.raises(aw.CheckpointError, match="are the same weight"):
        aw.from_diffusers(both, model)
    # A model of other sizes than the weights': the first mismatch is named.
    with pytest.raises(aw.CheckpointError, match="has shape"):
        aw.from_diffusers(state, AutoencoderKL(**dict(TINY, latent_channels=8)))


def test_load_params_files(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    model = AutoencoderKL(**TINY)
    state = aw.random_state_dict(model, 6)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.astype(np.float16) for k, v in state.items()}, str(path))
    params, kwargs = aw.load_params(path)  # no config.json: the module's 32 groups
    assert "norm_num_groups" not in kwargs and AutoencoderKL(**kwargs) == model.clone(
        norm_num_groups=32
    )
    expect = aw.from_diffusers({k: v.astype(np.float16) for k, v in state.items()}, model)
    jax.tree.map(np.testing.assert_array_equal, params, expect)
    _, kwargs = aw.load_params(path, norm_num_groups=8)
    assert AutoencoderKL(**kwargs) == model
    config = dict(TINY, _class_name="AutoencoderKL", scaling_factor=0.13025, shift_factor=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, kwargs = aw.load_params(path)
    assert kwargs["norm_num_groups"] == 8 and kwargs["scaling_factor"] == 0.13025
    assert "shift_factor" not in kwargs

    with pytest.raises(state_dicts.WeightsNotFoundError, match="no AutoencoderKL weights"):
        aw.load_params(tmp_path / "absent.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(aw.CheckpointError, match="not a readable .safetensors"):
        aw.load_params(tmp_path / "bad.safetensors")
    (tmp_path / "vae.bin").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
    with pytest.raises(ImportError, match="needs torch"):
        aw.load_params(tmp_path / "vae.bin")


# --- Parity with diffusers (torch on CPU). ---

PARITY = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8)


def _diffusers_vae(**config):
    diffusers = pytest.importorskip("diffusers")
    n = len(config["block_out_channels"])
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        **config,
    ).eval()


def test_parity_with_diffusers_random_weights():
    torch = pytest.importorskip("torch")
    model = AutoencoderKL(**PARITY)
    state = aw.random_state_dict(model, 7)
    peer = _diffusers_vae(**PARITY)
    # strict=True: our names are diffusers' names, all of them.
    peer.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    params = aw.from_diffusers(state, model)
    rng = np.random.default_rng(8)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
    nchw, nhwc = (0, 3, 1, 2), (0, 2, 3, 1)
    with torch.no_grad():
        posterior = peer.encode(torch.from_numpy(x.transpose(nchw))).latent_dist
        want_mean = posterior.mean.numpy().transpose(nhwc)
        want_logvar = posterior.logvar.numpy().transpose(nhwc)
        want_image = peer.decode(torch.from_numpy(z.transpose(nchw))).sample.numpy()
    mean, logvar = _apply(model, params, x, "encode")
    image = _apply(model, params, z, "decode")
    for got, want in (
        (mean, want_mean),
        (logvar, want_logvar),
        (image, want_image.transpose(nhwc)),
    ):
        scale = np.abs(want).max()
        assert scale > 0.5  # random weights give outputs of order 1, not a vanishing signal
        assert np.abs(np.asarray(got) - want).max() <= 1e-5 * scale


def test_sd_vae_parameter_count_is_diffusers():
    pytest.importorskip("torch")
    peer = _diffusers_vae(**SD_VAE)
    assert sum(p.numel() for p in peer.parameters()) == SD_VAE_PARAMETERS
    assert {k: tuple(v.shape) for k, v in peer.state_dict().items()} == aw.state_dict_shapes(
        AutoencoderKL()
    )
