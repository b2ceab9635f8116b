"""Flax networks for diffusion models: the U-Net, the DiT and the noisy-image classifier.

Every denoising network has one contract: ``net(x_in [B, H, W, C], noise_input [B], y, *,
train) -> [B, H, W, out_channels]`` float32, where ``(x_in, noise_input)`` are the objective's
network inputs (``objective.network_inputs``), ``y`` is ``[B]`` int labels of a
class-conditional network (label ``num_classes`` is the null label of classifier-free guidance
when ``null_label``) or None, and ``out_channels`` is twice the image's channels for a learned
variance. ``NETWORKS`` maps ``model.name`` to the module; the config group ``model.<name>``
holds exactly its hyperparameters (``config_lib.make_model``). The noisy-image classifier
(``model.kind`` "classifier") is the U-Net's down half, with the ``unet`` group's options.
"""

from diffusion_jax.models.classifier import NoisyClassifier
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.unet import UNet

NETWORKS = {"unet": UNet, "dit": DiT}

__all__ = ["NETWORKS", "DiT", "NoisyClassifier", "UNet"]
