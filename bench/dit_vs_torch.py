"""CPU train-step throughput of this library's DiT (jit) against diffusers' PyTorch DiT (eager).

    python bench/dit_vs_torch.py                  # DiT-S/2, 32x32x4 latents, batch 32
    python bench/dit_vs_torch.py --depth 2 --hidden 64 --heads 2 --batch 4 --rounds 1  # smoke
    python bench/dit_vs_torch.py --variants default,ynn_reduce   # XLA:CPU library choices

One train step = forward + backward of an MSE loss + an Adam update, class-conditional (1000
classes), learned sigma (8 output channels), float32. Ours: ``DiT(numerics="diffusers")``
jitted, params and optimizer state donated. Theirs: ``DiTTransformer2DModel`` of the same size
in eager mode (``model.train()``: its 10% label dropout is on; ours drops no labels, a
negligible difference in cost), ``torch.optim.Adam``. The two are timed in the same process,
round after round (interleaved, so a change of the machine's load hits both), each round the
best of ``--repeats`` steps; each round also measures the float32 matmul yardstick
(``_common.matmul_gflops``: a [2048, 2048]^2 dot); the last line has the best of all rounds,
the ratio (and the ratio of the medians of every timed step: on a shared host, one
undisturbed step of either side moves the best) and our step's XLA FLOP rate as a fraction of
the best yardstick. ``--variants`` compiles our step once per XLA:CPU library choice
(``_common.XLA_CPU_VARIANTS``; "ynn_reduce", the default, is the training program's setting)
and times each in every round; the last lines are per variant. Both use every core they see
(XLA's thread pool, torch's intra-op threads) and, unless ``--glibc_defaults``, the allocator
setting of the programs' ``--reuse_freed_memory`` (``diffusion_jax.host_memory``: glibc keeps
the gigabytes a step frees for the next; ``reuses_freed_memory`` in the env line): the numbers
mean something only as a ratio measured in one run, and only with the machine's load stated
alongside.

Prints JSON lines; without torch or diffusers, one line saying so (exit status 0).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    XLA_CPU_VARIANTS,
    best_of,
    emit,
    emit_env,
    matmul_gflops,
    time_compile,
    xla_flops,
)

from diffusion_jax import host_memory  # noqa: E402
from diffusion_jax.models import DiT  # noqa: E402


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--size", type=int, default=32, help="latent side")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--glibc_defaults",
        action="store_true",
        help="keep glibc's malloc settings (without the programs' --reuse_freed_memory)",
    )
    p.add_argument(
        "--variants",
        default="ynn_reduce",
        help=f"comma-separated XLA:CPU variants of our step, of {list(XLA_CPU_VARIANTS)}",
    )
    a = p.parse_args(argv)
    a.variants = a.variants.split(",")
    for v in a.variants:
        if v not in XLA_CPU_VARIANTS:
            p.error(f"unknown variant {v!r}; valid: {list(XLA_CPU_VARIANTS)}")
    return a


def _inputs(a, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((a.batch, a.size, a.size, a.channels)).astype(np.float32)
    t = rng.integers(0, 1000, a.batch).astype(np.float32)
    y = rng.integers(0, a.classes, a.batch).astype(np.int32)
    target = rng.standard_normal((a.batch, a.size, a.size, 2 * a.channels)).astype(np.float32)
    return x, t, y, target


def _jax_step(a, x, t, y, target, compiler_options=None):
    """``(run, gflop_per_image, compile_s)``: ``run()`` does one train step and blocks."""
    model = DiT(
        patch_size=a.patch,
        hidden_size=a.hidden,
        depth=a.depth,
        num_heads=a.heads,
        out_channels=2 * a.channels,
        num_classes=a.classes,
        numerics="diffusers",
    )
    x, t, y, target = map(jnp.asarray, (x, t, y, target))
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x, t, y, train=False))()
    tx = optax.adam(1e-4)
    opt_state = tx.init(params)

    def step(params, opt_state, x, t, y, target):
        def loss_fn(p):
            out = model.apply(p, x, t, y, train=True)
            return jnp.mean((out - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    compiled, compile_s = time_compile(
        jitted, params, opt_state, x, t, y, target, compiler_options=compiler_options
    )
    flops = xla_flops(compiled)
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], x, t, y, target)
        return loss

    gflop = flops / a.batch / 1e9 if flops else None
    return run, gflop, compile_s


def _torch_step(a, torch, diffusers, x, t, y, target):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=a.heads,
        attention_head_dim=a.hidden // a.heads,
        in_channels=a.channels,
        out_channels=2 * a.channels,
        num_layers=a.depth,
        sample_size=a.size,
        patch_size=a.patch,
        num_embeds_ada_norm=a.classes,
    ).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # NCHW
    target = torch.from_numpy(target.transpose(0, 3, 1, 2).copy())
    t, y = torch.from_numpy(t), torch.from_numpy(y.astype(np.int64))

    def run():
        opt.zero_grad(set_to_none=True)
        out = model(x, timestep=t, class_labels=y).sample
        loss = torch.mean((out - target) ** 2)
        loss.backward()
        opt.step()
        return loss.item()

    return run


def main(argv=None):
    a = _parse(argv)
    try:
        import diffusers
        import torch
    except ImportError as e:
        emit(bench="dit_vs_torch", skipped=f"needs torch and diffusers (the peer extra): {e}")
        return
    reuses = False if a.glibc_defaults else host_memory.reuse_freed_memory()  # before any backend
    emit_env()
    emit(
        bench="dit_vs_torch_env",
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        torch_threads=torch.get_num_threads(),
        reuses_freed_memory=reuses,
        loadavg_1min=os.getloadavg()[0],
    )
    x, t, y, target = _inputs(a)
    config = dict(hidden=a.hidden, depth=a.depth, heads=a.heads, patch=a.patch, size=a.size)
    config |= dict(batch=a.batch)
    sides, gflop = {}, {}
    for v in a.variants:
        run, gflop[v], compile_s = _jax_step(a, x, t, y, target, XLA_CPU_VARIANTS[v])
        sides[f"jax_{v}"] = run
        emit(
            bench="dit_vs_torch_compile",
            variant=v,
            jax_compile_s=compile_s,
            gflop_per_image=gflop[v],
            **config,
        )
    sides["torch"] = _torch_step(a, torch, diffusers, x, t, y, target)
    best = dict.fromkeys(sides, float("inf"))
    every = {name: [] for name in sides}
    yardstick = 0.0
    for r in range(a.rounds):
        start = time.perf_counter()
        round_yardstick = matmul_gflops()
        yardstick = max(yardstick, round_yardstick)
        emit(bench="dit_vs_torch_yardstick", round=r, matmul_gflops=round_yardstick)
        for name, run in sides.items():
            s, times = best_of(run, a.repeats, warmup=1)
            best[name] = min(best[name], s)
            every[name] += times
            emit(
                bench="dit_vs_torch_round",
                round=r,
                side=name,
                best_s=s,
                times_s=times,
                images_per_s=a.batch / s,
            )
        emit(bench="dit_vs_torch_round_end", round=r, wall_s=time.perf_counter() - start)
    for v in a.variants:
        ours = best[f"jax_{v}"]
        emit(
            bench="dit_vs_torch",
            variant=v,
            jax_images_per_s=a.batch / ours,
            torch_images_per_s=a.batch / best["torch"],
            jax_over_torch=best["torch"] / ours,
            jax_over_torch_median=float(np.median(every["torch"]) / np.median(every[f"jax_{v}"])),
            matmul_gflops=yardstick,
            jax_fraction_of_matmul=gflop[v] * a.batch / ours / yardstick if gflop[v] else None,
            loadavg_1min=os.getloadavg()[0],
            **config,
        )


if __name__ == "__main__":
    main()
