"""Class-conditional DDPM on CIFAR-10 with label dropout, for classifier-free guidance.

The DDPM CIFAR-10 recipe (``configs/cifar10.py``, Ho et al. 2020) plus a label embedding added
to the time embedding; each label is dropped with probability 0.1 (Ho & Salimans 2022, who
found 0.1 and 0.2 best on ImageNet; they did not train CIFAR-10, so the rest of the recipe is
DDPM's). Preview grids: 10 samples of each class, one row per class.
"""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.get_config()
    config.model.class_conditional = True
    config.model.label_dropout = 0.1
    config.sampling.num_samples = 100
    return config
