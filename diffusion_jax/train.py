"""Trains a diffusion model, or the noisy-image classifier of classifier guidance.

``python -m diffusion_jax.train --config=configs/digits.py --workdir=DIR``

``model.kind`` picks the network and its per-example objective (``train_step``); everything
else (this loop, checkpoints, sharding, logging) is the same for both. A classifier draws no
sample grids; its log shows accuracy.

The loop: validate config -> data -> mesh -> state (restored from ``workdir`` when a checkpoint
exists, if the config changed only in keys that are safe to change) -> jitted sharded train
step -> progress/TensorBoard/sample grids -> post-hoc EMA snapshots (``posthoc_ema``) -> async
checkpoints -> evaluations every ``training.eval_every`` steps (``train_eval``), and a final save
on SIGTERM, SIGINT (Ctrl-C) or preemption. Multi-host: the same program on every process, after
``jax.distributed.initialize`` (see ``launch/``). ``DIR`` may be any ``etils.epath`` path, e.g.
``gs://bucket/run``.
"""

from __future__ import annotations

import math

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from diffusion_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")


class NonFiniteLossError(FloatingPointError):
    """The loss, the gradient norm or the parameter update's norm became NaN/inf."""


def _check_finite(step_metrics: list[dict], first_step: int):
    for offset, metrics in enumerate(step_metrics):
        bad = [k for k in ("loss", "grad_norm", "update_norm") if not _is_finite(metrics[k])]
        if bad:
            raise NonFiniteLossError(
                f"Non-finite {', '.join(bad)} at step {first_step + offset + 1} "
                f"({', '.join(f'{k}={metrics[k]}' for k in bad)}). Stopping without saving; the "
                "last checkpoint is intact. Lower optim.learning_rate, raise "
                "optim.warmup_steps or check the data."
            )


def _is_finite(value) -> bool:
    return math.isfinite(float(value))


