"""Trained runs as inputs: the config and EMA parameters of a workdir's checkpoint, for the
evaluation program and for the networks that guide sampling (the noisy classifier of classifier
guidance, the weak model of autoguidance).

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
class Guide:
    """A trained network restored to guide sampling: the noisy classifier of classifier
    guidance (``model.apply`` gives logits of ``p(y | x_t)``) or the weak denoiser of
    autoguidance; ``params`` (EMA) laid out as ``param_sharding``."""

    model: Any
    params: Any
    param_sharding: Any
    workdir: str
    step: int


def load_guide(config, mesh, workdir) -> Guide | None:
    """The network that ``config.sampling.guidance`` samples with, or None when it uses none:
    for "classifier" the latest checkpoint of ``sampling.classifier_workdir``, for
    "autoguidance" checkpoint ``sampling.guide_step`` (0: the latest) of
    ``sampling.guide_workdir`` ("": ``workdir``, the run sampled). Raises ConfigError, in one
    line naming the keys, if there is no such checkpoint or it does not fit ``config``
    (``_check_guide``)."""
    scfg = config.sampling
    if scfg.guidance == "classifier":
        guide_workdir, step = scfg.classifier_workdir, None
        source = f"Config key 'sampling.classifier_workdir' ({guide_workdir!r})"
    elif scfg.guidance == "autoguidance":
        guide_workdir, step = scfg.guide_workdir or str(workdir), scfg.guide_step or None
        source = (
            f"Config key 'sampling.guide_workdir' ({guide_workdir!r}) at 'sampling.guide_step' "
            f"{scfg.guide_step}"
        )
    else:
        return None
    try:
        guide_config, step = load_config(guide_workdir, step)
    except (config_lib.ConfigError, checkpointing.CheckpointError) as e:
        raise config_lib.ConfigError(f"{source} holds no usable run: {e}") from e
    _check_guide(config, guide_config, source)
    model, params, param_sharding = restore_ema(guide_config, guide_workdir, step, mesh)
    return Guide(model, params, param_sharding, str(guide_workdir), step)


# By objective, what besides the images decides a guide's inputs: (what, the keys whose values
# must be the model's). Its training distribution of noise levels and a sampler's grid leave
# p(y | x_t) and E[x0 | x_t] the same functions, so they may differ.
CLASSIFIER_PROCESS = {
    "ddpm": ("the noise schedule", ("diffusion.schedule", "diffusion.num_timesteps")),
    "edm": ("the input scaling", ("objective.edm.sigma_data",)),
    "flow": ("the straight path", ()),
}
# An autoguidance guide's output is combined with the model's as is: the same parameterisation.
GUIDE_PROCESS = {
    **CLASSIFIER_PROCESS,
    "ddpm": (
        "the noise schedule and output",
        CLASSIFIER_PROCESS["ddpm"][1] + ("diffusion.mean_type", "diffusion.var_type"),
    ),
}
# By sampling.guidance: (what the guide is called, its model.kind, its process keys).
GUIDES = {
    "classifier": ("classifier", "classifier", CLASSIFIER_PROCESS),
    "autoguidance": ("guide model", "denoiser", GUIDE_PROCESS),
}


def _value(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _check_guide(config, guide_config, source: str) -> None:
    """Raises ConfigError (``source``: the keys that chose the guide, with their values) unless
    the guide of ``config.sampling.guidance`` fits the model sampled: its kind, image shape,
    objective and process (``GUIDES``), its classes; for autoguidance also its data set and
    class conditioning."""
    name, kind, processes = GUIDES[config.sampling.guidance]

    def mismatch(what, theirs, ours):
        return config_lib.ConfigError(
            f"{source}: the {name} there {what} {theirs}, the model sampled here {ours}"
        )

    if guide_config.model.kind != kind:
        raise mismatch(f"is not a {kind}: model.kind", repr(guide_config.model.kind), "needs one")
    shape = lambda c: f"{c.data.image_size}x{c.data.image_size}x{c.data.channels}"
    if shape(guide_config) != shape(config):
        raise mismatch(
            "was trained on images of", shape(guide_config), f"generates {shape(config)}"
        )
    objective = guide_config.objective.name
    if objective != config.objective.name:
        raise mismatch(
            "was trained with objective",
            repr(objective),
            f"{config.objective.name!r} (objective.name)",
        )
    what, keys = processes[objective]
    process = lambda c: " x ".join(repr(_value(c, key)) for key in keys)
    if process(guide_config) != process(config):
        raise mismatch(
            f"was trained on {what}",
            process(guide_config),
            f"uses {process(config)} ({' x '.join(keys)})",
        )
    if kind == "denoiser":
        data = lambda c: f"{c.data.name!r} (path {c.data.path!r})"
        if data(guide_config) != data(config):
            raise mismatch("was trained on data set", data(guide_config), f"on {data(config)}")
        conditional = lambda c: c.model.class_conditional
        if conditional(guide_config) != conditional(config):
            raise mismatch(
                "has model.class_conditional",
                conditional(guide_config),
                f"{conditional(config)}: both or neither take the labels",
            )
        if not conditional(config):
            return
    classes = lambda c: input_pipeline.dataset_spec(c.data)[1]
    if classes(guide_config) != classes(config):
        raise mismatch("tells apart classes:", classes(guide_config), f"has {classes(config)}")
