"""Tensor parallelism (``training.tensor_parallel``): the sharding rule's specs, what it refuses,
and a tiny DiT trained on 8 simulated CPU devices as 4 x 2 (data x tensor) against 8 x 1: same
losses, half the parameter bytes per device, Megatron's collectives, and exact resume from a
checkpoint written under the other mesh shape.

The 8-device runs happen in a process of their own (this one has 1 device), as in
``test_sharding_and_reporting``.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax import config_defaults, config_lib, sharding
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.unet import UNet

REPO = pathlib.Path(__file__).resolve().parents[1]


def _abstract_params(model, image_shape=(8, 8, 1)):
    """``model``'s parameters as ShapeDtypeStructs (nothing is computed)."""
    x = jax.ShapeDtypeStruct((1,) + image_shape, np.float32)
    t = jax.ShapeDtypeStruct((1,), np.int32)
    return jax.eval_shape(
        lambda x, t: model.init(jax.random.PRNGKey(0), x, t, None, train=False)["params"], x, t
    )


def _param_shapes(model) -> dict[str, tuple[int, ...]]:
    """``{"a/b/kernel": shape}`` of ``model``'s parameters."""
    return {
        "/".join(sharding.path_names(path)): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(_abstract_params(model))
    }


def test_rule_specs_of_the_dit_at_tensor_2_fsdp_2():
    """Every parameter of a DiT (D = 128, 4 heads of 32, MLP 512, patch 2, 8x8x1 images): heads
    and hidden units split column/row over ``tensor``, the adaLN modulations along their input
    units, ends and vectors whole; FSDP takes the largest other dim of the parameters of at
    least 2**14 elements."""
    model = DiT(patch_size=2, hidden_size=128, depth=1, num_heads=4, out_channels=2)
    expected = {
        "x_embedder/kernel": ((2, 2, 1, 128), P()),
        "x_embedder/bias": ((128,), P()),
        "t_embedder/mlp_0/kernel": ((256, 128), P("fsdp", "tensor")),
        "t_embedder/mlp_0/bias": ((128,), P("tensor")),
        "t_embedder/mlp_2/kernel": ((128, 128), P("tensor", "fsdp")),
        "t_embedder/mlp_2/bias": ((128,), P()),
        "blocks_0/adaLN_modulation/kernel": ((128, 768), P("tensor", "fsdp")),
        "blocks_0/adaLN_modulation/bias": ((768,), P()),
        "blocks_0/attn/qkv/kernel": ((128, 3, 4, 32), P("fsdp", None, "tensor", None)),
        "blocks_0/attn/qkv/bias": ((3, 4, 32), P(None, "tensor", None)),
        "blocks_0/attn/proj/kernel": ((4, 32, 128), P("tensor", None, "fsdp")),
        "blocks_0/attn/proj/bias": ((128,), P()),
        "blocks_0/mlp/fc1/kernel": ((128, 512), P("fsdp", "tensor")),
        "blocks_0/mlp/fc1/bias": ((512,), P("tensor")),
        "blocks_0/mlp/fc2/kernel": ((512, 128), P("tensor", "fsdp")),
        "blocks_0/mlp/fc2/bias": ((128,), P()),
        "final_layer/adaLN_modulation/kernel": ((128, 256), P("tensor", "fsdp")),
        "final_layer/adaLN_modulation/bias": ((256,), P()),
        "final_layer/linear/kernel": ((128, 8), P()),
        "final_layer/linear/bias": ((8,), P()),
    }
    shapes = _param_shapes(model)
    assert shapes == {name: shape for name, (shape, _) in expected.items()}
    for name, (shape, spec) in expected.items():
        got = sharding.param_spec(shape, 2, 2, tuple(name.split("/")))
        assert got == spec, (name, got, spec)
    # tensor = 1 leaves the FSDP rule as it was.
    for name, (shape, _) in expected.items():
        names = tuple(name.split("/"))
        assert sharding.param_spec(shape, 2, 1, names) == sharding.param_spec(shape, 2), name


@pytest.mark.parametrize(
    "model, tensor, message",
    [
        (DiT(2, 32, 1, num_heads=4, out_channels=2), 8, r"attention heads of blocks_0/attn/proj"),
        (
            DiT(2, 36, 1, num_heads=4, out_channels=2, mlp_ratio=1.5),
            4,
            r"MLP hidden units of blocks_0/mlp/fc1 \(54\)",
        ),
        (
            UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0),
            2,
            r"attention heads of down_1_attn_0/k \(1\)",
        ),
    ],
)
def test_tensor_parallel_refuses_heads_or_hidden_units_it_cannot_split(model, tensor, message):
    params = _abstract_params(model)
    with pytest.raises(ValueError, match=rf"^Config key 'training.tensor_parallel' \({tensor}\)"):
        sharding.check_tensor_parallel(model, params, tensor)
    with pytest.raises(ValueError, match=message):
        sharding.check_tensor_parallel(model, params, tensor)
    sharding.check_tensor_parallel(model, params, 1)


