"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph) in JAX, for FID, IS and KID.

Layer for layer the network pytorch-fid's ``fid_inception_v3()`` builds, which differs from
torchvision's Inception-v3: the 3x3 average pools of the A, C and E blocks do not count the
zero padding, the last E block (``Mixed_7c``) max-pools in its pool branch, the classifier is
1008-way, BatchNorm eps is 0.001. Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
(``FID_WEIGHTS_URL``) or an ``.npz`` made from it with

    python -m diffusion_jax.inception convert pt_inception-2015-12-05-6726825d.pth OUT.npz

``params`` is ``{module path: {"w": [kh, kw, cin, cout], "b": [cout]}}`` with BatchNorm (inference
statistics) folded into each convolution, plus ``"fc": {"w": [2048, 1008]}``; module paths are
pytorch-fid's (``"Conv2d_1a_3x3"``, ``"Mixed_5b.branch1x1"``, ...). Activations are NHWC float32.
Convolutions and the classifier use ``Precision.HIGHEST``: TPUs (and GPUs, with TF32) otherwise
multiply float32 at about 1e-3 relative precision, while published FIDs come from float32.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import state_dicts
from diffusion_jax.state_dicts import CheckpointError, WeightsNotFoundError, one_line

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299
NUM_LOGITS = 1008
POOL3_DIM = 2048
BN_EPS = 1e-3
_PRECISION = jax.lax.Precision.HIGHEST
_CONVERT_HINT = "python -m diffusion_jax.inception convert IN.pth OUT.npz"


# --- Architecture: every convolution, as torchvision/pytorch-fid define it. ---


def _conv_table() -> dict[str, tuple[int, int, tuple[int, int], int, tuple[int, int]]]:
    """``{module path: (cin, cout, (kh, kw), stride, (pad_h, pad_w))}`` of all 94 convolutions."""
    table = {}

    def conv(name, cin, cout, k, stride=1, pad=0):
        k = (k, k) if isinstance(k, int) else k
        pad = (pad, pad) if isinstance(pad, int) else pad
        table[name] = (cin, cout, k, stride, pad)

    def block_a(p, cin, pool_features):
        conv(f"{p}.branch1x1", cin, 64, 1)
        conv(f"{p}.branch5x5_1", cin, 48, 1)
        conv(f"{p}.branch5x5_2", 48, 64, 5, pad=2)
        conv(f"{p}.branch3x3dbl_1", cin, 64, 1)
        conv(f"{p}.branch3x3dbl_2", 64, 96, 3, pad=1)
        conv(f"{p}.branch3x3dbl_3", 96, 96, 3, pad=1)
        conv(f"{p}.branch_pool", cin, pool_features, 1)

    def block_b(p, cin):
        conv(f"{p}.branch3x3", cin, 384, 3, stride=2)
        conv(f"{p}.branch3x3dbl_1", cin, 64, 1)
        conv(f"{p}.branch3x3dbl_2", 64, 96, 3, pad=1)
        conv(f"{p}.branch3x3dbl_3", 96, 96, 3, stride=2)

    def block_c(p, cin, c7):
        conv(f"{p}.branch1x1", cin, 192, 1)
        conv(f"{p}.branch7x7_1", cin, c7, 1)
        conv(f"{p}.branch7x7_2", c7, c7, (1, 7), pad=(0, 3))
        conv(f"{p}.branch7x7_3", c7, 192, (7, 1), pad=(3, 0))
        conv(f"{p}.branch7x7dbl_1", cin, c7, 1)
        conv(f"{p}.branch7x7dbl_2", c7, c7, (7, 1), pad=(3, 0))
        conv(f"{p}.branch7x7dbl_3", c7, c7, (1, 7), pad=(0, 3))
        conv(f"{p}.branch7x7dbl_4", c7, c7, (7, 1), pad=(3, 0))
        conv(f"{p}.branch7x7dbl_5", c7, 192, (1, 7), pad=(0, 3))
        conv(f"{p}.branch_pool", cin, 192, 1)

    def block_d(p, cin):
        conv(f"{p}.branch3x3_1", cin, 192, 1)
        conv(f"{p}.branch3x3_2", 192, 320, 3, stride=2)
        conv(f"{p}.branch7x7x3_1", cin, 192, 1)
        conv(f"{p}.branch7x7x3_2", 192, 192, (1, 7), pad=(0, 3))
        conv(f"{p}.branch7x7x3_3", 192, 192, (7, 1), pad=(3, 0))
        conv(f"{p}.branch7x7x3_4", 192, 192, 3, stride=2)

    def block_e(p, cin):
        conv(f"{p}.branch1x1", cin, 320, 1)
        conv(f"{p}.branch3x3_1", cin, 384, 1)
        conv(f"{p}.branch3x3_2a", 384, 384, (1, 3), pad=(0, 1))
        conv(f"{p}.branch3x3_2b", 384, 384, (3, 1), pad=(1, 0))
        conv(f"{p}.branch3x3dbl_1", cin, 448, 1)
        conv(f"{p}.branch3x3dbl_2", 448, 384, 3, pad=1)
        conv(f"{p}.branch3x3dbl_3a", 384, 384, (1, 3), pad=(0, 1))
        conv(f"{p}.branch3x3dbl_3b", 384, 384, (3, 1), pad=(1, 0))
        conv(f"{p}.branch_pool", cin, 192, 1)

    conv("Conv2d_1a_3x3", 3, 32, 3, stride=2)
    conv("Conv2d_2a_3x3", 32, 32, 3)
    conv("Conv2d_2b_3x3", 32, 64, 3, pad=1)
    conv("Conv2d_3b_1x1", 64, 80, 1)
    conv("Conv2d_4a_3x3", 80, 192, 3)
    block_a("Mixed_5b", 192, 32)
    block_a("Mixed_5c", 256, 64)
    block_a("Mixed_5d", 288, 64)
    block_b("Mixed_6a", 288)
    block_c("Mixed_6b", 768, 128)
    block_c("Mixed_6c", 768, 160)
    block_c("Mixed_6d", 768, 160)
    block_c("Mixed_6e", 768, 192)
    block_d("Mixed_7a", 768)
    block_e("Mixed_7b", 1280)
    block_e("Mixed_7c", 2048)
    return table


