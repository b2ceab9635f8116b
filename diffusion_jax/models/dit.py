"""The Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

A ViT over non-overlapping ``patch_size`` x ``patch_size`` patches of the (latent) image,
conditioned on the timestep and class label through adaLN-Zero blocks. The numerics and the
initialisation follow the official PyTorch code (github.com/facebookresearch/DiT, models.py),
and the submodule names mirror its ``state_dict`` keys (``x_embedder``, ``t_embedder/mlp_0``,
``t_embedder/mlp_2``, ``y_embedder/embedding_table``, ``blocks_<i>/attn/qkv``,
``blocks_<i>/attn/proj``, ``blocks_<i>/mlp/fc1``, ``blocks_<i>/mlp/fc2``,
``blocks_<i>/adaLN_modulation``, ``final_layer/adaLN_modulation``, ``final_layer/linear``;
the official's ``mlp.0``/``mlp.2`` and ``adaLN_modulation.1`` are Sequential indices), so its
checkpoints can be imported by transposing the weights (Linear [out, in] -> Dense [in, out];
Conv2d [out, in, p, p] -> [p, p, in, out]) and, for attention, reshaping: ``attn/qkv`` has the
kernel ``[D, 3, num_heads, head_dim]`` (the official's output channels are laid out that way)
and ``attn/proj`` ``[num_heads, head_dim, D]``.

The fixed 2-D sin-cos position table is NOT a parameter here: it is recomputed (in NumPy, at
trace time) as a constant of the computation, so it never reaches the optimizer, the EMA or a
checkpoint. The official stores it as a frozen ``nn.Parameter`` (``requires_grad=False``) that
counts in its parameter total; an imported ``pos_embed`` equals ``get_2d_sincos_pos_embed``'s
table and can be dropped. DiT-XL/2 on 32x32x4 latents with 1000 classes and learned sigma has
674,834,720 trainable parameters here, 675,129,632 with the 256 x 1152 table (the paper's 675M).

Classifier-free guidance: with ``num_classes`` set, the label table has ``num_classes + 1`` rows
and label ``num_classes`` is the null label (the official's LabelEmbedder with dropout > 0). The
label dropout itself is the caller's (``train_step.drop_labels``), as for the U-Net; the DiT has
no dropout, so ``train`` is accepted for the common model call and otherwise unused.

Numerics (``DiT.numerics``): "official" (the default) computes as the official code;
"diffusers" as diffusers' ``DiTTransformer2DModel`` (``norm_type="ada_norm_zero"``), which
differs in two constants only (``NUMERICS``): its timestep frequencies are
``exp(-ln(10000) k / (dim/2 - 1))`` (``downscale_freq_shift=1``; the official divides by
``dim/2``), and the LayerNorm before each block's MLP (its ``norm3``) has its ``norm_eps``,
1e-5 by default, where the official's has 1e-6 (the attention's ``norm1`` and the final
``norm_out`` keep 1e-6 in both). diffusers also keeps a copy of the timestep and label
embedders in every block; a checkpoint converted from the official has them all equal, and
``diffusion_jax.dit_weights`` imports one copy.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import sharding
from diffusion_jax.models.layers import check_labels

Dtype = Any

# Named sizes of the paper (table 1): (hidden_size, depth, num_heads); each with patch 2, 4 or 8.
DIT_SIZES = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}
DIT_PATCH_SIZES = (2, 4, 8)

# Initialisers of the official `initialize_weights`.
xavier_uniform = nn.initializers.xavier_uniform()  # every Linear's weight (torch fans = flax's)
# The patch conv's weight, xavier-uniform over the flattened [out, in*p*p] view: fan_in = p*p*in,
# fan_out = out (flax's default conv fans would multiply fan_out by the receptive field p*p too).
patch_init = nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
)
normal_002 = nn.initializers.normal(stddev=0.02)  # label table, both timestep-MLP weights
zeros = nn.initializers.zeros  # biases, adaLN modulations, the final linear

# The constants that differ between the official code and diffusers' DiTTransformer2DModel:
# the timestep frequencies' divisor is dim/2 - freq_shift; the LayerNorm before each block's
# MLP has epsilon mlp_norm_eps (the other LayerNorms have 1e-6 in both).
NUMERICS = {
    "official": dict(freq_shift=0, mlp_norm_eps=1e-6),
    "diffusers": dict(freq_shift=1, mlp_norm_eps=1e-5),
}


def dit_config(name: str) -> dict:
    """The attributes of a named DiT: ``dit_config("XL/2")`` (also accepts ``"DiT-XL/2"``) ->
    ``{"hidden_size": 1152, "depth": 28, "num_heads": 16, "patch_size": 2}``; pass them to
    ``DiT(**dit_config(name), out_channels=..., num_classes=...)``."""
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if size not in DIT_SIZES or not patch.isdigit() or int(patch) not in DIT_PATCH_SIZES:
        names = [f"{s}/{p}" for s in DIT_SIZES for p in DIT_PATCH_SIZES]
        raise ValueError(f"unknown DiT {name!r}; known: {', '.join(names)}")
    return dict(DIT_SIZES[size], patch_size=int(patch))


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """1-D sin-cos embedding of positions ``pos`` [M] -> [M, dim] float64:
    ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_k = 10000^(-k / (dim/2))``,
    ``k = 0 .. dim/2 - 1`` (the official ``get_1d_sincos_pos_embed_from_grid``)."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = np.asarray(pos, np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(dim: int, grid_size: int) -> np.ndarray:
    """The fixed position table [grid_size**2, dim] float32 of the official
    ``get_2d_sincos_pos_embed``: token ``r * grid_size + c`` (row r, column c, row-major as the
    patch tokens) gets ``concat(sincos_1d(dim/2, c), sincos_1d(dim/2, r))``.

    The COLUMN comes first: the official stacks ``np.meshgrid(grid_w, grid_h)`` (w first,
    'xy' indexing, so ``grid[0][r, c] = c``) and embeds ``grid[0]`` into the first half (a
    variable it calls ``emb_h``). Within each half, sines first then cosines.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position table needs dim divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return table.astype(np.float32)


def dit_timestep_embedding(t: jax.Array, dim: int = 256, freq_shift: int = 0) -> jax.Array:
    """The DiT's (GLIDE's) sinusoidal embedding of [B] timesteps -> [B, dim] float32.

    Frequencies ``exp(-ln(10000) * k / (dim/2 - freq_shift))``, ``k = 0 .. dim/2 - 1``; the
    result is ``[cos(t f), sin(t f)]`` -- cosines FIRST, and a different frequency spacing from
    ``layers.timestep_embedding`` (the DDPM U-Net's). ``freq_shift`` 0 is the official's,
    1 diffusers' (``downscale_freq_shift=1``).
    """
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def unpatchify(tokens: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """Tokens [B, h*w, p*p*C] (row-major grid of square patches) -> image [B, h*p, w*p, C].

    A token's features are ordered ``(p_row, p_col, channel)``, channel fastest: the official
    reshapes to [N, h, w, p, q, c] and permutes ``'nhwpqc->nchpwq'`` (NCHW); in NHWC that is
    [N, h, p, w, q, c].
    """
    B, T, F = tokens.shape
    p = patch_size
    h = math.isqrt(T)
    if h * h != T or F != p * p * channels:
        raise ValueError(
            f"unpatchify needs a square number of tokens with {p}*{p}*{channels} features, "
            f"got tokens of shape {tokens.shape}"
        )
    x = tokens.reshape(B, h, h, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h * p, h * p, channels)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift`` with x [B, T, D] and shift, scale [B, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T) v`` per head, heads-major: q [B, H, Tq, d] (already scaled by
    ``d**-0.5``), k, v [B, H, Tk, d] -> [B, H, Tq, d] in v's dtype; logits, exponentials and row
    sums in float32.

    Heads-major operands make both products plain batched matrix products over (B, H); with the
    heads between tokens and features instead, XLA:CPU runs them as strided batch dots, 2-3x
    slower (measured in docs/networks.md). The row sums divide the [B, H, Tq, d] output instead
    of the [B, H, Tq, Tk] weights (as flash attention does), and the scale is applied to q, not
    to the logits: XLA:CPU otherwise materialises the broadcast scale and row sums at the
    logits' size and spends a pass over the block's largest tensor on each, in the forward and
    again in the backward pass.
    """
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    # Any per-row shift gives the same result; the max keeps exp from overflowing.
    p = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / p.sum(axis=-1, keepdims=True)).astype(v.dtype)


