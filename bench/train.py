"""Train-step throughput, FLOPs and memory of a config's model (default: DDPM CIFAR-10, 35.7M
parameters).

    python bench/train.py                     # batch 32, float32, 3 timed steps
    python bench/train.py --dtype bfloat16 --batch 128 --steps 20      # the GPU target
    python bench/train.py --dtype bfloat16 --batch 256 --max_batch 8192   # largest batch
    python bench/train.py --ch 16 --ch_mult 1 --num_res_blocks 1 --image_size 8 --batch 2
    python bench/train.py --config configs/cifar10_edm.py    # another objective, same network
    python bench/train.py --config configs/digits_dit.py --config.model.dit.depth=12
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/train.py --compile_only \
        --config configs/celebahq256.py --batch 64 --dtype bfloat16 --config.training.fsdp=8

Uses the training program's own pieces: ``sharding.make_mesh``,
``train_step.create_train_state`` and the jitted, donated ``train_step.make_train_step``, fed
synthetic batches of the config's shape (no data set needed). Prints JSON lines; the
``train_step`` line holds the state initialisation time, the compile time, the time to the
first step (compile + one step), the best and mean images/s over the timed steps, and:

  - ``xla_gflop_per_image``: FLOPs of the compiled step by XLA's cost analysis, summed over
    devices, per image (a DiT with ``model.dit.scan_blocks`` counted with its blocks unrolled:
    the analysis counts a loop's body once); for the DDPM CIFAR-10 network also
    ``paper_gflop_per_image`` (37.3: 3x the 12.4 GFLOP forward) and ``xla_over_paper``, their
    ratio;
  - ``mfu``: achieved XLA FLOP/s per device over the device's peak (``peak`` says which: dense
    bf16 for bfloat16 compute, dense TF32 for float32; ``--peak_tflops`` overrides, None where
    unknown, e.g. on CPU); ``mfu_paper`` the same with the paper's FLOPs;
  - ``program_mib``: device memory of the compiled step by XLA's buffer assignment;
    ``peak_device_mib``: the device's peak bytes in use so far (None on CPU);
    ``peak_rss_mib``: the peak host memory so far.

``--config.KEY=VALUE`` sets any config key, as on the programs' command lines (values as
Python literals, else strings). With ``--compile_only`` the step is compiled for the devices
present (simulated CPU devices work) and not run: one ``train_step_compiled`` line with the
parameters, ``program_mib`` per device, XLA's FLOPs per image and the compile time; nothing is
allocated, so it sizes pod-scale configs on a laptop. It compiles with XLA:CPU's
memory-minimising scheduler: the default one orders for concurrency and keeps far more alive
than an accelerator's compiler would (``xla_flags.CPU_MEMORY_SCHEDULER_FLAG``).

With ``--max_batch N``, batches 2x, 4x, ... the first are tried up to N, each in a fresh state,
until one fails with XLA's resource-exhausted (out of memory) error: a ``train_step`` line for
each that ran, then a ``train_step_max_batch`` line with the largest. Only meant for devices
whose memory XLA manages (GPU, TPU): on CPU the operating system kills the process instead.
"""

import argparse
import ast
import functools
import importlib.util
import os
import sys

from diffusion_jax import xla_flags  # noqa: E402

# The training program's XLA settings, before JAX starts; sizing a program (--compile_only)
# uses XLA:CPU's memory-minimising scheduler (xla_flags.CPU_MEMORY_SCHEDULER_FLAG).
xla_flags.configure(memory_scheduler="--compile_only" in sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    device_peak_flops,
    emit,
    emit_env,
    peak_device_mib,
    peak_rss_mib,
    program_mib,
    time_compile,
    timed,
    xla_flops,
)

