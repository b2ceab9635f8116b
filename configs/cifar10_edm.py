"""EDM's CIFAR-10 recipe (Karras et al. 2022, Table 7, config F, unconditional) on the DDPM
U-Net of ``configs/cifar10.py``.

Theirs: the objective (preconditioning, ln sigma ~ N(-1.2, 1.2^2), loss weight, sigma_data
0.5); batch 512; Adam at learning rate 1e-3 ramped up linearly over the first 10M images
(19,531 steps) and no gradient clipping; 200M training images (390,625 steps); an EMA of
half-life 0.5M images (decay 0.5^(512 / 500,000) = 0.99929 per step); dropout 0.13; Heun's
sampler on 18 noise levels from 80 to 0.002, rho 7 (35 network evaluations; their FID 1.97
uncond. on the larger DDPM++ network, 56M parameters).
Not theirs: the network (this library's DDPM U-Net, 35.7M parameters) and the augmentation
(their non-leaky geometric augmentation is not implemented; horizontal flips as in DDPM).
"""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.use_objective(config_defaults.get_config(), "edm")
    config.model.unet.dropout = 0.13
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 19_531
    config.optim.grad_clip_norm = 0.0
    config.optim.ema_decay = 0.99929
    config.training.batch_size = 512
    config.training.num_steps = 390_625
    return config