def tokenwise(layer, x: jax.Array, feature_axes: int = 1) -> jax.Array:
    """``layer`` (a Dense layer) applied to x [B, T, *F] (``feature_axes`` trailing feature
    axes) as to one [B*T, *F] matrix of tokens, the result reshaped back to [B, T, *out].

    The same parameters and values as applying it to x directly. Why: over [B, T, *F], the
    kernel's gradient contracts two axes (B and T), and XLA:CPU first copies the output
    gradient transposed, then runs a dot form only its slowest kernel takes; over [B*T, *F] it
    is one plain matrix product. A DiT-S/2 block with gradients 841 -> 777 ms (batch 32),
    the train step 0.87x -> 0.96x PyTorch eager (docs/networks.md). The merged axis keeps the
    batch's split (B is its major part), so sharded programs are unchanged.
    """
    lead = x.shape[: x.ndim - feature_axes]
    out = layer(x.reshape(-1, *x.shape[len(lead) :]))
    return out.reshape(*lead, *out.shape[1:])


def _dense(features: int, dtype: Dtype, name: str, kernel_init=xavier_uniform) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=kernel_init,
        bias_init=zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _layer_norm(dtype: Dtype, epsilon: float = 1e-6) -> nn.LayerNorm:
    """LayerNorm without affine parameters, eps 1e-6 unless told (statistics in float32)."""
    return nn.LayerNorm(epsilon=epsilon, use_bias=False, use_scale=False, dtype=dtype)


