"""The noisy-image classifier of the digits, for classifier guidance of ``configs/digits.py``.

p(y | x_t) on the 8x8 scikit-learn digits: the down half and middle block of the quick-start
U-Net (ch 32, 8x8 -> 4x4, attention at 4x4) with a pooled head, trained by cross-entropy on
x_t of the same process as the denoiser it guides (T=200 linear: keep ``diffusion.*`` equal to
``configs/digits.py``), t uniform. The 10 classes are the digits' labels; the 1500 training
images train it, the 297 held-out ones measure it (``--mode=accuracy``).
"""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.model.kind = "classifier"
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
    config.training.sample_every = 0  # a classifier draws no samples
    config.eval.batch_size = 300  # the 297 test digits in one call, padded (1-6 devices)
    return config
