"""Gradient accumulation as an unrolled loop vs a ``lax.scan``: train-step time and compile.

    python bench/accumulate.py                       # digits network, batch 128, 4 micro-batches
    python bench/accumulate.py --config configs/cifar10.py --batch 32 --accum 2 --rounds 2

Builds the train step of ``--config`` (same flags as ``bench/train.py``) with
``training.grad_accum_steps = --accum`` twice, ``make_train_step(accumulate="loop")`` and
``accumulate="scan"``, and times them in alternating rounds of ``--steps`` steps, so that load
from other processes hits both alike. Prints one JSON line per variant (compile time, best and
all per-step times, the optimized HLO's size in characters) and ``scan_over_loop``, the ratio
of the best step times: what ``make_train_step`` decides by (the loop on CPU, the scan on
accelerators).
"""

import argparse
import functools
import os
import sys

from diffusion_jax import xla_flags  # noqa: E402

xla_flags.configure()

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, emit_env, time_compile, timed  # noqa: E402
from train import REPO, add_config_args, build, load_config  # noqa: E402

VARIANTS = ("loop", "scan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.set_defaults(config=os.path.join(REPO, "configs", "digits.py"), batch=128)
    parser.add_argument("--accum", type=int, default=4, help="training.grad_accum_steps")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant")
    args = parser.parse_args(argv)
    if min(args.accum, args.steps, args.rounds) < 1:
        parser.error("--accum, --steps and --rounds must be >= 1")

    emit_env()
    config = load_config(args, grad_accum_steps=args.accum)
    runs = {}
    for variant in VARIANTS:
        state, step_fn, batches, _ = build(config, args.num_classes, accumulate=variant)
        compiled, compile_s = time_compile(step_fn, state, batches[0])
        state, _ = compiled(state, batches[0])  # warm-up
        runs[variant] = dict(
            compiled=compiled, state=state, batches=batches, compile_s=compile_s, step_s=[]
        )

    def steps(run):
        state = run["state"]
        for i in range(args.steps):
            state, _ = run["compiled"](state, run["batches"][i % 2])
        return state

    for _ in range(args.rounds):
        for run in runs.values():
            run["state"], seconds = timed(functools.partial(steps, run))
            run["step_s"].append(seconds / args.steps)

    best = {variant: min(run["step_s"]) for variant, run in runs.items()}
    for variant, run in runs.items():
        emit(
            bench="accumulate",
            variant=variant,
            config=os.path.relpath(args.config, REPO),
            platform=jax.devices()[0].platform,
            batch=args.batch,
            accum=args.accum,
            dtype=args.dtype,
            compile_s=run["compile_s"],
            hlo_chars=len(run["compiled"].as_text()),
            step_s=best[variant],
            step_s_all=run["step_s"],
            scan_over_loop=best["scan"] / best["loop"],
        )


if __name__ == "__main__":
    main()
