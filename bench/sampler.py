"""Overhead of the scan samplers over the bare network they call, per network evaluation.

    python bench/sampler.py      # CIFAR-10 U-Net, batch 2, 1000 + 100 steps (slow on CPU)
    python bench/sampler.py --ch 32 --steps 100 --respaced_steps 20 --repeats 2   # quick run
    python bench/sampler.py --batch 256 --dtype bfloat16 --repeats 1   # the GPU target

For each sampler, the whole chain (``diffusion_jax.sampling.sample`` with the U-Net as
``model_fn``, inside an outer jit taking the parameters as an argument, as
``generate.make_generate_fn`` does) is timed against a Python loop dispatching the jitted bare
forward of the same network at the same batch once per network evaluation of the chain (each
output fed to the next call, blocking only at the end). ``ratio = scan_s / loop_s``; the target
is <= 1.05; ``per_eval_ms = scan_s / evaluations`` against ``forward_ms = loop_s /
evaluations``; ``samples_per_s = batch / scan_s``; ``compile_scan_s`` compiles the whole chain.
Samplers:

  - ``ancestral``: ``--steps`` steps (1000 = the full DDPM chain; fewer: the 1000-step process
    respaced to that many);
  - every method of ``sampling.SAMPLING_METHODS`` (``ancestral_respaced`` for ancestral) over
    ``--respaced_steps`` grid steps (0 skips them): as many evaluations, heun 2K - 1;
  - every method of ``ode_sampling.METHODS`` for the EDM and flow objectives
    (``edm_heun``, ``flow_dpmpp_2m``, ...) over ``--respaced_steps`` steps of their time
    grids (the U-Net as their bare network; evaluations: ``ode_sampling.num_evaluations``);
  - with ``--record_every N``, also ``ancestral`` recording the trajectory every N steps;
  - ``sampler_guidance``: classifier-free and classifier guidance against unguided sampling of
    the same conditional network, ``--guidance_steps`` steps (``bench_guidance``).

Then the chains without the network (``model_fn`` a cheap elementwise function), every method
over ``--steps`` steps and ancestral also recording its trajectory, then every ODE method of
EDM and flow (``method`` "edm_heun", ...) over ``--respaced_steps`` steps: the cost per
evaluation of everything the sampler adds (x0 prediction, the method's update, noise,
``timestep_map`` gather, recording). Timed rounds alternate scan and loop so that load from
other processes hits both alike; the best wall times, all wall times and the best CPU times (of
all this process's threads: ``cpu_ratio`` is the steadier figure on a shared machine, where the
wall time includes waiting for a core) are reported, with the device's peak memory in use so
far (None on CPU) and the host's."""

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    emit,
    emit_env,
    peak_device_mib,
    peak_rss_mib,
    time_compile,
    timed,
)

from diffusion_jax import (  # noqa: E402
    config_lib,
    guidance,
    objectives,
    ode_sampling,
    sampling,
    schedules,
)
from diffusion_jax.models import NoisyClassifier, UNet  # noqa: E402
from diffusion_jax.models.classifier import log_prob_fn  # noqa: E402

NUM_TIMESTEPS = 1000  # the trained process; shorter chains are respacings of it
NUM_CLASSES = 10
ODE_OBJECTIVES = (objectives.EDM(), objectives.Flow())


def make_schedule(num_steps: int) -> schedules.Schedule:
    """The linear 1000-step DDPM process, respaced to ``num_steps`` when fewer."""
    betas = schedules.get_betas("linear", NUM_TIMESTEPS)
    if num_steps == NUM_TIMESTEPS:
        return schedules.Schedule.from_betas(betas)
    return schedules.respace(betas, schedules.space_timesteps(NUM_TIMESTEPS, num_steps))


def make_sampler(model_fn_of, schedule, shape, **sample_kw):
    """Jitted ``(params, rng) -> x0``: the scan sampler with ``model_fn_of(params)``."""

    def run(params, rng):
        out = sampling.sample(model_fn_of(params), schedule, shape, rng, **sample_kw)
        return out if sample_kw.get("record_every") is None else out[0]

    return jax.jit(run)


