"""Class-conditional DDPM on the embedded 8x8 digits, trained for classifier-free guidance.

The quick-start network and recipe (``configs/digits.py``) plus a label embedding and label
dropout (``config_defaults.make_class_conditional``), so the same network also learns the
unconditional model. Preview grids show 10 samples of every digit, one row per class. Sample
with guidance::

    python -m diffusion_jax.evaluate --workdir=DIR --mode=sample \\
        --config.sampling.guidance=classifier_free --config.sampling.guidance_scale=3
"""

from diffusion_jax import config_defaults


def get_config():
    return config_defaults.make_class_conditional(config_defaults.get_config_digits())
