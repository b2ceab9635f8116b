"""Experiment configs: validation against the schema of ``config_defaults``, and builders.

``validate`` runs before anything is compiled or written: every key must exist in the default
config with a value of the same type, names must be among the valid choices, numbers within
range; errors name the key (``training.batch_size``) and what would be valid.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from diffusion_jax import (
    config_defaults,
    diffusion,
    guidance,
    losses,
    models,
    objectives,
    ode_sampling,
    posthoc_ema,
    sampling,
    schedules,
    train_step,
)
from diffusion_jax.models import NoisyClassifier
from diffusion_jax.models import dit as dit_module
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.objectives.flow import TIME_SAMPLINGS

TIMESTEP_SAMPLINGS = ("uniform", "importance")
# model.kind: the diffusion model's U-Net, or the noisy-image classifier of classifier guidance.
MODEL_KINDS = ("denoiser", "classifier", "autoencoder")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# training.remat: no rematerialisation, or every block's activations recomputed.
REMAT = ("none", "block")
GUIDANCE = ("none", "classifier_free", "classifier", "autoguidance")


class ConfigError(ValueError):
    """A config key has an unknown name, a wrong type or an impossible value."""


def _check_schema(config, schema, prefix=""):
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"Unknown config key {path!r}; valid keys here: {sorted(schema)}")
        value, expected = config[key], schema[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"Config key {path!r} must be a group of keys, got {value!r}")
            _check_schema(value, expected, prefix=f"{path}.")
            continue
        if expected is None or value is None:
            continue
        ok = isinstance(value, type(expected))
        if isinstance(expected, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(expected, int) and not isinstance(expected, bool):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(expected, (tuple, list)):
            ok = isinstance(value, (tuple, list))
        if not ok:
            raise ConfigError(
                f"Config key {path!r} must be {type(expected).__name__}, got "
                f"{type(value).__name__} {value!r}"
            )
    missing = sorted(set(schema.keys()) - set(config.keys()))
    if missing:
        raise ConfigError(f"Config group {prefix or '<root>'!r} lacks keys {missing}")


def _choice(config, path, valid):
    value = _get(config, path)
    if value not in valid:
        raise ConfigError(f"Config key {path!r} is {value!r}; valid: {', '.join(map(str, valid))}")


def _at_least(config, path, minimum):
    value = _get(config, path)
    if not value >= minimum:  # NaN fails too
        raise ConfigError(f"Config key {path!r} must be >= {minimum}, got {value!r}")


def _positive(config, path):
    value = _get(config, path)
    if not value > 0:
        raise ConfigError(f"Config key {path!r} must be > 0, got {value!r}")


def _fraction(config, path):
    value = _get(config, path)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"Config key {path!r} must lie in [0, 1), got {value!r}")


def _get(config, path):
    for part in path.split("."):
        config = config[part]
    return config


def _check_data_path(config):
    """``data.path`` names the image folder of ``data.name`` "folder" or the latent data set of
    "latents", and nothing else; whether it exists and holds images is checked when the data
    is opened (it lists directories). Latents are not clipped to the images' [-1, 1]."""
    data = config.data
    if data.name == "latents":
        if not data.path:
            raise ConfigError(
                "Config key 'data.path' must name a latent data set for data.name 'latents' "
                "(python -m diffusion_jax.encode writes one)"
            )
        for path, off in (("sampling.clip_denoised", False), ("sampling.dynamic_threshold", 0.0)):
            if _get(config, path) != off:
                raise ConfigError(
                    f"Config key {path!r} clips x0 predictions to the images' [-1, 1], which "
                    f"latents exceed: set it to {off!r} for data.name 'latents'"
                )
        return
    if data.name != "folder":
        if data.path:
            raise ConfigError(
                f"Config key 'data.path' ({data.path!r}) is only read when 'data.name' is "
                f"'folder' or 'latents', not {data.name!r}"
            )
        return
    if not data.path:
        raise ConfigError(
            "Config key 'data.path' must name a directory of images for data.name 'folder'"
        )
    _choice(config, "data.split", ("train",))  # a folder is one split
    _choice(config, "data.channels", (1, 3))


