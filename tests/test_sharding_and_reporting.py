import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from PIL import Image

from diffusion_jax import reporting, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_param_spec_rule():
    assert sharding.param_spec((3, 3, 128, 256), 1) == P()
    assert sharding.param_spec((128,), 4) == P()  # too small to be worth sharding
    assert sharding.param_spec((3, 3, 128, 256), 4) == P(None, None, None, "fsdp")
    assert sharding.param_spec((3, 3, 130, 258), 4) == P()  # nothing divisible by 4
    assert sharding.param_spec((512, 130), 2) == P("fsdp", None)


# The partition specs of the train state on 4 CPU devices (a process of its own: this one has
# 1 device) with fsdp=2, T=2000 and importance-sampled t: a [2000, 10] loss history has more
# elements than the size rule's threshold.
_STATE_SPECS = textwrap.dedent(
    """\
    import json
    from diffusion_jax import xla_flags
    xla_flags.configure(cpu_devices=4)
    import jax
    from diffusion_jax import config_defaults, config_lib, sharding, train_step
    config = config_defaults.get_config()
    config.model.unet.ch_mult = (1, 2)
    config.diffusion.num_timesteps = 2000
    config.diffusion.loss_type = "hybrid"
    config.diffusion.timestep_sampling = "importance"
    config.training.fsdp = 2
    _, shardings = train_step.state_shardings(
        config_lib.make_train_setup(config), (8, 8, 3), sharding.make_mesh(2)
    )
    print(json.dumps({
        jax.tree_util.keystr(path): [str(s.spec), s.mesh.devices.size]
        for path, s in jax.tree_util.tree_leaves_with_path(shardings)
    }))
    """
)


def test_fsdp_shards_parameters_and_optimizer_state_only():
    result = subprocess.run(
        [sys.executable, "-c", _STATE_SPECS],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    specs = json.loads(result.stdout)
    assert {devices for _, devices in specs.values()} == {4}
    groups = {}
    for path, (spec, _) in specs.items():
        groups.setdefault(path.split(".")[1].split("[")[0], set()).add(spec)
    assert set(groups) == {"step", "params", "ema_params", "opt_state", "rng", "loss_history"}
    for name in ("params", "ema_params", "opt_state"):
        assert any("fsdp" in spec for spec in groups[name]), name
    for name in ("step", "rng", "loss_history"):
        assert groups[name] == {str(P())}, name


def test_mesh_and_global_batch_single_process():
    mesh = sharding.make_mesh(1)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.devices.size == jax.device_count()
    batch = sharding.global_batch(mesh, {"image": np.ones((4, 2, 2, 1), np.float32)})
    assert batch["image"].shape == (4, 2, 2, 1)
    assert batch["image"].sharding == sharding.batch_sharding(mesh)


def test_image_grid_layout_and_png(tmp_path):
    images = np.stack([np.full((2, 3, 1), v) for v in (-1.0, 0.0, 1.0)])
    grid = reporting.image_grid(images)
    # 3 images -> 2 columns x 2 rows of 2x3 tiles with 1-pixel grey gaps; -1 -> 0, 1 -> 255.
    assert grid.shape == (2 * 3 - 1, 2 * 4 - 1, 1) and grid.dtype == np.uint8
    assert grid[0, 0, 0] == 0 and grid[0, 4, 0] == 128 and grid[3, 0, 0] == 255
    assert grid[2, 0, 0] == 128 and grid[0, 3, 0] == 128  # the gaps
    path = reporting.save_png(tmp_path / "g.png", images, scale=2)
    with Image.open(path) as im:
        assert im.size == (14, 10) and im.mode == "L"


def test_average_metrics_weights_quarters_by_their_examples():
    from diffusion_jax.train_step import average_metrics

    empty = {f"loss_q{q}_{k}": 0.0 for q in range(4) for k in ("sum", "count")}
    step1 = dict(empty, loss=1.0, loss_q0_sum=3.0, loss_q0_count=3.0)
    step2 = dict(
        empty, loss=3.0, loss_q0_sum=1.0, loss_q0_count=1.0, loss_q1_sum=2.0, loss_q1_count=1.0
    )
    out = average_metrics([step1, step2])
    assert out["loss"] == 2.0
    assert out["loss_q0"] == 1.0  # (3 + 1) / 4 examples
    assert out["loss_q1"] == 2.0  # only step 2 had an example there
    assert "loss_q2" not in out and "loss_q0_sum" not in out  # no example, no value
