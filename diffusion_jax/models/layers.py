"""Building blocks of the DDPM U-Net (Ho et al. 2020, appendix B), with the options of
improved-diffusion / ADM (Nichol & Dhariwal 2021, Dhariwal & Nichol 2021): AdaGN and
resampling in ResBlock, several heads in AttnBlock; off by default.

All modules take NHWC activations. `dtype` is the compute dtype; parameters are always
created in float32. Initialisers follow the reference implementation: variance scaling
(fan_avg, uniform) with scale 1, and zero for the last layer of every residual branch
(second conv of a ResBlock, attention output projection) so that each block starts as
the identity; the U-Net's output conv is zero-initialised too.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the DDPM code.

    Frequencies are `exp(-ln(10000) * k / (dim/2 - 1))` for `k = 0 .. dim/2-1`; the result
    is `[sin(t * f), cos(t * f)]` concatenated (sines first).

    Args:
      t: [B] int or float timesteps (zero-based, used as-is).
      dim: even embedding size.
    Returns:
      [B, dim] float32.
    """
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class Conv3x3(nn.Module):
    """3x3 convolution with bias, 'SAME' padding ([B,H,W,Cin] -> [B,H/s,W/s,features]).

    With stride 2 on even sizes the padding is (0, 1) on each spatial axis, as in
    TensorFlow's 'SAME' that the reference used.
    """

    features: int
    stride: int = 1
    kernel_init: Any = default_init
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (3, 3, cin, self.features), jnp.float32)
        bias = self.param("bias", zero_init, (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        pad = (1, 1) if self.stride == 1 else (0, 1)
        y = jax.lax.conv_general_dilated(
            x,
            kernel.astype(self.dtype),
            (self.stride, self.stride),
            (pad, pad),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias.astype(self.dtype)


def group_norm(
    num_groups: int, dtype: Dtype, name: str, *, fast_variance: bool = True
) -> nn.GroupNorm:
    """GroupNorm(num_groups) with eps 1e-6 (the reference's), learned scale and bias.
    ``fast_variance=False``: the two-pass variance (torch's, for parity with its networks)."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=fast_variance,
        name=name,
    )


def check_labels(y, batch: int, num_classes: int | None, null_label: bool) -> None:
    """The labels of a denoising network's call (``models.NETWORKS``' contract): None for an
    unconditional network, else int ``[batch]`` in ``[0, num_classes]`` (``num_classes`` the
    null label) or ``[0, num_classes)`` without ``null_label``. Raises ValueError naming the
    problem. Concrete labels are range-checked here; under jit an out-of-range label reads a
    row of NaN (``jnp.take``'s fill for out-of-bounds indices), which poisons the output."""
    if num_classes is None:
        if y is not None:
            raise ValueError("y given but the model has num_classes=None")
        return
    if y is None:
        raise ValueError(
            "model is class-conditional: pass y (num_classes = no label)"
            if null_label
            else "model is class-conditional: pass y (it has no null label)"
        )
    if jnp.shape(y) != (batch,):
        raise ValueError(f"y must have shape [B] = [{batch}], got {jnp.shape(y)}")
    if not isinstance(y, jax.core.Tracer):
        rows = num_classes + 1 if null_label else num_classes
        bad = np.asarray(y)[(np.asarray(y) < 0) | (np.asarray(y) >= rows)]
        if bad.size:
            raise ValueError(
                f"labels must be in [0, {rows})"
                + ("" if null_label else " (null_label=False: no 'no label' token)")
                + f", got {bad.tolist()}"
            )


def downsample_avg(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2: [B,H,W,C] -> [B,H/2,W/2,C]."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour doubling: [B,H,W,C] -> [B,2H,2W,C]."""
    B, H, W, C = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
    return x.reshape(B, 2 * H, 2 * W, C)


_RESAMPLE = {"down": downsample_avg, "up": upsample_nearest}


class ResBlock(nn.Module):
    """Residual block: GN-swish-conv, + Dense(swish(temb)), GN-swish-dropout-conv, + skip.

    x: [B,H,W,Cin], temb: [B,E] -> [B,H,W,out_ch]. A 1x1 projection (with bias) maps the
    skip path when Cin != out_ch.

    ``scale_shift_norm`` (AdaGN, Dhariwal & Nichol 2021; improved/guided-diffusion's
    ``use_scale_shift_norm``): ``temb_proj`` outputs ``2 * out_ch``, split into ``(scale, shift)``
    (scale first), and the second norm becomes ``norm2(h) * (1 + scale) + shift`` instead of
    ``norm2(h + temb_proj)``.

    ``resample`` "down" / "up" (BigGAN-style resampling, guided-diffusion's ``down``/``up``
    ResBlock): after norm1 and swish, both the residual path and the skip input are resampled
    without parameters (2x2 average pooling / nearest-neighbour doubling) before conv1; the
    output is [B,H/2,W/2,out_ch] or [B,2H,2W,out_ch].
    """

    out_ch: int
    dropout: float
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    scale_shift_norm: bool = False
    resample: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        h = nn.swish(group_norm(self.num_groups, self.dtype, "norm1")(x))
        if self.resample is not None:
            if self.resample not in _RESAMPLE:
                raise ValueError(f"resample must be None, 'down' or 'up', got {self.resample!r}")
            h, x = _RESAMPLE[self.resample](h), _RESAMPLE[self.resample](x)
        h = Conv3x3(self.out_ch, dtype=self.dtype, name="conv1")(h)
        emb = nn.Dense(
            2 * self.out_ch if self.scale_shift_norm else self.out_ch,
            kernel_init=default_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="temb_proj",
        )(nn.swish(temb))[:, None, None, :]
        norm2 = group_norm(self.num_groups, self.dtype, "norm2")
        if self.scale_shift_norm:
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + emb)
        h = nn.swish(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv3x3(self.out_ch, kernel_init=zero_init, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = nn.Dense(
                self.out_ch,
                kernel_init=default_init,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="skip",
            )(x)
        return x + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over all H*W positions, with residual connection.

    x: [B,H,W,C] -> [B,H,W,C]. q, k, v and the output projection are C->C Dense layers with
    bias (4C^2 + 4C parameters, whatever ``num_heads``) plus the GroupNorm's 2C. Head ``i``
    attends with channels ``i*d .. (i+1)*d - 1`` (``d = C / num_heads``) of q, k and v, logits
    scaled by ``1/sqrt(d)``; the heads' outputs are concatenated in that order before the output
    projection. One head is DDPM's block. Logits and softmax in float32.
    """

    num_groups: int = 32
    dtype: Dtype = jnp.float32
    num_heads: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        nh = self.num_heads
        if nh < 1 or C % nh:
            raise ValueError(f"attention over {C} channels cannot have {nh} heads")
        d = C // nh
        h = group_norm(self.num_groups, self.dtype, "norm")(x)

        def proj(name, init=default_init):
            return nn.Dense(
                C, kernel_init=init, dtype=self.dtype, param_dtype=jnp.float32, name=name
            )

        def split_heads(a):  # [B,H,W,C] -> [B*nh, H*W, d]
            return a.reshape(B, H * W, nh, d).transpose(0, 2, 1, 3).reshape(B * nh, H * W, d)

        q = split_heads(proj("q")(h))
        k = split_heads(proj("k")(h))
        v = split_heads(proj("v")(h))
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (d**-0.5), axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v)
        h = h.reshape(B, nh, H * W, d).transpose(0, 2, 1, 3).reshape(B, H, W, C)
        return x + proj("proj_out", zero_init)(h)


class Downsample(nn.Module):
    """Halve H and W: stride-2 3x3 conv (or 2x2 average pooling). [B,H,W,C] -> [B,H/2,W/2,C]."""

    with_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_conv:
            return Conv3x3(x.shape[-1], stride=2, dtype=self.dtype, name="op")(x)
        return downsample_avg(x)


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then a 3x3 conv if with_conv. [B,H,W,C] -> [B,2H,2W,C]."""

    with_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest(x)
        if self.with_conv:
            x = Conv3x3(x.shape[-1], dtype=self.dtype, name="op")(x)
        return x
