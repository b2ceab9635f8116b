"""DDPM on LSUN bedroom at 256x256 (Ho et al. 2020): see ``config_defaults.get_config_256``."""

from diffusion_jax import config_defaults


def get_config():
    return config_defaults.get_config_256("lsun/bedroom")
