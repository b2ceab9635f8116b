"""Class-conditional DDPM on the embedded 8x8 digits, trained for classifier-free guidance.

The quick-start network and recipe (``configs/digits.py``) plus a label embedding; each
example's label is dropped with probability 0.1 (Ho & Salimans 2022 found 0.1 and 0.2 the best
of their label-drop rates), so the same network also learns the unconditional model. Preview
grids show 10 samples of every digit, one row per class. Sample with guidance::

    python -m diffusion_jax.evaluate --workdir=DIR --mode=sample \\
        --config.sampling.guidance=classifier_free --config.sampling.guidance_scale=3
"""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.get_config_digits()
    config.model.class_conditional = True
    config.model.label_dropout = 0.1
    config.sampling.num_samples = 100
    return config
