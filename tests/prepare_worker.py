"""One process of a multi-process run that opens the CIFAR-10 training data and nothing else:
the training program's data path, without compiling a train step. ``tests/test_datasets.py``
runs it through ``launch/local.sh`` with ``MODULE=tests.prepare_worker``.

``python -m tests.prepare_worker --data_dir=DIR [runtime flags]`` prints ``first batch <sha256>``,
the digest of this process's rows of the first global batch (4 images, no shuffling or flips).
"""

from __future__ import annotations

import hashlib
import sys

from absl import app, flags

from diffusion_jax import runtime

GLOBAL_BATCH = 4


def data_config(data_dir):
    from diffusion_jax import config_defaults

    config = config_defaults.get_config().data
    config.data_dir = str(data_dir)
    config.shuffle = False
    config.random_flip = False
    return config


def digest(images) -> str:
    return hashlib.sha256(images.tobytes()).hexdigest()


def main(argv):
    del argv
    runtime.init_runtime()
    from diffusion_jax import datasets, input_pipeline

    config = data_config(flags.FLAGS.data_dir)
    try:
        iterator = input_pipeline.create_train_iterator(
            config, global_batch_size=GLOBAL_BATCH, seed=0
        )
    except datasets.DataSetUnavailableError as e:
        sys.exit(f"error: {e}")
    print(f"first batch {digest(next(iterator)['image'])}", flush=True)


if __name__ == "__main__":
    # Defined here, so that importing this module (as the test does) defines no flag.
    flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
    app.run(main, flags_parser=runtime.parse_flags)
