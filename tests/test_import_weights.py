"""Importing DiT weights into a workdir (diffusion_jax.import_weights): the evaluation program
restores exactly the file's parameters and samples from them; a config whose DiT is not the
file's, and a workdir that has a checkpoint, are refused before anything is written."""

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from diffusion_jax import (
    checkpointing,
    config_defaults,
    config_lib,
    dit_weights,
    evaluators,
    import_weights,
    pretrained,
    sharding,
)
from tests.test_dit_weights import DEPTH, HEADS, D, random_official


def _config():
    """The digits (8x8x1, 10 classes) with the small DiT of test_dit_weights, class-conditional
    with a learned variance, sampled with 4 DDPM steps."""
    config = config_defaults.get_config_digits()
    config_defaults.use_network(
        config, "dit", patch_size=2, hidden_size=D, depth=DEPTH, num_heads=HEADS
    )
    config.model.class_conditional = True
    config.model.label_dropout = 0.1
    config.diffusion.var_type = "learned_range"
    config.sampling.update(num_steps=4)
    return config


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "dit.safetensors"
    save_file(random_official(seed=3, channels=1), path)
    return path


def test_imported_weights_are_what_the_evaluation_program_restores_and_samples(weights, tmp_path):
    workdir = tmp_path / "run"
    count = import_weights.import_into_workdir(_config(), workdir, weights, HEADS)
    want, _ = dit_weights.load_params(weights, HEADS)
    assert count == sum(a.size for a in jax.tree_util.tree_leaves(want))

    config, step = pretrained.load_config(workdir, None, None)
    assert step == 0
    _, restored, _ = pretrained.restore_ema(config, workdir, 0, sharding.make_mesh(1))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored), want)

    result = evaluators.evaluate(workdir, "sample", overrides={"eval.num_samples": 6})
    shards = list((workdir / "eval" / "samples_step0").glob("*.npz"))
    images = np.concatenate([np.load(s)["images"] for s in shards])
    assert result["num_samples"] == 6 and images.shape == (6, 8, 8, 1)
    assert images.std() > 0  # not the zero output of a fresh DiT's zero-initialised final layer

    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(checkpointing.CheckpointError, match="already has checkpoint 0"):
        import_weights.import_into_workdir(_config(), workdir, weights, HEADS)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


@pytest.mark.parametrize(
    "override, named",
    [
        (("model", "dit", "hidden_size", 64), "hidden_size 64 (set by model.dit.hidden_size)"),
        (("diffusion", "var_type", "fixed_large"), "out_channels 1"),
        (("model", "dit", "numerics", "diffusers"), "numerics 'diffusers'"),
        (("model", "class_conditional", False), "num_classes None"),
    ],
)
def test_a_config_of_another_dit_is_refused_and_nothing_written(weights, tmp_path, override, named):
    config = _config()
    *group, key, value = override
    target = config
    for name in group:
        target = target[name]
    target[key] = value
    if key == "class_conditional":
        config.model.label_dropout = 0.0
    with pytest.raises(config_lib.ConfigError, match="The config's DiT is not the weights'") as e:
        import_weights.import_into_workdir(config, tmp_path / "run", weights, HEADS)
    assert named in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