def test_a_unet_with_heads_tensor_divides_is_accepted():
    model = UNet(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_heads=2
    )
    sharding.check_tensor_parallel(model, _abstract_params(model), 2)


def test_config_tensor_parallel_must_divide_the_devices_with_fsdp():
    config = config_defaults.get_config_digits()
    config.training.fsdp, config.training.tensor_parallel = 2, 2
    config_lib.validate(config, num_devices=4)
    config.training.tensor_parallel = 3
    with pytest.raises(
        config_lib.ConfigError,
        match=r"^Config key 'training.tensor_parallel' \(3\) x 'training.fsdp' \(2\) must divide "
        r"the number of devices \(4\)$",
    ):
        config_lib.validate(config, num_devices=4)
    config.training.tensor_parallel = 0
    with pytest.raises(config_lib.ConfigError, match=r"'training.tensor_parallel' must be >= 1"):
        config_lib.validate(config, num_devices=4)


# 8 CPU devices: a tiny DiT trained 3 steps as 8 x 1 (checkpointed at step 2 with the training
# program's Checkpointer), as 4 x 2 with its blocks rematerialised and scanned
# (``scan_blocks``), and as 4 x 2 from scratch; then the step-2 checkpoint restored onto
# 4 x 2 and stepped once. Prints the numbers as JSON.
_EIGHT_DEVICES = textwrap.dedent(
    """\
    import json, re, sys
    from diffusion_jax import xla_flags
    xla_flags.configure(cpu_devices=8)
    import jax, numpy as np
    from diffusion_jax import (
        checkpointing, config_defaults, config_lib, input_pipeline, sharding, train_step
    )
    from diffusion_jax.models.dit import DiT

    workdir = sys.argv[1]
    config = config_defaults.get_config_digits()  # 8x8x1 digits
    config.diffusion.num_timesteps = 50
    config.diffusion.var_type = "learned_range"  # the DiT's 2 output channels
    config.diffusion.loss_type = "hybrid"
    config.optim.warmup_steps = 0  # the first steps move the parameters
    config.training.batch_size = 16
    model = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=4, out_channels=2)
    setup = config_lib.make_train_setup(config, model=model)
    scanned = model.clone(remat=True, scan_blocks=True)
    image_shape = (8, 8, 1)

    def build(tensor, setup=setup):
        mesh = sharding.make_mesh(1, tensor=tensor)
        abstract, shardings = train_step.state_shardings(setup, image_shape, mesh)
        data = input_pipeline.create_train_iterator(config.data, global_batch_size=16, seed=0)
        return mesh, abstract, shardings, data

    def compiled_step(mesh, shardings, state, data, setup=setup):
        step = train_step.make_train_step(setup, mesh, shardings)
        first = sharding.global_batch(mesh, next(data))
        return step.lower(state, first).compile(), first

    def params_bytes_on_device0(state):
        device = jax.devices()[0]
        return sum(
            shard.data.nbytes
            for leaf in jax.tree_util.tree_leaves(state.params)
            for shard in leaf.addressable_shards
            if shard.device == device
        )

    def host(tree):
        return jax.tree_util.tree_map(np.array, tree)

    out = {}
    checkpointer = checkpointing.Checkpointer(workdir, keep=2, async_save=False)
    scanned_setup = config_lib.make_train_setup(config, model=scanned)
    runs = (("8x1", 1, setup), ("4x2_scanned", 2, scanned_setup), ("4x2", 2, setup))
    for name, tensor, run_setup in runs:
        mesh, abstract, shardings, data = build(tensor, run_setup)
        state = train_step.create_train_state(run_setup, image_shape, shardings, config.seed)
        out[f"bytes_{name}"] = params_bytes_on_device0(state)
        step, batch = compiled_step(mesh, shardings, state, data, run_setup)
        losses = []
        for i in range(3):
            if i:
                batch = sharding.global_batch(mesh, next(data))
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            if name == "8x1" and i == 1:
                out["params_at_2"] = host(state.params)
                checkpointer.save(2, state, data, config)
        out[f"losses_{name}"] = losses
        out[f"specs_{name}"] = {
            jax.tree_util.keystr(path): str(s.spec)
            for path, s in jax.tree_util.tree_leaves_with_path(shardings.params)
        }
    hlo = step.as_text()  # 4 x 2

    # Resume: the 8 x 1 checkpoint of step 2 onto 4 x 2, then one step (the compiled 4 x 2 one).
    mesh, abstract, shardings, data = build(2)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    restored = checkpointer.restore(2, target, data)
    checkpointer.close()
    out["restored_specs"] = sorted(
        {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(restored.params)}
    )
    params = host(restored.params)
    out["restored_equal"] = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(out.pop("params_at_2"))
        )
    )
    _, metrics = step(restored, sharding.global_batch(mesh, next(data)))
    out["resumed_loss"] = float(metrics["loss"])

    # The 4 x 2 program's collectives: (op, result shape, op_name of the metadata).
    out["collectives"] = []
    for line in hlo.splitlines():
        op = re.search(
            r" (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\\(", line
        )
        if op and "= " in line:
            name = re.search(r'op_name="([^"]*)"', line)
            shape = line[line.index("= ") + 2 : op.start()]
            out["collectives"].append([op.group(1), shape, name.group(1) if name else ""])
    out["param_shapes"] = [
        list(leaf.shape) for leaf in jax.tree_util.tree_leaves(abstract.params)
    ]
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    result = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICES, str(tmp_path_factory.mktemp("tp"))],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow  # one 8-device training subprocess: CI's slow pass
def test_four_by_two_trains_like_eight_by_one_on_half_the_bytes(eight_devices):
    """Same losses over 3 steps (float32 round-off: the tensor group sums its heads' and hidden
    units' parts in another order), the 4 x 2 parameters really split over ``tensor``, and
    device 0 holds half the parameter bytes within 3%."""
    out = eight_devices
    np.testing.assert_allclose(out["losses_4x2"], out["losses_8x1"], rtol=1e-5)
    # The same with the blocks rematerialised and scanned over their stacked, split parameters.
    np.testing.assert_allclose(out["losses_4x2_scanned"], out["losses_8x1"], rtol=1e-5)
    assert out["specs_4x2_scanned"] == out["specs_4x2"]
    assert all(spec == str(P()) for spec in out["specs_8x1"].values())
    assert out["specs_4x2"]["['blocks_0']['attn']['qkv']['kernel']"] == str(
        P(None, None, "tensor", None)
    )
    ratio = out["bytes_4x2"] / out["bytes_8x1"]
    assert abs(ratio - 0.5) < 0.015, (ratio, out["bytes_4x2"], out["bytes_8x1"])


@pytest.mark.slow  # one 8-device training subprocess: CI's slow pass
def test_four_by_two_program_is_megatrons(eight_devices):
    """The compiled 4 x 2 step all-gathers no weight (no all-gather's result has the shape of
    a parameter), moves no activation by all-to-all or permute, and in the forward pass
    all-reduces the output of each block's attention projection and MLP (row-parallel)."""
    out = eight_devices
    kinds = [kind for kind, _, _ in out["collectives"]]
    assert "all-to-all" not in kinds and "collective-permute" not in kinds, kinds
    weight_shapes = {
        f"f32[{','.join(map(str, shape))}]" for shape in out["param_shapes"] if len(shape) > 1
    }
    gathered = [shape for kind, shape, _ in out["collectives"] if kind == "all-gather"]
    for shape in gathered:
        assert re.sub(r"\{.*", "", shape) not in weight_shapes, (shape, gathered)
    forward = [name for kind, _, name in out["collectives"] if kind == "all-reduce"]
    forward = [name for name in forward if "jvp(DiT)" in name and "transpose" not in name]
    for block in range(2):
        for layer in ("attn/proj", "mlp/fc2"):
            assert any(f"blocks_{block}/{layer}/dot_general" in n for n in forward), forward


@pytest.mark.slow  # one 8-device training subprocess: CI's slow pass
def test_checkpoint_of_eight_by_one_resumes_exactly_on_four_by_two(eight_devices):
    """The step-2 checkpoint written under 8 x 1 restores onto 4 x 2 (split over ``tensor``)
    with the same parameters bit for bit, and the next step's loss is 8 x 1's step 3 within
    round-off."""
    out = eight_devices
    assert out["restored_equal"]
    assert any("tensor" in spec for spec in out["restored_specs"]), out["restored_specs"]
    np.testing.assert_allclose(out["resumed_loss"], out["losses_8x1"][2], rtol=1e-5)
