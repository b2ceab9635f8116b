"""Import trained DiT weights: the official checkpoints and diffusers' ``DiTTransformer2DModel``.

Two formats of state dict (name -> array), recognised by their keys:

- official (github.com/facebookresearch/DiT: ``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``,
  or the ``"ema"`` entry of a checkpoint of its train.py): ``x_embedder.proj.weight``,
  ``t_embedder.mlp.0.weight``, ``y_embedder.embedding_table.weight``,
  ``blocks.<i>.attn.qkv.weight``, ``blocks.<i>.adaLN_modulation.1.weight``,
  ``final_layer.linear.weight``, ... and the fixed ``pos_embed`` (checked equal to
  ``sincos_2d_table``, then dropped: the DiT here recomputes it). Runs with
  ``DiT(numerics="official")``.
- diffusers (``DiTTransformer2DModel`` / ``Transformer2DModel`` with
  ``norm_type="ada_norm_zero"``, e.g. ``transformer/diffusion_pytorch_model.safetensors``):
  ``pos_embed.proj.weight``, ``transformer_blocks.<i>.norm1.linear.weight``,
  ``transformer_blocks.<i>.attn1.to_q.weight`` (``to_k``, ``to_v``, ``to_out.0``),
  ``transformer_blocks.<i>.ff.net.0.proj.weight``, ``.ff.net.2``, ``proj_out_1``,
  ``proj_out_2``, and in EVERY block a copy of the timestep and label embedders
  (``transformer_blocks.<i>.norm1.emb.timestep_embedder.linear_1.weight``, ...,
  ``.norm1.emb.class_embedder.embedding_table.weight``): they must all be equal (diffusers
  uses block 0's for the final layer; a checkpoint converted from the official has them equal)
  and one copy is imported. Runs with ``DiT(numerics="diffusers")``.

Layouts: Linear ``[out, in]`` -> Dense kernel ``[in, out]``; the patch Conv2d
``[D, C, p, p]`` -> ``[p, p, C, D]``; the attention's input projection (official ``qkv``
``[3D, D]``, diffusers ``to_q``/``to_k``/``to_v`` ``[D, D]`` each) -> ``attn/qkv`` kernel
``[D, 3, heads, head_dim]``, bias ``[3, heads, head_dim]``; its output projection ``[D, D]``
-> ``attn/proj`` kernel ``[heads, head_dim, D]``. Every key must be used and every parameter
filled, with the shape the DiT expects (``DiTWeightsError`` names the key otherwise).

The DiT's size is read from the shapes (hidden size, depth, patch size, channels, classes,
MLP ratio) except the number of heads, which no shape shows: pass ``num_heads``, or it is
taken from the paper's size with that hidden size (S 6, B 12, L 16, XL 16), or, for a
diffusers file with its ``config.json`` beside it, from ``num_attention_heads``. The label
table's last row is taken as the null label (``num_classes = rows - 1``), as in every released
checkpoint (trained with label dropout 0.1); a model trained without label dropout has no such
row and would be misread.

Files: ``.safetensors`` through the ``safetensors`` package's NumPy API (no torch needed);
``.pt``/``.pth``/``.bin`` through torch (``weights_only``), if installed. Without torch, convert
once where torch is installed::

    python -m diffusion_jax.dit_weights convert DiT-XL-2-256x256.pt DiT-XL-2-256x256.safetensors

(the same state dict, keys unchanged). ``load_params(path)`` gives ``(params, dit_kwargs)``
with ``DiT(**dit_kwargs).apply({"params": params}, x, t, y, train=False)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import state_dicts
from diffusion_jax.models.dit import DIT_SIZES, DiT, sincos_2d_table

# num_heads of the paper's sizes by hidden size (S, B, L, XL).
HEADS_BY_HIDDEN = {v["hidden_size"]: v["num_heads"] for v in DIT_SIZES.values()}

_CONVERT_HINT = "python -m diffusion_jax.dit_weights convert IN.pt OUT.safetensors"


class DiTWeightsError(state_dicts.CheckpointError):
    """A state dict that is not a DiT of the recognised formats, or does not fit one."""


# --- Layout transforms (PyTorch -> Flax). ---


def _linear(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _conv(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # [out, in, p, p] -> [p, p, in, out]


def _qkv_kernel(w: np.ndarray, num_heads: int) -> np.ndarray:
    """[3D, D] (output channels laid out [3, heads, head_dim]) -> [D, 3, heads, head_dim]."""
    d = w.shape[1]
    return np.ascontiguousarray(w.T.reshape(d, 3, num_heads, d // num_heads))


def _proj_kernel(w: np.ndarray, num_heads: int) -> np.ndarray:
    """[D, D] (input channels laid out [heads, head_dim]) -> [heads, head_dim, D]."""
    d = w.shape[0]
    return np.ascontiguousarray(w.T.reshape(num_heads, d // num_heads, d))


# --- State dicts. ---


def _as_arrays(state_dict: Mapping) -> dict[str, np.ndarray]:
    """Name -> float32 NumPy array (accepts torch tensors, of any float dtype, too)."""
    return {str(k): state_dicts.float32_array(v) for k, v in state_dict.items()}


def detect_format(state_dict: Mapping) -> str:
    """ "official" or "diffusers", from the patch embedding's key."""
    if "x_embedder.proj.weight" in state_dict:
        return "official"
    if "pos_embed.proj.weight" in state_dict:
        return "diffusers"
    some = ", ".join(sorted(state_dict)[:5])
    raise DiTWeightsError(
        "not a DiT state dict: neither 'x_embedder.proj.weight' (official) nor "
        f"'pos_embed.proj.weight' (diffusers) is a key (first keys: {some})"
    )