def validate(
    config: ml_collections.ConfigDict, *, num_devices: int = 1, process_count: int = 1
) -> ml_collections.ConfigDict:
    """Checks ``config``; returns it unchanged or raises ``ConfigError`` naming the bad key."""
    _check_schema(config, config_defaults.get_config())
    _validate_objective(config)
    _validate_model(config)
    _choice(config, "diffusion.schedule", schedules.BETA_SCHEDULES)
    _choice(config, "diffusion.mean_type", diffusion.MEAN_TYPES)
    _choice(config, "diffusion.var_type", diffusion.VAR_TYPES)
    _choice(config, "diffusion.loss_type", losses.LOSS_TYPES)
    _choice(config, "diffusion.loss_weighting", losses.LOSS_WEIGHTINGS)
    _choice(config, "diffusion.timestep_sampling", TIMESTEP_SAMPLINGS)
    _choice(config, "training.compute_dtype", tuple(COMPUTE_DTYPES))
    _check_data_path(config)
    _choice(config, "sampling.spacing", schedules.SPACINGS)
    for path in (
        "diffusion.num_timesteps",
        "training.batch_size",
        "training.num_steps",
        "training.grad_accum_steps",
        "training.fsdp",
        "training.log_every",
        "training.checkpoint_every",
        "training.keep_checkpoints",
        "training.posthoc_ema_every",
        "sampling.num_samples",
        "training.eval_num_samples",
        "eval.num_samples",
        "eval.batch_size",
        "eval.precision_recall_samples",
        "eval.ode_steps",
        "data.image_size",
        "data.channels",
    ):
        _at_least(config, path, 1)
    for path in (
        "training.sample_every",
        "training.eval_every",
        "training.eval_num_examples",
        "sampling.num_steps",
        "optim.warmup_steps",
        "data.num_workers",
        "data.prefetch",
        "sampling.eta",
        "eval.num_examples",
        "eval.seed",
        "optim.grad_clip_norm",
        "diffusion.vlb_weight",
        "diffusion.p2_gamma",
        "optim.weight_decay",
    ):
        _at_least(config, path, 0)
    for path in ("optim.learning_rate", "optim.eps", "diffusion.min_snr_gamma", "diffusion.p2_k"):
        _positive(config, path)
    for path in (
        "model.label_dropout",
        "optim.ema_decay",
        "optim.beta1",
        "optim.beta2",
    ):
        _fraction(config, path)
    if config.model.kind == "classifier":
        _check_classifier(config)
    if config.model.label_dropout and not config.model.class_conditional:
        raise ConfigError(
            f"Config key 'model.label_dropout' ({config.model.label_dropout}) drops class labels: "
            "it needs 'model.class_conditional' True"
        )
    _validate_sampling(config)
    _check_posthoc_ema_stds(config)
    if (
        config.diffusion.timestep_sampling == "importance"
        and config.diffusion.loss_type == "simple"
    ):
        raise ConfigError(
            "Config key 'diffusion.timestep_sampling' is 'importance', which needs the VLB term: "
            "set 'diffusion.loss_type' to 'vlb' or 'hybrid'"
        )
    try:
        schedules.get_betas(config.diffusion.schedule, config.diffusion.num_timesteps)
    except ValueError as e:
        raise ConfigError(
            f"Config keys 'diffusion.schedule' ({config.diffusion.schedule!r}) and "
            f"'diffusion.num_timesteps' ({config.diffusion.num_timesteps}) give no valid "
            f"schedule: {e}"
        ) from e
    guidance_interval(config)  # after the schedule: the interval is checked against its levels
    batch, accum, fsdp = (
        config.training.batch_size,
        config.training.grad_accum_steps,
        config.training.fsdp,
    )
    if num_devices % fsdp:
        raise ConfigError(
            f"Config key 'training.fsdp' ({fsdp}) must divide the number of devices ({num_devices})"
        )
    _validate_tensor_parallel(config, num_devices)
    if batch % (num_devices * accum):
        raise ConfigError(
            f"Config key 'training.batch_size' ({batch}) must be divisible by the number of "
            f"devices ({num_devices}) x 'training.grad_accum_steps' ({accum})"
        )
    if config.eval.batch_size % num_devices:
        raise ConfigError(
            f"Config key 'eval.batch_size' ({config.eval.batch_size}) must be divisible by the "
            f"number of devices ({num_devices})"
        )
    if batch % process_count:
        raise ConfigError(
            f"Config key 'training.batch_size' ({batch}) must be divisible by the number of "
            f"processes ({process_count})"
        )
    return config


def _check_posthoc_ema_stds(config) -> None:
    """``training.posthoc_ema_stds``: distinct numbers in ``(0, posthoc_ema.MAX_SIGMA_REL]``,
    the relative standard deviations a power-function EMA can have."""
    stds = config.training.posthoc_ema_stds
    valid = all(
        isinstance(s, (int, float))
        and not isinstance(s, bool)
        and 0 < s <= posthoc_ema.MAX_SIGMA_REL
        for s in stds
    )
    if not valid or len(set(stds)) != len(stds):
        raise ConfigError(
            f"Config key 'training.posthoc_ema_stds' is {tuple(stds)!r}; it must hold distinct "
            f"relative standard deviations in (0, {posthoc_ema.MAX_SIGMA_REL:.4f}] "
            "(EDM2: (0.05, 0.1)), or be () for none"
        )


def _validate_tensor_parallel(config, num_devices: int) -> None:
    """``training.tensor_parallel`` >= 1 divides the device count together with ``fsdp``. That
    it divides the network's heads and hidden units is checked once the network is known
    (``train_step.state_shardings``)."""
    _at_least(config, "training.tensor_parallel", 1)
    fsdp, tensor = config.training.fsdp, config.training.tensor_parallel
    if num_devices % (fsdp * tensor):
        raise ConfigError(
            f"Config key 'training.tensor_parallel' ({tensor}) x 'training.fsdp' ({fsdp}) must "
            f"divide the number of devices ({num_devices})"
        )


