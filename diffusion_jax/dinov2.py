"""DINOv2 ViT (Oquab et al. 2023) in Flax: the feature network of FD-DINOv2.

FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics";
reported by EDM2, Karras et al. 2024) is the Fréchet distance of DINOv2 ViT-L/14 features.
The facts this module follows, with their source:

- Network (github.com/facebookresearch/dinov2, ``dinov2/hub/backbones.py`` and
  ``dinov2/models/vision_transformer.py``): ``dinov2_vitl14`` is ``vit_large`` with patch 14,
  width 1024, 24 blocks of 16 heads, MLP ratio 4, ``img_size=518`` (a learned position table
  of 37 x 37 patches plus the CLS token's entry), LayerScale (``init_values=1.0``), plain MLP
  blocks (GELU, erf form), no register tokens, LayerNorm eps 1e-6. Tokens: the patch Conv2d's
  outputs in row-major order after the CLS token, plus the position table; pre-norm blocks
  ``x += ls1 * attn(norm1(x))``, ``x += ls2 * mlp(norm2(x))`` (timm attention with qkv bias);
  a final ``norm``. ``forward`` returns ``x_norm_clstoken``: the CLS token of the final normed
  tokens (its ``head`` is the identity).
- Position table at another grid (``interpolate_pos_encoding``): when the patch grid is the
  table's (and square) the table is used as is; otherwise the 37 x 37 patch entries are
  resampled by ``torch.nn.functional.interpolate(mode="bicubic", antialias=False,
  scale_factor=((gh + 0.1) / 37, (gw + 0.1) / 37))`` (``interpolate_offset=0.1``, "a
  historical kludge" of DINO), i.e. with the coordinate scale ``37 / (g + 0.1)``, not
  ``37 / g``; align_corners False, Keys' cubic with a = -0.75, edge indices clamped. At 224 x
  224 the grid is 16 x 16. transformers' ``Dinov2Model`` (5.x) resamples to ``size=(gh, gw)``
  instead (scale ``37 / g``): ``Dinov2Config.interpolate_offset=0`` computes that.
- Input and feature (github.com/NVlabs/edm2, ``calculate_metrics.py``, ``DINOv2Detector``,
  "modeled after" github.com/layer6ai-labs/dgm-eval): uint8 RGB images resized to 224 x 224
  by ``interpolate(mode="bicubic", antialias=True)`` on the 0..255 float values (its default
  "torch" resize; the antialiased bicubic is PIL's: a = -0.5, support scaled by the
  downsampling factor, weights renormalised over the pixels inside the image), then ``/ 255``,
  minus the ImageNet mean (0.485, 0.456, 0.406), over its std (0.229, 0.224, 0.225); the
  feature is the model's output, the 1024-wide CLS token. dgm-eval's own resize (PIL's bicubic
  on 8-bit images) rounds the resized image to integers; EDM2 says the torch resize "yields
  almost the same results". Grey images: dgm-eval opens every image with ``.convert("RGB")``,
  which copies the grey level into the three channels; ``features`` does the same.

Weights (``load_params``): the official ``dinov2_vitl14_pretrain.pth`` (``OFFICIAL_URL``, a torch
state dict) or transformers' ``facebook/dinov2-large`` (``HF_ID``: ``model.safetensors`` or
``pytorch_model.bin``), or either converted to ``.safetensors``/``.npz`` with its keys unchanged.
Every key and shape is checked. Matmuls and the patch convolution run at
``Precision.HIGHEST``: TPUs and GPUs (TF32) otherwise multiply float32 at about 1e-3 relative
precision.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import state_dicts
from diffusion_jax.models.dit import Attention, Mlp
from diffusion_jax.state_dicts import CheckpointError

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
HF_ID = "facebook/dinov2-large"
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_NORM_EPS = 1e-6
# No shape shows the number of heads: every released DINOv2 (ViT-S/B/L/g, widths 384, 768,
# 1024, 1536 with 6, 12, 16, 24 heads) has heads of 64 channels.
HEAD_DIM = 64


class Dinov2WeightsError(CheckpointError):
    """A state dict that is not a DINOv2 ViT of the supported kind, or does not fit one."""


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """A DINOv2 ViT: ``pos_grid`` is the side of the learned position table (518 / 14 = 37
    for the released models); ``interpolate_offset`` the official resampling's +0.1 (0: to the
    grid size, as transformers 5.x)."""

    patch_size: int = 14
    hidden_size: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    pos_grid: int = 37
    interpolate_offset: float = 0.1


VIT_L14 = Dinov2Config()
# For tests: 224 x 224 inputs give a 16 x 16 grid, resampled from the 4 x 4 table.
TINY = Dinov2Config(hidden_size=64, depth=2, num_heads=1, mlp_dim=128, pos_grid=4)


# --- Resampling matrices (one axis; NumPy, at trace time). ---


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances ``x`` (zero for |x| >= 2)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def pos_embed_matrix(n_in: int, n_out: int, offset: float) -> np.ndarray:
    """``[n_out, n_in]`` float32: ``interpolate(mode="bicubic", align_corners=False)`` along one
    axis with ``scale_factor=(n_out + offset) / n_in`` (``size=n_out`` when offset is 0).

    Output ``i`` reads source coordinate ``s = (i + 0.5) * n_in / (n_out + offset) - 0.5``
    (float32, as PyTorch computes it); taps ``floor(s) - 1 .. floor(s) + 2``, clamped to the
    edges, weighted by Keys' kernel with a = -0.75 at their distances from ``s``.
    """
    scale = np.float32(n_in / (n_out + offset))
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    first = np.floor(src).astype(np.int64) - 1
    matrix = np.zeros((n_out, n_in), np.float64)
    for tap in range(4):
        index = first + tap
        weight = _keys_cubic(src.astype(np.float64) - index, -0.75)
        np.add.at(matrix, (np.arange(n_out), np.clip(index, 0, n_in - 1)), weight)
    return matrix.astype(np.float32)


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float32: PIL's bicubic resize along one axis, which is
    ``interpolate(mode="bicubic", antialias=True)``'s.

    With ``scale = n_in / n_out`` and ``f = max(scale, 1)``, output ``i`` weighs input ``j`` by
    Keys' kernel (a = -0.5) at ``(j + 0.5 - (i + 0.5) * scale) / f``, normalised to sum 1 over
    the inputs (so the kernel is cut off, not clamped, at the edges). ``n_in == n_out`` gives
    the identity.
    """
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    centers = (np.arange(n_out) + 0.5) * scale
    weights = _keys_cubic((np.arange(n_in)[None, :] + 0.5 - centers[:, None]) / stretch, -0.5)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def interpolate_pos_embed(table: jax.Array, grid: tuple[int, int], offset: float) -> jax.Array:
    """The patch entries of the position table ``[M * M, D]`` resampled to ``grid``:
    ``[gh * gw, D]``, row-major; the table itself when the grid is ``(M, M)``."""
    side = int(round(np.sqrt(table.shape[0])))
    if grid == (side, side):
        return table
    rows = pos_embed_matrix(side, grid[0], offset)
    cols = pos_embed_matrix(side, grid[1], offset)
    square = table.reshape(side, side, -1)
    return jnp.einsum("ai,bj,ijd->abd", rows, cols, square).reshape(grid[0] * grid[1], -1)


