"""The noisy-image classifier of the digits, for classifier guidance of ``configs/digits.py``.

p(y | x_t) on the 8x8 scikit-learn digits: the down half and middle block of the quick-start
U-Net (ch 32, 8x8 -> 4x4, attention at 4x4) with a pooled head, trained by cross-entropy on
x_t of the same process as the denoiser it guides (T=200 linear: keep ``diffusion.*`` equal to
``configs/digits.py``), t uniform. The 10 classes are the digits' labels; the 1500 training
images train it, the 297 held-out ones measure it (``--mode=accuracy``).
"""

from diffusion_jax import config_defaults


def get_config():
    config = config_defaults.get_config_digits()  # data, network and optimiser of digits.py
    config.model.kind = "classifier"
    config.training.sample_every = 0  # a classifier draws no samples
    config.eval.batch_size = 300  # the 297 test digits in one call, padded (1-6 devices)
    return config
