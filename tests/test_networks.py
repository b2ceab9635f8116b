"""The network registry: ``model.name`` and its config group, validation before compiling,
configs saved before the registry, the model summary, and rematerialisation."""

import functools
import json
import re

import chex
import jax
import numpy as np
import pytest

from diffusion_jax import config_defaults, config_lib, sharding, train_step
from diffusion_jax.models import DiT, UNet, summary
from tests.test_train import _config, _tiny

TINY_DIT = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2)


def tiny_dit(**overrides):
    return config_defaults.use_network(_tiny(**overrides), "dit", **TINY_DIT)


def test_model_name_picks_the_network_with_its_groups_attributes():
    unet = config_lib.make_model(config_lib.validate(_tiny()))
    assert isinstance(unet, UNet) and (unet.ch, unet.ch_mult) == (32, (1,))
    config = tiny_dit(**{"model.class_conditional": True, "training.remat": "block"})
    dit = config_lib.make_model(config_lib.validate(config), num_classes=10)
    assert isinstance(dit, DiT)
    assert (dit.patch_size, dit.hidden_size, dit.depth, dit.num_heads) == (2, 32, 2, 2)
    assert (dit.out_channels, dit.num_classes, dit.null_label, dit.remat) == (1, 10, True, True)
    config.model.dit.scan_blocks = True
    assert config_lib.make_model(config_lib.validate(config)).scan_blocks


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.unet.ch": 64}, "Config key 'model.unet.ch' (64) is an option of network 'unet'"),
        ({"model.dit.patch_size": 3}, "'model.dit.patch_size' (3) must divide 'data.image_size'"),
        ({"model.dit.num_heads": 3}, "'model.dit.num_heads' (3) must divide"),
        ({"model.dit.hidden_size": 34, "model.dit.num_heads": 1}, "must be divisible by 4"),
        ({"model.kind": "classifier"}, "model.kind 'classifier' is the U-Net's down half"),
        ({"training.remat": "all"}, "training.remat"),
        (
            {"model.dit.scan_blocks": True},
            "Config key 'model.dit.scan_blocks' needs training.remat='block' (got 'none')",
        ),
    ],
)
def test_dit_config_errors_name_the_key(overrides, message):
    config = tiny_dit()
    config_lib.apply_overrides(config, overrides)
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.dit.depth": 4}, "Config key 'model.dit.depth' (4) is an option of network 'dit'"),
        ({"model.unet.num_heads": 3}, "'model.unet.num_heads' (3) must divide the channels"),
        ({"model.unet.num_head_channels": 12}, "'model.unet.num_head_channels' (12) must divide"),
        (
            {
                "model.class_conditional": True,
                "model.label_dropout": 0.1,
                "model.null_label": False,
            },
            "needs 'model.null_label' True",
        ),
    ],
)
def test_unet_config_errors_name_the_key(overrides, message):
    config = config_lib.apply_overrides(_tiny(), overrides)
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.validate(config)


def test_configs_saved_before_the_registry_load_with_their_unet_keys():
    config = config_lib.validate(_config("digits"))
    saved = json.loads(config.to_json_best_effort())
    model = saved["model"]
    for key in ("name", "null_label", "dit"):
        del model[key]
    unet = model.pop("unet")
    for key in ("scale_shift_norm", "num_heads", "num_head_channels", "resblock_updown"):
        del unet[key]
    model.update(unet)  # flat, as runs saved them
    loaded = config_lib.from_dict(saved, source="an old run")
    assert config_lib.differences(config, loaded) == {}
    assert loaded.model.unet.ch == 32 and loaded.model.name == "unet"


def test_use_network_resets_the_other_networks_group():
    config = config_defaults.use_network(_config("digits"), "dit", depth=3)
    assert config.model.unet.ch == 128 and config.model.dit.depth == 3
    assert config.model.dit.hidden_size == config_defaults.get_config().model.dit.hidden_size


@pytest.mark.parametrize(
    "name, parameters",
    # improved-diffusion's and guided-diffusion's own counts of these networks.
    [("cifar10_improved", 52_546_438), ("imagenet64_adm", 295_904_454), ("cifar10", 35_746_307)],
)
def test_summary_counts_the_papers_networks(name, parameters):
    result = summary.summarize(config_lib.validate(_config(name)), num_classes=1000)
    assert result["parameters"] == parameters == sum(result["modules"].values())
    text = summary.format_summary(result)
    assert f"parameters: {parameters:,}" in text.splitlines()


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_summary_gflop_is_xlas_count_of_the_forward_pass(scan_blocks):
    # Scanned blocks are counted unrolled (XLA's count of a scan has its body once).
    # A tiny DiT of 16 tokens, width 32, 2 blocks, counted by hand (2 FLOP per multiply-add):
    # per block qkv 3*32*32, proj 32*32, mlp 2*32*128 MACs per token, attention logits and
    # values 2*16*32 per token, adaLN 32*192 per example; patch conv 4*32 and final linear
    # 32*4 per token; the t-embedder 256*32 + 32*32 per example.
    overrides = {"model.dit.scan_blocks": scan_blocks, "training.remat": "block"}
    result = summary.summarize(config_lib.validate(tiny_dit(**overrides)))
    tokens, width = 16, 32
    per_token = 2 * (4 * width * width + 2 * width * 4 * width + 2 * tokens * width) + 2 * 4 * width
    macs = tokens * per_token + 2 * width * 6 * width + 256 * width + width * width
    macs += tokens * 4 * width + width * 2 * width
    # Elementwise work (norms, softmax, GELU) adds a few percent on top of the matmuls.
    assert 1.0 <= result["forward_gflop"] * 1e9 / (2 * macs) < 1.15, result["forward_gflop"]


@functools.cache
def _one_step(remat: str, network: str):
    """Parameters after one train step of a tiny network with ``training.remat``."""
    config = tiny_dit() if network == "dit" else _tiny()
    config = config_lib.validate(
        config_lib.apply_overrides(config, {"training.remat": remat, "training.batch_size": 8})
    )
    setup = config_lib.make_train_setup(config)
    mesh = sharding.make_mesh()
    _, shardings = train_step.state_shardings(setup, (8, 8, 1), mesh)
    state = train_step.create_train_state(setup, (8, 8, 1), shardings, config.seed)
    step = train_step.make_train_step(setup, mesh, shardings)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    batch = sharding.global_batch(mesh, {"image": images, "label": np.zeros(8, np.int32)})
    lowered = step.lower(state, batch).as_text()
    state, metrics = step(state, batch)
    return jax.device_get(state.params), float(metrics["loss"]), lowered


@pytest.mark.slow  # compiles four train steps: CI's slow pass
@pytest.mark.parametrize("network", ["unet", "dit"])
def test_remat_trains_the_same_and_recomputes(network):
    params, loss, program = _one_step("block", network)
    plain_params, plain_loss, plain_program = _one_step("none", network)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    chex.assert_trees_all_close(params, plain_params, rtol=1e-5, atol=1e-7)
    # The rematerialised blocks reach the compiler as checkpointed regions (an optimization
    # barrier keeps XLA from merging their recomputation back into the forward pass).
    assert "optimization_barrier" in program and "optimization_barrier" not in plain_program