def _depth(state_dict: Mapping, prefix: str) -> int:
    """Number of blocks ``<prefix>.<i>.``: the indices must be 0 .. depth-1."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if not indices:
        raise DiTWeightsError(f"no '{prefix}.<i>.' keys: a DiT has at least one block")
    depth = max(indices) + 1
    if len(indices) != depth:
        missing = sorted(set(range(depth)) - indices)
        raise DiTWeightsError(f"'{prefix}.<i>.' keys miss block(s) {missing} of {depth}")
    return depth


def _num_heads(hidden_size: int, num_heads: int | None) -> int:
    if num_heads is None:
        if hidden_size not in HEADS_BY_HIDDEN:
            raise DiTWeightsError(
                f"hidden size {hidden_size} is none of the paper's DiT sizes "
                f"({sorted(HEADS_BY_HIDDEN)}): pass num_heads (the shapes do not show it)"
            )
        num_heads = HEADS_BY_HIDDEN[hidden_size]
    if hidden_size % num_heads:
        raise DiTWeightsError(f"num_heads={num_heads} does not divide hidden size {hidden_size}")
    return num_heads


def _shape(state_dict: Mapping, key: str, ndim: int) -> tuple[int, ...]:
    if key not in state_dict:
        raise DiTWeightsError(f"missing key {key!r}")
    shape = tuple(state_dict[key].shape)
    if len(shape) != ndim:
        raise DiTWeightsError(f"{key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def _dit_kwargs(
    state_dict: Mapping,
    *,
    patch_key: str,
    fc1_key: str,
    final_key: str,
    label_key: str,
    block_prefix: str,
    num_heads: int | None,
    numerics: str,
) -> dict:
    hidden, _, p, p2 = _shape(state_dict, patch_key, 4)
    if p != p2:
        raise DiTWeightsError(f"{patch_key!r}: non-square patches {p}x{p2}")
    mlp_hidden = _shape(state_dict, fc1_key, 2)[0]
    final = _shape(state_dict, final_key, 2)[0]
    if final % (p * p):
        raise DiTWeightsError(f"{final_key!r}: {final} outputs is not a multiple of {p}*{p}")
    num_classes = None
    if label_key in state_dict:
        num_classes = _shape(state_dict, label_key, 2)[0] - 1  # the last row: null label
    return dict(
        patch_size=p,
        hidden_size=hidden,
        depth=_depth(state_dict, block_prefix),
        num_heads=_num_heads(hidden, num_heads),
        out_channels=final // (p * p),
        mlp_ratio=mlp_hidden / hidden,
        num_classes=num_classes,
        numerics=numerics,
    )


def _in_channels(state_dict: Mapping, patch_key: str) -> int:
    return state_dict[patch_key].shape[1]


def _fill(sources: dict[tuple[str, ...], tuple[str, np.ndarray]], state_dict, kwargs, in_ch):
    """Check ``sources`` (param path -> (state dict key(s) it came from, value)) against the
    parameters of ``DiT(**kwargs)`` and that every key of ``state_dict`` was used; returns the
    nested params dict."""
    model = DiT(**kwargs)
    p = kwargs["patch_size"]
    x = jax.ShapeDtypeStruct((1, p, p, in_ch), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = None if kwargs["num_classes"] is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(
        lambda x, t, y: model.init(jax.random.PRNGKey(0), x, t, y, train=False), x, t, y
    )["params"]
    expected = {
        tuple(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }
    for path, shape in expected.items():
        if path not in sources:
            raise DiTWeightsError(f"no key fills the DiT parameter {'/'.join(path)} {shape}")
        key, value = sources[path]
        if value.shape != shape:
            raise DiTWeightsError(
                f"{key!r} gives {'/'.join(path)} the shape {value.shape}, the DiT "
                f"({_describe(kwargs)}) expects {shape}"
            )
    extra = sorted(set(sources) - set(expected))
    if extra:
        raise DiTWeightsError(
            f"{sources[extra[0]][0]!r} maps to {'/'.join(extra[0])}, not a DiT parameter"
        )
    used = {k for key, _ in sources.values() for k in key.split(" + ")}
    unused = sorted(set(state_dict) - used)
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise DiTWeightsError(f"unused key {unused[0]!r}{more}: not part of this DiT")
    params: dict = {}
    for path, (_, value) in sources.items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return params


def _describe(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def _check_pos_embed(table: np.ndarray, key: str, hidden: int) -> None:
    """An imported position table must be ``sincos_2d_table`` (which the DiT recomputes)."""
    n = table.size // hidden if hidden else 0
    grid = math.isqrt(n)
    if table.size != grid * grid * hidden:
        raise DiTWeightsError(f"{key!r} of shape {table.shape} is not a square grid x {hidden}")
    ours = sincos_2d_table(hidden, grid)
    err = float(np.max(np.abs(table.reshape(grid * grid, hidden) - ours)))
    if err > 1e-5:
        raise DiTWeightsError(
            f"{key!r} differs from the 2-D sin-cos table the DiT uses (max abs diff {err:.3g}): "
            "a learned or otherwise different position table cannot be imported"
        )


def _official(state_dict: Mapping, num_heads: int | None) -> tuple[dict, dict]:
    sd = _as_arrays(state_dict)
    kwargs = _dit_kwargs(
        sd,
        patch_key="x_embedder.proj.weight",
        fc1_key="blocks.0.mlp.fc1.weight",
        final_key="final_layer.linear.weight",
        label_key="y_embedder.embedding_table.weight",
        block_prefix="blocks",
        num_heads=num_heads,
        numerics="official",
    )
    heads = kwargs["num_heads"]
    sources: dict[tuple[str, ...], tuple[str, np.ndarray]] = {}

    def linear(path, key):
        sources[(*path, "kernel")] = (f"{key}.weight", _linear(_get(sd, f"{key}.weight")))
        sources[(*path, "bias")] = (f"{key}.bias", _get(sd, f"{key}.bias"))

    sources[("x_embedder", "kernel")] = (
        "x_embedder.proj.weight",
        _conv(sd["x_embedder.proj.weight"]),
    )
    sources[("x_embedder", "bias")] = ("x_embedder.proj.bias", _get(sd, "x_embedder.proj.bias"))
    linear(("t_embedder", "mlp_0"), "t_embedder.mlp.0")
    linear(("t_embedder", "mlp_2"), "t_embedder.mlp.2")
    if kwargs["num_classes"] is not None:
        key = "y_embedder.embedding_table.weight"
        sources[("y_embedder", "embedding_table", "embedding")] = (key, sd[key])
    for i in range(kwargs["depth"]):
        b, block = f"blocks.{i}", f"blocks_{i}"
        qkv = (f"{b}.attn.qkv.weight", f"{b}.attn.qkv.bias")
        _attention(sources, block, heads, qkv, *(_get(sd, k) for k in qkv), sd, f"{b}.attn.proj")
        linear((block, "mlp", "fc1"), f"{b}.mlp.fc1")
        linear((block, "mlp", "fc2"), f"{b}.mlp.fc2")
        linear((block, "adaLN_modulation"), f"{b}.adaLN_modulation.1")
    linear(("final_layer", "adaLN_modulation"), "final_layer.adaLN_modulation.1")
    linear(("final_layer", "linear"), "final_layer.linear")
    if "pos_embed" in sd:
        _check_pos_embed(sd["pos_embed"], "pos_embed", kwargs["hidden_size"])
    used_sd = {k: v for k, v in sd.items() if k != "pos_embed"}
    in_ch = _in_channels(sd, "x_embedder.proj.weight")
    return _fill(sources, used_sd, kwargs, in_ch), kwargs


def _get(sd: Mapping, key: str) -> np.ndarray:
    if key not in sd:
        raise DiTWeightsError(f"missing key {key!r}")
    return sd[key]


def _qkv(w: np.ndarray, heads: int) -> np.ndarray:
    if w.ndim != 2 or w.shape[0] != 3 * w.shape[1] or w.shape[1] % heads:
        return w  # wrong shape: reported (with its key) by the shape check
    return _qkv_kernel(w, heads)


def _proj(w: np.ndarray, heads: int) -> np.ndarray:
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] % heads:
        return w
    return _proj_kernel(w, heads)


def _attention(sources, block, heads, qkv_keys, qkv_w, qkv_b, sd, proj) -> None:
    """Adds ``block``'s attention parameters to ``sources``: the input projection from the
    official layout ``[3D, D]`` weight and ``[3D]`` bias (``qkv_keys`` name them) and the
    output projection from the state dict's ``<proj>.weight`` and ``.bias``."""
    d = qkv_w.shape[-1]
    sources[(block, "attn", "qkv", "kernel")] = (qkv_keys[0], _qkv(qkv_w, heads))
    sources[(block, "attn", "qkv", "bias")] = (
        qkv_keys[1],
        qkv_b.reshape(3, heads, -1) if qkv_b.size == 3 * d and d % heads == 0 else qkv_b,
    )
    proj_w = _get(sd, f"{proj}.weight")
    sources[(block, "attn", "proj", "kernel")] = (f"{proj}.weight", _proj(proj_w, heads))
    sources[(block, "attn", "proj", "bias")] = (f"{proj}.bias", _get(sd, f"{proj}.bias"))


