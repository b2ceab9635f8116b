"""Latent diffusion on the embedded 8x8 digits (Rombach et al. 2022): a small DiT (patch 1 on
the 4x4x4 latents of ``configs/digits_autoencoder.py``: 16 tokens, width 128, 6 blocks of 4
heads) trained by flow matching on the latent data set that ``python -m diffusion_jax.encode``
wrote to ``workdirs/digits_latents``, each step on a fresh sample of every example's stored
posterior; sampled with Heun's method at 35 evaluations and decoded to 8x8 digits by the
autoencoder (previews, ``mode=sample``; ``mode=fid`` scores them against the digits).
"""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.use_objective(config_defaults.get_config_digits(), "flow")
    config.data.update(name="latents", path="workdirs/digits_latents", image_size=4, channels=4)
    config.sampling.clip_denoised = False  # latents are not images in [-1, 1]
    return config_defaults.use_network(
        config, "dit", patch_size=1, hidden_size=128, depth=6, num_heads=4
    )