# Keys whose other values ask a noisy-image classifier for what only a denoiser has:
# (key, the value a classifier needs, why).
_CLASSIFIER_VALUES = (
    ("model.class_conditional", False, "it predicts the label instead of being given one"),
    ("model.label_dropout", 0.0, "it is not conditioned on labels"),
    ("diffusion.loss_type", "simple", "its loss is the cross-entropy, not a denoising loss"),
    ("diffusion.loss_weighting", "none", "its cross-entropy is not weighted by SNR"),
    ("diffusion.timestep_sampling", "uniform", "it draws t uniformly (no VLB to sample t by)"),
    ("training.sample_every", 0, "it draws no samples"),
)


# Keys whose other values ask the autoencoder for what only a diffusion model has.
_AUTOENCODER_VALUES = (
    ("model.name", "unet", "it is not one of the denoising networks"),
    ("model.class_conditional", False, "it is not conditioned on labels"),
    ("model.label_dropout", 0.0, "it is not conditioned on labels"),
    ("objective.name", "ddpm", "it is trained by reconstruction, not a diffusion objective"),
    ("diffusion.loss_type", "simple", "its loss is the reconstruction's"),
    ("diffusion.timestep_sampling", "uniform", "it draws no noise levels"),
    ("training.remat", "none", "its blocks are not rematerialised"),
    ("training.sample_every", 0, "it draws no samples"),
)


def _check_kind_values(config, values) -> None:
    """The ``(key, needed, why)`` of ``values`` for ``model.kind``: one line naming the first
    key with another value."""
    for path, needed, why in values:
        value = _get(config, path)
        if value != needed:
            raise ConfigError(
                f"Config key {path!r} is {value!r}, but model.kind {config.model.kind!r} needs "
                f"{needed!r}: {why}"
            )


def _check_classifier(config) -> None:
    """``model.kind`` "classifier": the keys that would ask it for a denoiser's loss, labels or
    samples must keep their neutral values. The objective (``objective.name`` and its options)
    draws its x_t and gives its network inputs, as for a denoiser; ddpm's ``mean_type`` and
    ``var_type`` describe a denoiser's output and are not read."""
    _check_kind_values(config, _CLASSIFIER_VALUES)


def check_classes(config, num_classes: int) -> None:
    """Raises ``ConfigError`` when ``config`` needs class labels that its data set, with
    ``num_classes`` classes (0: unlabeled; ``input_pipeline.dataset_spec``), lacks: a classifier
    needs at least 2 classes, a class-conditional denoiser at least 1."""
    data = f"data set {config.data.name!r}"
    if config.data.name == "folder":
        data += f" ({config.data.path})"
    if config.model.kind == "classifier" and num_classes < 2:
        raise ConfigError(
            f"Config key 'model.kind' is 'classifier', which needs a data set with class "
            f"labels, but {data} has {'one class' if num_classes == 1 else 'no class labels'}"
        )
    if config.model.class_conditional and not num_classes:
        raise ConfigError(
            f"Config key 'model.class_conditional' is True but {data} has no class labels"
        )


# The group of options of each objective (ddpm's keeps the name it had before objectives).
OBJECTIVE_GROUPS = {"ddpm": "diffusion", "edm": "objective.edm", "flow": "objective.flow"}


def _unchosen_at_defaults(config, key: str, groups: dict[str, str], what: str) -> None:
    """The option groups (``{choice: group path}``) of every choice of ``key`` but the chosen
    one must keep their defaults: an option given to the wrong ``what`` would be silently
    ignored."""
    name, defaults = _get(config, key), config_defaults.get_config()
    for other, group in groups.items():
        if other == name:
            continue
        changed = differences(_get(defaults, group), _get(config, group))
        if changed:
            option, (_, value) = next(iter(changed.items()))
            raise ConfigError(
                f"Config key '{group}.{option}' ({value!r}) is an option of {what} {other!r}, "
                f"but {key!r} is {name!r}: leave it at its default "
                f"({_get(defaults, group)[option]!r})"
            )


def _validate_model(config) -> None:
    """``model.kind``, ``model.name`` and the chosen network's group; the groups of the other
    networks must keep their defaults. Shapes the network cannot take are refused here, before
    anything compiles."""
    mcfg = config.model
    _choice(config, "model.kind", MODEL_KINDS)
    _choice(config, "model.name", tuple(models.NETWORKS))
    _choice(config, "training.remat", REMAT)
    networks = {name: f"model.{name}" for name in models.NETWORKS}
    if mcfg.kind == "autoencoder":
        _check_kind_values(config, _AUTOENCODER_VALUES)
        _unchosen_at_defaults(config, "model.kind", networks, "network")
        _validate_autoencoder(config)
        return
    _unchosen_at_defaults(config, "model.kind", {"autoencoder": "model.autoencoder"}, "kind")
    _unchosen_at_defaults(config, "model.name", networks, "network")
    if mcfg.kind == "classifier" and mcfg.name != "unet":
        raise ConfigError(
            f"Config key 'model.name' is {mcfg.name!r}, but model.kind 'classifier' is the "
            "U-Net's down half: use 'unet'"
        )
    if mcfg.label_dropout and not mcfg.null_label:
        raise ConfigError(
            f"Config key 'model.label_dropout' ({mcfg.label_dropout}) trains on the null label, "
            "which needs 'model.null_label' True"
        )
    if mcfg.name == "unet":
        _validate_unet(config)
    else:
        _validate_dit(config)


