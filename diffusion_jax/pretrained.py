"""Trained runs as inputs: the config and EMA parameters of a workdir's checkpoint, for the
evaluation program and for the noisy classifier of classifier guidance.

Only the EMA parameters are read (no optimizer state, no data position), laid out over the
caller's mesh like the training program lays them out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from etils import epath

from diffusion_jax import checkpointing, config_lib, input_pipeline, train_step


def load_config(workdir, step: int | None, overrides: dict | None = None):
    """``(config, step)``: the config checkpoint ``step`` (None: the latest) of ``workdir`` was
    trained with, with ``overrides`` (dotted keys) set, and that step. For a checkpoint saved
    before checkpoints recorded their config: the workdir's ``config.json``."""
    checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
    try:
        step = checkpointer.step_to_evaluate(step)
        saved = checkpointer.saved_config(step)
    finally:
        checkpointer.close()
    if saved is None:
        return config_lib.load(workdir, overrides), step
    return config_lib.from_dict(saved, overrides, source=f"checkpoint {step}"), step


def restore_ema(config, workdir, step: int, mesh):
    """``(model, params, param_sharding)``: the network of ``config`` and the EMA parameters of
    checkpoint ``step`` of ``workdir``, sharded over ``mesh`` as in training."""
    image_shape, num_classes = input_pipeline.dataset_spec(config.data)
    config_lib.check_classes(config, num_classes)
    setup = config_lib.make_train_setup(config, num_classes)
    abstract, shardings = train_step.state_shardings(setup, image_shape, mesh)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract.ema_params,
        shardings.ema_params,
    )
    checkpointer = checkpointing.Checkpointer(epath.Path(workdir), read_only=True)
    try:
        params = checkpointer.restore_ema_params(step, target)
    finally:
        checkpointer.close()
    return setup.model, params, shardings.ema_params


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A noisy-image classifier restored for guidance: ``model.apply`` gives logits of
    ``p(y | x_t)``; ``params`` (EMA) laid out as ``param_sharding``."""

    model: Any
    params: Any
    param_sharding: Any
    workdir: str
    step: int


def load_classifier(config, mesh) -> Classifier | None:
    """The latest checkpoint of ``sampling.classifier_workdir`` when ``config`` samples with
    classifier guidance, else None. Raises ConfigError if that run is not a noisy classifier
    of ``config``'s images, classes, objective and its process (``CLASSIFIER_PROCESS``)."""
    if config.sampling.guidance != "classifier":
        return None
    workdir = config.sampling.classifier_workdir
    try:
        classifier_config, step = load_config(workdir, None)
    except (config_lib.ConfigError, checkpointing.CheckpointError) as e:
        raise config_lib.ConfigError(
            f"Config key 'sampling.classifier_workdir' ({workdir!r}) holds no usable run: {e}"
        ) from e
    _check_classifier(config, classifier_config, workdir)
    model, params, param_sharding = restore_ema(classifier_config, workdir, step, mesh)
    return Classifier(model, params, param_sharding, str(workdir), step)


# By objective, what besides the images decides the classifier's inputs: (what, the keys whose
# values must be the model's). Its training distribution of noise levels and a sampler's grid
# leave p(y | x_t) the same function, so they may differ.
CLASSIFIER_PROCESS = {
    "ddpm": ("the noise schedule", ("diffusion.schedule", "diffusion.num_timesteps")),
    "edm": ("the input scaling", ("objective.edm.sigma_data",)),
    "flow": ("the straight path", ()),
}


def _value(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _check_classifier(config, classifier_config, workdir) -> None:
    def mismatch(what, theirs, ours):
        return config_lib.ConfigError(
            f"Config key 'sampling.classifier_workdir' ({workdir!r}): the classifier there "
            f"{what} {theirs}, the model sampled here {ours}"
        )

    if classifier_config.model.kind != "classifier":
        raise mismatch("is not one: model.kind", repr(classifier_config.model.kind), "needs one")
    shape = lambda c: f"{c.data.image_size}x{c.data.image_size}x{c.data.channels}"
    if shape(classifier_config) != shape(config):
        raise mismatch(
            "was trained on images of", shape(classifier_config), f"generates {shape(config)}"
        )
    name = classifier_config.objective.name
    if name != config.objective.name:
        raise mismatch(
            "was trained with objective", repr(name), f"{config.objective.name!r} (objective.name)"
        )
    what, keys = CLASSIFIER_PROCESS[name]
    process = lambda c: " x ".join(repr(_value(c, key)) for key in keys)
    if process(classifier_config) != process(config):
        raise mismatch(
            f"was trained on {what}",
            process(classifier_config),
            f"uses {process(config)} ({' x '.join(keys)})",
        )
    classes = lambda c: input_pipeline.dataset_spec(c.data)[1]
    if classes(classifier_config) != classes(config):
        raise mismatch("tells apart classes:", classes(classifier_config), f"has {classes(config)}")
