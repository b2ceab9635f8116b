"""Train-step throughput of a config's model (default: DDPM CIFAR-10, 35.7M parameters).

    python bench/train.py                     # batch 32, float32, 3 timed steps
    python bench/train.py --batch 8 --steps 2 --ch 32           # quick run
    python bench/train.py --ch 16 --ch_mult 1 --num_res_blocks 1 --image_size 8 --batch 2

Uses the training program's own pieces: ``sharding.make_mesh``,
``train_step.create_train_state`` and the jitted, donated ``train_step.make_train_step``, fed
synthetic batches of the config's shape (no data set needed). Prints one JSON line with the
state initialisation time, the compile time, the time to the first step (compile + one step),
the best and mean images/s over the timed steps, and the peak host memory (maxrss) so far.

On a GPU (``jax.devices()[0].platform == "gpu"``) a second line follows: bfloat16 compute at
``--gpu_batch`` with the model FLOPs utilisation ``images/s * --flops_per_image / --peak_flops``
(37.3e9 FLOPs per image per step: 3x the 12.4 GFLOP forward of the DDPM CIFAR-10 network, so
MFU is only reported for that network, i.e. without --ch/--ch_mult/--num_res_blocks/
--image_size overrides; 989e12 is the H100 SXM dense bf16 peak).
"""

import argparse
import functools
import importlib.util
import os
import resource
import sys

from diffusion_jax import xla_flags  # noqa: E402

xla_flags.configure()  # the training program's XLA settings, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, time_compile, timed  # noqa: E402

from diffusion_jax import config_lib, sharding, train_step  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, args):
    """``get_config()`` of the file at ``path`` with the command-line overrides, validated."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.training.batch_size = args.batch
    config.training.compute_dtype = args.dtype
    for key, value in (
        ("ch", args.ch),
        ("ch_mult", args.ch_mult),
        ("num_res_blocks", args.num_res_blocks),
    ):
        if value is not None:
            config.model[key] = value
    # GroupNorm(32) needs >= 32 channels; smaller smoke-run networks use ch groups.
    config.model.num_groups = min(config.model.num_groups, config.model.ch)
    if args.image_size is not None:
        config.data.image_size = args.image_size
    return config_lib.validate(
        config, num_devices=jax.device_count(), process_count=jax.process_count()
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_train_step(config, num_steps: int, num_classes: int) -> dict:
    """Times init, compile and ``num_steps`` train steps after the first; returns the fields."""
    data = config.data
    image_shape = (data.image_size, data.image_size, data.channels)
    mesh = sharding.make_mesh(config.training.fsdp)
    model = config_lib.make_model(config, num_classes)
    schedule = config_lib.make_schedule(config)
    optimizer, lr_schedule = train_step.make_optimizer(config.optim)
    _, shardings = train_step.state_shardings(config, model, optimizer, image_shape, mesh)

    state, init_s = timed(
        lambda: train_step.create_train_state(config, model, optimizer, image_shape, shardings)
    )
    num_params = sum(p.size for p in jax.tree_util.tree_leaves(state.params))
    step_fn = train_step.make_train_step(
        config, model, schedule, optimizer, lr_schedule, mesh, shardings
    )

    batch_size = config.training.batch_size
    rng = np.random.default_rng(0)
    labels = rng.integers(0, max(num_classes, 1), batch_size, dtype=np.int32)
    batches = [
        sharding.global_batch(
            mesh,
            {
                "image": rng.uniform(-1, 1, (batch_size,) + image_shape).astype(np.float32),
                "label": labels,
            },
        )
        for _ in range(2)
    ]
    compiled, compile_s = time_compile(step_fn, state, batches[0])
    (state, _), first_s = timed(lambda: compiled(state, batches[0]))
    step_s = []
    for i in range(num_steps):
        (state, _), dt = timed(functools.partial(compiled, state, batches[(i + 1) % 2]))
        step_s.append(dt)
    return dict(
        platform=jax.devices()[0].platform,
        batch=batch_size,
        dtype=config.training.compute_dtype,
        ch=config.model.ch,
        image_size=data.image_size,
        params_m=num_params / 1e6,
        steps=num_steps,
        init_s=init_s,
        compile_s=compile_s,
        first_step_s=compile_s + first_s,
        step_s=min(step_s),
        step_s_all=step_s,
        images_per_s=batch_size / min(step_s),
        images_per_s_mean=batch_size * num_steps / sum(step_s),
        peak_rss_mib=peak_rss_mib(),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        default=os.path.join(REPO, "configs", "cifar10.py"),
        help="experiment config file (a get_config() module)",
    )
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=tuple(config_lib.COMPUTE_DTYPES),
        help="training.compute_dtype",
    )
    parser.add_argument("--ch", type=int, help="override model.ch (smoke runs)")
    parser.add_argument(
        "--ch_mult",
        type=lambda s: tuple(int(m) for m in s.split(",")),
        help="override model.ch_mult, comma-separated",
    )
    parser.add_argument("--num_res_blocks", type=int, help="override model.num_res_blocks")
    parser.add_argument("--image_size", type=int, help="override data.image_size")
    parser.add_argument(
        "--num_classes", type=int, default=10, help="labels of a class-conditional config"
    )
    parser.add_argument(
        "--gpu_batch", type=int, default=128, help="batch of the bfloat16 run on a GPU; 0 skips it"
    )
    parser.add_argument("--flops_per_image", type=float, default=37.3e9)
    parser.add_argument(
        "--peak_flops",
        type=float,
        default=989e12,
        help="peak bf16 FLOP/s of the GPU (H100 SXM dense)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    config = load_config(args.config, args)
    fields = bench_train_step(config, args.steps, args.num_classes)
    emit(bench="train_step", config=os.path.relpath(args.config, REPO), **fields)

    if jax.devices()[0].platform == "gpu" and args.gpu_batch:
        args.batch, args.dtype = args.gpu_batch, "bfloat16"
        fields = bench_train_step(load_config(args.config, args), args.steps, args.num_classes)
        overridden = any(
            getattr(args, k) is not None for k in ("ch", "ch_mult", "num_res_blocks", "image_size")
        )
        flops = fields["images_per_s"] * args.flops_per_image
        mfu = None if overridden else flops / args.peak_flops
        emit(
            bench="train_step_gpu_bf16",
            config=os.path.relpath(args.config, REPO),
            mfu=mfu,
            peak_flops=args.peak_flops,
            **fields,
        )


if __name__ == "__main__":
    main()
