"""CPU throughput of the DDPM CIFAR-10 U-Net (35.7M parameters, 32x32x3, dropout 0.1).

    python bench/unet.py                      # batches 8 and 32, 5 timed repeats
    python bench/unet.py --batch 8 --repeats 2 --variants default   # quick smoke run

Prints JSON lines: per batch size and XLA variant the compile time and best images/s of a
jitted forward pass (train=False) and of a train step (forward + backward of an MSE loss +
Adam update, params/optimizer state donated), with the achieved GFLOP/s and its ratio to the
float32 matmul rate (the yardstick, a [2048,2048]^2 jnp.dot measured in the same rounds);
last the best matmul rate. FLOPs per image are the
DDPM paper network's: 12.4 GFLOP per forward (~6.2 GMAC), 37.3 per train step (3x).

XLA variants are compiler options given to `.compile(compiler_options=...)`, so all variants
run in one process, interleaved round by round with the matmul yardstick; that keeps the
comparison fair when other processes share the CPU. To use a variant in a program, put the
same options in XLA_FLAGS (e.g. `XLA_FLAGS=--xla_cpu_prefer_vector_width=512`) before JAX
initialises its backend (before the first computation).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import XLA_CPU_VARIANTS as VARIANTS  # noqa: E402
from _common import emit, emit_env, matmul_gflops, time_compile, timed  # noqa: E402

from diffusion_jax.models import UNet  # noqa: E402

GFLOP_FORWARD = 12.4
GFLOP_TRAIN = 37.3
MATMUL_N = 2048


def build(batch: int):
    """Jitted (not yet compiled) forward and train step, and their initial arguments."""
    model = UNet()
    key = jax.random.PRNGKey(0)
    x = jax.random.uniform(key, (batch, 32, 32, 3), minval=-1, maxval=1)
    t = jax.random.randint(key, (batch,), 0, 1000)
    noise = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    params = jax.jit(model.init, static_argnames="train")(key, x[:1], t[:1], train=False)
    tx = optax.adam(2e-4)

    def forward(params, x, t):
        return model.apply(params, x, t, train=False)

    def train_step(params, opt_state, x, t, noise, rng):
        def loss_fn(p):
            out = model.apply(p, x, t, train=True, rngs={"dropout": rng})
            return jnp.mean((out - noise) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    fwd = jax.jit(forward)
    step = jax.jit(train_step, donate_argnums=(0, 1))
    return fwd, step, params, tx.init(params), (x, t, noise)


def run_batch(batch: int, variants: list[str], repeats: int, matmul_times: list[float]):
    """Compile every variant, then time them round-robin (round 0 is warm-up)."""
    fwd, step, params, opt_state, (x, t, noise) = build(batch)
    runs = {}
    for name in variants:
        opts = VARIANTS[name]
        fwd_c, fwd_s = time_compile(fwd, params, x, t, compiler_options=opts)
        step_c, step_s = time_compile(
            step, params, opt_state, x, t, noise, jax.random.PRNGKey(0), compiler_options=opts
        )
        runs[name] = dict(
            fwd=fwd_c,
            step=step_c,
            compile_s=(fwd_s, step_s),
            fwd_t=[],
            step_t=[],
            mm_t=[],
            state=jax.tree.map(jnp.copy, (params, opt_state)),
        )

    a = jnp.ones((MATMUL_N, MATMUL_N))
    dot = jax.jit(jnp.dot)
    for r in range(repeats + 1):
        for run in runs.values():
            # The yardstick is re-measured next to each step: the load from other processes
            # changes from round to round, so per-round ratios are the steadier figure.
            dt_mm = min(timed(lambda: dot(a, a))[1] for _ in range(3))
            dt_step, dt_fwd = _time_round(run, x, t, noise, jax.random.PRNGKey(r))
            if r:
                matmul_times.append(dt_mm)
                run["mm_t"].append(dt_mm)
                run["step_t"].append(dt_step)
                run["fwd_t"].append(dt_fwd)

    for name, run in runs.items():
        mm = [2 * MATMUL_N**3 / s / 1e9 for s in run["mm_t"]]
        for kind, gflop, times, compile_s in (
            ("forward", GFLOP_FORWARD, run["fwd_t"], run["compile_s"][0]),
            ("train_step", GFLOP_TRAIN, run["step_t"], run["compile_s"][1]),
        ):
            ips = [batch / s for s in times]
            ratios = sorted(i * gflop / m for i, m in zip(ips, mm, strict=True))
            emit(
                bench=f"unet_cifar10_{kind}",
                batch=batch,
                variant=name,
                compile_s=compile_s,
                images_per_s=max(ips),
                images_per_s_min=min(ips),
                repeats=len(ips),
                gflops=max(ips) * gflop,
                matmul_gflops=max(mm),
                ratio_to_matmul=max(ips) * gflop / max(mm),
                ratio_per_round_median=ratios[len(ratios) // 2],
            )


def _time_round(run, x, t, noise, rng):
    """One timed train step (updating run["state"]) and one forward; returns both seconds."""
    (params, opt_state, _), dt_step = timed(lambda: run["step"](*run["state"], x, t, noise, rng))
    run["state"] = (params, opt_state)
    _, dt_fwd = timed(lambda: run["fwd"](params, x, t))
    return dt_step, dt_fwd


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}"
    )
    args = parser.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; valid: {list(VARIANTS)}")

    emit_env()
    matmul_times: list[float] = []
    for batch in args.batch:
        run_batch(batch, variants, args.repeats, matmul_times)
    emit(
        bench="matmul_f32",
        n=MATMUL_N,
        gflops=2 * MATMUL_N**3 / min(matmul_times) / 1e9,
        gflops_isolated=matmul_gflops(MATMUL_N),
    )


if __name__ == "__main__":
    main()
