"""Evaluates a trained workdir.

``python -m diffusion_jax.evaluate --workdir=DIR --mode=MODE [--mode=MODE ...] [--step=N]
[--config.eval.KEY=V]``

Takes the config the latest checkpoint (or ``--step``) was trained with (recorded in it;
``--config.*`` flags override keys of it), restores that checkpoint's EMA parameters and runs
one mode:

  - ``bpd``: the variational bound in bits/dim over ``eval.split`` (resumable);
  - ``sample``: ``eval.num_samples`` samples as uint8 ``.npz`` shards plus a grid (resumable);
  - ``fid``: FID, Inception Score, KID and precision/recall of the sample directory against
    ``eval.reference_split`` (cached reference features);
  - ``figures``: the DDPM paper's figures 5, 6, 7 and 9 as PNG (and the rate-distortion data);
  - ``accuracy`` (a noisy-image classifier's workdir, ``model.kind`` "classifier"): accuracy and
    cross-entropy over ``eval.split``, overall and by quarter of t. The other modes evaluate
    a denoiser; a mode for the other kind stops with one line.

Each writes ``DIR/eval/<mode>_step<N>.json`` (its numbers, the step and the config) and prints
a one-line summary. Several ``--mode`` flags run their modes in that order in one process (e.g.
``--mode=sample --mode=fid``: one start-up, one multi-host initialisation). Multi-host like
training: the same command on every process.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import config_defaults, runtime
from diffusion_jax.evaluators import MODES

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (local or gs://...).")
_MODES = flags.DEFINE_multi_enum(
    "mode", None, list(MODES), "What to evaluate; repeated, the modes run in that order."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_CONFIG = config_flags.DEFINE_config_dict(
    "config",
    config_defaults.get_config(),
    "Overrides of the checkpoint's config, e.g. --config.eval.num_samples=1000.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None or not _MODES.value:
        raise app.UsageError("--workdir and --mode are required")
    runtime.init_runtime()
    from diffusion_jax import checkpointing, config_lib, evaluators

    overrides = config_flags.get_override_values(flags.FLAGS["config"])

    def evaluate_each():
        for mode in _MODES.value:
            evaluators.evaluate(_WORKDIR.value, mode, _STEP.value, overrides)

    runtime.run_or_exit(
        evaluate_each,
        (config_lib.ConfigError, checkpointing.CheckpointError, ValueError, OSError, ImportError),
    )


if __name__ == "__main__":
    app.run(main, flags_parser=runtime.parse_flags)