# diffusers' per-block embedders: (suffix under transformer_blocks.<i>.norm1.emb., target path).
_DIFFUSERS_EMBEDDERS = (
    ("timestep_embedder.linear_1.weight", ("t_embedder", "mlp_0", "kernel"), _linear),
    ("timestep_embedder.linear_1.bias", ("t_embedder", "mlp_0", "bias"), None),
    ("timestep_embedder.linear_2.weight", ("t_embedder", "mlp_2", "kernel"), _linear),
    ("timestep_embedder.linear_2.bias", ("t_embedder", "mlp_2", "bias"), None),
    ("class_embedder.embedding_table.weight", ("y_embedder", "embedding_table", "embedding"), None),
)


def _diffusers(state_dict: Mapping, num_heads: int | None) -> tuple[dict, dict]:
    sd = _as_arrays(state_dict)
    kwargs = _dit_kwargs(
        sd,
        patch_key="pos_embed.proj.weight",
        fc1_key="transformer_blocks.0.ff.net.0.proj.weight",
        final_key="proj_out_2.weight",
        label_key="transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
        block_prefix="transformer_blocks",
        num_heads=num_heads,
        numerics="diffusers",
    )
    heads, depth = kwargs["num_heads"], kwargs["depth"]
    sources: dict[tuple[str, ...], tuple[str, np.ndarray]] = {}

    def linear(path, key):
        sources[(*path, "kernel")] = (f"{key}.weight", _linear(_get(sd, f"{key}.weight")))
        sources[(*path, "bias")] = (f"{key}.bias", _get(sd, f"{key}.bias"))

    sources[("x_embedder", "kernel")] = (
        "pos_embed.proj.weight",
        _conv(sd["pos_embed.proj.weight"]),
    )
    sources[("x_embedder", "bias")] = ("pos_embed.proj.bias", _get(sd, "pos_embed.proj.bias"))

    # One copy of the per-block embedders, after checking all copies are equal.
    for suffix, path, transform in _DIFFUSERS_EMBEDDERS:
        keys = [f"transformer_blocks.{i}.norm1.emb.{suffix}" for i in range(depth)]
        if keys[0] not in sd and path[0] == "y_embedder":
            continue  # unconditional (reported if only some blocks have a label table)
        first = _get(sd, keys[0])
        for key in keys[1:]:
            other = _get(sd, key)
            if other.shape != first.shape or not np.array_equal(other, first):
                raise DiTWeightsError(
                    f"{key!r} differs from {keys[0]!r}: this DiT has one timestep/label "
                    "embedder, diffusers' copies in every block must be equal to import"
                )
        value = transform(first) if transform else first
        sources[path] = (" + ".join(keys), value)

    for i in range(depth):
        b, block = f"transformer_blocks.{i}", f"blocks_{i}"
        linear((block, "adaLN_modulation"), f"{b}.norm1.linear")
        names = [f"{b}.attn1.to_{n}" for n in "qkv"]
        ws = [_get(sd, f"{n}.weight") for n in names]
        bs = [_get(sd, f"{n}.bias") for n in names]
        keys_w = " + ".join(f"{n}.weight" for n in names)
        keys_b = " + ".join(f"{n}.bias" for n in names)
        if len({w.shape for w in ws}) != 1 or ws[0].ndim != 2 or ws[0].shape[0] != ws[0].shape[1]:
            raise DiTWeightsError(
                f"{keys_w}: shapes {[w.shape for w in ws]}, expected three [D, D] matrices"
            )
        qkv_w, qkv_b = np.concatenate(ws, axis=0), np.concatenate(bs, axis=0)
        _attention(sources, block, heads, (keys_w, keys_b), qkv_w, qkv_b, sd, f"{b}.attn1.to_out.0")
        linear((block, "mlp", "fc1"), f"{b}.ff.net.0.proj")
        linear((block, "mlp", "fc2"), f"{b}.ff.net.2")
    linear(("final_layer", "adaLN_modulation"), "proj_out_1")
    linear(("final_layer", "linear"), "proj_out_2")
    # A persistent position table (only with pos_embed_max_size) is checked and dropped.
    if "pos_embed.pos_embed" in sd:
        _check_pos_embed(sd["pos_embed.pos_embed"], "pos_embed.pos_embed", kwargs["hidden_size"])
    used_sd = {k: v for k, v in sd.items() if k != "pos_embed.pos_embed"}
    in_ch = _in_channels(sd, "pos_embed.proj.weight")
    return _fill(sources, used_sd, kwargs, in_ch), kwargs


