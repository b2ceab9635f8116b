"""Smoke test of the bench scripts: tiny networks, their JSON lines parse and hold the fields.

Both scripts run as subprocesses, side by side, with XLA's LLVM optimisation off (a tiny
network's run is almost all compilation; its timings are meaningless anyway).
"""

import json
import os
import subprocess
import sys

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
TRAIN_ARGS = TINY + ["--steps", "1"]


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
    """The process's JSON lines, grouped by their "bench" field."""
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = {}
    for line in map(json.loads, out.splitlines()):
        lines.setdefault(line["bench"], []).append(line)
    return lines


def _assert_positive(line, keys):
    for key in keys:
        assert isinstance(line[key], (int, float)) and line[key] > 0, (key, line)


def test_bench_scripts_print_json_lines():
    sampler, train = _start("sampler.py", SAMPLER_ARGS), _start("train.py", TRAIN_ARGS)
    sampler_lines, train_lines = _lines(sampler), _lines(train)

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
            line, ["scan_s", "loop_s", "ratio", "forward_ms", "compile_scan_s", "compile_forward_s"]
        )

    [line] = train_lines["train_step"]
    assert (line["batch"], line["ch"], line["image_size"]) == (2, 16, 8)
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
        ],
    )
