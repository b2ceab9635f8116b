"""Throughput of the evaluation program's pieces on the CIFAR-10 network (35.7M parameters).

    python bench/evaluate.py                    # batch 2 on a CPU (about 3 minutes)
    python bench/evaluate.py --batch 256        # on a GPU
    python bench/evaluate.py --ch 32 --steps 20 --respaced_steps 5 --inception_batch 0  # smoke

Uses the program's own jitted functions with freshly initialised parameters (throughput does
not depend on the weights), for a process of T = ``--steps`` steps: ``generate.make_generate_fn``
for ancestral sampling over all T steps (1000: the paper's chain) and respaced to
``--respaced_steps``, and ``evaluators.bpd.make_bound_fn`` for the variational bound (T network
evaluations per image).
Then ``inception.features`` (randomly initialised FID Inception, 32x32 uint8 inputs resized to
299x299 inside) at ``--inception_batch``. One JSON line each: compile seconds, the best of
``--repeats`` timed calls, samples/s or images/s. The samplers' overhead over bare forward
passes is measured by ``bench/sampler.py`` (interleaved rounds, which a shared machine needs).
"""

import argparse
import os
import pathlib
import sys

from diffusion_jax import xla_flags

xla_flags.configure()  # the programs' XLA settings, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_of, emit, emit_env, time_compile  # noqa: E402

from diffusion_jax import config_defaults, config_lib, generate, sharding, train_step  # noqa: E402
from diffusion_jax.evaluators import bpd, common  # noqa: E402


def make_config(args, sampling_steps: int = 0):
    """DDPM CIFAR-10 with T = ``--steps``, ``model.unet.ch = --ch``, sampling respaced to
    ``sampling_steps`` (0: all T)."""
    config = config_defaults.get_config()
    config.model.unet.ch = args.ch
    config.model.unet.num_groups = min(32, args.ch)
    config.diffusion.num_timesteps = args.steps
    config.eval.batch_size = args.batch
    config.sampling.num_steps = sampling_steps
    return config_lib.validate(config, num_devices=jax.device_count())


def setup(config):
    mesh = sharding.make_mesh()
    train_setup = config_lib.make_train_setup(config)
    shape = (32, 32, 3)
    _, shardings = train_step.state_shardings(train_setup, shape, mesh)
    state = train_step.create_train_state(train_setup, shape, shardings, config.seed)
    return mesh, train_setup.model, state.ema_params, shardings.ema_params


def bench_sampler(args, name, num_steps):
    config = make_config(args, 0 if num_steps == args.steps else num_steps)
    mesh, model, params, param_sharding = setup(config)
    fn = generate.make_generate_fn(config, model, mesh, param_sharding, args.batch)
    rng = jax.random.PRNGKey(0)
    compiled, compile_s = time_compile(fn, params, rng, 0)
    best, times = best_of(lambda: compiled(params, rng, 0), args.repeats, warmup=0)
    emit(
        bench=f"evaluate_sample_{name}",
        steps=num_steps,
        batch=args.batch,
        ch=args.ch,
        compile_s=compile_s,
        s=best,
        s_all=times,
        samples_per_s=args.batch / best,
    )


def bench_bpd(args):
    config = make_config(args)
    mesh, model, params, param_sharding = setup(config)
    ctx = common.Context(
        config=config,
        workdir=pathlib.Path("."),
        step=0,
        mesh=mesh,
        model=model,
        objective=config_lib.make_objective(config),
        params=params,
        param_sharding=param_sharding,
        eval_dir=pathlib.Path("."),
    )
    fn = bpd.make_bound_fn(ctx)
    batch = sharding.global_batch(
        mesh,
        {
            "image": np.random.default_rng(0).uniform(-1, 1, (args.batch, 32, 32, 3)),
            "label": np.zeros((args.batch,), np.int32),
            "keys": np.asarray(common.example_keys(0, np.arange(args.batch))),
        },
    )
    compiled, compile_s = time_compile(fn, params, batch)
    best, times = best_of(lambda: compiled(params, batch), args.repeats, warmup=0)
    emit(
        bench="evaluate_bpd",
        num_timesteps=args.steps,
        batch=args.batch,
        ch=args.ch,
        compile_s=compile_s,
        s=best,
        s_all=times,
        images_per_s=args.batch / best,
    )


def bench_inception(args):
    from diffusion_jax import inception

    params = inception.params_from_state_dict(inception.random_state_dict(0))
    images = np.random.default_rng(0).integers(0, 256, (args.inception_batch, 32, 32, 3), np.uint8)
    fn = jax.jit(inception.features)
    compiled, compile_s = time_compile(fn, params, images)
    best, times = best_of(lambda: compiled(params, images), args.repeats)
    emit(
        bench="evaluate_inception_features",
        batch=args.inception_batch,
        input_size=32,
        compile_s=compile_s,
        s=best,
        s_all=times,
        images_per_s=args.inception_batch / best,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="samples / images per call")
    parser.add_argument("--ch", type=int, default=128, help="model.unet.ch (128: the paper's)")
    parser.add_argument("--steps", type=int, default=1000, help="T: the full chain's steps")
    parser.add_argument("--respaced_steps", type=int, default=100, help="0 skips it")
    parser.add_argument("--skip_bpd", action="store_true", help="skip the bound")
    parser.add_argument("--inception_batch", type=int, default=8, help="0 skips it")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    emit_env()
    bench_sampler(args, f"ancestral{args.steps}", args.steps)
    if args.respaced_steps:
        bench_sampler(args, f"respaced{args.respaced_steps}", args.respaced_steps)
    if not args.skip_bpd:
        bench_bpd(args)
    if args.inception_batch:
        bench_inception(args)


if __name__ == "__main__":
    main()
