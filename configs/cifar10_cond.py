"""Class-conditional DDPM on CIFAR-10 with label dropout, for classifier-free guidance.

The DDPM CIFAR-10 recipe (``configs/cifar10.py``, Ho et al. 2020) plus a label embedding added
to the time embedding and label dropout 0.1 (``config_defaults.make_class_conditional``; Ho &
Salimans 2022 chose it on ImageNet and did not train CIFAR-10, so the rest is DDPM's). Preview
grids: 10 samples of each class, one row per class.
"""

from diffusion_jax import config_defaults


def get_config():
    return config_defaults.make_class_conditional(config_defaults.get_config())