def make_ode_sampler(model_fn_of, objective, shape, method: str, num_steps: int):
    """Jitted ``(params, rng) -> x0``: ``ode_sampling.sample`` of ``objective`` with the bare
    network ``model_fn_of(params)``."""

    def run(params, rng):
        fn = model_fn_of(params)
        return ode_sampling.sample(fn, objective, shape, rng, method=method, num_steps=num_steps)

    return jax.jit(run)


def ode_runs(num_steps: int):
    """``(name, objective, method, evaluations)`` of every ODE sampler over ``num_steps``."""
    return [
        (f"{o.name}_{m}", o, m, ode_sampling.num_evaluations(m, num_steps))
        for o in ODE_OBJECTIVES
        for m in ode_sampling.METHODS
    ]


def wall_and_cpu(fn) -> tuple[float, float]:
    """Wall and CPU (all threads of this process) seconds of ``fn()``, blocked on."""
    cpu = time.process_time()
    _, wall = timed(fn)
    return wall, time.process_time() - cpu


def best(times: list[tuple[float, float]]) -> tuple[float, float]:
    """The least wall and the least CPU time of ``(wall, cpu)`` pairs (not always one pair)."""
    return tuple(min(ts) for ts in zip(*times, strict=True))


def evaluation_timesteps(method: str, schedule: schedules.Schedule) -> list[int]:
    """The original timesteps of the network's evaluations over the whole chain, in order."""
    grid = schedule.timestep_map[::-1].tolist()
    if sampling.METHODS[method].stages == 1:
        return grid
    return [t for pair in zip(grid, grid[1:], strict=False) for t in pair] + grid[-1:]


def make_loop(forward, params, x, timesteps):
    """``loop()`` dispatching ``forward`` once per timestep (chained); blocked on by the caller."""
    t_batches = [jnp.full((x.shape[0],), t, jnp.int32) for t in timesteps]

    def loop():
        y = x
        for t in t_batches:
            y = forward(params, y, t)
        return y

    return loop


def network_kwargs(args) -> dict:
    """The U-Net (and noisy classifier) constructor arguments the command line chooses."""
    return dict(
        ch=args.ch,
        ch_mult=args.ch_mult,
        num_res_blocks=args.num_res_blocks,
        num_groups=min(32, args.ch),
        dtype=config_lib.COMPUTE_DTYPES[args.dtype],
    )


def bench_network(args):
    """Scan samplers vs the loop of bare forwards; one JSON line per sampler."""
    model = UNet(**network_kwargs(args))
    shape = (args.batch, args.image_size, args.image_size, 3)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, shape)
    t0 = jnp.zeros((args.batch,), jnp.int32)
    params = jax.jit(lambda k: model.init(k, x, t0, train=False))(key)
    forward = jax.jit(lambda p, x, t: model.apply(p, x, t, train=False))
    forward_c, forward_compile_s = time_compile(forward, params, x, t0)
    model_fn_of = lambda p: lambda x, t: model.apply(p, x, t, train=False)

    configs = [("ancestral", args.steps, {})]
    if args.respaced_steps:
        configs += [
            (
                "ancestral_respaced" if method == "ancestral" else method,
                args.respaced_steps,
                {"method": method},
            )
            for method in sampling.SAMPLING_METHODS
        ]
    if args.record_every:
        configs.append(
            (
                f"ancestral_record{args.record_every}",
                args.steps,
                {"record_every": args.record_every},
            )
        )
    runs = []  # (name, steps, jitted sampler, the timesteps of its evaluations)
    for name, num_steps, kw in configs:
        schedule = make_schedule(num_steps)
        sampler = make_sampler(model_fn_of, schedule, shape, **kw)
        runs.append(
            (
                name,
                num_steps,
                sampler,
                evaluation_timesteps(kw.get("method", "ancestral"), schedule),
            )
        )
    if args.respaced_steps:
        for name, objective, method, evaluations in ode_runs(args.respaced_steps):
            sampler = make_ode_sampler(model_fn_of, objective, shape, method, args.respaced_steps)
            # The network's cost does not depend on the noise level: the loop calls it at t = 0.
            runs.append((name, args.respaced_steps, sampler, [0] * evaluations))

    for name, num_steps, sampler, timesteps in runs:
        sampler_c, scan_compile_s = time_compile(sampler, params, key)
        loop = make_loop(forward_c, params, x, timesteps)
        scan_t, loop_t = [], []
        for r in range(args.warmup + args.repeats):
            run = functools.partial(sampler_c, params, jax.random.PRNGKey(r))
            scan_t.append(wall_and_cpu(run))
            loop_t.append(wall_and_cpu(loop))
        scan_t, loop_t = scan_t[args.warmup :], loop_t[args.warmup :]
        (scan_s, scan_cpu_s), (loop_s, loop_cpu_s) = best(scan_t), best(loop_t)
        emit(
            bench=f"sampler_{name}",
            steps=num_steps,
            evaluations=len(timesteps),
            ch=args.ch,
            batch=args.batch,
            image_size=args.image_size,
            dtype=args.dtype,
            samples_per_s=args.batch / scan_s,
            scan_s=scan_s,
            loop_s=loop_s,
            ratio=scan_s / loop_s,
            scan_cpu_s=scan_cpu_s,
            loop_cpu_s=loop_cpu_s,
            cpu_ratio=scan_cpu_s / loop_cpu_s,
            scan_s_all=[w for w, _ in scan_t],
            loop_s_all=[w for w, _ in loop_t],
            per_eval_ms=1e3 * scan_s / len(timesteps),
            forward_ms=1e3 * loop_s / len(timesteps),
            compile_scan_s=scan_compile_s,
            compile_forward_s=forward_compile_s,
            peak_device_mib=peak_device_mib(),
            peak_rss_mib=peak_rss_mib(),
        )


