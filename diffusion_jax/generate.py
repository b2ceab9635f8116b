"""Sample generation split over a mesh's devices and processes, shared by training and evaluation.

Sample ``i`` (a global index: the preview grid's ``0..63``, or sample 41,337 of an evaluation
run) draws all of its noise from ``fold_in(key, i)``; with class labels (a conditional model or
classifier guidance) it gets label ``i mod L`` of the ``L`` requested ones (``sampling.labels``,
by default every class in turn). Every device computes its own slice of the batch, and a set of
N samples is the same on any number of devices or processes and in any chunking of the indices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from diffusion_jax import config_lib, guidance, ode_sampling, sampling, sharding
from diffusion_jax.models.classifier import log_prob_fn

# The values of sampling.guidance that sample with a second network, a pretrained.Guide.
GUIDED_BY_A_NETWORK = ("classifier", "autoguidance")


def sample_keys(rng, indices):
    """Per-sample keys ``uint32 [N, 2]``: ``fold_in(rng, i)`` for each global index ``i``."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, indices.astype(jnp.uint32))


def padded_size(num: int, mesh) -> int:
    """``num`` rounded up to a multiple of the mesh's device count."""
    return -(-num // mesh.size) * mesh.size


def make_generate_fn(
    config, model, mesh, param_sharding, num_samples: int, guide=None, decoder=None
):
    """Jitted ``generate(params, rng, first_index) -> images [P, H, W, C]`` in [-1, 1].

    Generates samples ``first_index .. first_index + P - 1`` with the sampler of
    ``config.sampling`` (method, number of steps and their spacing, eta, clipping or dynamic
    thresholding, guidance) from ``params`` (e.g. the EMA parameters, laid out as
    ``param_sharding``). A class-conditional model, or classifier guidance, gives sample ``i``
    the label ``sample_labels(config, num_classes, i)``. ``guide``: the ``pretrained.Guide`` of
    classifier guidance or autoguidance (``pretrained.load_guide``), its parameters an argument
    of the compiled program like ``params``. ``decoder``: for a model of
    latents (``data.name`` "latents"), the ``latents.Decoder`` that turns them into images
    (``latents.load_decoder``; the same program decodes them).

    ``P = padded_size(num_samples, mesh)``: the batch is split evenly over every device of the
    mesh (all processes), so it is padded to a multiple of the device count; callers keep the
    first ``num_samples`` rows. The result is a global array sharded over the batch axes
    (``to_host`` gathers it). Parameters and ``first_index`` are arguments, so one compilation
    serves a whole run.
    """
    scfg = config.sampling
    if (scfg.guidance in GUIDED_BY_A_NETWORK) != (guide is not None):
        raise ValueError(
            f"sampling.guidance is {scfg.guidance!r}: pass the guide network (pretrained."
            f"load_guide) exactly when it is {' or '.join(map(repr, GUIDED_BY_A_NETWORK))}"
        )
    objective = config_lib.make_objective(config)
    if objective.process is None:  # DDPM's chain over its (respaced) discrete schedule
        schedule = config_lib.make_sampling_schedule(config)
        options = config_lib.sampler_options(config)
        run_sampler = lambda fn, keys: sampling.sample(fn, schedule, shape, keys, **options)
    else:  # the continuous objective's ODE (or EDM's stochastic) sampler
        options = config_lib.ode_sampler_options(config)
        run_sampler = lambda fn, keys: ode_sampling.sample(fn, objective, shape, keys, **options)
    num_classes = model.num_classes or (guide and guide.model.num_classes)
    cycle = config_lib.sampling_labels(config, num_classes)
    batch = padded_size(num_samples, mesh)
    shape = (batch, config.data.image_size, config.data.image_size, config.data.channels)
    batch_sharding = sharding.batch_sharding(mesh)

    if (config.data.name == "latents") != (decoder is not None):
        raise ValueError("pass the decoder of the latent data set exactly for data.name 'latents'")

    def generate(params, rng, first_index, guide_params=None, decoder_params=None):
        # The first half of the split keyed random labels before labels cycled; the noise keeps
        # its key, so unconditional sample sets are unchanged.
        _, noise_root = jax.random.split(rng)
        indices = first_index + jnp.arange(batch, dtype=jnp.int32)
        keys = jax.lax.with_sharding_constraint(sample_keys(noise_root, indices), batch_sharding)
        y = None if cycle is None else jnp.asarray(cycle)[indices % len(cycle)]
        model_fn = sampler_model_fn(
            config, model, params, y, guide, guide_params, batch_sharding=batch_sharding
        )
        x0 = run_sampler(model_fn, keys)
        if decoder is not None:
            x0 = decoder.decode(decoder_params, x0)
        return jnp.clip(x0, -1.0, 1.0)

    if guide is None and decoder is None:
        return jax.jit(
            generate, in_shardings=(param_sharding, None, None), out_shardings=batch_sharding
        )
    # The guide's and the decoder's parameters are arguments too (None: absent).
    helpers = (guide, decoder and decoder.autoencoder)
    compiled = jax.jit(
        generate,
        in_shardings=(param_sharding, None, None, *(h and h.param_sharding for h in helpers)),
        out_shardings=batch_sharding,
    )
    return lambda params, rng, first_index: compiled(
        params, rng, first_index, *(h and h.params for h in helpers)
    )


def sampler_model_fn(
    config, model, params, labels, guide=None, guide_params=None, *, batch_sharding=None
):
    """The model function that the sampler of ``config.sampling`` runs: the bare network
    ``(x_in, noise_input)`` (DDPM's samplers give it ``(x_t, t)``, the others the objective's
    network inputs), guided as ``sampling.guidance`` says, at the noise levels of
    ``sampling.guidance_interval``.

    ``model`` (a U-Net) with ``params``, given ``labels`` (int ``[B]``, one per row of ``x_t``:
    a class-conditional model's, and the classes of classifier guidance; None when sampling
    uses no labels). Classifier guidance and autoguidance take the ``pretrained.Guide``
    ``guide`` with ``guide_params``: the classifier fed the objective's network inputs as in its
    training, the weak model the same inputs and labels as ``model``. With
    ``batch_sharding``, the networks' input is constrained to it.
    """
    scfg = config.sampling
    interval = config_lib.guidance_interval(config)

    def network(module, module_params, x_in, noise_input, y):
        if batch_sharding is None:
            return module.apply({"params": module_params}, x_in, noise_input, y, train=False)
        x_in = jax.lax.with_sharding_constraint(x_in, batch_sharding)
        with sharding.tracing_mesh(batch_sharding.mesh):
            return module.apply({"params": module_params}, x_in, noise_input, y, train=False)

    def conditioned(module, module_params):
        """``(x_in, noise_input) -> output`` of ``module``, given ``labels`` if it takes them."""
        y = None if module.num_classes is None else labels
        return lambda x_in, noise_input: network(module, module_params, x_in, noise_input, y)

    if scfg.guidance == "classifier_free":
        return guidance.classifier_free(
            lambda x_in, noise_input, y: network(model, params, x_in, noise_input, y),
            labels,
            scfg.guidance_scale,
            null_label=model.num_classes,
            var_type=config.diffusion.var_type,
            interval=interval,
        )
    model_fn = conditioned(model, params)
    if scfg.guidance == "autoguidance":
        return guidance.autoguidance(
            model_fn,
            conditioned(guide.model, guide_params),
            scfg.guidance_scale,
            var_type=config.diffusion.var_type,
            interval=interval,
        )
    if scfg.guidance == "classifier":
        return guidance.classifier(
            model_fn,
            log_prob_fn(guide.model, guide_params),
            labels,
            scfg.guidance_scale,
            config_lib.make_objective(config),
            interval=interval,
        )
    return model_fn


def sample_labels(config, num_classes: int | None, indices) -> np.ndarray | None:
    """The labels int32 ``[N]`` of samples ``indices`` (global indices, as ``generate`` gives
    them), or None when sampling uses no labels."""
    cycle = config_lib.sampling_labels(config, num_classes)
    return None if cycle is None else cycle[np.asarray(indices) % len(cycle)]


def to_host(tree):
    """Each (possibly multi-process) global array of ``tree`` as one whole NumPy array on every
    process. Every process must call it."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    return jax.tree_util.tree_map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree
    )


def to_uint8(images) -> np.ndarray:
    """Quantises images in [-1, 1] as 8-bit images on disk: ``uint8(clip(round(127.5 x +
    127.5), 0, 255))`` (rounding, not truncation)."""
    return np.clip(np.round(np.asarray(images, np.float32) * 127.5 + 127.5), 0, 255).astype(
        np.uint8
    )
