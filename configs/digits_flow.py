"""Flow matching (rectified flow) on the embedded 8x8 digits: the quick start's network, data and
optimiser (``configs/digits.py``) trained on the straight path ``x_t = (1 - t) x0 + t eps`` to
predict the velocity ``eps - x0``, with SD3's logit-normal training times (m 0, s 1), sampled
with Heun's method over 18 equal steps of t: 35 network evaluations.
"""

from diffusion_jax import config_defaults


def get_config():
    return config_defaults.use_objective(config_defaults.get_config_digits(), "flow")
