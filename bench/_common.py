"""Small helpers shared by the bench scripts: timing, JSON-line output, a matmul yardstick,
FLOP counts, device peaks and memory, and the sweeps' sample-and-score points.

    from _common import emit, timed, time_compile, best_of, matmul_gflops, xla_flops

Bench scripts are run as `python bench/NAME.py`, so this module is imported by its bare name
(the script's directory is on sys.path).
"""

import json
import os
import resource
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


# XLA:CPU library choices, as compiler options (`.compile(compiler_options=...)`), so that
# variants run in one process, interleaved. In this jaxlib, YNNPACK takes dots, convolutions and
# reductions by default. "eigen_conv" keeps its dots and reductions and gives convolutions to
# XLA's Eigen kernels; "ynn_reduce" keeps its reductions only (the programs' setting,
# `xla_flags.CPU_LIBRARY_FLAG`); "eigen" gives it nothing. The same as
# XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce, =reduce and =(empty)
# before JAX starts its backend.
XLA_CPU_VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "eigen_conv": {
        "xla_cpu_experimental_ynn_fusion_type": (
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
        )
    },
    "ynn_reduce": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
}


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


# Dense tensor-core peaks per device in FLOP/s: (bfloat16, tf32), from NVIDIA's data sheets.
# Matched against ``device.device_kind`` in this order (the first substring found wins).
PEAK_FLOPS = {
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 495e12),  # SXM
    "H200": (989e12, 495e12),
    "A100": (312e12, 156e12),
}


def device_peak_flops(device, dtype: str) -> tuple[float | None, str | None]:
    """``(FLOP/s, what it is)`` of ``device`` for ``dtype`` compute, or ``(None, None)``.

    float32 convolutions and dots run at JAX's default precision, which XLA:GPU executes on
    TF32 tensor cores (Ampere and later): their peak is the TF32 one.
    """
    for kind, (bf16, tf32) in PEAK_FLOPS.items():
        if kind in device.device_kind:
            name = "bf16" if dtype == "bfloat16" else "tf32"
            return (bf16 if name == "bf16" else tf32), f"{kind} dense {name}"
    return None, None


def xla_flops(compiled) -> float | None:
    """FLOPs of one run of a compiled program by XLA's cost analysis (per device for an SPMD
    program), or None where the backend gives none. ``cost_analysis()`` returns a dict in
    recent JAX and a list of one dict per program in older ones."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def program_mib(compiled) -> float | None:
    """Device memory a compiled program needs by XLA's buffer assignment (arguments, outputs
    and temporaries, donated buffers counted once), in MiB; None where unavailable."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return total / 2**20


def peak_device_mib() -> float | None:
    """Peak device memory in use by this process so far, in MiB (None on CPU, which keeps no
    such count)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def peak_rss_mib() -> float:
    """Peak resident host memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fail(msg: str) -> None:
    """Print `msg` to stderr and exit with status 1."""
    print(msg, file=sys.stderr)
    sys.exit(1)


def read_results(path) -> list[dict]:
    """The JSON lines of a sweep's results file (none if it does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_result(path, line: dict) -> None:
    """Appends one point's JSON line to a sweep's results file."""
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def sample_and_score(workdir, overrides: dict) -> tuple[dict, float]:
    """``(scores, sample_s)``: the evaluation program's ``sample`` mode on ``workdir`` with
    ``overrides`` (dotted keys), timed, then its ``fid`` mode's numbers. Call
    ``diffusion_jax.xla_flags.configure()`` first, as the evaluation program does."""
    from diffusion_jax import evaluators

    start = time.perf_counter()
    evaluators.evaluate(workdir, "sample", overrides=overrides)
    sample_s = time.perf_counter() - start
    return evaluators.evaluate(workdir, "fid", overrides=overrides), sample_s
