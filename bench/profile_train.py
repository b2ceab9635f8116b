"""Where the time of a train step goes: a ``jax.profiler`` trace and its breakdown by kind of op.

    python bench/profile_train.py --dtype bfloat16 --batch 128      # CIFAR-10 U-Net, GPU
    python bench/profile_train.py --ch 16 --ch_mult 1 --num_res_blocks 1 --image_size 8 --batch 2

Builds the train step as ``bench/train.py`` does (same flags), runs ``--warmup`` steps, then
traces ``--steps`` steps into ``--logdir`` (for TensorBoard/XProf or Perfetto) and reads the
Chrome-trace JSON the profiler writes beside its ``.xplane.pb`` (no TensorBoard needed). Each
op event (on a GPU the "XLA Ops" line, else the kernels on the streams; thunks on XLA:CPU) names
its HLO instruction; the compiled program's own HLO text says what the instruction is (opcode,
fused ops, custom-call target, the JAX op path in its metadata), from which it gets one category:

  conv_fwd / conv_bwd    convolutions (cuDNN custom calls or fusions holding a convolution);
                         backward when the JAX path is under ``transpose(...)``
  attention              ops of the attention blocks (q/k/v/out projections, logits, softmax)
  dense                  other matmuls (timestep embedding and its per-block projections)
  norm_elementwise       everything else in the network's forward and backward passes:
                         GroupNorm, swish, residual adds, loss (fused elementwise/reductions)
  random                 threefry bits of the noise, t and dropout masks
  optimizer_ema          ops outside the gradient: clipping, Adam, EMA, metrics
  layout                 copies and transposes (layout changes)
  collectives            cross-device communication
  other                  the rest, and events named after no instruction (e.g. memcpy;
                         reported apart as ``unknown_ms_per_step``)

Prints a table (milliseconds per step and share of the summed op time, then the costliest
ops), then one JSON line. On XLA:CPU, ops that run side by side make the summed op time exceed
the wall time; on a GPU, a summed op time well below the wall time means idle gaps (launch
overhead). CUDA command buffers are turned off here (``--xla_gpu_enable_command_buffer=``):
kernels replayed from a CUDA graph lose their HLO op names in the trace.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

from diffusion_jax import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
xla_flags.configure()

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, emit_env, time_compile  # noqa: E402
from train import add_config_args, build, load_config  # noqa: E402

CATEGORIES = (
    "conv_fwd",
    "conv_bwd",
    "attention",
    "dense",
    "norm_elementwise",
    "random",
    "optimizer_ema",
    "layout",
    "collectives",
    "other",
)
CONTROL_FLOW = {"while", "conditional", "call"}  # their bodies' ops have events of their own
LAYOUT_OPS = {"copy", "transpose", "copy-start", "copy-done"}
LAYOUT_ONLY = LAYOUT_OPS | {"parameter", "bitcast", "reshape", "constant", "tuple"}
COLLECTIVES = re.compile(r"^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)")
RANDOM = re.compile(r"threefry|_bernoulli|_uniform|_normal|_randint|random_bits|rng")
# A U-Net GroupNorm's module is named norm, norm1, norm2 or norm_out (diffusion_jax.models).
GROUP_NORM = re.compile(r"/norm(\d*|_out)/")

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([^\s(]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([^\s=]+) = .*?\s([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"calls=%?([^\s,]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def parse_hlo(text: str) -> dict[str, dict]:
    """Instruction name -> ``{opcode, op_name, target, fused}`` of an HLO module's text;
    ``fused`` is the set of opcodes of a fusion's called computation."""
    computations: dict[str, set[str]] = collections.defaultdict(set)
    instructions = {}
    current = None
    for line in text.splitlines():
        if " = " not in line and (match := _COMPUTATION.match(line)):
            current = match.group(1)
        elif match := _INSTRUCTION.match(line):
            name, opcode = match.groups()
            computations[current].add(opcode)
            calls, target, op_name = (p.search(line) for p in (_CALLS, _TARGET, _OP_NAME))
            instructions[name] = dict(
                opcode=opcode,
                op_name=op_name.group(1) if op_name else "",
                target=target.group(1) if target else "",
                calls=calls.group(1) if calls and opcode == "fusion" else None,
            )
    for info in instructions.values():
        info["fused"] = computations.get(info.pop("calls"), set())
    return instructions


def categorize(info: dict | None) -> str | None:
    """The category of one HLO instruction (None: control flow, not counted)."""
    if info is None:
        return "other"
    opcode, op_name, target = info["opcode"], info["op_name"], info["target"].lower()
    ops = info["fused"] | {opcode}
    backward = "transpose(" in op_name
    if opcode in CONTROL_FLOW:
        return None
    if "convolution" in ops or "conv" in target:
        return "conv_bwd" if backward or "backward" in target else "conv_fwd"
    if "dot" in ops or "gemm" in target or "matmul" in target:
        return "attention" if "attn" in op_name else "dense"
    if opcode in LAYOUT_OPS or (opcode == "fusion" and info["fused"] <= LAYOUT_ONLY):
        return "layout"
    if any(COLLECTIVES.match(op) for op in ops):
        return "collectives"
    if RANDOM.search(op_name) or "rng-bit-generator" in ops:
        return "random"
    if "attn" in op_name and not GROUP_NORM.search(op_name):
        return "attention"
    if "jvp(" not in op_name and "transpose(" not in op_name:
        return "optimizer_ema"
    return "norm_elementwise"


