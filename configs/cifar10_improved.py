"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021): cosine schedule, learned variance,
hybrid loss, 4000 steps sampled with 100 respaced steps; dropout 0.3, lr 1e-4 (their CIFAR-10
run)."""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.get_config()
    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 4000
    config.diffusion.var_type = "learned_range"
    config.diffusion.loss_type = "hybrid"
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 3
    config.model.dropout = 0.3
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 0
    config.training.num_steps = 500_000
    config.sampling.num_steps = 100
    return config
