"""Smoke test of the bench scripts: tiny networks, their JSON lines parse and hold the fields.

The scripts run as subprocesses, side by side, with XLA's LLVM optimisation off (a tiny
network's run is almost all compilation; its timings are meaningless anyway).
"""

import gzip
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from diffusion_jax import config_defaults, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--ch",
    "16",
    "--ch_mult",
    "1",
    "--num_res_blocks",
    "1",
    "--image_size",
    "8",
    "--batch",
    "2",
]
SAMPLER_ARGS = TINY + ["--steps", "3", "--respaced_steps", "2", "--guidance_steps", "2"]
SAMPLER_ARGS += ["--repeats", "1", "--warmup", "0"]
TRAIN_ARGS = TINY + ["--steps", "1", "--max_batch", "4"]
PROFILE_ARGS = TINY + ["--steps", "2", "--warmup", "1"]
EVALUATE_ARGS = ["--ch", "16", "--steps", "21", "--respaced_steps", "3", "--inception_batch", "0"]


def _import_bench(name):
    """A bench script as a module (the scripts import their siblings by bare name)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _start(script, args, xla_flags="--xla_backend_optimization_level=0"):
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "bench", script), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _lines(proc):
    """The process's JSON lines (its other lines skipped), grouped by their "bench" field."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    lines = {}
    for line in map(json.loads, filter(lambda text: text.startswith("{"), out.splitlines())):
        lines.setdefault(line["bench"], []).append(line)
    return lines


def _assert_positive(line, keys):
    for key in keys:
        assert isinstance(line[key], (int, float)) and line[key] > 0, (key, line)


@pytest.mark.slow  # long end to end: runs in CI's slow pass
def test_bench_scripts_print_json_lines(tmp_path):
    sampler, train = _start("sampler.py", SAMPLER_ARGS), _start("train.py", TRAIN_ARGS)
    profile = _start("profile_train.py", PROFILE_ARGS + ["--logdir", str(tmp_path)])
    evaluate = _start("evaluate.py", EVALUATE_ARGS)
    sampler_lines, train_lines, profile_lines = _lines(sampler), _lines(train), _lines(profile)
    evaluate_lines = _lines(evaluate)

    respaced = {"ancestral_respaced": 2, "ddim": 2, "dpmpp_2m": 2, "dpmpp_3m": 2, "heun": 3}
    ode = {"euler": 2, "heun": 3, "edm_stochastic": 3, "dpmpp_2m": 2, "dpmpp_3m": 2}
    respaced |= {f"{o}_{m}": n for o in ("edm", "flow") for m, n in ode.items()}
    assert set(sampler_lines) == {
        "env",
        "sampler_chain_only",
        "sampler_ancestral",
        "sampler_guidance",
    } | {f"sampler_{name}" for name in respaced}
    guided = sampler_lines["sampler_guidance"]
    assert [line["guidance"] for line in guided] == ["none", "classifier_free", "classifier"]
    assert guided[0]["ratio"] == 1.0
    for line in guided:
        assert line["steps"] == 2
        _assert_positive(line, ["s", "per_step_ms", "ratio", "cpu_ratio", "compile_s"])
    chain_only = sampler_lines["sampler_chain_only"]
    assert [(line["method"], line["record_every"]) for line in chain_only] == [
        ("ancestral", None),
        ("ddim", None),
        ("dpmpp_2m", None),
        ("dpmpp_3m", None),
        ("heun", None),
        ("ancestral", 1),
    ] + [(f"{o}_{m}", None) for o in ("edm", "flow") for m in ode]
    assert [line["evaluations"] for line in chain_only] == [3, 3, 3, 3, 5, 3] + 2 * list(
        ode.values()
    )
    for line in chain_only:
        _assert_positive(line, ["s", "per_eval_us", "compile_s"])
    for name, evaluations in {"ancestral": 3, **respaced}.items():
        [line] = sampler_lines[f"sampler_{name}"]
        assert line["evaluations"] == evaluations
        _assert_positive(
            line,
            [
                "samples_per_s",
                "scan_s",
                "loop_s",
                "ratio",
                "per_eval_ms",
                "forward_ms",
                "compile_scan_s",
                "compile_forward_s",
                "peak_rss_mib",
            ],
        )
        assert line["peak_device_mib"] is None  # CPU

    assert [line["batch"] for line in train_lines["train_step"]] == [2, 4]
    for line in train_lines["train_step"]:
        assert (line["ch"], line["image_size"], line["dtype"]) == (16, 8, "float32")
        _assert_positive(
            line,
            [
                "images_per_s",
                "images_per_s_mean",
                "step_s",
                "compile_s",
                "first_step_s",
                "init_s",
                "peak_rss_mib",
                "params_m",
                "xla_gflop_per_image",
                "xla_tflops_per_s",
                "program_mib",
            ],
        )
        # Not the paper's network, and a CPU: no paper FLOPs, no peak, no MFU.
        for key in ("paper_gflop_per_image", "peak", "mfu", "mfu_paper", "peak_device_mib"):
            assert line[key] is None, key
    [line] = train_lines["train_step_max_batch"]
    assert (line["largest_batch"], line["stopped"]) == (4, "reached --max_batch")

    assert set(evaluate_lines) == {
        "env",
        "evaluate_sample_ancestral21",
        "evaluate_sample_respaced3",
        "evaluate_bpd",
    }
    for name in ("evaluate_sample_ancestral21", "evaluate_sample_respaced3"):
        [line] = evaluate_lines[name]
        assert line["batch"] == 2
        _assert_positive(line, ["samples_per_s", "s", "compile_s"])
    [line] = evaluate_lines["evaluate_bpd"]
    assert line["num_timesteps"] == 21
    _assert_positive(line, ["images_per_s", "s", "compile_s"])

    [line] = profile_lines["profile_train"]
    shares = line["share"]
    assert abs(sum(shares.values()) - 1) < 1e-3, shares
    # The tiny U-Net's convolutions, forward and backward, are found and named as such.
    assert shares["conv_fwd"] > 0 and shares["conv_bwd"] > 0, shares
    assert line["top_ops"] and line["trace"].startswith(str(tmp_path))


