"""Flow matching (rectified flow) on CIFAR-10: DDPM's recipe of ``configs/cifar10.py`` (network,
batch 128, Adam 2e-4 with 5000 warmup steps, clipping at 1, EMA 0.9999, 800k steps) with the
straight-path velocity objective and Stable Diffusion 3's logit-normal training times (m 0,
s 1, no shift at 32x32; Esser et al. 2024), sampled with Heun's method over 18 equal steps of
t (35 network evaluations). A recipe of this library's, not a reproduction of a paper's run.
"""

from diffusion_jax import config_defaults


def get_config():
    return config_defaults.use_objective(config_defaults.get_config(), "flow")
