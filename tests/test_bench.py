"""Smoke test of the bench scripts: tiny networks, their JSON lines parse and hold the fields.

The scripts run as subprocesses, side by side, with XLA's LLVM optimisation off (a tiny
network's run is almost all compilation; its timings are meaningless anyway).
"""

import importlib
import json
import os
import subprocess
import sys

import pytest

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
SAMPLER_ARGS = TINY + ["--steps", "3", "--respaced_steps", "2", "--repeats", "1", "--warmup", "0"]
TRAIN_ARGS = TINY + ["--steps", "1", "--max_batch", "4"]
PROFILE_ARGS = TINY + ["--steps", "2", "--warmup", "1"]


def _import_bench(name):
    """A bench script as a module (the scripts import their siblings by bare name)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _start(script, args):
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
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
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = {}
    for line in map(json.loads, filter(lambda text: text.startswith("{"), out.splitlines())):
        lines.setdefault(line["bench"], []).append(line)
    return lines


def _assert_positive(line, keys):
    for key in keys:
        assert isinstance(line[key], (int, float)) and line[key] > 0, (key, line)


def test_bench_scripts_print_json_lines(tmp_path):
    sampler, train = _start("sampler.py", SAMPLER_ARGS), _start("train.py", TRAIN_ARGS)
    profile = _start("profile_train.py", PROFILE_ARGS + ["--logdir", str(tmp_path)])
    sampler_lines, train_lines, profile_lines = _lines(sampler), _lines(train), _lines(profile)

    assert set(sampler_lines) == {
        "env",
        "sampler_chain_only",
        "sampler_ancestral",
        "sampler_ancestral_respaced",
        "sampler_ddim",
    }
    chain_only = sampler_lines["sampler_chain_only"]
    assert [line["record_every"] for line in chain_only] == [None, 1]
    for line in chain_only:
        _assert_positive(line, ["s", "per_step_us", "compile_s"])
    for name, steps in (("ancestral", 3), ("ancestral_respaced", 2), ("ddim", 2)):
        [line] = sampler_lines[f"sampler_{name}"]
        assert line["steps"] == steps
        _assert_positive(
            line,
            [
                "samples_per_s",
                "scan_s",
                "loop_s",
                "ratio",
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
