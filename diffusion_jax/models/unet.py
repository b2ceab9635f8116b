"""The DDPM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", appendix B).

Defaults are the CIFAR-10 network: 35,746,307 parameters (the paper's 35.7M). The 256x256
models use `ch_mult=(1, 1, 2, 2, 4, 4)` (113,673,219 parameters, the paper's 114M).
The count depends on the input size only through which levels get attention.

``UNet``'s ADM options (AdaGN, multi-head attention, resampling ResBlocks, a label table
without the null label) give improved-diffusion's and guided-diffusion's networks with their
parameter counts; see the class docstring.

CPU performance (jaxlib 0.10): training is 10-30% (one machine) to 3.6x (another) faster with
XLA's Eigen convolutions instead of YNNPACK's, whose weight-gradient convolutions are slow:
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=reduce`, set before JAX initialises its
backend (before the first computation); the training program and bench/train.py set it through
``diffusion_jax.xla_flags.configure``; see bench/unet.py.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import (
    AttnBlock,
    Conv3x3,
    Downsample,
    ResBlock,
    Upsample,
    check_labels,
    default_init,
    group_norm,
    timestep_embedding,
    zero_init,
)


def check_image_and_t(x, t, ch_mult: Sequence[int]) -> None:
    """Raises ValueError unless ``x`` is a square NHWC batch whose size the ``len(ch_mult) - 1``
    downsamplings halve exactly and ``t`` is ``[B]``."""
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C] (NHWC), got shape {x.shape}")
    B, H, W, _ = x.shape
    if H != W:
        raise ValueError(f"x must be square, got H={H}, W={W}")
    factor = 2 ** (len(ch_mult) - 1)
    if H % factor:
        raise ValueError(f"x height/width {H} must be divisible by 2**(len(ch_mult)-1) = {factor}")
    if jnp.ndim(t) != 1 or jnp.shape(t)[0] != B:
        raise ValueError(f"t must have shape [B] = [{B}], got {jnp.shape(t)}")


def attn_heads(module: nn.Module, channels: int) -> int:
    """Heads of an attention block over ``channels``: ``channels // module.num_head_channels``
    when that is > 0 (guided-diffusion's ``num_head_channels``), else ``module.num_heads``."""
    if module.num_head_channels > 0:
        if channels % module.num_head_channels:
            raise ValueError(
                f"num_head_channels={module.num_head_channels} does not divide an attention "
                f"block's {channels} channels"
            )
        return channels // module.num_head_channels
    return module.num_heads


def resblock(module: nn.Module, out_ch: int, name: str, resample: str | None = None):
    """A ``ResBlock`` with ``module``'s options (dropout, groups, dtype, AdaGN), rematerialised
    with ``module.remat``: called ``(x, temb, train)``."""
    cls = nn.remat(ResBlock, static_argnums=(3,)) if module.remat else ResBlock
    return cls(
        out_ch,
        module.dropout,
        module.num_groups,
        module.dtype,
        scale_shift_norm=module.scale_shift_norm,
        resample=resample,
        name=name,
    )


def attention(module: nn.Module, channels: int, name: str) -> AttnBlock:
    """An ``AttnBlock`` over ``channels`` with ``module``'s groups, dtype and heads,
    rematerialised with ``module.remat``."""
    cls = nn.remat(AttnBlock) if module.remat else AttnBlock
    return cls(module.num_groups, module.dtype, num_heads=attn_heads(module, channels), name=name)


def encode(module: nn.Module, x, t, y=None, *, train: bool):
    """The U-Net's time embedding, downsampling half and middle block, as layers of ``module``.

    Called from the compact ``__call__`` of ``UNet`` and of ``models.classifier.NoisyClassifier``,
    so both networks hold exactly these layers under the same names (``temb_dense0/1``,
    ``label_emb``, ``conv_in``, ``down_<level>_block_<i>``, ``down_<level>_attn_<i>``,
    ``down_<level>_downsample``, ``mid_block_0``, ``mid_attn``, ``mid_block_1``). ``module``
    supplies the hyperparameters: ``ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
    resamp_with_conv, num_groups, dtype, scale_shift_norm, num_heads, num_head_channels,
    resblock_updown, remat`` (and ``num_classes, null_label`` when ``y`` is given). With
    ``resblock_updown`` the ``down_<level>_downsample`` layers are ResBlocks that downsample.

    Args:
      x: [B, H, W, C] in [-1, 1]; t: [B] timesteps.
      y: [B] int labels of a class-conditional network (a label embedding of
        ``module.num_classes + 1`` rows, ``num_classes`` without ``null_label``, is added to
        the time embedding), or None.
    Returns:
      ``(h, hs, temb)``: the middle block's output ``[B, H', W', ch * ch_mult[-1]]``, the
      down path's activations (the U-Net's skip connections, ``conv_in`` first), and the
      time (plus label) embedding ``[B, 4 * ch]``.
    """
    dense = lambda n, name: nn.Dense(
        n, kernel_init=default_init, dtype=module.dtype, param_dtype=jnp.float32, name=name
    )
    block = lambda n, name: resblock(module, n, name)

    temb = timestep_embedding(t, module.ch)
    temb = dense(4 * module.ch, "temb_dense0")(temb)
    temb = dense(4 * module.ch, "temb_dense1")(nn.swish(temb))
    if y is not None:
        rows = module.num_classes + 1 if module.null_label else module.num_classes
        temb = temb + nn.Embed(rows, 4 * module.ch, param_dtype=jnp.float32, name="label_emb")(
            y
        ).astype(temb.dtype)

    hs = [Conv3x3(module.ch, dtype=module.dtype, name="conv_in")(x)]
    for level, mult in enumerate(module.ch_mult):
        for i in range(module.num_res_blocks):
            h = block(module.ch * mult, f"down_{level}_block_{i}")(hs[-1], temb, train)
            if h.shape[1] in module.attn_resolutions:
                h = attention(module, h.shape[-1], f"down_{level}_attn_{i}")(h)
            hs.append(h)
        if level != len(module.ch_mult) - 1:
            name = f"down_{level}_downsample"
            if module.resblock_updown:
                h = resblock(module, hs[-1].shape[-1], name, "down")(hs[-1], temb, train)
            else:
                h = Downsample(module.resamp_with_conv, module.dtype, name=name)(hs[-1])
            hs.append(h)

    h = hs[-1]
    h = block(h.shape[-1], "mid_block_0")(h, temb, train)
    h = attention(module, h.shape[-1], "mid_attn")(h)
    h = block(h.shape[-1], "mid_block_1")(h, temb, train)
    return h, hs, temb


class UNet(nn.Module):
    """Noise-prediction U-Net.

    Attributes:
      ch: base channel count; level `i` has `ch * ch_mult[i]` channels.
      ch_mult: channel multiplier per resolution level (the first is the input resolution).
      num_res_blocks: ResBlocks per level on the way down (one more on the way up).
      attn_resolutions: spatial sizes (H) at which ResBlocks are followed by self-attention.
      dropout: dropout rate inside ResBlocks (active only with `train=True`).
      out_channels: output channels (2*C for a learned-range variance).
      resamp_with_conv: strided conv down / nearest+conv up (else avg-pool / nearest only).
      num_classes: if set, a label embedding of `num_classes + 1` rows is added to the time
        embedding; label `num_classes` is the "no label" token (classifier-free guidance).
      num_groups: GroupNorm groups.
      dtype: compute dtype (e.g. bfloat16); parameters are float32, the output is float32.

    The options of improved-diffusion / guided-diffusion's UNetModel (Nichol & Dhariwal 2021,
    Dhariwal & Nichol 2021), each off by default (the defaults are the DDPM network, parameter
    for parameter):
      scale_shift_norm: AdaGN in every ResBlock (``use_scale_shift_norm``), see ``ResBlock``.
      num_heads: attention heads (``num_heads``).
      num_head_channels: if > 0, channels per head instead (``num_head_channels``; overrides
        num_heads).
      resblock_updown: resample between levels with a ResBlock that pools / doubles inside
        (``resblock_updown``) instead of Downsample / Upsample.
      null_label: the label table has the extra "no label" row; False gives ADM's table of
        `num_classes` rows (classifier-guided, no null label).
      remat: rematerialise every ResBlock and attention block (``nn.remat``: their
        activations are recomputed in the backward pass); same parameters and results.

    ADM's own attention_resolutions are downsampling factors (``image_size // res`` of the
    command-line resolutions); here they are the resolutions. Their attention computes q, k, v
    with one 1x1 conv of 3C outputs (the same 3C^2 + 3C parameters as the q, k, v here); the
    head split here is their ``use_new_attention_order`` (heads split q, k and v each), a
    permutation of the legacy order's qkv channels. The rest (time embedding, conv_in, the
    down / middle / up blocks and their skips, norm_out, conv_out) is DDPM's structure, so
    improved-diffusion's CIFAR-10 model (``ch=128, num_res_blocks=3, dropout=0.3,
    attn_resolutions=(16, 8), num_heads=4, scale_shift_norm=True, out_channels=6``) has their
    52,546,438 parameters and ADM ImageNet-64 (``ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
    attn_resolutions=(32, 16, 8), num_head_channels=64, resblock_updown=True,
    scale_shift_norm=True, out_channels=6, num_classes=1000, null_label=False``) 295,904,454.
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    out_channels: int = 3
    resamp_with_conv: bool = True
    num_classes: int | None = None
    num_groups: int = 32
    dtype: Any = jnp.float32
    scale_shift_norm: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    resblock_updown: bool = False
    null_label: bool = True
    remat: bool = False

    def _check_inputs(self, x, t, y):
        check_image_and_t(x, t, self.ch_mult)
        check_labels(y, x.shape[0], self.num_classes, self.null_label)

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool
    ) -> jax.Array:
        """x: [B,H,W,C] in [-1, 1]; t: [B] timesteps; y: [B] int labels or None.

        Returns [B,H,W,out_channels] float32.
        """
        self._check_inputs(x, t, y)
        block = lambda n, name: resblock(self, n, name)
        h, hs, temb = encode(self, x, t, y, train=train)

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
                h = block(self.ch * mult, f"up_{level}_block_{i}")(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attention(self, h.shape[-1], f"up_{level}_attn_{i}")(h)
            if level != 0:
                name = f"up_{level}_upsample"
                if self.resblock_updown:
                    h = resblock(self, h.shape[-1], name, "up")(h, temb, train)
                else:
                    h = Upsample(self.resamp_with_conv, self.dtype, name=name)(h)
        assert not hs

        h = nn.swish(group_norm(self.num_groups, self.dtype, "norm_out")(h))
        h = Conv3x3(self.out_channels, kernel_init=zero_init, dtype=self.dtype, name="conv_out")(h)
        return h.astype(jnp.float32)