# --- The network. ---


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, name=name)


class Block(nn.Module):
    """Pre-norm block with LayerScale: [B, T, D] -> [B, T, D]."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        ls1 = self.param("ls1", nn.initializers.ones, (d,))
        ls2 = self.param("ls2", nn.initializers.ones, (d,))
        x = x + ls1 * Attention(self.num_heads, name="attn")(_layer_norm("norm1")(x))
        mlp = Mlp(self.mlp_dim, approximate_gelu=False, name="mlp")
        return x + ls2 * mlp(_layer_norm("norm2")(x))


class Dinov2(nn.Module):
    """DINOv2 ViT: normalised images ``[N, H, W, 3]`` (H, W multiples of the patch size) ->
    the final normed tokens ``[N, 1 + (H / p) * (W / p), D]``, the CLS token first.

    Parameters mirror the official keys: ``patch_embed`` (Conv kernel ``[p, p, 3, D]``),
    ``cls_token`` ``[D]``, ``pos_embed`` ``[1 + M * M, D]`` (the CLS entry first),
    ``blocks_<i>/{norm1, attn/qkv, attn/proj, ls1, norm2, mlp/fc1, mlp/fc2, ls2}``, ``norm``.
    """

    config: Dinov2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        p, d = c.patch_size, c.hidden_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"image size {x.shape[1:3]} is not a multiple of the patch {p}")
        patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(x)
        n, gh, gw, _ = patches.shape
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (d,))
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1 + c.pos_grid**2, d))
        patch_pos = interpolate_pos_embed(pos[1:], (gh, gw), c.interpolate_offset)
        tokens = patches.reshape(n, gh * gw, d) + patch_pos
        x = jnp.concatenate([jnp.broadcast_to(cls + pos[0], (n, 1, d)), tokens], axis=1)
        for i in range(c.depth):
            x = Block(c.num_heads, c.mlp_dim, name=f"blocks_{i}")(x)
        return _layer_norm("norm")(x)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 224, 224, 3]``: antialiased bicubic resize of the
    0..255 values, ``/ 255``, ImageNet mean and std (EDM2's ``DINOv2Detector``)."""
    _, h, w, _ = images.shape
    x = images.astype(jnp.float32)
    x = jnp.einsum("ow,nhwc->nhoc", resize_matrix(w, INPUT_SIZE), x)
    x = jnp.einsum("oh,nhwc->nowc", resize_matrix(h, INPUT_SIZE), x)
    return (x / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


@functools.partial(jax.jit, static_argnames="config")
def _features(params, images, config):
    with jax.default_matmul_precision("highest"):
        if images.shape[-1] == 1:
            images = jnp.broadcast_to(images, (*images.shape[:-1], 3))
        tokens = Dinov2(config).apply({"params": params}, preprocess(images))
    return tokens[:, 0]


def features(params, images: jax.Array, config: Dinov2Config) -> jax.Array:
    """FD-DINOv2 features of 8-bit images: the CLS token of the final normed output, float32
    ``[N, D]`` (1024 for ViT-L/14). Pure and jitted (one compilation per input shape); the
    batch may be sharded over devices.

    Args:
      params: from ``load_params`` (or ``params_from_state_dict``).
      images: uint8 ``[N, H, W, C]``, any H, W; C = 3 (RGB) or 1 (grey, copied to RGB).
      config: the network's sizes (``load_params`` gives them).
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 3] or [N, H, W, 1], got shape {images.shape}")
    if images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    return _features(params, images, config)


# --- Weights. ---


def official_shapes(config: Dinov2Config) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict of ``config``'s ViT, with its shape
    (``mask_token`` is the masked-training token: present in the released files, unused)."""
    d, p, m = config.hidden_size, config.patch_size, config.mlp_dim
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + config.pos_grid**2, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(config.depth):
        b = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            shapes[f"{b}.{norm}.weight"] = shapes[f"{b}.{norm}.bias"] = (d,)
        shapes |= {
            f"{b}.attn.qkv.weight": (3 * d, d),
            f"{b}.attn.qkv.bias": (3 * d,),
            f"{b}.attn.proj.weight": (d, d),
            f"{b}.attn.proj.bias": (d,),
            f"{b}.ls1.gamma": (d,),
            f"{b}.ls2.gamma": (d,),
            f"{b}.mlp.fc1.weight": (m, d),
            f"{b}.mlp.fc1.bias": (m,),
            f"{b}.mlp.fc2.weight": (d, m),
            f"{b}.mlp.fc2.bias": (d,),
        }
    return shapes


# transformers' Dinov2Model names (legacy, as in the facebook/dinov2-* files, and 5.x's
# q_proj/k_proj/v_proj/o_proj) -> the official names; the separate q, k, v go into one qkv.
_TRANSFORMERS_RENAMES = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", "mask_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (
        r"encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)",
        r"blocks.\1.attn.proj.\2",
    ),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
_TRANSFORMERS_QKV = re.compile(
    r"encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|([qkv])_proj)\.(weight|bias)"
)


def from_transformers(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A transformers ``Dinov2Model`` state dict with the official names: renamed, and each
    block's query, key and value concatenated (in that order) into ``attn.qkv``. Keys it does
    not know keep their names (``params_from_state_dict`` reports them)."""
    out, parts = {}, {}
    for key, value in state.items():
        if m := _TRANSFORMERS_QKV.fullmatch(key):
            block, long_name, short_name, kind = m.groups()
            part = (long_name or short_name)[0]  # "q", "k" or "v"
            parts.setdefault((block, kind), {})[part] = (key, value)
            continue
        for pattern, official in _TRANSFORMERS_RENAMES:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, official, key)
                break
        out[key] = value
    for (block, kind), qkv in parts.items():
        target = f"blocks.{block}.attn.qkv.{kind}"
        if len(qkv) != 3:
            missing = ", ".join(p for p in "qkv" if p not in qkv)
            raise Dinov2WeightsError(
                f"{target}: no {missing} part beside {next(iter(qkv.values()))[0]!r}"
            )
        shapes = [np.shape(qkv[p][1]) for p in "qkv"]
        if len(set(shapes)) != 1:
            raise Dinov2WeightsError(f"{target}: q, k, v of unequal shapes {shapes}")
        out[target] = np.concatenate([state_dicts.float32_array(qkv[p][1]) for p in "qkv"])
    return out


def _format(state: Mapping) -> str:
    if "patch_embed.proj.weight" in state:
        return "official"
    if "embeddings.patch_embeddings.projection.weight" in state:
        return "transformers"
    some = ", ".join(sorted(state)[:4])
    raise Dinov2WeightsError(
        "not a DINOv2 state dict: neither 'patch_embed.proj.weight' (official) nor "
        f"'embeddings.patch_embeddings.projection.weight' (transformers) is a key (first: {some})"
    )


def _config(state: Mapping, num_heads: int | None) -> Dinov2Config:
    """The sizes of an official-named state dict, from its shapes (heads: ``num_heads`` or
    ``width / HEAD_DIM``)."""

    def shape(key, ndim):
        if key not in state:
            raise Dinov2WeightsError(f"missing key {key!r}")
        s = tuple(np.shape(state[key]))
        if len(s) != ndim:
            raise Dinov2WeightsError(f"{key!r} has shape {s}, expected {ndim} dimensions")
        return s

    d, _, p, _ = shape("patch_embed.proj.weight", 4)
    positions = shape("pos_embed", 3)[1] - 1
    grid = int(round(np.sqrt(positions)))
    if grid * grid != positions:
        raise Dinov2WeightsError(f"'pos_embed': {positions} patch positions is not a square grid")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if num_heads is None:
        if d % HEAD_DIM:
            raise Dinov2WeightsError(
                f"width {d} is not a multiple of {HEAD_DIM} as in the released DINOv2s: pass "
                "num_heads (the shapes do not show it)"
            )
        num_heads = d // HEAD_DIM
    if d % num_heads:
        raise Dinov2WeightsError(f"num_heads={num_heads} does not divide the width {d}")
    return Dinov2Config(
        patch_size=p,
        hidden_size=d,
        depth=max(blocks, default=-1) + 1,
        num_heads=num_heads,
        mlp_dim=shape("blocks.0.mlp.fc1.weight", 2)[0],
        pos_grid=grid,
    )


def _checked(state: Mapping, config: Dinov2Config) -> dict[str, np.ndarray]:
    """The official-named state dict as float32 arrays, after checking that its keys are
    exactly ``official_shapes(config)``'s, with those shapes."""
    expected = official_shapes(config)
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(state) - set(expected))
    for keys, what in ((missing, "missing key"), (unexpected, "unexpected key")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise Dinov2WeightsError(
                f"{what} {keys[0]!r}{more}: not a DINOv2 ViT with MLP blocks and no registers "
                f"(width {config.hidden_size}, {config.depth} blocks)"
            )
    arrays = {}
    for key, shape in expected.items():
        a = state_dicts.float32_array(state[key])
        if a.shape != shape:
            raise Dinov2WeightsError(f"{key!r} has shape {a.shape}, expected {shape}")
        arrays[key] = a
    return arrays


def params_from_state_dict(
    state: Mapping, num_heads: int | None = None
) -> tuple[dict, Dinov2Config]:
    """``(params, config)`` for ``features`` from an official or a transformers DINOv2 state
    dict (NumPy arrays or torch tensors). The sizes come from the shapes, the heads from
    ``num_heads`` or the width (``HEAD_DIM`` channels each). Params are float32 NumPy arrays.

    Raises:
      Dinov2WeightsError: a key is missing or unexpected, or a shape is wrong (named).
    """
    if _format(state) == "transformers":
        state = from_transformers(state)
    config = _config(state, num_heads)
    a = _checked(state, config)
    d, h = config.hidden_size, config.num_heads

    def dense(key):
        return {"kernel": np.ascontiguousarray(a[f"{key}.weight"].T), "bias": a[f"{key}.bias"]}

    def norm(key):
        return {"scale": a[f"{key}.weight"], "bias": a[f"{key}.bias"]}

    params = {
        "patch_embed": {
            "kernel": np.ascontiguousarray(a["patch_embed.proj.weight"].transpose(2, 3, 1, 0)),
            "bias": a["patch_embed.proj.bias"],
        },
        "cls_token": a["cls_token"].reshape(d),
        "pos_embed": a["pos_embed"].reshape(-1, d),
        "norm": norm("norm"),
    }
    for i in range(config.depth):
        b = f"blocks.{i}"
        # qkv's output channels are laid out [3, heads, head_dim], proj's inputs [heads, hd].
        qkv = a[f"{b}.attn.qkv.weight"].T.reshape(d, 3, h, d // h)
        proj = a[f"{b}.attn.proj.weight"].T.reshape(h, d // h, d)
        params[f"blocks_{i}"] = {
            "norm1": norm(f"{b}.norm1"),
            "attn": {
                "qkv": {"kernel": qkv, "bias": a[f"{b}.attn.qkv.bias"].reshape(3, h, d // h)},
                "proj": {"kernel": proj, "bias": a[f"{b}.attn.proj.bias"]},
            },
            "ls1": a[f"{b}.ls1.gamma"],
            "norm2": norm(f"{b}.norm2"),
            "mlp": {"fc1": dense(f"{b}.mlp.fc1"), "fc2": dense(f"{b}.mlp.fc2")},
            "ls2": a[f"{b}.ls2.gamma"],
        }
    return params, config


def _transformers_heads(path: str, num_heads: int | None) -> int | None:
    """The heads of a transformers file from its ``config.json`` (when beside it), after
    checking the settings this module computes (GELU, MLP blocks, LayerNorm eps 1e-6)."""
    config_path = os.path.join(os.path.dirname(path), "config.json")
    if not os.path.isfile(config_path):
        return num_heads
    with open(config_path) as f:
        cfg = json.load(f)
    wanted = {"hidden_act": "gelu", "use_swiglu_ffn": False, "layer_norm_eps": LAYER_NORM_EPS}
    for key, value in wanted.items():
        if cfg.get(key, value) != value:
            raise Dinov2WeightsError(
                f"{config_path} has {key}={cfg[key]!r}; this ViT has {value!r}"
            )
    heads = cfg.get("num_attention_heads", num_heads)
    if num_heads is not None and heads != num_heads:
        raise Dinov2WeightsError(f"num_heads={num_heads} but {config_path} says {heads}")
    return heads


def load_params(path, num_heads: int | None = None) -> tuple[dict, Dinov2Config]:
    """``(params, config)`` for ``features`` from a DINOv2 weights file: the official ``.pth``
    (needs torch), transformers' ``model.safetensors`` (its ``config.json``, when beside it,
    gives the heads) or ``pytorch_model.bin``, or a ``.safetensors``/``.npz`` of either's keys.

    Raises:
      WeightsNotFoundError: no such file (the message says where to download it).
      CheckpointError: not a readable state dict; Dinov2WeightsError: not a DINOv2 (names the
        key or shape).
      ImportError: a PyTorch file and torch is not installed.
    """
    path = os.fspath(path)
    state = state_dicts.read(
        path,
        missing="DINOv2 weights",
        where_to_get=f"download {OFFICIAL_URL} or {HF_ID}'s model.safetensors",
        torch_hint=f"pip install torch, or use {HF_ID}'s model.safetensors",
    )
    try:
        if _format(state) == "transformers":
            num_heads = _transformers_heads(path, num_heads)
        return params_from_state_dict(state, num_heads)
    except Dinov2WeightsError as e:
        raise Dinov2WeightsError(f"{path}: {e}") from None


def random_state_dict(config: Dinov2Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in the official layout, for tests (no real weights needed): weights
    N(0, 1/fan_in), biases N(0, 0.1^2), LayerNorm and LayerScale gains around 1, tokens and
    positions N(0, 1)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in official_shapes(config).items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
            v = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("weight"):
            v = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)
        elif key.endswith("bias"):
            v = rng.normal(0.0, 0.1, shape)
        else:
            v = rng.normal(0.0, 1.0, shape)
        state[key] = v.astype(np.float32)
    return state