def _check_levels(config, groups_key: str, channels: list[int], levels_key: str) -> None:
    """A convolutional network's levels: the GroupNorm groups (``groups_key``) divide every
    level's ``channels``, and the image halves exactly once per level after the first
    (``levels_key`` names the key with one entry per level)."""
    groups, size = _get(config, groups_key), config.data.image_size
    if any(c % groups for c in channels):
        raise ConfigError(
            f"Config key {groups_key!r} ({groups}) must divide the channels of every level, "
            f"{channels}"
        )
    factor = 2 ** (len(channels) - 1)
    if size % factor:
        raise ConfigError(
            f"Config key 'data.image_size' ({size}) must be divisible by "
            f"2**(len({levels_key}) - 1) = {factor}"
        )


def _validate_autoencoder(config) -> None:
    for path in (
        "model.autoencoder.layers_per_block",
        "model.autoencoder.latent_channels",
        "model.autoencoder.norm_num_groups",
    ):
        _at_least(config, path, 1)
    _at_least(config, "model.autoencoder.kl_weight", 0)
    channels = list(config.model.autoencoder.block_out_channels)
    if not channels:
        raise ConfigError("Config key 'model.autoencoder.block_out_channels' is empty")
    _check_levels(
        config,
        "model.autoencoder.norm_num_groups",
        channels,
        "model.autoencoder.block_out_channels",
    )