_CONVS = _conv_table()


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The pytorch-fid state-dict entries the network uses, with their (PyTorch-layout) shapes."""
    shapes = {}
    for name, (cin, cout, (kh, kw), _, _) in _CONVS.items():
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{stat}"] = (cout,)
    shapes["fc.weight"] = (NUM_LOGITS, POOL3_DIM)
    return shapes


# --- Forward pass. ---


def _conv_bn_relu(params, name, x):
    _, _, _, stride, (ph, pw) = _CONVS[name]
    y = jax.lax.conv_general_dilated(
        x,
        params[name]["w"],
        window_strides=(stride, stride),
        padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_PRECISION,
    )
    return jax.nn.relu(y + params[name]["b"])


def _max_pool_3x3(x, stride, pad=0):
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    strides = (1, stride, stride, 1)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), strides, pads)


def _avg_pool_3x3_exclude_pad(x):
    """3x3, stride 1, padding 1 average that divides by the number of real (unpadded) inputs."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)

    def counts(n):  # window size along one axis: 2 at the borders, 3 inside
        i = np.arange(n)
        return np.minimum(i + 1, n - 1) - np.maximum(i - 1, 0) + 1

    _, h, w, _ = x.shape
    return sums / np.outer(counts(h), counts(w)).astype(np.float32)[None, :, :, None]


def _block_a(params, p, x):
    c = functools.partial(_conv_bn_relu, params)
    b1 = c(f"{p}.branch1x1", x)
    b5 = c(f"{p}.branch5x5_2", c(f"{p}.branch5x5_1", x))
    b3 = c(f"{p}.branch3x3dbl_3", c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x)))
    bp = c(f"{p}.branch_pool", _avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


def _block_b(params, p, x):
    c = functools.partial(_conv_bn_relu, params)
    b3 = c(f"{p}.branch3x3", x)
    b3d = c(f"{p}.branch3x3dbl_3", c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x)))
    return jnp.concatenate([b3, b3d, _max_pool_3x3(x, stride=2)], axis=-1)


def _block_c(params, p, x):
    c = functools.partial(_conv_bn_relu, params)
    b1 = c(f"{p}.branch1x1", x)
    b7 = x
    for i in (1, 2, 3):
        b7 = c(f"{p}.branch7x7_{i}", b7)
    b7d = x
    for i in (1, 2, 3, 4, 5):
        b7d = c(f"{p}.branch7x7dbl_{i}", b7d)
    bp = c(f"{p}.branch_pool", _avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, b7d, bp], axis=-1)


def _block_d(params, p, x):
    c = functools.partial(_conv_bn_relu, params)
    b3 = c(f"{p}.branch3x3_2", c(f"{p}.branch3x3_1", x))
    b7 = x
    for i in (1, 2, 3, 4):
        b7 = c(f"{p}.branch7x7x3_{i}", b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, stride=2)], axis=-1)


