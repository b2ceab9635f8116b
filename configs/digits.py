"""The quick-start: DDPM on the 8x8 handwritten digits that ship with scikit-learn.

Trains on a 2-core CPU in about 4 minutes: a small U-Net (ch 32, 8x8 -> 4x4), T=200 linear
steps, batch 128, on the 1500 training images at their native 8x8 grayscale (the other 297
are the held-out test split). The recipe is ``config_defaults.get_config_digits``.
"""

from diffusion_jax import config_defaults


def get_config():
    return config_defaults.get_config_digits()