def from_official(state_dict: Mapping, num_heads: int | None = None) -> dict:
    """Params (the ``"params"`` collection of ``DiT``) from an official DiT state dict (NumPy
    arrays or torch tensors). ``num_heads`` None: the paper's for the hidden size. The DiT's
    attributes: ``dit_kwargs(state_dict, num_heads)``. Raises DiTWeightsError."""
    return _official(state_dict, num_heads)[0]


def from_diffusers(state_dict: Mapping, num_heads: int | None = None) -> dict:
    """Params from a diffusers ``DiTTransformer2DModel`` state dict; its per-block embedder
    copies must be equal. Run them with ``DiT(numerics="diffusers")``. Raises DiTWeightsError."""
    return _diffusers(state_dict, num_heads)[0]


def convert(state_dict: Mapping, num_heads: int | None = None) -> tuple[dict, dict]:
    """``(params, dit_kwargs)`` from a state dict of either format (``detect_format``)."""
    fmt = detect_format(state_dict)
    return (_official if fmt == "official" else _diffusers)(state_dict, num_heads)


def dit_kwargs(state_dict: Mapping, num_heads: int | None = None) -> dict:
    """The ``DiT`` attributes of a state dict of either format: patch_size, hidden_size, depth,
    num_heads, out_channels, mlp_ratio, num_classes and numerics."""
    return convert(state_dict, num_heads)[1]


