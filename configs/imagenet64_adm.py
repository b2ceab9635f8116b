"""ADM's class-conditional ImageNet 64x64 model (Dhariwal & Nichol 2021, "Diffusion Models Beat
GANs on Image Synthesis", Table 11, and their released model flags): 192 channels, channel
multipliers (1, 2, 3, 4), 3 res blocks per level, attention at 32, 16 and 8 with 64 channels
per head, BigGAN-style up/downsampling ResBlocks, scale-shift norm (AdaGN), dropout 0.1, a
label embedding of 1000 rows (no null label: ADM is guided by a classifier, not
classifier-free); learned variance (learned_range) with the hybrid loss on the cosine schedule
of T = 1000; Adam at lr 3e-4, batch 2048, 540K steps, EMA 0.9999 -- 295,904,454 parameters, as
counted by their code. Mixed precision here is bfloat16 (theirs fp16); sampling uses 250
respaced steps.

Data: TFDS ``imagenet2012`` (manual download: place ILSVRC2012's train and validation tars in
TFDS's manual directory and run ``python -m diffusion_jax.datasets imagenet2012``), each image
center-cropped to a square and resized to 64x64 with PIL's anti-aliased bicubic filter (ADM
resizes the shorter side to 64 with box then bicubic filtering and center-crops: the same region,
a slightly different filter).
"""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.get_config()
    config.data.name = "imagenet2012"
    config.data.image_size = 64
    config.model.class_conditional = True
    config.model.null_label = False
    config.model.unet.update(
        ch=192,
        ch_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attn_resolutions=(32, 16, 8),
        num_head_channels=64,
        resblock_updown=True,
        scale_shift_norm=True,
        dropout=0.1,
    )
    config.diffusion.schedule = "cosine"
    config.diffusion.var_type = "learned_range"
    config.diffusion.loss_type = "hybrid"
    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 0
    config.optim.ema_decay = 0.9999
    config.training.batch_size = 2048
    config.training.num_steps = 540_000
    config.training.compute_dtype = "bfloat16"
    config.sampling.num_steps = 250
    config.sampling.num_samples = 100
    return config
