"""Weights of diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE) for ``models.autoencoder``.

Reads diffusers' format: ``diffusion_pytorch_model.safetensors`` of ``stabilityai/sd-vae-ft-ema``
or ``sd-vae-ft-mse`` (keys ``encoder.conv_in.weight``, ``encoder.down_blocks.0.resnets.0.norm1.
weight``, ``encoder.mid_block.attentions.0.to_q.weight``, ``quant_conv.weight``, ``decoder.up_
blocks.0.upsamplers.0.conv.weight``, ...). Older files name the attention's Linear layers
``query``/``key``/``value``/``proj_attn`` (for ``to_q``/``to_k``/``to_v``/``to_out.0``); both are
accepted. The network's sizes are read off the weights' shapes (``model_kwargs``); the GroupNorm
groups cannot be, and come from a diffusers ``config.json`` beside the file when there is one
(else 32, the SD VAE's), with its ``scaling_factor`` and ``shift_factor``.

    params, kwargs = load_params("sd-vae-ft-mse/diffusion_pytorch_model.safetensors")
    vae = AutoencoderKL(**kwargs)
    mean, logvar = vae.apply(params, images, method=vae.encode)   # images NHWC in [-1, 1]

Every key must be used and every parameter filled, with its shape; otherwise ``CheckpointError``
names the key. Conv2d weights [out, in, kh, kw] become kernels [kh, kw, in, out], Linear weights
[out, in] kernels [in, out] (a [out, in, 1, 1] attention weight is accepted as a Linear), GroupNorm
``weight`` becomes ``scale``; everything float32.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from diffusion_jax import state_dicts
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.state_dicts import CheckpointError, one_line

# Older diffusers names of the mid-block attention's layers -> the current ones.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_CONFIG_KEYS = ("norm_num_groups", "scaling_factor", "shift_factor")


def _current_key(key: str) -> str:
    """``key`` with an older attention name (``...attentions.0.query.weight``) renamed."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _OLD_ATTENTION_NAMES and ".attentions." in key:
        return ".".join(parts[:-2] + [_OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return key


def _module_path(key: str) -> tuple[str, ...]:
    """``encoder.down_blocks.0.resnets.1.conv1.weight`` -> ``("encoder", "down_blocks_0",
    "resnets_1", "conv1", "weight")``: a numeric part joins the name before it."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def state_dict_key(path: tuple[str, ...]) -> str:
    """The diffusers key of a flax parameter path (``kernel``/``scale`` -> ``weight``)."""
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    leaf = "bias" if path[-1] == "bias" else "weight"
    return ".".join(parts + [leaf])


def _array(state: Mapping, key: str, source: str) -> np.ndarray:
    value = state[key]
    try:
        return state_dicts.float32_array(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source}: {key!r} is not an array ({one_line(e)})") from None


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """diffusers' shape of a parameter of flax shape ``shape``."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


def _normalised(state: Mapping, source: str) -> dict[str, str]:
    """Current key -> the key given in ``state`` (an old and a new name of one weight: error)."""
    keys: dict[str, str] = {}
    for key in state:
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: key {key!r} is not a string")
        new = _current_key(key)
        if new in keys:
            raise CheckpointError(f"{source}: {keys[new]!r} and {key!r} are the same weight")
        keys[new] = key
    return keys


@functools.lru_cache(maxsize=8)
def _abstract_params(model: AutoencoderKL) -> dict:
    """Flattened parameter path -> ShapeDtypeStruct of ``model`` (nothing materialised)."""
    size = model.down_factor
    x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    return traverse_util.flatten_dict(abstract)


def model_kwargs(state: Mapping, source: str = "state dict") -> dict:
    """The ``AutoencoderKL`` sizes of a diffusers state dict, read off its shapes: in/out
    channels, block_out_channels, layers_per_block, latent_channels, mid_block_attention."""
    keys = _normalised(state, source)

    def shape(key):
        if key not in keys:
            raise CheckpointError(f"{source}: not an AutoencoderKL: missing key {key!r}")
        return np.shape(state[keys[key]])

    chans, i = [], 0
    while f"encoder.down_blocks.{i}.resnets.0.conv1.weight" in keys:
        chans.append(int(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]))
        i += 1
    if not chans:
        shape("encoder.down_blocks.0.resnets.0.conv1.weight")  # raises: names the key
    layers = 0
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in keys:
        layers += 1
    return dict(
        in_channels=int(shape("encoder.conv_in.weight")[1]),
        out_channels=int(shape("decoder.conv_out.weight")[0]),
        block_out_channels=tuple(chans),
        layers_per_block=layers,
        latent_channels=int(shape("post_quant_conv.weight")[0]),
        mid_block_attention="encoder.mid_block.attentions.0.to_q.weight" in keys,
    )


def from_diffusers(
    state: Mapping, model: AutoencoderKL | None = None, source: str = "state dict"
) -> dict:
    """``params`` of ``model`` (default: ``AutoencoderKL(**model_kwargs(state))``) from a
    diffusers ``AutoencoderKL`` state dict (torch tensors or arrays).

    Raises:
      CheckpointError: naming the key, for a key no parameter takes, a parameter no key fills,
        or a weight of the wrong shape.
    """
    if model is None:
        model = AutoencoderKL(**model_kwargs(state, source))
    keys = _normalised(state, source)
    expected = _abstract_params(model)
    modules = {path[:-1] for path in expected}
    params = {}
    for key in sorted(keys):
        given = keys[key]
        *module, leaf = _module_path(key)
        module = tuple(module)
        if module not in modules or leaf not in ("weight", "bias"):
            raise CheckpointError(f"{source}: unused key {given!r}: no such parameter in {model}")
        if leaf == "bias":
            path = module + ("bias",)
        else:
            path = module + (("kernel",) if module + ("kernel",) in expected else ("scale",))
        a = _array(state, given, source)
        if path[-1] == "kernel":
            if a.ndim == 4 and len(expected[path].shape) == 2 and a.shape[2:] == (1, 1):
                a = a[:, :, 0, 0]  # an attention weight stored as a 1x1 conv: a Linear
            if a.ndim == 4:
                a = a.transpose(2, 3, 1, 0)  # Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
            elif a.ndim == 2:
                a = a.T  # Linear [out, in] -> [in, out]
        want = expected[path].shape
        if a.shape != want:
            raise CheckpointError(
                f"{source}: {given!r} has shape {tuple(np.shape(state[given]))}, "
                f"expected {_torch_shape(want)}"
            )
        params[path] = jnp.asarray(a)
    missing = [path for path in expected if path not in params]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing key {state_dict_key(missing[0])!r}{more}")
    return {"params": traverse_util.unflatten_dict(params)}


def state_dict_shapes(model: AutoencoderKL) -> dict[str, tuple[int, ...]]:
    """diffusers' key -> shape of every weight of ``model`` (current attention names)."""
    return {
        state_dict_key(path): _torch_shape(a.shape) for path, a in _abstract_params(model).items()
    }


def random_state_dict(model: AutoencoderKL, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of ``model`` in diffusers' layout, for tests (no real weights
    needed): every entry random, GroupNorm scales around 1, biases around 0, conv and Linear
    weights with variance 1/fan_in (activations keep their scale)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in state_dict_shapes(model).items():
        if key.endswith(".bias"):
            v = rng.normal(0.0, 0.1, shape)
        elif len(shape) == 1:  # a GroupNorm weight
            v = rng.uniform(0.5, 1.5, shape)
        else:
            v = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)
        state[key] = v.astype(np.float32)
    return state


