"""The KL autoencoder of latent diffusion (Rombach et al. 2022), as diffusers' ``AutoencoderKL``.

Layer for layer diffusers' ``AutoencoderKL`` (models/autoencoders/autoencoder_kl.py, vae.py,
resnet.py, attention_processor.py) with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks and
the mid-block attention; the defaults are the Stable Diffusion VAE (``stabilityai/sd-vae-ft-ema``,
``sd-vae-ft-mse``): block_out_channels (128, 256, 512, 512), 2 resnets per down block, 4 latent
channels, GroupNorm(32, eps 1e-6), SiLU, 83,653,863 parameters, down factor 8.

  encoder: conv_in 3x3 -> down_blocks_i (layers_per_block resnets; then, except in the last
    block, a downsampler: pad (0, 1) bottom/right with zeros, 3x3 conv stride 2 without padding)
    -> mid_block (resnets_0, attentions_0, resnets_1) -> conv_norm_out, SiLU, conv_out 3x3 to
    2 * latent_channels;
  quant_conv 1x1 -> (mean, logvar), logvar clipped to [-30, 20];
  post_quant_conv 1x1 -> decoder: conv_in 3x3 -> mid_block -> up_blocks_i over the reversed
    block_out_channels (layers_per_block + 1 resnets; then, except in the last block, an
    upsampler: nearest x2, 3x3 conv) -> conv_norm_out, SiLU, conv_out 3x3.

A resnet is norm1-SiLU-conv1-norm2-SiLU-conv2 plus the input (through a 1x1 ``conv_shortcut``
when the channels change); diffusers' dropout there is 0 in every VAE, so there is none here.
The attention block is one head over all H*W positions: ``group_norm``, ``to_q``/``to_k``/
``to_v`` Dense C->C, ``softmax(q k^T / sqrt(C)) v`` (logits and softmax in float32),
``to_out_0`` Dense C->C, plus the input (``rescale_output_factor`` 1).

Submodule names mirror diffusers' ``state_dict`` keys with ``.<i>`` written ``_<i>``
(``encoder/down_blocks_0/resnets_1/conv_shortcut``, ``decoder/mid_block/attentions_0/to_out_0``),
so ``diffusion_jax.autoencoder_weights`` imports a checkpoint by renaming and transposing
(Conv2d [out, in, kh, kw] -> [kh, kw, in, out]; Linear [out, in] -> [in, out]; GroupNorm
``weight`` -> ``scale``). Activations are NHWC; parameters float32; ``dtype`` is the compute
dtype; outputs are float32. Fresh weights follow torch's default (uniform +-1/sqrt(fan_in)) with
zero biases; only imported weights are meant to match diffusers' numbers.

Latents for a diffusion model are ``(z - shift_factor) * scaling_factor`` (0.18215 and no shift
for the SD VAE): ``encode_latents`` / ``decode_latents``.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import group_norm

Dtype = Any

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)
SD_SCALING_FACTOR = 0.18215
LOGVAR_RANGE = (-30.0, 20.0)

# torch's default Conv2d and Linear weights (kaiming_uniform, a=sqrt(5)): uniform(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros


def _conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1, pad=None):
    """Conv with bias; a 3x3 pads 1 on every side unless ``pad`` (per-axis (lo, hi)) is given."""
    if pad is None:
        pad = (kernel // 2, kernel // 2)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=(pad, pad),
        kernel_init=torch_default_init,
        bias_init=zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _group_norm(num_groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
    """GroupNorm, eps 1e-6, affine; statistics in float32 with the two-pass variance (torch's)."""
    return group_norm(num_groups, dtype, name, fast_variance=False)


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without time embedding: [B,H,W,Cin] -> [B,H,W,out_channels]."""

    out_channels: int
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(_group_norm(self.num_groups, self.dtype, "norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = nn.silu(_group_norm(self.num_groups, self.dtype, "norm2")(h))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x.astype(h.dtype) + h


class AttentionBlock(nn.Module):
    """diffusers' VAE mid-block ``Attention`` (one head, residual): [B,H,W,C] -> [B,H,W,C]."""

    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        h = _group_norm(self.num_groups, self.dtype, "group_norm")(x).reshape(B, H * W, C)

        def dense(name):
            return nn.Dense(
                C,
                kernel_init=torch_default_init,
                bias_init=zeros,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )

        q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (C**-0.5), axis=-1).astype(self.dtype)
        h = dense("to_out_0")(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x.astype(h.dtype) + h.reshape(B, H, W, C)


class MidBlock(nn.Module):
    """``resnets_0``, ``attentions_0`` (if ``attention``), ``resnets_1``; channels unchanged."""

    attention: bool = True
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        C = x.shape[-1]
        x = ResnetBlock(C, self.num_groups, self.dtype, name="resnets_0")(x)
        if self.attention:
            x = AttentionBlock(self.num_groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(C, self.num_groups, self.dtype, name="resnets_1")(x)


class Resample(nn.Module):
    """``downsamplers_0`` / ``upsamplers_0``: a ``conv`` 3x3 keeping the channels, after
    nearest-neighbour doubling ("up") or as a stride-2 conv on the input padded (0, 1) ("down")."""

    direction: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        C = x.shape[-1]
        if self.direction == "down":
            return _conv(C, 3, self.dtype, "conv", stride=2, pad=(0, 1))(x)
        B, H, W, _ = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
        return _conv(C, 3, self.dtype, "conv")(x.reshape(B, 2 * H, 2 * W, C))


class Block(nn.Module):
    """A ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``: ``num_resnets`` resnets to
    ``out_channels`` (``resnets_<j>``), then the resampler ``direction`` ("down", "up", None)."""

    out_channels: int
    num_resnets: int
    direction: str | None
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_resnets):
            x = ResnetBlock(self.out_channels, self.num_groups, self.dtype, name=f"resnets_{j}")(x)
        if self.direction is not None:
            name = "downsamplers_0" if self.direction == "down" else "upsamplers_0"
            x = Resample(self.direction, self.dtype, name=name)(x)
        return x


class Encoder(nn.Module):
    """Image [B,H,W,in] -> [B,H/f,W/f,2*latent_channels] (before ``quant_conv``),
    f = 2**(len(block_out_channels) - 1)."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    num_groups: int = 32
    mid_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chans, g, dt = tuple(self.block_out_channels), self.num_groups, self.dtype
        h = _conv(chans[0], 3, dt, "conv_in")(x)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            down = None if last else "down"
            h = Block(c, self.layers_per_block, down, g, dt, name=f"down_blocks_{i}")(h)
        h = MidBlock(self.mid_attention, g, dt, name="mid_block")(h)
        h = nn.silu(_group_norm(g, dt, "conv_norm_out")(h))
        return _conv(2 * self.latent_channels, 3, dt, "conv_out")(h)


class Decoder(nn.Module):
    """Latent [B,h,w,latent_channels] (after ``post_quant_conv``) -> image [B,h*f,w*f,out]."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    num_groups: int = 32
    mid_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        chans, g, dt = tuple(reversed(self.block_out_channels)), self.num_groups, self.dtype
        h = _conv(chans[0], 3, dt, "conv_in")(z)
        h = MidBlock(self.mid_attention, g, dt, name="mid_block")(h)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            up = None if last else "up"
            h = Block(c, self.layers_per_block + 1, up, g, dt, name=f"up_blocks_{i}")(h)
        h = nn.silu(_group_norm(g, dt, "conv_norm_out")(h))
        return _conv(self.out_channels, 3, dt, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL``; the defaults are the Stable Diffusion VAE (``SD_VAE``).

    Attributes:
      in_channels, out_channels: image channels in and out.
      block_out_channels: channels of each level; the spatial down factor is
        ``2 ** (len(block_out_channels) - 1)``.
      layers_per_block: resnets per encoder block (the decoder has one more per block).
      latent_channels: channels of z.
      norm_num_groups: groups of every GroupNorm (must divide every channel count).
      mid_block_attention: the attention block between the mid-block resnets.
      scaling_factor, shift_factor: diffusion latents are ``(z - shift) * scale``
        (``encode_latents``, ``decode_latents``); the SD VAE's are 0.18215 and 0.
      dtype: compute dtype; parameters are float32, outputs float32.

    Methods: ``encode(x) -> (mean, logvar)`` of the diagonal Gaussian posterior; ``decode(z)``;
    ``__call__(x, key=None) -> (reconstruction, mean, logvar)`` decoding ``z = mean`` (no key)
    or a sample ``mean + exp(logvar / 2) * eps`` (with ``key``).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    scaling_factor: float = SD_SCALING_FACTOR
    shift_factor: float = 0.0
    dtype: Dtype = jnp.float32

    @property
    def down_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        chans, g = tuple(self.block_out_channels), self.norm_num_groups
        for c in chans:
            if c % g:
                raise ValueError(f"norm_num_groups={g} must divide every channel count {chans}")
        attn, dt = self.mid_block_attention, self.dtype
        self.encoder = Encoder(chans, self.layers_per_block, self.latent_channels, g, attn, dt)
        self.decoder = Decoder(chans, self.layers_per_block, self.out_channels, g, attn, dt)
        self.quant_conv = _conv(2 * self.latent_channels, 1, self.dtype, "quant_conv")
        self.post_quant_conv = _conv(self.latent_channels, 1, self.dtype, "post_quant_conv")

    def _check(self, x: jax.Array, channels: int, factor: int, what: str) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be [B, H, W, {channels}] (NHWC), got shape {x.shape}")
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"{what} height and width must be divisible by {factor}: {x.shape}")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image [B,H,W,in_channels] -> (mean, logvar), each [B,H/f,W/f,latent_channels] float32."""
        self._check(x, self.in_channels, self.down_factor, "x")
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent [B,h,w,latent_channels] -> image [B,h*f,w*f,out_channels] float32."""
        self._check(z, self.latent_channels, 1, "z")
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(reconstruction, mean, logvar): decodes the posterior mean, or a sample with ``key``."""
        mean, logvar = self.encode(x)
        z = mean if key is None else sample_posterior(key, mean, logvar)
        return self.decode(z), mean, logvar

    def encode_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Diffusion latents ``(z - shift_factor) * scaling_factor``; z is the posterior mean,
        or a sample with ``key``."""
        mean, logvar = self.encode(x)
        z = mean if key is None else sample_posterior(key, mean, logvar)
        return (z - self.shift_factor) * self.scaling_factor

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Image of diffusion latents: ``decode(latents / scaling_factor + shift_factor)``."""
        return self.decode(latents / self.scaling_factor + self.shift_factor)


def sample_posterior(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """``mean + exp(logvar / 2) * eps``, eps ~ N(0, I) (``DiagonalGaussianDistribution.sample``)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over [H, W, C] -> [B] (diffusers' ``kl()``)."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
