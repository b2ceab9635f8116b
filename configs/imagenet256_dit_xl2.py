"""DiT-XL/2 on ImageNet 256x256 (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), trained on the latents of the Stable Diffusion VAE (stabilityai/sd-vae-ft-ema,
scaling factor 0.18215: 32x32x4): class-conditional with label dropout 0.1 (a null label for
classifier-free guidance), DDPM's linear schedule of T = 1000 with a learned variance
(learned_range) and the hybrid loss (their L_simple + L_vlb), AdamW at lr 1e-4 without weight
decay, batch 256, EMA 0.9999, random horizontal flips (both orientations are encoded); 675M
parameters. The paper's FID-50K 2.27 is after 7M steps, sampled with 250 DDPM steps and
classifier-free guidance of scale 1.5 (here w = 0.5: out = 1.5 f(y) - 0.5 f(null)); their
sampler guides three of the four latent channels "for exact reproducibility", this one all four
(the standard form, as their README recommends for new work). float32 as theirs (TF32 on GPUs).

The latents come first (TFDS imagenet2012 from your manual download, center-cropped and resized
to 256x256; the VAE's diffusers weights file, e.g. diffusion_pytorch_model.safetensors of
sd-vae-ft-ema):

    python -m diffusion_jax.encode --config=configs/imagenet256_dit_xl2.py:images \\
        --autoencoder=sd-vae-ft-ema/diffusion_pytorch_model.safetensors \\
        --out=workdirs/imagenet256_latents
    python -m diffusion_jax.train --config=configs/imagenet256_dit_xl2.py --workdir=DIR

``:images`` gives the images' config (``get_config("images")``), whose data group the encoder
reads.

On 16 GiB devices (a TPU v3 core), eight of them: ``--config.training.compute_dtype=bfloat16
--config.training.fsdp=8 --config.training.remat=block --config.model.dit.scan_blocks=True``
(4,408 MiB per device by XLA's buffer assignment, a third more FLOPs; docs/networks.md).
"""

from diffusion_jax import config_defaults
from diffusion_jax.models import dit


def get_config(variant: str = ""):
    config = config_defaults.get_config()
    if variant == "images":
        config.data.update(name="imagenet2012", image_size=256, random_flip=True)
        return config
    if variant:
        raise ValueError(f"unknown variant {variant!r} of this config; valid: '', 'images'")
    config.data.update(
        name="latents", path="workdirs/imagenet256_latents", image_size=32, channels=4
    )
    config_defaults.use_network(config, "dit", **dit.dit_config("XL/2"))
    config.model.class_conditional = True
    config.model.label_dropout = 0.1
    config.diffusion.update(
        schedule="linear", num_timesteps=1000, var_type="learned_range", loss_type="hybrid"
    )
    config.optim.update(learning_rate=1e-4, warmup_steps=0, weight_decay=0.0, ema_decay=0.9999)
    config.optim.grad_clip_norm = 0.0
    config.training.update(batch_size=256, num_steps=7_000_000, sample_every=50_000)
    config.sampling.update(
        method="ancestral",
        num_steps=250,
        guidance="classifier_free",
        guidance_scale=0.5,
        clip_denoised=False,
        num_samples=64,
    )
    config.eval.update(num_samples=50_000, batch_size=256)
    return config
