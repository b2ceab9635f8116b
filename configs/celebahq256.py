"""DDPM on CelebA-HQ 256x256 (Ho et al. 2020, Appendix B): ch_mult (1,1,2,2,4,4), attention at 16x16,
batch 64, dropout 0.0, EMA 0.9999, lr 2e-5 (their 256x256 runs)."""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.get_config()
    config.data.name = "celeb_a_hq/256"
    config.data.image_size = 256
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0
    config.optim.learning_rate = 2e-5
    config.training.batch_size = 64
    config.training.num_steps = 500_000
    config.sampling.num_samples = 16
    return config
