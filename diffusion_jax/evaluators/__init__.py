"""The evaluation program's modes, one module each: ``bpd``, ``samples``, ``fid``, ``figures``.

Each has ``run(context) -> dict`` (the numbers written to ``DIR/eval/<mode>_step<N>.json``) and
``summary(result) -> str`` (its one-line report); ``evaluate`` runs one on a workdir. The
program ``python -m diffusion_jax.evaluate`` is a thin command line around it.
"""

from __future__ import annotations

import importlib

from absl import logging

# mode -> module of diffusion_jax.evaluators
MODES = {"bpd": "bpd", "sample": "samples", "fid": "fid", "figures": "figures"}


def evaluate(workdir, mode: str, step: int | None = None, overrides: dict | None = None) -> dict:
    """Runs ``mode`` on ``workdir``; returns its numbers (also in ``eval/<mode>_step<N>.json``,
    with the step and the config). JAX is imported here, not at module import: the program
    sets its XLA flags first."""
    import jax

    from diffusion_jax import config_lib, pretrained
    from diffusion_jax.evaluators import common

    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; valid: {', '.join(MODES)}")
    evaluator = importlib.import_module(f"diffusion_jax.evaluators.{MODES[mode]}")
    config, step = pretrained.load_config(workdir, step, overrides)
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    context = common.restore(config, workdir, step)
    logging.info("Evaluating step %d of %s: %s", context.step, workdir, mode)
    result = evaluator.run(context)
    path = common.save_result(context, mode, result)
    if context.is_main:
        print(f"{mode} step {context.step}: {evaluator.summary(result)} -> {path}", flush=True)
    return result
