"""EDM (Karras et al. 2022) on the embedded 8x8 digits: the quick start's network, data and
optimiser (``configs/digits.py``) trained with EDM's preconditioning, log-normal noise levels and
loss weight (the paper's values: sigma_data 0.5, P_mean -1.2, P_std 1.2), sampled with Heun's
method on EDM's grid of 18 noise levels (sigma 80 to 0.002, rho 7): 35 network evaluations.
"""

from diffusion_jax import config_defaults


def get_config():
    return config_defaults.use_objective(config_defaults.get_config_digits(), "edm")
