"""A small Diffusion Transformer (Peebles & Xie 2023) on the embedded 8x8 digits: patches of
2x2 (16 tokens), width 128, 6 adaLN-Zero blocks of 4 heads, trained by flow matching
(``configs/digits_flow.py``: the straight path, SD3's logit-normal times) with the quick
start's data, batch and schedule (``configs/digits.py``) and sampled with Heun's method over 18
steps of t: 35 network evaluations.
"""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.use_objective(config_defaults.get_config_digits(), "flow")
    return config_defaults.use_network(
        config, "dit", patch_size=2, hidden_size=128, depth=6, num_heads=4
    )