def _block_e(params, p, x, *, max_pool):
    c = functools.partial(_conv_bn_relu, params)
    b1 = c(f"{p}.branch1x1", x)
    b3 = c(f"{p}.branch3x3_1", x)
    b3 = jnp.concatenate([c(f"{p}.branch3x3_2a", b3), c(f"{p}.branch3x3_2b", b3)], axis=-1)
    b3d = c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x))
    b3d = jnp.concatenate([c(f"{p}.branch3x3dbl_3a", b3d), c(f"{p}.branch3x3dbl_3b", b3d)], -1)
    # The FID graph's Mixed_7c max-pools here (Mixed_7b and the paper average-pool).
    pooled = _max_pool_3x3(x, stride=1, pad=1) if max_pool else _avg_pool_3x3_exclude_pad(x)
    bp = c(f"{p}.branch_pool", pooled)
    return jnp.concatenate([b1, b3, b3d, bp], axis=-1)


# Jitted apart from the preprocessing (the only part that depends on H, W), so that un-jitted
# callers compile the network once for all input sizes; inside a caller's jit both are inlined.
@jax.jit
def _network(params, x):
    """``[N, 299, 299, 3]`` in [-1, 1] -> pool3 ``[N, 2048]``, unbiased logits ``[N, 1008]``."""
    c = functools.partial(_conv_bn_relu, params)
    x = c("Conv2d_2b_3x3", c("Conv2d_2a_3x3", c("Conv2d_1a_3x3", x)))  # 147x147x64
    x = _max_pool_3x3(x, stride=2)  # 73x73
    x = c("Conv2d_4a_3x3", c("Conv2d_3b_1x1", x))  # 71x71x192
    x = _max_pool_3x3(x, stride=2)  # 35x35
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _block_a(params, name, x)  # 35x35x288
    x = _block_b(params, "Mixed_6a", x)  # 17x17x768
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _block_c(params, name, x)
    x = _block_d(params, "Mixed_7a", x)  # 8x8x1280
    x = _block_e(params, "Mixed_7b", x, max_pool=False)
    x = _block_e(params, "Mixed_7c", x, max_pool=True)  # 8x8x2048
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = jnp.dot(pool3, params["fc"]["w"], precision=_PRECISION)
    return {"pool3": pool3, "logits": logits}