def bench_guidance(args):
    """Cost per step of guided against unguided sampling at equal batch, one JSON line each.

    One conditional U-Net (10 classes) and the same respaced ancestral chain of
    ``--guidance_steps`` steps: ``none`` (conditional sampling), ``classifier_free`` (both
    branches in one network call of twice the batch) and ``classifier`` (the U-Net plus the
    gradient of a noisy classifier with the same downsampling half). Timed rounds alternate the
    three; ``ratio`` is each one's best wall time over the unguided one (target for
    classifier-free guidance: <= 2.1).
    """
    net = network_kwargs(args)
    model = UNet(num_classes=NUM_CLASSES, **net)
    classifier = NoisyClassifier(num_classes=NUM_CLASSES, **net)
    shape = (args.batch, args.image_size, args.image_size, 3)
    key = jax.random.PRNGKey(0)
    x, t = jnp.zeros(shape), jnp.zeros((args.batch,), jnp.int32)
    labels = jnp.arange(args.batch, dtype=jnp.int32) % NUM_CLASSES
    params = jax.jit(lambda k: model.init(k, x, t, labels, train=False))(key)
    classifier_params = jax.jit(lambda k: classifier.init(k, x, t, train=False))(key)
    schedule = make_schedule(args.guidance_steps)
    training_schedule = make_schedule(NUM_TIMESTEPS)

    def model_fn_of(guidance_kind):
        def of(all_params):
            unet, cls = all_params
            network = lambda x, t, y: model.apply(unet, x, t, y, train=False)
            if guidance_kind == "classifier_free":
                return guidance.classifier_free(
                    network, labels, args.guidance_scale, null_label=NUM_CLASSES
                )
            conditional = lambda x, t: network(x, t, labels)
            if guidance_kind == "none":
                return conditional
            return guidance.classifier(
                conditional,
                log_prob_fn(classifier, cls["params"]),
                labels,
                args.guidance_scale,
                training_schedule,
            )

        return of

    kinds = ("none", "classifier_free", "classifier")
    samplers, compile_s = {}, {}
    for kind in kinds:
        sampler = make_sampler(model_fn_of(kind), schedule, shape)
        samplers[kind], compile_s[kind] = time_compile(sampler, (params, classifier_params), key)
    times = {kind: [] for kind in kinds}
    for r in range(args.warmup + args.repeats):
        for kind in kinds:
            run = functools.partial(
                samplers[kind], (params, classifier_params), jax.random.PRNGKey(r)
            )
            times[kind].append(wall_and_cpu(run))
    best_times = {kind: best(ts[args.warmup :]) for kind, ts in times.items()}
    for kind in kinds:
        (wall, cpu), (base_wall, base_cpu) = best_times[kind], best_times["none"]
        emit(
            bench="sampler_guidance",
            guidance=kind,
            scale=0.0 if kind == "none" else args.guidance_scale,
            steps=args.guidance_steps,
            batch=args.batch,
            ch=args.ch,
            image_size=args.image_size,
            dtype=args.dtype,
            s=wall,
            s_all=[w for w, _ in times[kind][args.warmup :]],
            per_step_ms=1e3 * wall / args.guidance_steps,
            ratio=wall / base_wall,
            cpu_s=cpu,
            cpu_ratio=cpu / base_cpu,
            compile_s=compile_s[kind],
            peak_device_mib=peak_device_mib(),
        )


