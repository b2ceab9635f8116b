"""DDPM on CIFAR-10 (Ho et al. 2020): the defaults. ``--config=configs/cifar10.py``."""

from diffusion_jax import config_defaults


def get_config():
    return config_defaults.get_config()