def trace_file(logdir: str) -> str:
    """The newest Chrome-trace JSON under ``logdir`` (``<host>.trace.json.gz``, or the
    ``perfetto_trace.json.gz`` that newer profilers write in its place)."""
    for pattern in ("*.trace.json.gz", "perfetto_trace.json.gz"):
        found = glob.glob(os.path.join(logdir, "plugins", "profile", "*", pattern))
        if found:
            return max(found, key=os.path.getmtime)
    raise FileNotFoundError(f"no trace JSON under {logdir}/plugins/profile")


def op_events(path: str, module: str) -> tuple[list[tuple[str, float]], str]:
    """``(events, where from)``: ``(HLO op or kernel name, microseconds)`` of the op events in
    a trace, each op run counted once. A GPU's trace shows each op on a derived "XLA Ops" line
    and as its kernels on the stream lines: the former is read where present, else the latter
    (kernels carry their op's name in ``args.hlo_op``). Without device events (XLA:CPU): the
    host's thunk events of HLO module ``module``."""
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e["args"]["name"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in spans if process.get(e["pid"], "").startswith("/device:")]
    line = lambda e: thread.get((e["pid"], e.get("tid")), "")
    sources = (
        ("XLA Ops line", [e for e in device if line(e) == "XLA Ops"]),
        ("device streams", [e for e in device if line(e).startswith("Stream")]),
        ("host thunks", [e for e in spans if e.get("args", {}).get("hlo_module") == module]),
    )
    for source, chosen in sources:
        if chosen:
            return [(e.get("args", {}).get("hlo_op", e["name"]), e["dur"]) for e in chosen], source
    return [], "none"


def breakdown(events, instructions, num_steps: int, top: int):
    """Milliseconds per step by category, of names that are no instruction of the program, and
    the ``top`` costliest ops. Kernel names may spell an instruction's '.' and '-' as '_'."""
    spelled = lambda name: name.lstrip("%").replace(".", "_").replace("-", "_")
    aliases = {spelled(name): name for name in instructions}
    per_category, per_op = collections.Counter(), collections.Counter()
    unknown = 0.0
    for name, dur in events:
        info = instructions.get(name) or instructions.get(aliases.get(spelled(name), ""))
        category = categorize(info)
        if category is None:
            continue
        ms = dur / 1e3 / num_steps
        per_category[category] += ms
        per_op[(name, category)] += ms
        unknown += ms if info is None else 0.0
    return per_category, unknown, per_op.most_common(top)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--steps", type=int, default=5, help="traced steps")
    parser.add_argument("--warmup", type=int, default=2, help="untraced steps before them")
    parser.add_argument("--logdir", default="bench_out/profile", help="trace directory")
    parser.add_argument("--top", type=int, default=15, help="costliest ops to list")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1, --warmup >= 0")

    emit_env()
    config = load_config(args)
    state, step_fn, batches, _ = build(config, args.num_classes)
    compiled, compile_s = time_compile(step_fn, state, batches[0])

    def run(state, num_steps):
        for i in range(num_steps):
            state, _ = compiled(state, batches[i % 2])
        return jax.block_until_ready(state)

    state = run(state, args.warmup)
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level = 3  # XLA:CPU names its thunks only at this level
    with jax.profiler.trace(args.logdir, profiler_options=options):
        start = time.perf_counter()
        run(state, args.steps)
        wall_ms = 1e3 * (time.perf_counter() - start) / args.steps
    hlo = compiled.as_text()
    module = hlo.split(None, 2)[1].rstrip(",")  # "HloModule jit_train_step, ..."
    path = trace_file(args.logdir)
    events, source = op_events(path, module)
    if not events:
        raise RuntimeError(f"no op events in {path}")
    per_category, unknown, top_ops = breakdown(events, parse_hlo(hlo), args.steps, args.top)
    total = sum(per_category.values())

    print(f"{module}: {args.steps} traced steps, batch {args.batch}, {args.dtype}")
    print(f"wall {wall_ms:.2f} ms/step, summed op time {total:.2f} ms/step ({source} of {path})")
    print(f"  ({unknown:.3f} ms/step of events named after no instruction of the program)")
    for category in CATEGORIES:
        ms = per_category.get(category, 0.0)
        print(f"  {category:18s} {ms:10.3f} ms {100 * ms / total:6.1f} %")
    print("costliest ops:")
    for (name, category), ms in top_ops:
        print(f"  {name:40s} {category:18s} {ms:10.3f} ms")
    emit(
        bench="profile_train",
        platform=jax.devices()[0].platform,
        batch=args.batch,
        dtype=args.dtype,
        ch=config.model.unet.ch,
        steps=args.steps,
        compile_s=compile_s,
        wall_ms_per_step=wall_ms,
        op_ms_per_step=total,
        events_from=source,
        unknown_ms_per_step=unknown,
        ms_per_step={c: round(per_category.get(c, 0.0), 4) for c in CATEGORIES},
        share={c: round(per_category.get(c, 0.0) / total, 4) for c in CATEGORIES},
        top_ops=[[name, category, ms] for (name, category), ms in top_ops],
        trace=path,
    )


if __name__ == "__main__":
    main()
