"""``python -m diffusion_jax.models summary --config=FILE [--config.KEY=VALUE ...]``: the
network of a config, its parameters by module and its forward GFLOP (``models.summary``)."""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")


def main(argv):
    if argv[1:] != ["summary"]:
        raise app.UsageError("usage: python -m diffusion_jax.models summary --config=FILE")
    from diffusion_jax.models import summary

    print(summary.main(_CONFIG.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
