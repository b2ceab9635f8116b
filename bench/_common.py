"""Small helpers shared by the bench scripts: timing, JSON-line output, a matmul yardstick.

    from _common import emit, timed, time_compile, best_of, matmul_gflops

Bench scripts are run as `python bench/NAME.py`, so this module is imported by its bare name
(the script's directory is on sys.path).
"""

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def emit(**fields: Any) -> dict[str, Any]:
    """Print one JSON line (floats rounded to 4 significant digits) and return the dict."""

    def fmt(v):
        if isinstance(v, float):
            return float(f"{v:.4g}")
        if isinstance(v, (list, tuple)):
            return [fmt(u) for u in v]
        return v

    fields = {k: fmt(v) for k, v in fields.items()}
    print(json.dumps(fields), flush=True)
    return fields


def emit_env() -> dict[str, Any]:
    """Prints the line that says where the other lines were measured."""
    return emit(
        bench="env",
        jax=jax.__version__,
        devices=str(jax.devices()),
        cpu_count=os.cpu_count(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


def time_compile(
    jitted: Callable, *args, compiler_options: dict[str, Any] | None = None
) -> tuple[Callable, float]:
    """AOT-compile `jitted` for `args` with optional XLA compiler options (the DebugOptions
    fields, as in XLA_FLAGS without the dashes); returns (executable, seconds to lower+compile).
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile(compiler_options=compiler_options)
    return compiled, time.perf_counter() - start


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Call `fn()`, block on its result; returns (result, seconds)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def best_of(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Run `fn()` (whose result is blocked on) `warmup + repeats` times.

    Returns (best seconds, all timed seconds). The best is the least disturbed by other
    processes on the machine; report the spread alongside it.
    """
    for _ in range(warmup):
        timed(fn)
    times = [timed(fn)[1] for _ in range(repeats)]
    return min(times), times


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best float32 GFLOP/s of a jitted [n,n] @ [n,n] on the default device (2 n^3 flops)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
    best, _ = best_of(lambda: dot(a, b), repeats)
    return 2 * n**3 / best / 1e9


def fail(msg: str) -> None:
    """Print `msg` to stderr and exit with status 1."""
    print(msg, file=sys.stderr)
    sys.exit(1)
