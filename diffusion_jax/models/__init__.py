"""Flax networks for diffusion models."""

from diffusion_jax.models.unet import UNet

__all__ = ["UNet"]
