"""The noisy-image classifier of CIFAR-10, for classifier guidance of ``configs/cifar10.py``.

Network: the DDPM CIFAR-10 U-Net's downsampling half and middle block (ch 128, ch_mult
(1, 2, 2, 2), 2 res blocks per level, attention at 16x16 and in the middle, GroupNorm(32))
with a pooled head: 13,414,794 parameters. Trained on x_t of the same process as the denoiser it
guides (T=1000 linear: ``diffusion.*`` as in ``configs/cifar10.py``), t uniform, by
cross-entropy.

From Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis", section 4.1 and
the README of openai/guided-diffusion, flags of its 128x128 ImageNet classifier): the noising
of the diffusion model, t uniform; AdamW with learning rate 3e-4 and weight decay 0.05, batch
256, no warmup and no gradient clipping (their ``scripts/classifier_train.py``); the zero-
initialised pooled head of their ``EncoderUNetModel`` (``pool="adaptive"``).

Not from there (they have no CIFAR-10 classifier; our choices, untuned): the trunk is DDPM's,
not their ImageNet classifier's (width 128, depth 2, attention at 32, 16 and 8, attention
pooling, BigGAN-style resampling blocks); dropout 0.1 (DDPM's, in place of their random crops,
which this input pipeline does not have; random horizontal flips as for the denoiser); a
constant learning rate (theirs anneals linearly to 0, which ``optim`` does not offer); EMA
0.9999 of the parameters (they keep none; the evaluation program and guidance use the EMA);
150,000 steps (their 128x128 classifier trains 300,000 on ImageNet).
"""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.get_config()
    config.model.kind = "classifier"
    config.model.unet.dropout = 0.1
    config.optim.learning_rate = 3e-4
    config.optim.weight_decay = 0.05
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 0.0
    config.optim.ema_decay = 0.9999
    config.training.batch_size = 256
    config.training.num_steps = 150_000
    config.training.sample_every = 0  # a classifier draws no samples
    return config
