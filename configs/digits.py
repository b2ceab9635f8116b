"""The quick-start: DDPM on the 8x8 handwritten digits that ship with scikit-learn.

Trains on a 2-core CPU in about 4 minutes: a small U-Net (ch 32, 8x8 -> 4x4), T=200 linear
steps, batch 128, on the 1500 training images at their native 8x8 grayscale (the other 297
are the held-out test split).
"""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.diffusion.num_timesteps = 200
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.995
    config.training.batch_size = 128
    config.training.num_steps = 2000
    config.training.log_every = 100
    config.training.checkpoint_every = 1000
    config.training.sample_every = 1000
    config.sampling.num_samples = 64
    # Evaluation: bpd on the 297 held-out test digits; 1000 samples scored by the digits
    # classifier's Fréchet distance against the train split.
    config.eval.num_samples = 1000
    config.eval.batch_size = 500
    return config
