"""The DDPM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", appendix B).

Defaults are the CIFAR-10 network: 35,746,307 parameters (the paper's 35.7M). The 256x256
models use `ch_mult=(1, 1, 2, 2, 4, 4)` (113,673,219 parameters, the paper's 114M).
The count depends on the input size only through which levels get attention.

CPU performance (jaxlib 0.10): training is 10-30% faster with XLA's Eigen convolutions
instead of YNNPACK's, whose weight-gradient convolutions are slow:
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce`, set before JAX
initialises its backend (before the first computation); the training program and
bench/train.py set it through ``diffusion_jax.xla_flags.configure``; see bench/unet.py.
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


def encode(module: nn.Module, x, t, y=None, *, train: bool):
    """The U-Net's time embedding, downsampling half and middle block, as layers of ``module``.

    Called from the compact ``__call__`` of ``UNet`` and of ``models.classifier.NoisyClassifier``,
    so both networks hold exactly these layers under the same names (``temb_dense0/1``,
    ``label_emb``, ``conv_in``, ``down_<level>_block_<i>``, ``down_<level>_attn_<i>``,
    ``down_<level>_downsample``, ``mid_block_0``, ``mid_attn``, ``mid_block_1``). ``module``
    supplies the hyperparameters: ``ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
    resamp_with_conv, num_groups, dtype`` (and ``num_classes`` when ``y`` is given).

    Args:
      x: [B, H, W, C] in [-1, 1]; t: [B] timesteps.
      y: [B] int labels of a class-conditional network (a label embedding of
        ``module.num_classes + 1`` rows is added to the time embedding), or None.
    Returns:
      ``(h, hs, temb)``: the middle block's output ``[B, H', W', ch * ch_mult[-1]]``, the
      down path's activations (the U-Net's skip connections, ``conv_in`` first), and the
      time (plus label) embedding ``[B, 4 * ch]``.
    """
    dense = lambda n, name: nn.Dense(
        n, kernel_init=default_init, dtype=module.dtype, param_dtype=jnp.float32, name=name
    )
    block = lambda n, name: ResBlock(n, module.dropout, module.num_groups, module.dtype, name=name)
    attn = lambda name: AttnBlock(module.num_groups, module.dtype, name=name)

    temb = timestep_embedding(t, module.ch)
    temb = dense(4 * module.ch, "temb_dense0")(temb)
    temb = dense(4 * module.ch, "temb_dense1")(nn.swish(temb))
    if y is not None:
        temb = temb + nn.Embed(
            module.num_classes + 1, 4 * module.ch, param_dtype=jnp.float32, name="label_emb"
        )(y).astype(temb.dtype)

    hs = [Conv3x3(module.ch, dtype=module.dtype, name="conv_in")(x)]
    for level, mult in enumerate(module.ch_mult):
        for i in range(module.num_res_blocks):
            h = block(module.ch * mult, f"down_{level}_block_{i}")(hs[-1], temb, train=train)
            if h.shape[1] in module.attn_resolutions:
                h = attn(f"down_{level}_attn_{i}")(h)
            hs.append(h)
        if level != len(module.ch_mult) - 1:
            hs.append(
                Downsample(module.resamp_with_conv, module.dtype, name=f"down_{level}_downsample")(
                    hs[-1]
                )
            )

    h = hs[-1]
    h = block(h.shape[-1], "mid_block_0")(h, temb, train=train)
    h = attn("mid_attn")(h)
    h = block(h.shape[-1], "mid_block_1")(h, temb, train=train)
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

    def _check_inputs(self, x, t, y):
        check_image_and_t(x, t, self.ch_mult)
        B = x.shape[0]
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y given but the model has num_classes=None")
        elif y is None:
            raise ValueError("model is class-conditional: pass y (num_classes = no label)")
        elif jnp.shape(y) != (B,):
            raise ValueError(f"y must have shape [B] = [{B}], got {jnp.shape(y)}")

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool
    ) -> jax.Array:
        """x: [B,H,W,C] in [-1, 1]; t: [B] timesteps; y: [B] int labels or None.

        Returns [B,H,W,out_channels] float32.
        """
        self._check_inputs(x, t, y)
        block = lambda n, name: ResBlock(n, self.dropout, self.num_groups, self.dtype, name=name)
        attn = lambda name: AttnBlock(self.num_groups, self.dtype, name=name)
        h, hs, temb = encode(self, x, t, y, train=train)

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
                h = block(self.ch * mult, f"up_{level}_block_{i}")(h, temb, train=train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = Upsample(self.resamp_with_conv, self.dtype, name=f"up_{level}_upsample")(h)
        assert not hs

        h = nn.swish(group_norm(self.num_groups, self.dtype, "norm_out")(h))
        h = Conv3x3(self.out_channels, kernel_init=zero_init, dtype=self.dtype, name="conv_out")(h)
        return h.astype(jnp.float32)
