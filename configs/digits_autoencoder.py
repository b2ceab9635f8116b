"""The autoencoder of latent diffusion on the embedded 8x8 digits (``model.kind``
"autoencoder"): the Stable Diffusion VAE's architecture (``models.autoencoder.AutoencoderKL``)
at digit size -- two levels of 32 and 64 channels (down factor 2: 4x4x4 latents), one resnet
per level, mid-block attention, GroupNorm(8) -- trained on the quick start's data and optimiser
by the reconstruction error of a posterior sample plus SD's KL weight 1e-6. Then
``python -m diffusion_jax.encode --autoencoder=workdirs/digits_autoencoder
--out=workdirs/digits_latents`` writes the latent data set of ``configs/digits_latent.py``.
"""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.get_config_digits()
    config.model.kind = "autoencoder"
    config.model.unet = config_defaults.get_config().model.unet  # read by denoisers only
    config.model.autoencoder.update(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8
    )
    config.training.num_steps = 1500
    config.training.checkpoint_every = 1500
    config.training.sample_every = 0
    return config