from diffusion_jax import config_lib, sharding, train_step  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_PARAMS = 35_746_307  # the DDPM CIFAR-10 network, whose train step is 37.3 GFLOP/image
PAPER_GFLOP_PER_IMAGE = 37.3


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the config, its batch, compute dtype and (smaller) network."""
    parser.add_argument(
        "--config",
        default=os.path.join(REPO, "configs", "cifar10.py"),
        help="experiment config file (a get_config() module)",
    )
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=tuple(config_lib.COMPUTE_DTYPES),
        help="training.compute_dtype",
    )
    parser.add_argument("--ch", type=int, help="override model.unet.ch (smoke runs)")
    parser.add_argument(
        "--ch_mult",
        type=lambda s: tuple(int(m) for m in s.split(",")),
        help="override model.unet.ch_mult, comma-separated",
    )
    parser.add_argument("--num_res_blocks", type=int, help="override model.unet.num_res_blocks")
    parser.add_argument("--image_size", type=int, help="override data.image_size")
    parser.add_argument(
        "--num_classes", type=int, default=10, help="labels of a class-conditional config"
    )


def config_overrides(rest: list[str]) -> dict:
    """``{"model.dit.depth": 12}`` from ``["--config.model.dit.depth=12", ...]`` (values as
    Python literals, else strings); raises SystemExit naming anything else."""
    overrides = {}
    for arg in rest:
        key, sep, value = arg.partition("=")
        if not key.startswith("--config.") or not sep:
            raise SystemExit(f"unrecognised argument {arg!r} (expected --config.KEY=VALUE)")
        try:
            overrides[key.removeprefix("--config.")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key.removeprefix("--config.")] = value
    return overrides


def load_config(args, **training):
    """``get_config()`` of ``args.config`` with the command-line overrides and the
    ``training.*`` keys given, validated."""
    spec = importlib.util.spec_from_file_location("bench_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.training.batch_size = args.batch
    config.training.compute_dtype = args.dtype
    config.training.update(training)
    for key, value in (
        ("ch", args.ch),
        ("ch_mult", args.ch_mult),
        ("num_res_blocks", args.num_res_blocks),
    ):
        if value is not None:
            config.model.unet[key] = value
    # GroupNorm(32) needs >= 32 channels; smaller smoke-run networks use ch groups.
    config.model.unet.num_groups = min(config.model.unet.num_groups, config.model.unet.ch)
    if args.image_size is not None:
        config.data.image_size = args.image_size
    config_lib.apply_overrides(config, getattr(args, "overrides", {}))
    return config_lib.validate(
        config, num_devices=jax.device_count(), process_count=jax.process_count()
    )


def build(config, num_classes: int, accumulate=None):
    """``(state, jitted step, two synthetic batches, init seconds)`` of ``config``."""
    data = config.data
    image_shape = (data.image_size, data.image_size, data.channels)
    mesh = sharding.make_mesh(config.training.fsdp, tensor=config.training.tensor_parallel)
    setup = config_lib.make_train_setup(config, num_classes)
    _, shardings = train_step.state_shardings(setup, image_shape, mesh)
    state, init_s = timed(
        lambda: train_step.create_train_state(setup, image_shape, shardings, config.seed)
    )
    step_fn = train_step.make_train_step(setup, mesh, shardings, accumulate=accumulate)
    batch_size = config.training.batch_size
    rng = np.random.default_rng(0)
    labels = rng.integers(0, max(num_classes, 1), batch_size, dtype=np.int32)
    # A latent data set's batches also hold the posterior's standard deviation.
    std = {"std": np.full((batch_size, *image_shape), 0.1, np.float32)} if setup.posterior else {}
    batches = [
        sharding.global_batch(
            mesh,
            {
                **std,
                "image": rng.uniform(-1, 1, (batch_size,) + image_shape).astype(np.float32),
                "label": labels,
            },
        )
        for _ in range(2)
    ]
    return state, step_fn, batches, init_s


def run_steps(compiled, state, batches, num_steps: int):
    """``(state, seconds of the first step, seconds of each of the next num_steps)``."""
    (state, _), first_s = timed(lambda: compiled(state, batches[0]))
    step_s = []
    for i in range(num_steps):
        (state, _), dt = timed(functools.partial(compiled, state, batches[(i + 1) % 2]))
        step_s.append(dt)
    return state, first_s, step_s


def bench_train_step(config, num_steps: int, num_classes: int, peak_tflops=None) -> dict:
    """Times init, compile and ``num_steps`` train steps after the first; returns the fields."""
    state, step_fn, batches, init_s = build(config, num_classes)
    num_params = sum(p.size for p in jax.tree_util.tree_leaves(state.params))
    compiled, compile_s = time_compile(step_fn, state, batches[0])
    _, first_s, step_s = run_steps(compiled, state, batches, num_steps)

    batch_size, dtype = config.training.batch_size, config.training.compute_dtype
    num_devices = jax.device_count()
    device = jax.devices()[0]
    step_best = min(step_s)
    mesh = sharding.make_mesh(config.training.fsdp, tensor=config.training.tensor_parallel)
    accumulate = train_step.default_accumulate(mesh)  # as build's step runs micro-batches
    flops = step_flops(config, compiled, num_classes, accumulate)  # one device's share
    peak, peak_name = device_peak_flops(device, dtype)
    if peak_tflops:
        peak, peak_name = peak_tflops * 1e12, "--peak_tflops"
    paper = PAPER_GFLOP_PER_IMAGE if num_params == PAPER_PARAMS else None
    xla_per_image = None if flops is None else flops * num_devices / batch_size / 1e9
    images_per_s = batch_size / step_best
    return dict(
        platform=device.platform,
        device_kind=device.device_kind,
        num_devices=num_devices,
        batch=batch_size,
        dtype=dtype,
        objective=config.objective.name,
        network=config.model.name,
        ch=config.model.unet.ch,
        image_size=config.data.image_size,
        params_m=num_params / 1e6,
        steps=num_steps,
        init_s=init_s,
        compile_s=compile_s,
        first_step_s=compile_s + first_s,
        step_s=step_best,
        step_s_all=step_s,
        images_per_s=images_per_s,
        images_per_s_mean=batch_size * num_steps / sum(step_s),
        xla_gflop_per_image=xla_per_image,
        paper_gflop_per_image=paper,
        xla_over_paper=xla_per_image / paper if paper and xla_per_image else None,
        xla_tflops_per_s=None if flops is None else flops * num_devices / step_best / 1e12,
        peak_tflops_per_device=None if peak is None else peak / 1e12,
        peak=peak_name,
        mfu=flops / step_best / peak if peak and flops else None,
        mfu_paper=paper * 1e9 * images_per_s / (peak * num_devices) if peak and paper else None,
        program_mib=program_mib(compiled),
        peak_device_mib=peak_device_mib(),
        peak_rss_mib=peak_rss_mib(),
    )


def compile_abstract(config, num_classes: int, accumulate: str = "scan"):
    """The train step of ``config`` compiled (not run) for the devices present from abstract
    state and batch, micro-batches run as ``accumulate`` says (``train_step.make_train_step``);
    returns ``(compiled, seconds, abstract state)``."""
    data = config.data
    image_shape = (data.image_size, data.image_size, data.channels)
    mesh = sharding.make_mesh(config.training.fsdp, tensor=config.training.tensor_parallel)
    setup = config_lib.make_train_setup(config, num_classes)
    abstract, shardings = train_step.state_shardings(setup, image_shape, mesh)
    state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    batch_size = config.training.batch_size
    spread = sharding.batch_sharding(mesh)
    image = jax.ShapeDtypeStruct((batch_size, *image_shape), np.float32, sharding=spread)
    batch = {
        "image": image,
        **({"std": image} if setup.posterior else {}),
        "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=spread),
    }
    step_fn = train_step.make_train_step(setup, mesh, shardings, accumulate=accumulate)
    compiled, compile_s = time_compile(step_fn, state, batch)
    return compiled, compile_s, abstract


def step_flops(config, compiled, num_classes: int, accumulate: str) -> float | None:
    """One device's FLOPs of ``compiled``, the whole train step of ``config`` with its
    micro-batches run as ``accumulate``, by XLA's cost analysis, which counts a loop's body
    once: a DiT whose blocks are scanned (``model.dit.scan_blocks``) is counted on the same
    step with its blocks unrolled (the same operations; compiled for the count, not run), and
    micro-batches run as a scan are multiplied back."""
    if config.model.name == "dit" and config.model.dit.scan_blocks:
        unrolled = config.copy_and_resolve_references()
        unrolled.model.dit.scan_blocks = False
        compiled = compile_abstract(unrolled, num_classes, accumulate)[0]
    flops = xla_flops(compiled)
    if flops is not None and accumulate == "scan":
        flops *= config.training.grad_accum_steps
    return flops


def compile_train_step(config, num_classes: int) -> dict:
    """Compiles (does not run) the train step of ``config`` on the devices present, from
    abstract state and batch; returns the fields of a ``train_step_compiled`` line."""
    # Micro-batches as accelerators run them (a scan: one micro-batch's activations at a time),
    # not as the CPU default (an unrolled loop, faster here but holding more at once).
    compiled, compile_s, abstract = compile_abstract(config, num_classes, "scan")
    flops = step_flops(config, compiled, num_classes, "scan")
    batch_size = config.training.batch_size
    return dict(
        platform=jax.devices()[0].platform,
        num_devices=jax.device_count(),
        batch=batch_size,
        dtype=config.training.compute_dtype,
        network=config.model.name,
        fsdp=config.training.fsdp,
        tensor_parallel=config.training.tensor_parallel,
        remat=config.training.remat,
        grad_accum_steps=config.training.grad_accum_steps,
        scan_blocks=config.model.name == "dit" and config.model.dit.scan_blocks,
        params=sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(abstract.params)),
        program_mib=program_mib(compiled),
        xla_gflop_per_image=None
        if flops is None
        else flops * jax.device_count() / batch_size / 1e9,
        compile_s=compile_s,
    )


def is_out_of_memory(error: Exception) -> bool:
    """XLA's resource-exhausted error, raised by compilation or by an allocation."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def search_max_batch(args, first_batch: int) -> None:
    """Doubles the batch from ``first_batch`` up to ``args.max_batch`` until it runs out of
    memory; one line per batch that ran, then the largest."""
    largest, stopped = first_batch, "reached --max_batch"
    batch = 2 * first_batch
    while batch <= args.max_batch:
        try:
            fields = bench_train_step(
                load_config(args, batch_size=batch), args.steps, args.num_classes, args.peak_tflops
            )
        except jax.errors.JaxRuntimeError as e:
            if not is_out_of_memory(e):
                raise
            stopped = f"out of memory at batch {batch}: {str(e).splitlines()[0][:200]}"
            break
        emit(bench="train_step", config=os.path.relpath(args.config, REPO), **fields)
        largest, batch = batch, 2 * batch
    emit(
        bench="train_step_max_batch",
        dtype=args.dtype,
        largest_batch=largest,
        stopped=stopped,
        peak_device_mib=peak_device_mib(),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument(
        "--max_batch",
        type=int,
        default=0,
        help="then double the batch up to this until out of memory; 0: no search",
    )
    parser.add_argument(
        "--peak_tflops", type=float, help="peak TFLOP/s of one device (default: by device kind)"
    )
    parser.add_argument(
        "--compile_only", action="store_true", help="compile the step, report its memory"
    )
    args, rest = parser.parse_known_args(argv)
    args.overrides = config_overrides(rest)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    emit_env()
    if args.compile_only:
        fields = compile_train_step(load_config(args), args.num_classes)
        emit(bench="train_step_compiled", config=os.path.relpath(args.config, REPO), **fields)
        return
    fields = bench_train_step(load_config(args), args.steps, args.num_classes, args.peak_tflops)
    emit(bench="train_step", config=os.path.relpath(args.config, REPO), **fields)
    if args.max_batch:
        search_max_batch(args, args.batch)


if __name__ == "__main__":
    main()
