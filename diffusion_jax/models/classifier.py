"""The noisy-image classifier of classifier guidance (Dhariwal & Nichol 2021, section 4.1):
``p(y | x_t)`` from the U-Net's downsampling half and middle block, conditioned on t.

The trunk is ``models.unet.encode``: the very layers of ``UNet`` under the same names (time
embedding, ``conv_in``, the down path, the middle block), so the two networks cannot drift apart.
On top of it: GroupNorm, swish, global average pooling and a Dense layer to the logits, the
"adaptive" pooling head of Dhariwal & Nichol's ``EncoderUNetModel`` (their paper uses an
attention pool at 8x8 instead).

The head has the default initialisation of the project's Dense layers (DDPM's variance scaling),
not the zero initialisation of Dhariwal & Nichol's. With a zero head the trunk gets no gradient
until the head has moved (its other residual branches start at zero too); with a random head it
learns from the first step. Measured with ``configs/digits_classifier.py``: training
cross-entropy 1.594 against 1.671 nats over steps 401-500, the same 1.52-1.53 after 2000 steps.
The price, random logits at step 0 (cross-entropy near, not exactly, ln(num_classes)), matters
to nobody: an untrained classifier guides nothing.

The final GroupNorm, the pooling and the head run in float32 whatever the compute dtype (the
head is tiny; log-softmax gradients, which guidance uses, want the precision). With one
channel per group (``num_groups`` equal to the last level's channels) that GroupNorm removes
each channel's spatial mean, which the pooling then cannot see: keep several channels per
group (DDPM's CIFAR-10 trunk has 8, the digits' 2).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import default_init, group_norm
from diffusion_jax.models.unet import check_image_and_t, encode


class NoisyClassifier(nn.Module):
    """Logits of ``p(y | x_t)`` for images ``x_t`` of the objective's forward process, given as
    the objective's network inputs (DDPM: ``x_t`` and its timestep ``t``).

    Attributes:
      num_classes: number of classes (>= 2).
      ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv, num_groups,
        dtype: as in ``models.unet.UNet``; they shape the same downsampling half and middle
        block. The DDPM CIFAR-10 values give the CIFAR-10 U-Net's down half.
      scale_shift_norm, num_heads, num_head_channels, resblock_updown: ADM's options, as in
        ``models.unet.UNet`` (off by default); remat: as there.
    """

    num_classes: int
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_groups: int = 32
    dtype: Any = jnp.float32
    scale_shift_norm: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    resblock_updown: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool) -> jax.Array:
        """x: [B,H,W,C], the objective's input (DDPM: x_t); t: [B] its noise input (DDPM: int
        timesteps, zero-based).

        Returns logits float32 [B, num_classes].
        """
        if self.num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {self.num_classes}")
        check_image_and_t(x, t, self.ch_mult)
        h, _, _ = encode(self, x, t, train=train)
        h = nn.swish(group_norm(self.num_groups, jnp.float32, "norm_out")(h.astype(jnp.float32)))
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(
            self.num_classes,
            kernel_init=default_init,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            name="head",
        )(h)


def label_log_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``log p(y | x)`` ``[B]`` of int ``labels`` ``[B]`` under ``logits`` ``[B, K]``: the label's
    entry of ``log_softmax(logits)``, in float32. Its negative is the cross-entropy (nats)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def log_prob_fn(model: NoisyClassifier, params):
    """``log_prob(x_in, noise_input, y) -> log p(y | x_t)`` ``[B]`` of the classifier ``model``
    with ``params`` (e.g. a checkpoint's EMA parameters), with ``train=False``, on the network
    inputs of the objective it was trained with (DDPM: ``(x_t, t)``): what
    ``guidance.classifier`` takes as ``log_prob_fn``.

    Example ``i``'s value depends on ``x_t[i]`` alone (no batch statistics), as guidance needs.
    ``params`` are closed over: build the function inside your own ``jax.jit`` that takes them
    as an argument to change them without recompiling (see ``sampling``).
    """

    def log_prob(x_in, noise_input, y):
        logits = model.apply({"params": params}, x_in, noise_input, train=False)
        return label_log_prob(logits, y)

    return log_prob
