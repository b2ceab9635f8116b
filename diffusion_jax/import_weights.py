"""Writes trained DiT weights (official or diffusers, ``dit_weights``) into a new workdir.

``python -m diffusion_jax.import_weights --config=configs/imagenet256_dit_xl2.py \\
    --workdir=DIR --weights=DiT-XL-2-256x256.pt``

The workdir gets what a training run of ``--config`` saves at step 0: a checkpoint whose
parameters and EMA parameters are both the imported weights (fresh optimizer state, the data
iterator at its start) and ``config.json``. The evaluation program then samples and scores it
like any run (``python -m diffusion_jax.evaluate --workdir=DIR --mode=fid``), and the training
program fine-tunes it from there. The config's network must be the file's: every attribute that
the weights fix (patch size, width, depth, heads, MLP ratio, channels in and out, classes with
the null label, the numerics of the format) is compared before anything is written, and a
workdir that already has a checkpoint is refused. For a config of latents (``data.name``
"latents"), ``data.path`` must be the encoded data set (its ``latents.json`` gives the shape,
the classes and the decoder the evaluation program uses).
"""

from __future__ import annotations

from etils import epath

# The DiT attributes that the weights fix (``dit_weights.dit_kwargs``) and the config key that
# sets each one, for the refusal's remedy.
_CONFIG_KEYS = {
    "patch_size": "model.dit.patch_size",
    "hidden_size": "model.dit.hidden_size",
    "depth": "model.dit.depth",
    "num_heads": "model.dit.num_heads",
    "mlp_ratio": "model.dit.mlp_ratio",
    "numerics": "model.dit.numerics",
    "out_channels": "diffusion.var_type (learned_range doubles the channels)",
    "num_classes": "model.class_conditional and the data set's classes",
}


def check_matches(model, file_kwargs: dict, in_channels: int, file_in_channels: int) -> None:
    """Raises ``config_lib.ConfigError`` listing every attribute in which ``model`` (the config's
    DiT) differs from the weights' (``file_kwargs``, ``file_in_channels``)."""
    from diffusion_jax import config_lib

    wrong = [
        f"{name} {getattr(model, name)!r} (set by {key}) but the weights have {file_kwargs[name]!r}"
        for name, key in _CONFIG_KEYS.items()
        if getattr(model, name) != file_kwargs[name]
    ]
    if in_channels != file_in_channels:
        wrong.append(
            f"data.channels {in_channels} but the weights take {file_in_channels} channels"
        )
    if file_kwargs["num_classes"] is not None and not model.null_label:
        wrong.append("model.null_label is False but the weights have a null label's row")
    if wrong:
        raise config_lib.ConfigError("The config's DiT is not the weights': " + "; ".join(wrong))


def import_into_workdir(config, workdir, weights, num_heads: int | None = None) -> int:
    """Writes ``weights`` (a DiT file) as step 0 of a new run of ``config`` in ``workdir``;
    returns the number of imported parameters."""
    import jax
    import numpy as np

    from diffusion_jax import (
        checkpointing,
        config_lib,
        dit_weights,
        input_pipeline,
        sharding,
        train_step,
    )

    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    if config.model.kind != "denoiser" or config.model.name != "dit":
        raise config_lib.ConfigError(
            f"import_weights writes DiT weights: the config's model is {config.model.kind!r} "
            f"{config.model.name!r}, not a 'denoiser' 'dit'"
        )
    workdir = epath.Path(workdir)
    image_shape, num_classes = input_pipeline.dataset_spec(config.data)
    config_lib.check_classes(config, num_classes)
    setup = config_lib.make_train_setup(config, num_classes)
    params, file_kwargs = dit_weights.load_params(weights, num_heads)
    # The patch embedding's kernel is [p, p, channels in, width].
    check_matches(
        setup.model, file_kwargs, image_shape[-1], params["x_embedder"]["kernel"].shape[2]
    )

    checkpointer = checkpointing.Checkpointer(workdir, keep=config.training.keep_checkpoints)
    try:
        if (latest := checkpointer.latest_step()) is not None:
            raise checkpointing.CheckpointError(
                f"{checkpointer.directory} already has checkpoint {latest}: import into a new "
                "--workdir (nothing was written)"
            )
        mesh = sharding.make_mesh(config.training.fsdp, tensor=config.training.tensor_parallel)
        abstract, shardings = train_step.state_shardings(setup, image_shape, mesh)
        _check_tree(abstract.params, params)
        state = train_step.create_train_state(setup, image_shape, shardings, config.seed)
        imported = jax.device_put(params, shardings.params)
        state = state.replace(
            params=imported, ema_params=jax.device_put(params, shardings.ema_params)
        )
        data_iterator = input_pipeline.create_train_iterator(
            config.data, global_batch_size=config.training.batch_size, seed=config.seed
        )
        config_lib.record(workdir, config, None, 0)
        checkpointer.save(0, state, data_iterator, config, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    return sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(params))


def _check_tree(abstract_params, params) -> None:
    """The imported tree has the config's parameter names and shapes (the importer fills every
    parameter of the DiT it describes, so only a bug makes them differ)."""
    import jax

    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract_params)
    got = jax.tree_util.tree_map(lambda a: tuple(a.shape), params)
    if want != got:
        raise ValueError("the imported parameters do not have the config's names and shapes")


def main(argv, flag_values):
    """The program (its flags: ``_define_flags``)."""
    from absl import app, logging

    from diffusion_jax import checkpointing, config_lib, dit_weights, runtime

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if None in (flag_values.config, flag_values.workdir, flag_values.weights):
        raise app.UsageError("--config, --workdir and --weights are required")
    runtime.init_runtime()

    def run():
        count = import_into_workdir(
            flag_values.config, flag_values.workdir, flag_values.weights, flag_values.num_heads
        )
        logging.info(
            "Wrote %s parameters of %s as step 0 of %s",
            f"{count:,}",
            flag_values.weights,
            flag_values.workdir,
        )

    runtime.run_or_exit(
        run,
        (
            config_lib.ConfigError,
            checkpointing.CheckpointError,
            dit_weights.DiTWeightsError,
            ImportError,
            OSError,
            ValueError,
        ),
    )


def _define_flags():
    """The program's flags; defined only when it runs (the training program's own ``--config``
    and ``--workdir`` would collide in a process that imports both)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_string("workdir", None, "New workdir to write the checkpoint into.")
    flags.DEFINE_string(
        "weights", None, "DiT weights: official .pt/.safetensors or diffusers .safetensors."
    )
    flags.DEFINE_integer(
        "num_heads",
        None,
        "Heads of the file's DiT (no shape shows them); default: its config.json's, or the "
        "paper's size of that width.",
    )
    return flags.FLAGS


if __name__ == "__main__":
    from absl import app

    from diffusion_jax import runtime

    _flags = _define_flags()
    app.run(lambda argv: main(argv, _flags), flags_parser=runtime.parse_flags)
