"""Flax networks for diffusion models: the U-Net, the DiT and the noisy-image classifier."""

from diffusion_jax.models.classifier import NoisyClassifier
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.unet import UNet

__all__ = ["DiT", "NoisyClassifier", "UNet"]
