"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021), their CIFAR-10 run: cosine schedule,
T = 4000, learned variance (learned_range), hybrid loss, lr 1e-4, batch 128, sampled with 100
respaced steps; their network (improved-diffusion's UNetModel with the CIFAR-10 flags): 128
channels, 3 res blocks per level, attention at 16x16 and 8x8 with 4 heads, scale-shift norm
(AdaGN), dropout 0.3 -- 52,546,438 parameters, as counted by their code."""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.get_config()
    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 4000
    config.diffusion.var_type = "learned_range"
    config.diffusion.loss_type = "hybrid"
    config.model.unet.update(
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=3,
        attn_resolutions=(16, 8),
        num_heads=4,
        scale_shift_norm=True,
        dropout=0.3,
    )
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 0
    config.training.num_steps = 500_000
    config.sampling.num_steps = 100
    return config