class Attention(nn.Module):
    """Multi-head self-attention (timm's ``Attention`` with qkv bias): [B, T, D] -> [B, T, D].

    ``qkv``: kernel ``[D, 3, num_heads, head_dim]`` (the official Linear(D, 3D) with its output
    channels laid out ``[3, num_heads, head_dim]``); ``softmax(q k^T / sqrt(head_dim)) v`` with
    logits and softmax in float32; ``proj``: kernel ``[num_heads, head_dim, D]`` (Linear(D, D)).
    Heads are an axis of both kernels, so a mesh axis can split them (tensor parallelism: each
    device computes its heads' attention, ``proj`` sums over them). Both are initialised as the
    official Linear layers (xavier-uniform over the flattened [D, 3D] and [D, D] views).
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, D = x.shape
        hd = D // self.num_heads
        dense = lambda features, axis, name: nn.DenseGeneral(
            features,
            axis=axis,
            kernel_init=xavier_uniform,
            bias_init=zeros,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
        )
        qkv = tokenwise(dense((3, self.num_heads, hd), -1, "qkv"), x)  # [B, T, 3, heads, hd]
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, heads, T, hd]
        out = softmax_attention(q * hd**-0.5, k, v).transpose(0, 2, 1, 3)  # [B, T, heads, hd]
        return tokenwise(dense(D, (-2, -1), "proj"), out, feature_axes=2)


class Mlp(nn.Module):
    """fc1: Dense(D, hidden_features), GELU, fc2: Dense(hidden_features, D). The DiT's GELU is
    the tanh approximation (timm's ``GELU(approximate="tanh")``); ``approximate_gelu=False``
    gives the exact erf form (``torch.nn.GELU()``, e.g. DINOv2's)."""

    hidden_features: int
    dtype: Dtype = jnp.float32
    approximate_gelu: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = tokenwise(_dense(self.hidden_features, self.dtype, "fc1"), x)
        h = nn.gelu(h, approximate=self.approximate_gelu)
        return tokenwise(_dense(x.shape[-1], self.dtype, "fc2"), h)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x [B, T, D], c [B, D] -> [B, T, D].

    ``adaLN_modulation`` = Dense(D, 6D)(SiLU(c)), zero-initialised, split into shift_msa,
    scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp;
    ``x += gate_msa * attn(modulate(LN(x), shift_msa, scale_msa))`` and
    ``x += gate_mlp * mlp(modulate(LN(x), shift_mlp, scale_mlp))``, so a fresh block is the
    identity. The first LayerNorm has eps 1e-6, the second ``mlp_norm_eps`` (``NUMERICS``).
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    mlp_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        D = x.shape[-1]
        mod = _dense(6 * D, self.dtype, "adaLN_modulation", zeros)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
        h = modulate(_layer_norm(self.dtype)(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None, :] * Attention(self.num_heads, self.dtype, name="attn")(h)
        h = modulate(_layer_norm(self.dtype, self.mlp_norm_eps)(x), shift_mlp, scale_mlp)
        mlp = Mlp(int(D * self.mlp_ratio), self.dtype, name="mlp")
        return x + gate_mlp[:, None, :] * mlp(h)


class FinalLayer(nn.Module):
    """x [B, T, D], c [B, D] -> [B, T, p*p*out_channels]: ``adaLN_modulation`` = Dense(D, 2D)
    (SiLU(c)) split into shift, scale; ``linear(modulate(LN(x), shift, scale))``. Both Dense
    layers are zero-initialised."""

    patch_size: int
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        D = x.shape[-1]
        mod = _dense(2 * D, self.dtype, "adaLN_modulation", zeros)(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(_layer_norm(self.dtype)(x), shift, scale)
        features = self.patch_size**2 * self.out_channels
        return tokenwise(_dense(features, self.dtype, "linear", zeros), x)


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, D]: ``mlp_2(SiLU(mlp_0(dit_timestep_embedding(t, 256, freq_shift))))``,
    both weights normal(0.02), zero biases (the official ``t_embedder.mlp.0`` / ``.mlp.2``)."""

    hidden_size: int
    dtype: Dtype = jnp.float32
    freq_shift: int = 0

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        c = dit_timestep_embedding(t, 256, self.freq_shift)
        c = _dense(self.hidden_size, self.dtype, "mlp_0", normal_002)(c)
        return _dense(self.hidden_size, self.dtype, "mlp_2", normal_002)(nn.silu(c))


class LabelEmbedder(nn.Module):
    """y [B] int -> [B, D] float32: a table of ``num_classes + 1`` rows, normal(0.02); row
    ``num_classes`` is the null label (classifier-free guidance). Without ``null_label``,
    ``num_classes`` rows (the official's LabelEmbedder without label dropout)."""

    num_classes: int
    hidden_size: int
    null_label: bool = True

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        return nn.Embed(
            self.num_classes + int(self.null_label),
            self.hidden_size,
            embedding_init=normal_002,
            param_dtype=jnp.float32,
            name="embedding_table",
        )(y)


class DiT(nn.Module):
    """Diffusion Transformer: x [B, H, W, C] NHWC, t [B], y [B] or None -> [B, H, W, out_channels].

    Attributes:
      patch_size: side of the square patches; must divide H (= W).
      hidden_size: token width D (divisible by ``num_heads`` and by 4).
      depth: number of DiT blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / D.
      out_channels: output channels (2*C for a learned variance: the official ``learn_sigma``).
      num_classes: if set, a label table of ``num_classes + 1`` rows (normal(0.02)) is added to
        the timestep embedding; label ``num_classes`` is the null label of classifier-free
        guidance. None: unconditional.
      null_label: False drops the null label's row (a model never trained without labels).
      dtype: compute dtype (e.g. bfloat16); parameters are float32, the output is float32.
      remat: wrap each block in ``nn.remat`` (recompute its activations in the backward pass);
        same parameters and results, less memory.
      numerics: "official" (the official code's constants) or "diffusers" (those of diffusers'
        ``DiTTransformer2DModel``: timestep frequency shift 1, MLP LayerNorm eps 1e-5; see the
        module docstring). Same parameters either way; pick the one the weights were trained
        with (``dit_weights.load_params`` says which).
      scan_blocks: run the blocks as one ``lax.scan`` over their stacked parameters instead of
        unrolled: the same parameters (``blocks_<i>``) and results (to float round-off), one
        compiled block, and a schedule that finishes each block's backward pass (its
        recomputation with ``remat``, its parameter gradients) before the next; with ``remat``
        it holds one block's activations, where XLA may keep several blocks' alive in the
        unrolled program (DiT-XL/2, batch 32 per device: docs/networks.md).

    Use ``dit_config("XL/2")`` for the paper's sizes.
    """

    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    out_channels: int
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    null_label: bool = True
    dtype: Dtype = jnp.float32
    remat: bool = False
    numerics: str = "official"
    scan_blocks: bool = False

    def _check_inputs(self, x, t, y):
        if self.numerics not in NUMERICS:
            raise ValueError(
                f"numerics={self.numerics!r} is not one of {', '.join(map(repr, NUMERICS))}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos table)"
            )
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C] (NHWC), got shape {x.shape}")
        B, H, W, _ = x.shape
        if H != W:
            raise ValueError(f"x must be square, got H={H}, W={W}")
        if H % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide x height/width {H}")
        if jnp.ndim(t) != 1 or jnp.shape(t)[0] != B:
            raise ValueError(f"t must have shape [B] = [{B}], got {jnp.shape(t)}")
        check_labels(y, B, self.num_classes, self.null_label)

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool
    ) -> jax.Array:
        """x: [B,H,W,C]; t: [B] float or int noise input; y: [B] int labels or None.

        Returns [B,H,W,out_channels] float32. ``train`` is unused (the DiT has no dropout).
        """
        del train
        self._check_inputs(x, t, y)
        B, H, _, _ = x.shape
        p, D = self.patch_size, self.hidden_size

        # Patch embedding: conv with kernel = stride = p, then the fixed position table.
        h = nn.Conv(
            D,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=patch_init,
            bias_init=zeros,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="x_embedder",
        )(x)
        grid = H // p
        h = h.reshape(B, grid * grid, D) + jnp.asarray(sincos_2d_table(D, grid), self.dtype)

        # Conditioning c = MLP(timestep embedding) (+ label embedding).
        numerics = NUMERICS[self.numerics]
        c = TimestepEmbedder(D, self.dtype, numerics["freq_shift"], name="t_embedder")(t)
        if y is not None:
            labels = LabelEmbedder(self.num_classes, D, self.null_label, name="y_embedder")
            c = c + labels(y).astype(c.dtype)

        block_args = (self.num_heads, self.mlp_ratio, self.dtype, numerics["mlp_norm_eps"])
        if self.scan_blocks and not self.is_initializing():
            h = self._scanned_blocks(DiTBlock(*block_args, parent=None), h, c)
        else:
            block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
            for i in range(self.depth):
                h = block_cls(*block_args, name=f"blocks_{i}")(h, c)

        h = FinalLayer(p, self.out_channels, self.dtype, name="final_layer")(h, c)
        return unpatchify(h, p, self.out_channels).astype(jnp.float32)

    def _scanned_blocks(self, block: DiTBlock, h: jax.Array, c: jax.Array) -> jax.Array:
        """The blocks as one ``lax.scan`` over their parameters stacked on a new leading axis
        (``blocks_0`` .. ``blocks_<depth-1>`` stay the parameters: the same tree as unrolled),
        each step ``block`` applied to the carry h [B, T, D] with c [B, D]; with ``remat`` the
        step is rematerialised (``jax.checkpoint``: only the carry of each step is saved).
        Traced under ``sharding.tracing_mesh``, the stacked parameters keep their split and the
        carry its batch split, so that each step gathers one layer's weights (FSDP)."""
        params = self.variables["params"]
        stacked = sharding.constrain_layers(
            jax.tree.map(
                lambda *layers: jnp.stack(layers),
                *(params[f"blocks_{i}"] for i in range(self.depth)),
            )
        )

        def step(h, layer_params):
            h = sharding.constrain_batch(h)
            return block.apply({"params": layer_params}, h, c), None

        if self.remat:
            # Inside a scan, CSE cannot merge the recomputation with the forward pass, so the
            # barrier that would prevent it (prevent_cse, costly on GPUs) is not needed.
            step = jax.checkpoint(step, prevent_cse=False)
        return jax.lax.scan(step, h, stacked)[0]
