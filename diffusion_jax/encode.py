"""Encodes a split of images with an autoencoder into a latent data set (``latents``).

    python -m diffusion_jax.encode --autoencoder=workdirs/digits_autoencoder \\
        --out=workdirs/digits_latents
    python -m diffusion_jax.encode --config=configs/imagenet256_dit_xl2.py --out=DIR \\
        --autoencoder=sd-vae-ft-ema/diffusion_pytorch_model.safetensors  # --config's images

Multi-host as the other programs (``launch/``): every process runs it; process 0 writes.
"""

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import runtime

_AUTOENCODER = flags.DEFINE_string(
    "autoencoder", None, "A workdir of model.kind autoencoder, or a diffusers weights file."
)
_OUT = flags.DEFINE_string("out", None, "Directory of the latent data set (local or gs://...).")
_SPLIT = flags.DEFINE_string("split", "train", "Split of the images to encode.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config whose data group names the images (default: the autoencoder's)."
)
_BATCH = flags.DEFINE_integer("batch_per_device", 64, "Images each device encodes per call.")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "Examples per file (a multiple of the batch).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _AUTOENCODER.value is None or _OUT.value is None:
        raise app.UsageError("--autoencoder and --out are required")
    runtime.init_runtime()
    import ml_collections

    from diffusion_jax import checkpointing, config_lib, latents, sharding

    def encode():
        mesh = sharding.make_mesh()
        autoencoder = latents.load_autoencoder(_AUTOENCODER.value, mesh)
        if _CONFIG.value is not None:
            data = _CONFIG.value.data
        elif autoencoder.source_data is not None:
            data = ml_collections.ConfigDict(autoencoder.source_data)
        else:
            raise config_lib.ConfigError(
                "--config is needed with imported weights: its data group names the images"
            )
        meta = latents.encode_split(
            autoencoder,
            data,
            _OUT.value,
            split=_SPLIT.value,
            batch_per_device=_BATCH.value,
            chunk_size=_CHUNK.value,
            mesh=mesh,
        )
        print(
            f"encoded {meta['num_examples']} examples of {meta['source_data']['name']!r} split "
            f"{meta['split']!r} to latents {meta['latent_shape']} (and their mirror images), "
            f"scaling factor {meta['scaling_factor']:.5f} -> "
            f"{latents.split_dir(_OUT.value, meta['split'])}"
        )

    runtime.run_or_exit(
        encode, (config_lib.ConfigError, checkpointing.CheckpointError, ValueError, OSError)
    )


if __name__ == "__main__":
    app.run(main, flags_parser=runtime.parse_flags)