def bench_chain_only(args):
    """The sampler's own cost per evaluation, with a network-free ``model_fn``."""
    shape = (args.batch, args.image_size, args.image_size, 3)
    schedule = make_schedule(args.steps)
    model_fn_of = lambda scale: lambda x, t: scale * x
    every = args.record_every or max(1, args.steps // 10)
    runs = [(method, None) for method in sampling.SAMPLING_METHODS] + [("ancestral", every)]
    for method, record_every in runs:
        sampler = make_sampler(
            model_fn_of, schedule, shape, method=method, record_every=record_every
        )
        evaluations = sampling.num_evaluations(method, args.steps)
        emit_chain_only(args, sampler, method, args.steps, evaluations, record_every)
    if args.respaced_steps:
        for name, objective, method, evaluations in ode_runs(args.respaced_steps):
            sampler = make_ode_sampler(model_fn_of, objective, shape, method, args.respaced_steps)
            emit_chain_only(args, sampler, name, args.respaced_steps, evaluations, None)


def emit_chain_only(args, sampler, method, num_steps, evaluations, record_every):
    """Times a network-free chain ``sampler(0.5, rng)``; one ``sampler_chain_only`` line."""
    sampler_c, compile_s = time_compile(sampler, 0.5, jax.random.PRNGKey(0))
    times = [
        wall_and_cpu(functools.partial(sampler_c, 0.5, jax.random.PRNGKey(r)))
        for r in range(args.warmup + args.repeats)
    ][args.warmup :]
    wall, cpu = best(times)
    emit(
        bench="sampler_chain_only",
        method=method,
        steps=num_steps,
        evaluations=evaluations,
        batch=args.batch,
        image_size=args.image_size,
        record_every=record_every,
        s=wall,
        s_all=[w for w, _ in times],
        cpu_s=cpu,
        per_eval_us=1e6 * wall / evaluations,
        compile_s=compile_s,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ch", type=int, default=128, help="U-Net base channels")
    parser.add_argument(
        "--ch_mult",
        type=lambda s: tuple(int(m) for m in s.split(",")),
        default=(1, 2, 2, 2),
        help="comma-separated channel multipliers",
    )
    parser.add_argument("--num_res_blocks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=tuple(config_lib.COMPUTE_DTYPES),
        help="the U-Net's compute dtype",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=NUM_TIMESTEPS,
        help=f"ancestral chain length (<= {NUM_TIMESTEPS})",
    )
    parser.add_argument(
        "--respaced_steps",
        type=int,
        default=100,
        help="steps of the respaced ancestral and DDIM samplers; 0 skips them",
    )
    parser.add_argument(
        "--record_every",
        type=int,
        default=0,
        help="also time ancestral sampling recording the trajectory",
    )
    parser.add_argument(
        "--guidance_steps",
        type=int,
        default=100,
        help="steps of the guided and unguided chains compared; 0 skips them",
    )
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="w and s")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    args = parser.parse_args(argv)
    for name in ("steps", "respaced_steps", "guidance_steps"):
        if not 0 <= getattr(args, name) <= NUM_TIMESTEPS:
            parser.error(f"--{name} must lie in [0, {NUM_TIMESTEPS}]")
    if min(args.steps, args.repeats, args.batch, args.warmup + 1) < 1:
        parser.error("--steps, --repeats and --batch must be >= 1, --warmup >= 0")

    emit_env()
    bench_chain_only(args)
    bench_network(args)
    if args.guidance_steps:
        bench_guidance(args)


if __name__ == "__main__":
    main()
