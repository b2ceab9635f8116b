"""The evaluation program's modes, one module each: ``bpd``, ``samples``, ``fid``, ``figures``
(of a denoiser) and ``accuracy`` (of a noisy-image classifier).

Each has ``run(context) -> dict`` (the numbers written to ``DIR/eval/<mode>_step<N>.json``) and
``summary(result) -> str`` (its one-line report); a module for another ``model.kind`` than
"denoiser" says so in ``MODEL_KIND``, one for some objectives only lists them in
``OBJECTIVES``. ``evaluate`` runs one on a workdir. The program
``python -m diffusion_jax.evaluate`` is a thin command line around it.
"""

from __future__ import annotations

import importlib

from absl import logging

# mode -> module of diffusion_jax.evaluators
MODES = {
    "bpd": "bpd",
    "sample": "samples",
    "fid": "fid",
    "figures": "figures",
    "accuracy": "accuracy",
}


def _module(mode: str):
    return importlib.import_module(f"diffusion_jax.evaluators.{MODES[mode]}")


def model_kind(mode: str) -> str:
    """The ``model.kind`` that ``mode`` evaluates."""
    return getattr(_module(mode), "MODEL_KIND", "denoiser")


def check_model_kind(mode: str, config, workdir, modes=tuple(MODES)) -> None:
    """Raises ``ConfigError`` (one line) when ``mode`` evaluates another kind of network than
    the one ``workdir`` trained (``config.model.kind``), naming the ``modes`` that fit it."""
    from diffusion_jax import config_lib

    kind, wanted = config.model.kind, model_kind(mode)
    if kind != wanted:
        fitting = [m for m in modes if model_kind(m) == kind]
        raise config_lib.ConfigError(
            f"mode={mode} evaluates a {wanted}, but {workdir} trained a {kind} "
            f"(model.kind {kind!r}); its modes: {', '.join(fitting) or 'none'}"
        )


# The modes of a model trained on a latent data set: its samples are decoded to images.
LATENT_MODES = ("sample", "fid")
# The modes the training program can run every training.eval_every steps: their modules have
# ``make_evaluate(ctx)``, which compiles once for every step's parameters (fid generates its
# samples in memory).
TRAINING_MODES = ("fid", "bpd", "accuracy")


def check_mode(mode: str, config, workdir, modes=tuple(MODES)) -> None:
    """Raises ``ConfigError`` (one line) when ``mode`` does not apply to a run of ``config``
    (in ``workdir``): another kind of network (``check_model_kind``, naming the ``modes`` that
    fit), an objective it is not defined for, or a model of latents for a mode of images."""
    from diffusion_jax import config_lib

    check_model_kind(mode, config, workdir, modes)
    supported = getattr(_module(mode), "OBJECTIVES", None)
    if supported is not None and config.objective.name not in supported:
        raise config_lib.ConfigError(
            f"mode={mode} is defined for objective {' and '.join(supported)} only; {workdir} "
            f"was trained with objective {config.objective.name!r}"
        )
    if config.data.name == "latents" and mode not in LATENT_MODES:
        raise config_lib.ConfigError(
            f"mode={mode} of a model of latents is not computed: its likelihood would be the "
            "latents' (nats of z, not of images) and its figures need the image chain; its "
            f"modes: {', '.join(m for m in LATENT_MODES if m in modes)} (samples decoded to "
            "images)"
        )


def make_evaluate(mode: str, ctx):
    """``evaluate(ctx) -> dict`` of a mode of ``TRAINING_MODES`` (its module's
    ``make_evaluate``): compiled for ``ctx``'s run once, then called with a context of each
    step to evaluate."""
    return _module(mode).make_evaluate(ctx)


def summary(mode: str, result: dict) -> str:
    """The one-line report of ``mode``'s ``result``."""
    return _module(mode).summary(result)


def evaluate(workdir, mode: str, step: int | None = None, overrides: dict | None = None) -> dict:
    """Runs ``mode`` on ``workdir``; returns its numbers (also in ``eval/<mode>_step<N>.json``,
    with the step and the config). JAX is imported here, not at module import: the program
    sets its XLA flags first."""
    import jax

    from diffusion_jax import config_lib, pretrained
    from diffusion_jax.evaluators import common

    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; valid: {', '.join(MODES)}")
    config, step = pretrained.load_config(workdir, step, overrides)
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    check_mode(mode, config, workdir)
    context = common.restore(config, workdir, step)
    logging.info("Evaluating step %d of %s: %s", context.step, workdir, mode)
    result = _module(mode).run(context)
    path = common.save_result(context, mode, result)
    if context.is_main:
        print(f"{mode} step {context.step}: {summary(mode, result)} -> {path}", flush=True)
    return result