def _validate_unet(config) -> None:
    unet, size = config.model.unet, config.data.image_size
    for path in ("model.unet.ch", "model.unet.num_res_blocks", "model.unet.num_groups"):
        _at_least(config, path, 1)
    _at_least(config, "model.unet.num_heads", 1)
    _at_least(config, "model.unet.num_head_channels", 0)
    _fraction(config, "model.unet.dropout")
    channels = [unet.ch * mult for mult in unet.ch_mult]
    _check_levels(config, "model.unet.num_groups", channels, "model.unet.ch_mult")
    # Attention runs at the levels whose size is listed, and in the middle block (last level).
    attended = {c for i, c in enumerate(channels) if size // 2**i in unet.attn_resolutions}
    attended.add(channels[-1])
    per_head = unet.num_head_channels
    key = "model.unet.num_head_channels" if per_head else "model.unet.num_heads"
    for c in sorted(attended):
        if c % (per_head or unet.num_heads):
            raise ConfigError(
                f"Config key {key!r} ({per_head or unet.num_heads}) must divide the channels "
                f"of every attention block: {sorted(attended)}"
            )


def _validate_dit(config) -> None:
    dit, size = config.model.dit, config.data.image_size
    for path in ("model.dit.patch_size", "model.dit.hidden_size", "model.dit.depth"):
        _at_least(config, path, 1)
    _at_least(config, "model.dit.num_heads", 1)
    _positive(config, "model.dit.mlp_ratio")
    _choice(config, "model.dit.numerics", tuple(dit_module.NUMERICS))
    if size % dit.patch_size:
        raise ConfigError(
            f"Config key 'model.dit.patch_size' ({dit.patch_size}) must divide "
            f"'data.image_size' ({size})"
        )
    if dit.hidden_size % dit.num_heads:
        raise ConfigError(
            f"Config key 'model.dit.num_heads' ({dit.num_heads}) must divide "
            f"'model.dit.hidden_size' ({dit.hidden_size})"
        )
    if dit.hidden_size % 4:
        raise ConfigError(
            f"Config key 'model.dit.hidden_size' ({dit.hidden_size}) must be divisible by 4 "
            "(the 2-D sin-cos position table)"
        )
    if dit.scan_blocks and config.training.remat != "block":
        # Without it the scan's backward pass keeps every intermediate of every block (DiT-XL/2,
        # batch 32 per device: 49,196 MiB per device against 31,560 unrolled; docs/networks.md).
        raise ConfigError(
            "Config key 'model.dit.scan_blocks' needs training.remat='block' (got "
            f"{config.training.remat!r}): scanned without rematerialisation, every block's "
            "intermediates are kept for the backward pass"
        )


def _validate_objective(config) -> None:
    """``objective.name`` and its options; the options of every other objective must keep
    their defaults."""
    _choice(config, "objective.name", tuple(objectives.OBJECTIVES))
    _unchosen_at_defaults(config, "objective.name", OBJECTIVE_GROUPS, "objective")
    name = config.objective.name
    if name == "edm":
        for path in ("objective.edm.sigma_data", "objective.edm.p_std", "objective.edm.rho"):
            _positive(config, path)
        _positive(config, "objective.edm.sigma_min")
        edm = config.objective.edm
        if not edm.sigma_min < edm.sigma_max:
            raise ConfigError(
                f"Config key 'objective.edm.sigma_max' ({edm.sigma_max}) must exceed "
                f"'objective.edm.sigma_min' ({edm.sigma_min})"
            )
    if name == "flow":
        _choice(config, "objective.flow.time_sampling", TIME_SAMPLINGS)
        _positive(config, "objective.flow.logit_std")
        _positive(config, "objective.flow.shift")


def _validate_sampling(config) -> None:
    if config.objective.name == "ddpm":
        _validate_ddpm_sampling(config)
    else:
        _validate_ode_sampling(config)
    scfg = config.sampling
    if scfg.method != "edm_stochastic":
        for key, default in (("churn", 0.0), ("s_tmin", 0.0), ("s_tmax", float("inf"))):
            if scfg[key] != default:
                raise ConfigError(
                    f"Config key 'sampling.{key}' ({scfg[key]}) applies to sampling.method "
                    f"'edm_stochastic' only, not {scfg.method!r}; leave it at {default}"
                )
        if scfg.s_noise != 1.0:
            raise ConfigError(
                f"Config key 'sampling.s_noise' ({scfg.s_noise}) applies to sampling.method "
                f"'edm_stochastic' only, not {scfg.method!r}; leave it at 1.0"
            )
    _at_least(config, "sampling.churn", 0)
    _at_least(config, "sampling.s_tmin", 0)
    _positive(config, "sampling.s_noise")
    _validate_guidance(config)


def _validate_ode_sampling(config) -> None:
    """The samplers of the continuous objectives (``ode_sampling``) and the DDPM sampler keys
    they do not read."""
    scfg, name = config.sampling, config.objective.name
    if scfg.method not in ode_sampling.METHODS:
        raise ConfigError(
            f"Config key 'sampling.method' is {scfg.method!r}, which objective {name!r} cannot "
            f"run; valid: {', '.join(ode_sampling.METHODS)}"
        )
    if scfg.num_steps < 1:
        raise ConfigError(
            f"Config key 'sampling.num_steps' ({scfg.num_steps}) must be >= 1 for objective "
            f"{name!r}: the steps of its time grid (0, all DDPM timesteps, is ddpm's)"
        )
    for key, default in (("spacing", "even"), ("dynamic_threshold", 0.0), ("eta", 0.0)):
        if scfg[key] != default:
            raise ConfigError(
                f"Config key 'sampling.{key}' ({scfg[key]!r}) applies to the ddpm objective's "
                f"samplers, not to objective {name!r}; leave it at {default!r}"
            )


def _validate_ddpm_sampling(config) -> None:
    scfg, num_timesteps = config.sampling, config.diffusion.num_timesteps
    _choice(config, "sampling.method", sampling.SAMPLING_METHODS)
    method = sampling.METHODS[scfg.method]
    if scfg.num_steps > num_timesteps:
        raise ConfigError(
            f"Config key 'sampling.num_steps' ({scfg.num_steps}) exceeds "
            f"'diffusion.num_timesteps' ({num_timesteps})"
        )
    if (scfg.num_steps or num_timesteps) < method.min_steps:
        raise ConfigError(
            f"Config key 'sampling.num_steps' ({scfg.num_steps}) is below the "
            f"{method.min_steps} steps sampling.method {scfg.method!r} needs"
        )
    if scfg.eta and not method.uses_eta:
        raise ConfigError(
            f"Config key 'sampling.eta' ({scfg.eta}) applies to sampling.method 'ddim' only, "
            f"not {scfg.method!r}; set it to 0"
        )
    if not 0.0 <= scfg.dynamic_threshold <= 1.0:
        raise ConfigError(
            f"Config key 'sampling.dynamic_threshold' must lie in [0, 1] (0: off), got "
            f"{scfg.dynamic_threshold!r}"
        )
    if config.diffusion.mean_type == "mu" and scfg.num_steps not in (0, num_timesteps):
        raise ConfigError(
            f"Config key 'sampling.num_steps' ({scfg.num_steps}) respaces the chain, but a 'mu' "
            "network (diffusion.mean_type) predicts the mean of its own one-step posterior, "
            "which a respaced step cannot use: set it to 0 (all steps)"
        )


def _validate_guidance(config) -> None:
    """``sampling.guidance`` and its keys; the labels' upper bound needs the data set and is
    checked by ``check_sampling_labels``."""
    scfg, mcfg = config.sampling, config.model
    _choice(config, "sampling.guidance", GUIDANCE)
    _at_least(config, "sampling.guidance_scale", 0)
    labels = list(scfg.labels)
    if not all(isinstance(y, int) and not isinstance(y, bool) and y >= 0 for y in labels):
        raise ConfigError(f"Config key 'sampling.labels' must hold ints >= 0, got {tuple(labels)}")
    if scfg.guidance == "none":
        for key, value in (
            ("guidance_scale", scfg.guidance_scale),
            ("guidance_interval", tuple(scfg.guidance_interval)),
        ):
            if value:
                raise ConfigError(
                    f"Config key 'sampling.{key}' ({value}) is set but 'sampling.guidance' is "
                    f"'none': choose one of {', '.join(GUIDANCE[1:])}"
                )
    _at_least(config, "sampling.guide_step", 0)
    if scfg.guidance != "autoguidance" and (scfg.guide_workdir or scfg.guide_step):
        raise ConfigError(
            f"Config keys 'sampling.guide_workdir' ({scfg.guide_workdir!r}) and "
            f"'sampling.guide_step' ({scfg.guide_step}) choose autoguidance's guide, but "
            f"'sampling.guidance' is {scfg.guidance!r}: leave them at '' and 0"
        )
    if scfg.guidance == "autoguidance" and not (scfg.guide_workdir or scfg.guide_step):
        raise ConfigError(
            "Config key 'sampling.guide_step' is 0 (the latest checkpoint) and "
            "'sampling.guide_workdir' '' (this run): the guide would be this run's newest "
            "model, not a weaker one; give the weak model's step or run"
        )
    if scfg.guidance == "classifier_free":
        if not mcfg.class_conditional:
            raise ConfigError(
                "Config key 'sampling.guidance' is 'classifier_free', which needs a "
                "class-conditional model, but 'model.class_conditional' is False"
            )
        if not mcfg.label_dropout:
            raise ConfigError(
                "Config key 'sampling.guidance' is 'classifier_free', which needs the "
                "unconditional model p(x) learned with 'model.label_dropout' > 0; this model was "
                "trained with 0, so its null label means nothing"
            )
    if (scfg.guidance == "classifier") != bool(scfg.classifier_workdir):
        raise ConfigError(
            "Config keys 'sampling.guidance' ('classifier') and 'sampling.classifier_workdir' "
            f"(the classifier's run) go together; got {scfg.guidance!r} and "
            f"{scfg.classifier_workdir!r}"
        )
    if labels and not (mcfg.class_conditional or scfg.guidance == "classifier"):
        raise ConfigError(
            f"Config key 'sampling.labels' is {tuple(labels)}: it asks for classes, but the model "
            "is not class-conditional and 'sampling.guidance' is not 'classifier'"
        )


def check_sampling_labels(config, num_classes: int | None) -> None:
    """Raises ConfigError if a label of ``sampling.labels`` is not a class of the data set
    (``num_classes`` of them; 0 or None: the data set has no labels)."""
    labels = tuple(config.sampling.labels)
    bad = [y for y in labels if not num_classes or y >= num_classes]
    if bad:
        valid = f"0..{num_classes - 1}" if num_classes else "none: it has no labels"
        raise ConfigError(
            f"Config key 'sampling.labels' is {labels}: label {bad[0]} is not a class of data "
            f"set {config.data.name!r} (valid labels: {valid})"
        )


def sampling_labels(config, num_classes: int | None) -> np.ndarray | None:
    """The labels samples cycle through, int32 ``[L]`` (sample ``i`` gets
    ``labels[i % L]``): ``sampling.labels``, or every class ``0 .. num_classes - 1``; None when
    sampling uses no labels (an unconditional model without classifier guidance)."""
    if not (config.model.class_conditional or config.sampling.guidance == "classifier"):
        return None
    check_sampling_labels(config, num_classes)
    return np.asarray(config.sampling.labels or range(num_classes), np.int32)


def load(workdir, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """The config of the first run in ``workdir`` (its ``config.json``, never overwritten; each
    checkpoint records the config of the run that saved it: ``Checkpointer.saved_config``).

    Applied on top of today's defaults, so keys added since the run keep their defaults; then
    ``overrides`` (``{"eval.num_samples": 1000}``, dotted keys) are set. Not validated.
    """
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(
            f"No config.json in {workdir}: not a training workdir (python -m diffusion_jax.train "
            "writes it)"
        )
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return from_dict(saved, overrides, source=str(path))


def from_dict(
    values: dict, overrides: dict | None = None, *, source: str
) -> ml_collections.ConfigDict:
    """Today's defaults updated with ``values`` (a saved config as nested dicts, from
    ``source``), then with ``overrides`` (dotted keys). Not validated."""
    config = config_defaults.get_config()
    _update(config, _before_registry(values), source)
    return apply_overrides(config, overrides or {})


# The U-Net's keys as they stood directly under ``model`` in runs saved before the network
# registry put them in ``model.unet``.
_UNET_KEYS_BEFORE_REGISTRY = (
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
    "resamp_with_conv",
    "num_groups",
)


def _before_registry(values: dict) -> dict:
    """A saved config with the U-Net's keys moved from ``model`` to ``model.unet`` (a copy)
    when it is from before the registry; otherwise ``values``."""
    model = values.get("model", {})
    moved = {key: model[key] for key in _UNET_KEYS_BEFORE_REGISTRY if key in model}
    if not moved:
        return values
    rest = {key: value for key, value in model.items() if key not in moved}
    return {**values, "model": {**rest, "unet": {**rest.get("unet", {}), **moved}}}


def apply_overrides(config, overrides: dict) -> ml_collections.ConfigDict:
    """Sets ``{"training.batch_size": 64, ...}`` (dotted keys, as on the command line) in
    ``config``; returns it."""
    for key, value in overrides.items():
        *groups, leaf = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[leaf] = value
    return config


def _update(config, values: dict, source: str, prefix: str = ""):
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in config:
            raise ConfigError(f"Unknown config key {path!r} in {source}")
        if isinstance(value, dict):
            _update(config[key], value, source, f"{path}.")
        elif isinstance(config[key], tuple) and isinstance(value, list):
            config[key] = tuple(value)
        else:
            config[key] = value


# What a resumed run may change (a group covers all its keys): how long to train, what it shows
# and saves, how the work is laid out, the optimiser from the restored step on, data access.
RESUME_SAFE_KEYS = (
    "training.num_steps",
    "training.log_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.sample_every",
    "training.eval_every",
    "training.eval_modes",
    "training.eval_num_samples",
    "training.eval_num_examples",
    "training.grad_accum_steps",
    "training.fsdp",
    "training.remat",
    "training.tensor_parallel",
    "training.posthoc_ema_every",  # the snapshots' steps; the profiles are the same
    "optim",
    "sampling",
    "objective.edm.sigma_min",  # EDM's sampler grid; training does not read it
    "objective.edm.sigma_max",
    "objective.edm.rho",
    "eval",
    "data.prefetch",
    "data.data_dir",
)


def check_resume(recorded, config, what: str) -> list[str]:
    """Refuses to continue ``what`` (a checkpoint trained with ``recorded``) with ``config`` when
    a key outside ``RESUME_SAFE_KEYS`` changed: raises one ``ConfigError`` naming every such
    key with both values. Returns the allowed changes, ``"key old -> new"``.

    Refused, because the resumed run would silently train on other data, other noise or another
    model than the checkpoint: ``seed`` (data order, flips, noise, dropout); ``data.name``,
    ``split``, ``image_size``, ``channels``, ``shuffle``, ``random_flip`` (the data) and
    ``num_workers`` (the saved data position is specific to it); ``training.batch_size`` (data
    order and the examples' noise, keyed by global index); ``training.compute_dtype`` (the
    network's arithmetic); ``training.posthoc_ema_stds`` (the profiles in the state); every
    ``model.*`` key (the network), ``objective.name`` and every
    ``diffusion.*`` and ``objective.*`` key (process, parameterisation, loss) but EDM's sampler
    grid. A key added to the config later is refused until it is
    listed as safe.

    Allowed: ``grad_accum_steps``, ``fsdp`` and ``tensor_parallel`` give the same updates up
    to rounding; ``optim.*``
    changes the updates from here on, a deliberate choice (e.g. a lower learning rate) recorded
    in the resumed run's config; the rest only changes what is logged, saved or evaluated, or
    how the same data are read.
    """
    changes = differences(recorded, config)
    unsafe = [k for k in changes if not _resume_safe(k)]
    if unsafe:
        raise ConfigError(
            f"Cannot resume {what} with a changed config: "
            + ", ".join(_change(k, changes[k]) for k in unsafe)
            + ". Use a new --workdir, or restore these values."
        )
    return [_change(k, values) for k, values in changes.items()]


def record(workdir, config, recorded, step: int) -> None:
    """Keeps every run's config: ``config.json`` is the first run's and is never overwritten; a
    run that starts at ``step`` with another config than ``recorded`` (the config of what it
    resumes) adds ``config_step<N>_<UTC time>.json``."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    text = config.to_json_best_effort(indent=2)
    if not (workdir / "config.json").exists():
        (workdir / "config.json").write_text(text)
    elif differences(recorded, config):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        (workdir / f"config_step{step}_{stamp}.json").write_text(text)


def differences(old, new) -> dict[str, tuple]:
    """``{dotted key: (old value, new value)}`` of every key whose value differs, sorted."""
    old, new = _flat(old), _flat(new)
    return {key: (old[key], new[key]) for key in sorted(new) if old[key] != new[key]}


def _change(key: str, values: tuple) -> str:
    return f"{key} {values[0]!r} -> {values[1]!r}"


def _resume_safe(key: str) -> bool:
    return any(key == safe or key.startswith(f"{safe}.") for safe in RESUME_SAFE_KEYS)


def _flat(config) -> dict:
    """``{dotted key: value}`` of ``config`` in its JSON form (tuples as lists)."""
    flat = {}

    def visit(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                visit(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    visit(json.loads(config.to_json_best_effort()), "")
    return flat


def guidance_interval(config) -> guidance.Interval | None:
    """The ``guidance.Interval`` of ``sampling.guidance_interval`` on the objective's noise
    levels, or None for ``()`` (guidance at every level). Raises ConfigError naming the key if
    it is not ``(lo, hi)`` with ``0 <= lo < hi`` meeting the objective's range of levels."""
    bounds = tuple(config.sampling.guidance_interval)
    if not bounds:
        return None
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds)
    if len(bounds) != 2 or not numbers:
        raise ConfigError(
            f"Config key 'sampling.guidance_interval' must be () or (lo, hi), two numbers, got "
            f"{bounds}"
        )
    try:
        # Concrete schedule arrays, whose levels the range check reads, inside a jit trace too.
        with jax.ensure_compile_time_eval():
            return guidance.Interval(make_objective(config), *map(float, bounds))
    except ValueError as e:
        raise ConfigError(f"Config key 'sampling.guidance_interval': {e}") from e


def make_objective(config):
    """The training objective of ``config`` (``objectives.from_config``)."""
    return objectives.from_config(config)


def make_train_setup(config, num_classes: int | None = None, model=None) -> train_step.TrainSetup:
    """The network, objective, optimizer and step settings of ``config``: everything the train
    step and its state are built from (``train_step``); ``num_classes`` as in ``make_model``.
    ``model``: a network of your own (same call as ``config``'s) to train with its recipe."""
    optimizer, lr_schedule = train_step.make_optimizer(config.optim)
    return train_step.TrainSetup(
        model=make_model(config, num_classes) if model is None else model,
        objective=make_objective(config),
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        batch_size=config.training.batch_size,
        kind=config.model.kind,
        grad_accum_steps=config.training.grad_accum_steps,
        ema_decay=config.optim.ema_decay,
        label_dropout=config.model.label_dropout,
        kl_weight=config.model.autoencoder.kl_weight,
        posterior=config.data.name == "latents",
        posthoc_ema_stds=tuple(config.training.posthoc_ema_stds),
    )


def num_evaluations(config) -> int:
    """Network evaluations per sample of the sampler ``config.sampling`` chooses (twice as
    many network rows under classifier-free guidance, which evaluates both branches at once,
    and under autoguidance, which evaluates the guide too)."""
    scfg = config.sampling
    if config.objective.name != "ddpm":
        return ode_sampling.num_evaluations(scfg.method, scfg.num_steps)
    return sampling.num_evaluations(scfg.method, scfg.num_steps or config.diffusion.num_timesteps)


def ode_sampler_options(config) -> dict:
    """The keyword arguments of ``ode_sampling.sample`` that ``config.sampling`` chooses."""
    scfg = config.sampling
    return dict(
        method=scfg.method,
        num_steps=scfg.num_steps,
        churn=scfg.churn,
        s_tmin=scfg.s_tmin,
        s_tmax=scfg.s_tmax,
        s_noise=scfg.s_noise,
    )


def make_schedule(config) -> schedules.Schedule:
    """The training process of ``config.diffusion``."""
    return schedules.Schedule.create(config.diffusion.schedule, config.diffusion.num_timesteps)


def make_sampling_schedule(config) -> schedules.Schedule:
    """The process the sampler reverses: all T steps, or ``sampling.num_steps`` of them picked by
    ``sampling.spacing`` (``schedules.spaced_timesteps``) and respaced."""
    betas = schedules.get_betas(config.diffusion.schedule, config.diffusion.num_timesteps)
    if config.sampling.num_steps in (0, config.diffusion.num_timesteps):
        return schedules.Schedule.from_betas(betas)
    kept = schedules.spaced_timesteps(betas, config.sampling.num_steps, config.sampling.spacing)
    return schedules.respace(betas, kept)


def sampler_options(config) -> dict:
    """The keyword arguments of ``sampling.sample`` (and ``interpolate``) that ``config``
    chooses: the network's parameterisation and the ``sampling.*`` method and its options."""
    return dict(
        mean_type=config.diffusion.mean_type,
        var_type=config.diffusion.var_type,
        clip_denoised=config.sampling.clip_denoised,
        dynamic_threshold=config.sampling.dynamic_threshold,
        method=config.sampling.method,
        eta=config.sampling.eta,
    )


def make_model(config, num_classes: int | None = None):
    """The network of ``config.model``: for ``kind`` "denoiser" ``models.NETWORKS[name]`` with
    the attributes of its group ``model.<name>`` (output channels doubled for a learned
    variance; a label embedding when ``class_conditional``, with the null label's row when
    ``null_label``), for "classifier" the noisy-image classifier of ``num_classes`` classes (the
    data set's: ``input_pipeline.dataset_spec``) on the ``unet`` group's trunk.
    ``training.remat`` "block" rematerialises every block of either."""
    mcfg = config.model
    dtype = COMPUTE_DTYPES[config.training.compute_dtype]
    if mcfg.kind == "autoencoder":
        # kl_weight is the loss's, not the network's.
        attributes = module_attributes(mcfg.autoencoder, exclude=("kl_weight",))
        channels = config.data.channels
        return AutoencoderKL(in_channels=channels, out_channels=channels, dtype=dtype, **attributes)
    attributes = module_attributes(mcfg[mcfg.name])
    attributes.update(dtype=dtype, remat=config.training.remat == "block")
    if mcfg.kind == "classifier":
        if not num_classes or num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes!r}")
        return NoisyClassifier(num_classes=num_classes, **attributes)
    channels = config.data.channels
    if config.diffusion.var_type == "learned_range":
        channels *= 2
    return models.NETWORKS[mcfg.name](
        out_channels=channels,
        num_classes=num_classes if mcfg.class_conditional else None,
        null_label=mcfg.null_label,
        **attributes,
    )


def module_attributes(group, exclude=()) -> dict:
    """A network's config group (e.g. ``model.unet``) as its module's attributes: every key
    but ``exclude``, sequences as tuples."""
    items = group.to_dict().items()
    return {k: tuple(v) if isinstance(v, list) else v for k, v in items if k not in exclude}