def test_device_peaks_and_both_forms_of_cost_analysis():
    _common = _import_bench("_common")

    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    h100 = Device("NVIDIA H100 80GB HBM3")
    assert _common.device_peak_flops(h100, "bfloat16") == (989e12, "H100 dense bf16")
    assert _common.device_peak_flops(h100, "float32") == (495e12, "H100 dense tf32")
    assert _common.device_peak_flops(Device("NVIDIA H100 PCIe"), "bfloat16")[0] == 756e12
    assert _common.device_peak_flops(Device("cpu"), "bfloat16") == (None, None)

    class Compiled:
        def __init__(self, analysis):
            self.cost_analysis = lambda: analysis

    assert _common.xla_flops(Compiled({"flops": 6.0, "bytes accessed": 1.0})) == 6.0
    assert _common.xla_flops(Compiled([{"flops": 6.0}])) == 6.0  # older JAX
    assert _common.xla_flops(Compiled(None)) is None


def test_compare_runs_reads_event_files(tmp_path, capsys):
    from tensorboardX import SummaryWriter

    compare_runs = _import_bench("compare_runs")
    for name, scale in (("a", 1.0), ("b", 1.5)):
        with SummaryWriter(str(tmp_path / name / "tensorboard")) as writer:
            for step in (10, 20):
                writer.add_scalar("train/loss", scale / step, step)
    compare_runs.main([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"])
    *table, last = capsys.readouterr().out.splitlines()
    assert table[2].split() == ["10", "0.10000", "0.15000", "1.5000"]
    assert json.loads(last)["last"] == {"a": 0.05, "b": 0.075}


@pytest.mark.parametrize("script", ["gpu.sh", "fetch_gpu_wheels.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(REPO, "bench", script)], check=True)


_GPU_LIKE_HLO = "\n".join(
    [
        "HloModule jit_train_step, is_scheduled=true",
        "",
        "%fused_computation.1 (param_0: f32[8]) -> f32[8] {",
        "  %param_0 = f32[8]{0} parameter(0)",
        "  ROOT %add.1 = f32[8]{0} add(%param_0, %param_0)",
        "}",
        "",
        "%fused_computation.2 (param_0.1: f32[8]) -> f32[8] {",
        "  %param_0.1 = f32[8]{0} parameter(0)",
        "  ROOT %transpose.1 = f32[8]{0} transpose(%param_0.1), dimensions={0}",
        "}",
        "",
        "ENTRY %main (p: f32[8]) -> (f32[8], u8[0]) {",
        "  %p = f32[8]{0} parameter(0)",
        "  %cudnn-conv.1 = (f32[8]{0}, u8[0]{0}) custom-call(%p),"
        ' custom_call_target="__cudnn$convBackwardFilter",'
        ' metadata={op_name="jit(train_step)/transpose(jvp(UNet))/conv_in/conv_general_dilated"}',
        "  %loop_add_fusion.3 = f32[8]{0} fusion(%p), kind=kLoop, calls=%fused_computation.1,"
        ' metadata={op_name="jit(train_step)/jvp(UNet)/down_0_block_0/norm1/add"}',
        "  %transpose_fusion = f32[8]{0} fusion(%loop_add_fusion.3), kind=kLoop,"
        ' calls=%fused_computation.2, metadata={op_name="jit(train_step)/transpose(jvp(UNet))/x"}',
        '  %multiply.2 = f32[8]{0} multiply(%p, %p), metadata={op_name="jit(train_step)/mul"}',
        "  ROOT %tuple = (f32[8]{0}, u8[0]{0}) tuple(%multiply.2, %cudnn-conv.1)",
        "}",
    ]
)


def _gpu_like_trace(path, with_xla_ops_line):
    """A trace as the profiler writes it for a GPU: the ops' kernels on a stream line (several
    per op), the same ops once each on a derived "XLA Ops" line, the module on "XLA Modules"."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
        {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 1, "tid": 9, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    kernels = [  # two kernels for the convolution; a fusion's kernel named after it
        ("sm90_xmma_wgrad_a", {"hlo_op": "cudnn-conv.1"}, 30.0),
        ("sm90_xmma_wgrad_b", {"hlo_op": "cudnn-conv.1"}, 10.0),
        ("loop_add_fusion_3", {}, 5.0),
        ("transpose_fusion", {"hlo_op": "transpose_fusion"}, 3.0),
        ("multiply_2", {"hlo_op": "multiply.2"}, 2.0),
        ("MemcpyD2D", {}, 1.0),
    ]
    events = [
        {"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": dur, "name": name, "args": args}
        for name, args, dur in kernels
    ]
    events.append({"ph": "X", "pid": 1, "tid": 9, "ts": 0, "dur": 60.0, "name": "jit_train_step"})
    events.append({"ph": "X", "pid": 2, "tid": 3, "ts": 0, "dur": 99.0, "name": "PjitFunction"})
    if with_xla_ops_line:
        ops = [("cudnn-conv.1", 40.0), ("loop_add_fusion.3", 5.0), ("transpose_fusion", 3.0)]
        ops.append(("multiply.2", 2.0))
        events += [
            {"ph": "X", "pid": 1, "tid": 8, "ts": 0, "dur": dur, "name": name} for name, dur in ops
        ]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


@pytest.mark.parametrize("with_xla_ops_line", [True, False])
def test_profile_breakdown_of_a_gpu_like_trace(tmp_path, monkeypatch, with_xla_ops_line):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the import adds flags
    profile_train = _import_bench("profile_train")
    path = tmp_path / "host.trace.json.gz"
    _gpu_like_trace(path, with_xla_ops_line)
    events, source = profile_train.op_events(str(path), "jit_train_step")
    assert source == ("XLA Ops line" if with_xla_ops_line else "device streams")
    instructions = profile_train.parse_hlo(_GPU_LIKE_HLO)
    per_category, unknown, top = profile_train.breakdown(events, instructions, 2, 1)
    expected = {"conv_bwd": 20.0, "norm_elementwise": 2.5, "layout": 1.5, "optimizer_ema": 1.0}
    if not with_xla_ops_line:
        expected["other"] = 0.5  # the copy kernel, named after no instruction
    # microseconds per step (2 steps)
    assert {c: ms * 1e3 for c, ms in per_category.items()} == pytest.approx(expected)
    assert unknown * 1e3 == pytest.approx(expected.get("other", 0.0))
    assert top == [(("cudnn-conv.1", "conv_bwd"), pytest.approx(0.02))]


def test_dit_vs_torch_prints_its_lines_or_skips():
    """bench/dit_vs_torch.py on a tiny DiT: the comparison's lines with torch and diffusers
    installed, else its one skip line."""
    args = ["--depth", "1", "--hidden", "32", "--heads", "2", "--size", "8", "--batch", "2"]
    lines = _lines(_start("dit_vs_torch.py", args + ["--rounds", "1", "--repeats", "1"]))
    [last] = lines["dit_vs_torch"]
    if "skipped" in last:
        assert set(lines) == {"dit_vs_torch"}
        return
    assert len(lines["dit_vs_torch_round"]) == 2
    _assert_positive(
        last, ["jax_images_per_s", "torch_images_per_s", "jax_over_torch", "jax_over_torch_median"]
    )


@pytest.mark.slow
def test_compile_only_counts_every_micro_batch_and_holds_one_at_a_time():
    """``--compile_only`` on a one-level digits U-Net (batch 64): two micro-batches are the
    same FLOPs per image (XLA counts the scan's body once; the bench multiplies it back) and
    need less memory than one batch of 64 (the scan holds one micro-batch's activations)."""
    bench_train = _import_bench("train")
    config = config_defaults.get_config_digits()
    config.model.unet.update(ch=16, ch_mult=(1,), attn_resolutions=(), num_groups=16)
    config.training.batch_size = 64
    one = bench_train.compile_train_step(config, 10)
    config.training.grad_accum_steps = 2
    two = bench_train.compile_train_step(config, 10)
    assert (one["grad_accum_steps"], two["grad_accum_steps"]) == (1, 2)
    assert two["xla_gflop_per_image"] == pytest.approx(one["xla_gflop_per_image"], rel=0.02)
    assert 0 < two["program_mib"] < 0.8 * one["program_mib"]


def test_timed_step_counts_every_micro_batch_of_a_scan(monkeypatch):
    """The timed step's FLOPs per image do not depend on the micro-batches, also where they
    run as a scan (accelerators' default, forced here: XLA counts a loop's body once)."""
    bench_train = _import_bench("train")
    monkeypatch.setattr(train_step, "default_accumulate", lambda mesh: "scan")
    config = config_defaults.get_config_digits()
    config.model.unet.update(ch=16, ch_mult=(1,), attn_resolutions=(), num_groups=16)
    config.training.batch_size = 8
    one = bench_train.bench_train_step(config, num_steps=1, num_classes=10)
    config.training.grad_accum_steps = 2
    two = bench_train.bench_train_step(config, num_steps=1, num_classes=10)
    assert two["xla_gflop_per_image"] == pytest.approx(one["xla_gflop_per_image"], rel=0.02)


@pytest.mark.slow
def test_compile_only_scanned_dit_blocks_same_flops_less_memory():
    """``--compile_only`` on an 8-block DiT with block remat: scanned blocks
    (``model.dit.scan_blocks``) are counted at the unrolled step's FLOPs (XLA counts a loop's
    body once; the bench counts the unrolled copy) and need less memory (one block's backward
    pass at a time: 125 against 76 MiB when written)."""
    bench_train = _import_bench("train")
    config = config_defaults.use_network(
        config_defaults.get_config_digits(),
        "dit",
        patch_size=2,
        hidden_size=128,
        depth=8,
        num_heads=4,
    )
    config.training.update(batch_size=64, remat="block")
    unrolled = bench_train.compile_train_step(config, 10)
    config.model.dit.scan_blocks = True
    scanned = bench_train.compile_train_step(config, 10)
    assert (unrolled["scan_blocks"], scanned["scan_blocks"]) == (False, True)
    flops = unrolled["xla_gflop_per_image"]
    assert scanned["xla_gflop_per_image"] == pytest.approx(flops, rel=0.01)
    assert 0 < scanned["program_mib"] < 0.8 * unrolled["program_mib"]


@pytest.mark.slow
def test_compile_only_scanned_dit_gathers_one_layers_weights_per_step(tmp_path):
    """The digits DiT (width 128, batch 64) with block remat and scanned blocks, FSDP over 8
    simulated devices: inside the loops XLA all-gathers only weights of one layer (2-D or
    more, no batch dim), never the carried activations of the whole batch, which GSPMD does
    when the stacked parameters and the carry are left unconstrained."""
    dump = tmp_path / "hlo"
    args = ["--compile_only", "--config", "configs/digits_dit.py", "--batch", "64"]
    args += [f"--config.training.{k}" for k in ("fsdp=8", "remat='block'")]
    args += ["--config.model.dit.scan_blocks=True", "--config.eval.batch_size=64"]
    flags = f"--xla_force_host_platform_device_count=8 --xla_dump_to={dump} "
    flags += "--xla_dump_hlo_module_re=.*train_step.* --xla_dump_hlo_pass_re=NONE"
    assert _lines(_start("train.py", args, flags))["train_step_compiled"]
    # The scanned step, and the unrolled copy compiled for the FLOP count (without loops).
    hlos = dump.glob("*train_step*after_optimizations.txt")
    computations = [text for hlo in hlos for text in hlo.read_text().split("\n\n")]
    bodies = set()
    for text in computations:
        bodies.update(re.findall(r"while\(.*?body=%?([\w.\-]+)", text))
    gathered = {}
    for text in computations:
        name = text.strip().split(" ", 1)[0].lstrip("%")
        if name in bodies:
            gathered[name] = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", text)
    loops = [shapes for shapes in gathered.values() if shapes]
    assert len(loops) >= 2, gathered  # the forward and the backward loop over the blocks
    for shapes in loops:
        for shape in shapes:
            dims = [int(d) for d in shape.split(",")]
            assert len(dims) >= 2 and 64 not in dims, (shape, gathered)