# --- Files. ---


def read_state_dict(path) -> dict[str, np.ndarray]:
    """The raw state dict of a ``.safetensors`` (NumPy, no torch) or ``.pt``/``.pth``/``.bin``
    file (needs torch; a train.py checkpoint's ``"ema"`` entry is taken, as the official
    sample.py does)."""
    state = state_dicts.read(
        path,
        missing="DiT weights",
        torch_hint=f"install torch to read .pt, or convert to safetensors where torch is "
        f"installed: {_CONVERT_HINT}",
        torch_safe_globals=(argparse.Namespace,),  # train.py saves its args beside the weights
    )
    if "ema" in state and isinstance(state["ema"], Mapping):
        state = state["ema"]
    return {
        k: np.asarray(v.detach().cpu().float() if hasattr(v, "detach") else v)
        for k, v in state.items()
    }


def _diffusers_config(path) -> dict | None:
    """diffusers' ``config.json`` beside a model file, if any."""
    config = os.path.join(os.path.dirname(os.fspath(path)), "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f)


def load_params(path, num_heads: int | None = None) -> tuple[dict, dict]:
    """``(params, dit_kwargs)`` from a DiT checkpoint file of either format, for
    ``DiT(**dit_kwargs).apply({"params": params}, x, t, y, train=False)`` (x NHWC).

    For a diffusers file with its ``config.json`` beside it, ``num_attention_heads`` gives the
    heads (when ``num_heads`` is None) and ``norm_eps`` must be diffusers' default 1e-5.
    """
    sd = read_state_dict(path)
    if detect_format(sd) == "diffusers" and (config := _diffusers_config(path)) is not None:
        heads = config.get("num_attention_heads")
        if num_heads is None:
            num_heads = heads
        elif heads is not None and heads != num_heads:
            raise DiTWeightsError(
                f"num_heads={num_heads} but {path}'s config.json says num_attention_heads={heads}"
            )
        eps = config.get("norm_eps", 1e-5)
        if eps != 1e-5:
            raise DiTWeightsError(
                f"{path}'s config.json has norm_eps={eps}; DiT(numerics='diffusers') has 1e-5"
            )
        if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise DiTWeightsError(
                f"{path}'s config.json has norm_type={config['norm_type']!r}, not ada_norm_zero"
            )
    return convert(sd, num_heads)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_jax.dit_weights",
        description="DiT checkpoints (official or diffusers): convert to .safetensors, describe.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser(
        "convert", help="write a .pt/.pth state dict as .safetensors (same keys; needs torch)"
    )
    conv.add_argument("src")
    conv.add_argument("dst")
    info = sub.add_parser("info", help="print the DiT attributes of a checkpoint as JSON")
    info.add_argument("path")
    info.add_argument("--num_heads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            if not args.dst.endswith(".safetensors"):
                parser.error("dst must end with .safetensors")
            from safetensors.numpy import save_file

            sd = read_state_dict(args.src)
            detect_format(sd)
            save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, args.dst)
            print(f"wrote {args.dst}: {len(sd)} arrays")
        else:
            print(json.dumps(load_params(args.path, args.num_heads)[1]))
    except (DiTWeightsError, ImportError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