def _linear_taps(n_in: int, n_out: int):
    """Source indices and weights of PyTorch's bilinear resize (align_corners=False) on one axis.

    Output ``i`` reads ``x[i0] * w0 + x[i1] * w1`` with source coordinate
    ``max((i + 0.5) * n_in / n_out - 0.5, 0)``, computed in float32 as PyTorch does.
    """
    if n_in == n_out:
        i = np.arange(n_out)
        return i, i, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, np.float32(1) - w1, w1


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` on NHWC.

    No antialiasing when shrinking (unlike ``jax.image.resize``): each output pixel mixes the
    2x2 input pixels around its source coordinate. Width is interpolated first, as in PyTorch.

    Args:
      x: float ``[N, H, W, C]``.
      size: output ``(height, width)``.
    Returns:
      ``[N, height, width, C]``, dtype of ``x``.
    """
    for axis, n_out in ((2, size[1]), (1, size[0])):
        i0, i1, w0, w1 = _linear_taps(x.shape[axis], n_out)
        shape = [1] * x.ndim
        shape[axis] = n_out
        x0 = jnp.take(x, i0, axis=axis, mode="clip")
        x1 = jnp.take(x, i1, axis=axis, mode="clip")
        x = x0 * w0.reshape(shape) + x1 * w1.reshape(shape)
    return x


def features(params, images: jax.Array) -> dict[str, jax.Array]:
    """FID features and Inception-Score logits of 8-bit RGB images.

    Preprocessing is pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``:
    ``x / 255``, bilinear resize to 299x299 (align_corners=False), then ``2x - 1``.
    Pure: works under ``jax.jit`` (one compilation per input shape), with the batch sharded over
    devices (no cross-example communication).

    Args:
      params: from ``load_params`` (or ``params_from_state_dict``).
      images: uint8 ``[N, H, W, 3]``, any H, W.
    Returns:
      ``{"pool3": [N, 2048], "logits": [N, 1008]}`` float32; logits are ``pool3 @ fc.weight.T``
      without the classifier bias, as the Inception Score code uses them.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] (NHWC RGB), got shape {images.shape}")
    if images.dtype != jnp.uint8:
        raise ValueError(
            f"images must be uint8 (quantise samples first: uint8(clip(round(127.5 x + 127.5)))),"
            f" got {images.dtype}"
        )
    return _network(params, _preprocess(images))


@jax.jit
def _preprocess(images):
    """uint8 ``[N, H, W, 3]`` -> ``[N, 299, 299, 3]`` in [-1, 1], in pytorch-fid's order."""
    x = resize_bilinear(images.astype(jnp.float32) / 255.0, (INPUT_SIZE, INPUT_SIZE))
    return 2.0 * x - 1.0


# --- Weights. ---


def _read_state_dict(path) -> Mapping:
    """The raw state dict in a pytorch-fid ``.pth`` or a converted ``.npz`` (by extension)."""
    return state_dicts.read(
        path,
        missing="Inception weights",
        where_to_get=f"download {FID_WEIGHTS_URL} (and, to load without torch, {_CONVERT_HINT})",
        torch_hint=f"pip install torch, or convert it to .npz where torch is installed: "
        f"{_CONVERT_HINT}",
    )


def _checked_arrays(state: Mapping, source: str = "state dict") -> dict[str, np.ndarray]:
    """The entries the network uses, as float32 NumPy arrays, after checking names and shapes.

    Raises:
      CheckpointError: a key is missing or an entry has the wrong shape; the message names it.
    """
    shapes = state_dict_shapes()
    missing = [k for k in shapes if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{source}: not the FID Inception weights: missing key {missing[0]!r}{more}"
        )
    arrays = {}
    for key, shape in shapes.items():
        try:
            a = np.asarray(state[key], dtype=np.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{source}: {key!r} is not an array ({one_line(e)})") from None
        if a.shape != shape:
            hint = ""
            if key == "fc.weight" and a.shape == (1000, POOL3_DIM):
                hint = " (torchvision's ImageNet Inception? FID needs the 2015-12-05 weights)"
            raise CheckpointError(f"{source}: {key!r} has shape {a.shape}, expected {shape}{hint}")
        arrays[key] = a
    return arrays


def params_from_state_dict(state: Mapping, source: str = "state dict"):
    """``params`` for ``features`` from a pytorch-fid state dict (tensors or arrays).

    BatchNorm is folded into the preceding convolution in float64:
    ``w * gamma / sqrt(var + eps)`` and ``beta - mean * gamma / sqrt(var + eps)``.
    """
    a = {k: v.astype(np.float64) for k, v in _checked_arrays(state, source).items()}
    params = {}
    for name in _CONVS:
        scale = a[f"{name}.bn.weight"] / np.sqrt(a[f"{name}.bn.running_var"] + BN_EPS)
        w = a[f"{name}.conv.weight"] * scale[:, None, None, None]  # [cout, cin, kh, kw]
        b = a[f"{name}.bn.bias"] - a[f"{name}.bn.running_mean"] * scale
        params[name] = {"w": w.transpose(2, 3, 1, 0), "b": b}
    params["fc"] = {"w": a["fc.weight"].T}
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)


def load_params(path):
    """``params`` for ``features`` from pytorch-fid's ``.pth`` (needs torch) or a converted .npz.

    Raises:
      WeightsNotFoundError: no such file (the message says where to download it).
      CheckpointError: not a checkpoint, or not this network's (names the key and shapes).
      ImportError: a ``.pth`` and torch is not installed.
    """
    return params_from_state_dict(_read_state_dict(path), source=os.fspath(path))


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in pytorch-fid's layout, for tests and benchmarks (no real weights needed).

    He-normal convolutions (activations keep their scale through the network) and BatchNorm
    affine parameters and statistics drawn around their neutral values.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in state_dict_shapes().items():
        if key.endswith("conv.weight"):
            v = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif key.endswith(("bn.weight", "bn.running_var")):
            v = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            v = rng.normal(0.0, 0.1, shape)
        else:  # fc.weight
            v = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
        state[key] = v.astype(np.float32)
    return state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_jax.inception",
        description="Convert pytorch-fid's Inception weights to an .npz that loads without torch.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="IN.pth -> OUT.npz (the arrays the network uses)")
    convert.add_argument("src", help=f"pytorch-fid's weights, from {FID_WEIGHTS_URL}")
    convert.add_argument("dst", help="output .npz")
    args = parser.parse_args(argv)
    if not args.dst.endswith(".npz"):
        parser.error(f"output must end in .npz, got {args.dst!r}")
    try:
        arrays = _checked_arrays(_read_state_dict(args.src), source=args.src)
    except (WeightsNotFoundError, CheckpointError, ImportError) as e:
        parser.exit(1, f"error: {e}\n")
    np.savez(args.dst, **arrays)
    n = sum(a.size for a in arrays.values())
    print(f"wrote {args.dst}: {len(arrays)} arrays, {n:,} values")


if __name__ == "__main__":
    sys.exit(main())