def train_and_evaluate(config, workdir) -> dict[str, float]:
    """Runs (or resumes) training in ``workdir``; returns the last logged metrics."""
    import jax
    import numpy as np

    from diffusion_jax import (
        checkpointing,
        config_lib,
        generate,
        input_pipeline,
        latents,
        posthoc_ema,
        pretrained,
        reporting,
        sharding,
        train_eval,
        train_step,
    )

    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    train_eval.check_config(config)
    workdir = epath.Path(workdir)
    tcfg = config.training
    image_shape, num_classes = input_pipeline.dataset_spec(config.data)
    config_lib.check_classes(config, num_classes)
    config_lib.check_sampling_labels(config, num_classes)
    data_iterator = input_pipeline.create_train_iterator(
        config.data, global_batch_size=tcfg.batch_size, seed=config.seed
    )
    mesh = sharding.make_mesh(tcfg.fsdp, tensor=tcfg.tensor_parallel)
    guide = pretrained.load_guide(config, mesh, workdir) if tcfg.sample_every else None
    setup = config_lib.make_train_setup(config, num_classes)
    abstract, shardings = train_step.state_shardings(setup, image_shape, mesh)

    checkpointer = checkpointing.Checkpointer(workdir, keep=tcfg.keep_checkpoints)
    latest = checkpointer.latest_step()
    recorded = _recorded_config(workdir, checkpointer, latest)
    changes = []
    if latest is not None and recorded is not None:
        try:  # before anything is written: a refused resume leaves the workdir as it was
            changes = config_lib.check_resume(recorded, config, f"{workdir} (step {latest})")
        except config_lib.ConfigError:
            checkpointer.close()
            raise
    if latest is None:
        state = train_step.create_train_state(setup, image_shape, shardings, config.seed)
    else:
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        state = checkpointer.restore(latest, target, data_iterator)
        logging.info(
            "Resumed from step %d in %s%s",
            latest,
            checkpointer.directory,
            f" with changed {', '.join(changes)}" if changes else "",
        )
    if jax.process_index() == 0:
        config_lib.record(workdir, config, recorded, latest or 0)

    step_fn = train_step.make_train_step(setup, mesh, shardings)
    num_preview = config.sampling.num_samples
    generate_fn, preview_labels = None, None
    if tcfg.sample_every:
        generate_fn = generate.make_generate_fn(
            config,
            setup.model,
            mesh,
            shardings.ema_params,
            num_preview,
            guide,
            latents.load_decoder(config, mesh),
        )
        preview_labels = generate.sample_labels(config, num_classes, np.arange(num_preview))
    evaluations = train_eval.build(config, workdir, mesh, setup.model, shardings.ema_params)
    reporter = reporting.Reporter(
        workdir,
        total_steps=tcfg.num_steps,
        batch_size=tcfg.batch_size,
        active=jax.process_index() == 0,
    )
    stop = checkpointing.StopSignal() if jax.process_count() == 1 else None
    step = int(jax.device_get(state.step))
    train_eval.resume(evaluations, step, state.ema_params, reporter)
    reporter.start(step)
    pending: list = []  # device metrics of the steps since the last check
    last_logged: dict[str, float] = {}

    def drain():
        nonlocal pending
        fetched = jax.device_get(pending)
        _check_finite(fetched, step - len(fetched))
        pending = []
        return fetched

    try:
        while step < tcfg.num_steps:
            batch = sharding.global_batch(mesh, next(data_iterator))
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append(metrics)
            if step % tcfg.log_every == 0 or step == tcfg.num_steps:
                fetched = drain()
                last_logged = train_step.average_metrics(fetched)
                reporter.log_train(step, last_logged)
            if generate_fn is not None and step % tcfg.sample_every == 0:
                images = generate_fn(state.ema_params, jax.random.PRNGKey(config.seed + step), 0)
                images = generate.to_host(images)[:num_preview]
                reporter.save_samples(step, images, preview_labels)
            if tcfg.posthoc_ema_stds and (
                step % tcfg.posthoc_ema_every == 0 or step == tcfg.num_steps
            ):
                drain()
                posthoc_ema.write_snapshots(workdir, step, state.posthoc_ema, tcfg.posthoc_ema_stds)
            stopping = (stop is not None and stop.received) or checkpointer.reached_preemption(step)
            evaluating = evaluations is not None and bool(evaluations.due(step))
            if (
                stopping
                or evaluating
                or step % tcfg.checkpoint_every == 0
                or step == tcfg.num_steps
            ):
                drain()
                checkpointer.save(step, state, data_iterator, config, force=stopping)
            if stopping:  # an evaluation of this step is left to the resumed run
                logging.info(
                    "Stop requested (%s): saved step %d, exiting.",
                    stop.received if stop else "preemption",
                    step,
                )
                break
            if evaluating:
                # A complete checkpoint first: a run killed while evaluating resumes here.
                checkpointer.wait()
                evaluations.run(step, state.ema_params, reporter)
                reporter.start(step)  # steps/s of the training alone
    finally:
        checkpointer.wait()
        checkpointer.close()
        reporter.close()
        if stop is not None:
            stop.restore_handlers()
    return last_logged


def _recorded_config(workdir, checkpointer, latest: int | None):
    """The config the latest checkpoint was trained with; for a checkpoint saved before
    checkpoints recorded it, or when there is none, the workdir's ``config.json`` (a run
    that saved nothing yet); None in a new workdir."""
    from diffusion_jax import config_lib

    saved = None if latest is None else checkpointer.saved_config(latest)
    if saved is not None:
        return config_lib.from_dict(saved, source=f"checkpoint {latest}")
    if (workdir / "config.json").exists():
        return config_lib.load(workdir)
    if latest is not None:
        logging.warning(
            "Checkpoint %d in %s records no config and there is no config.json: resuming "
            "without checking the config",
            latest,
            checkpointer.directory,
        )
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    runtime.init_runtime()
    from diffusion_jax import checkpointing, config_lib

    runtime.run_or_exit(
        lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value),
        (config_lib.ConfigError, checkpointing.CheckpointError, NonFiniteLossError, ValueError),
    )


if __name__ == "__main__":
    app.run(main, flags_parser=runtime.parse_flags)