def _read_state_dict(path: str) -> Mapping:
    """The raw state dict of a ``.safetensors`` (NumPy) or a ``.bin``/``.pt``/``.pth`` (torch)."""
    return state_dicts.read(
        path,
        missing="AutoencoderKL weights",
        torch_hint="pip install torch; the .safetensors file of the same weights loads without it",
    )


def load_params(path, norm_num_groups: int | None = None) -> tuple[dict, dict]:
    """``(params, kwargs)`` of diffusers ``AutoencoderKL`` weights at ``path``: build the network
    as ``AutoencoderKL(**kwargs)``. ``norm_num_groups`` (and the latent ``scaling_factor``,
    ``shift_factor``) come from a diffusers ``config.json`` beside the file, else 32 and the
    module's defaults (the SD VAE's); an explicit ``norm_num_groups`` wins.

    Raises:
      WeightsNotFoundError: no such file.
      CheckpointError: not a checkpoint, or not an AutoencoderKL's (names the key).
      ImportError: a torch checkpoint and torch is not installed.
    """
    path = os.fspath(path)
    state = _read_state_dict(path)
    kwargs = model_kwargs(state, path)
    config_file = epath.Path(path).parent / "config.json"
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{config_file}: not JSON ({one_line(e)})") from None
        kwargs.update({k: config[k] for k in _CONFIG_KEYS if config.get(k) is not None})
    if norm_num_groups is not None:
        kwargs["norm_num_groups"] = norm_num_groups
    return from_diffusers(state, AutoencoderKL(**kwargs), path), kwargs
