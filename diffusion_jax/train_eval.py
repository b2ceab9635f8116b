"""Evaluation during training: every ``training.eval_every`` steps the training program scores
its EMA parameters with the evaluation program's own code (``evaluators``, modes
``evaluators.TRAINING_MODES``), on the training mesh and parameter layout.

Settings: the config's ``eval`` group, as the evaluation program reads it, but for
``eval.num_samples`` (``training.eval_num_samples``: fid's samples, generated in memory) and
``eval.num_examples`` (``training.eval_num_examples``: bpd's and accuracy's first examples of
``eval.split``). The evaluation functions are built once, before the loop, and compile on their
first call.

Each evaluation of step s appends one JSON line ``{"step", "mode", "metrics", "seconds"}`` to
``eval/during_training.jsonl`` (``metrics``: what the evaluation program writes to
``eval/<mode>_step<s>.json`` for the same settings, without the config) by writing the whole file
anew and renaming it, so a kill never leaves a partial line; and TensorBoard scalars
``eval/<mode>/<metric>``. The modes' own files (bpd's sums, accuracy's per-example arrays) go to
``eval/during_training/``.

Preemption: an evaluation step is a checkpoint step; the loop saves it, waits until the
checkpoint is complete, then evaluates, and only then trains on. So the one evaluation step
without all its lines that a resumed run can find is the step it restored (a stop signal saved it
and exited, or a kill came during its evaluation): it evaluates the missing modes of that step
first, from the restored parameters, which are the interrupted run's bit for bit, and gets the
same numbers (evaluation is a function of the parameters and ``eval.seed``). A line is never
written twice. Evaluation steps before the restored one without lines (evaluation turned on, or
``eval_every`` changed, on resume) are skipped with a warning: their parameters are gone.
Multi-host: every process reads the log (the workdir is shared, as for checkpoints), process 0
writes it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

from absl import logging
from etils import epath

from diffusion_jax import config_lib, evaluators
from diffusion_jax.evaluators import common

LOG_NAME = "during_training.jsonl"


def check_config(config) -> None:
    """Raises ``ConfigError`` (one line) when evaluation during training is on
    (``training.eval_every`` > 0) and ``training.eval_modes`` is empty, repeats a mode, names
    one the training program cannot run, or one that does not apply to this run (where the
    evaluation program would refuse it: another kind of network, a model of latents, fid of
    RGB images without ``eval.inception_weights``)."""
    tcfg = config.training
    if not tcfg.eval_every:
        return
    modes = tuple(tcfg.eval_modes)
    key = f"Config key 'training.eval_modes' ({modes})"
    valid = ", ".join(evaluators.TRAINING_MODES)
    if not modes:
        raise config_lib.ConfigError(
            f"{key} is empty but 'training.eval_every' is {tcfg.eval_every}: name modes of "
            f"{valid}, or set eval_every to 0"
        )
    for mode in modes:
        if mode not in evaluators.TRAINING_MODES:
            raise config_lib.ConfigError(f"{key}: {mode!r} is not a mode; valid: {valid}")
    if len(set(modes)) != len(modes):
        raise config_lib.ConfigError(f"{key} names a mode twice")
    for mode in modes:
        try:
            evaluators.check_mode(mode, config, "this run", evaluators.TRAINING_MODES)
            if mode == "fid" and config.data.name != "latents":  # latents: checked on build
                from diffusion_jax.evaluators import fid

                fid.check_feature_network(config)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"{key}: {e}") from e


def eval_config(config):
    """``config`` with ``eval.num_samples`` and ``eval.num_examples`` set to
    ``training.eval_num_samples`` and ``training.eval_num_examples`` (a copy)."""
    config = config.copy_and_resolve_references()
    config.eval.num_samples = config.training.eval_num_samples
    config.eval.num_examples = config.training.eval_num_examples
    return config


def read_log(path) -> list[dict]:
    """The records of an evaluation log (``eval/during_training.jsonl``), in order; [] when
    there is none."""
    path = epath.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _append(path: epath.Path, record: dict) -> None:
    """Adds ``record`` as one line: the file is written whole and renamed, so a reader (or a
    kill) sees the old lines or the new ones, never part of a line."""
    text = path.read_text() if path.exists() else ""
    common.write_atomically(path, (text + json.dumps(record) + "\n").encode())


@dataclasses.dataclass
class Evaluations:
    """The evaluations of one training run: ``evaluate_fns`` (mode -> ``evaluate(ctx)``, built
    once) on ``context`` (the run's evaluation config, mesh, model and parameter layout) with
    each step's parameters; ``logged`` holds the ``(step, mode)`` of the log's lines."""

    context: common.Context
    every: int
    evaluate_fns: dict[str, Callable[[common.Context], dict]]
    log_path: epath.Path
    logged: set[tuple[int, str]]

    def due(self, step: int) -> list[str]:
        """The modes to evaluate at ``step``: all of them at a multiple of ``every``, less
        those already in the log."""
        if step % self.every:
            return []
        return [mode for mode in self.evaluate_fns if (step, mode) not in self.logged]

    def missed(self, step: int) -> list[int]:
        """The evaluation steps before ``step`` that lack a line of some mode."""
        return [s for s in range(self.every, step, self.every) if self.due(s)]

    def run(self, step: int, ema_params, reporter) -> None:
        """Evaluates the due modes of ``step`` from ``ema_params``, logging each (every process
        must call it)."""
        ctx = dataclasses.replace(self.context, step=step, params=ema_params)
        for mode in self.due(step):
            start = time.perf_counter()
            result = self.evaluate_fns[mode](ctx)
            seconds = time.perf_counter() - start
            if ctx.is_main:
                record = {"step": step, "mode": mode, "metrics": result, "seconds": seconds}
                _append(self.log_path, record)
            self.logged.add((step, mode))
            reporter.log_eval(step, mode, result, seconds, evaluators.summary(mode, result))


def build(config, workdir, mesh, model, param_sharding) -> Evaluations | None:
    """The ``Evaluations`` of a training run of ``config`` in ``workdir`` (None when
    ``training.eval_every`` is 0): ``model``'s EMA parameters laid out as ``param_sharding``
    over ``mesh``. Builds every mode's functions (fid: the feature network and the reference
    features, computed or read from their cache) and reads the log."""
    if not config.training.eval_every:
        return None
    cfg = eval_config(config)
    workdir = epath.Path(workdir)
    context = common.Context(
        config=cfg,
        workdir=workdir,
        step=0,
        mesh=mesh,
        model=model,
        objective=config_lib.make_objective(cfg),
        params=None,
        param_sharding=param_sharding,
        eval_dir=workdir / "eval" / "during_training",
    )
    log_path = workdir / "eval" / LOG_NAME
    return Evaluations(
        context=context,
        every=config.training.eval_every,
        evaluate_fns={
            mode: evaluators.make_evaluate(mode, context) for mode in cfg.training.eval_modes
        },
        log_path=log_path,
        logged={(record["step"], record["mode"]) for record in read_log(log_path)},
    )


def resume(evaluations: Evaluations | None, step: int, ema_params, reporter) -> None:
    """At the start of a run restored at ``step``: evaluates that step's missing modes (an
    evaluation the previous run did not finish) and warns of earlier evaluation steps that
    lack lines."""
    if evaluations is None or step == 0:
        return
    missed = evaluations.missed(step)
    if missed:
        logging.warning(
            "Evaluation steps %s have no line in %s; resuming from step %d, their parameters "
            "are gone: skipped",
            missed,
            evaluations.log_path,
            step,
        )
    evaluations.run(step, ema_params, reporter)
