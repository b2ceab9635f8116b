"""Multi-process training for real: several ``jax.distributed`` processes on loopback.

The runs go through ``launch/local.sh`` (N processes x M CPU devices, gloo collectives) with the
digits config shrunk to a one-level U-Net, so that each run is dominated by start-up and
compilation. They check that the result does not depend on how the global batch is spread:
2 processes x 2 devices reproduce 1 process x 4 devices, so does fsdp=2 on those 4 devices, and a
checkpoint written by 4 devices resumes on 2 processes x 1 device and ends where an
uninterrupted 4-device run ends.
The launcher's own logic (flags, failure and signal propagation) is tested with a stub program.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "launch" / "local.sh"
K = 4  # steps before the comparison / the checkpoint that is resumed
TINY_RUN = (
    "--config=configs/digits.py",
    "--config.model.unet.ch=32",  # GroupNorm(32) needs ch >= 32
    "--config.model.unet.ch_mult=(1,)",
    "--config.model.unet.attn_resolutions=()",
    "--config.model.unet.num_res_blocks=1",
    "--config.training.batch_size=16",
    "--config.training.sample_every=0",
    f"--config.training.log_every={K}",
    f"--config.training.checkpoint_every={K}",
)
# Halves XLA:CPU compile time, which dominates these few-step runs.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
RUN_TIMEOUT_S = 300
# Same global batch, different reduction order of the gradient all-reduce: float32 round-off,
# which Adam amplifies for parameters whose true gradient is zero (biases followed by a
# GroupNorm); the learning rate, still warming up, keeps it far below the tolerance.
PARAM_TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHON"] = sys.executable
    env["PORT"] = str(portpicker.pick_unused_port())
    env.update(extra)
    return env


def _train(
    workdir: pathlib.Path, num_steps: int, *extra_flags: str, processes: int, devices: int
) -> str:
    """Runs the program (through ``launch/local.sh`` when ``processes > 1``); returns its log."""
    flags = [
        *TINY_RUN,
        f"--workdir={workdir}",
        f"--config.training.num_steps={num_steps}",
        *extra_flags,
    ]
    if processes == 1:
        command = [sys.executable, "-m", "diffusion_jax.train", f"--cpu_devices={devices}"]
    else:
        command = [str(LOCAL_SH), str(processes), str(devices), "--"]
    result = subprocess.run(
        command + flags,
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"exit status {result.returncode}\n{log[-6000:]}"
    return log


def _load_state(workdir: pathlib.Path, step: int) -> dict:
    """The saved train state of ``step`` as a tree of host NumPy arrays (no devices needed)."""
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree
        )
        return checkpointer.restore(path, restore_args=restore_args)


def _max_abs_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(
        lambda x, y: np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))), a, b
    )
    return float(max(jax.tree_util.tree_leaves(diffs)))


def _assert_same_state(actual: dict, expected: dict):
    assert int(actual["step"]) == int(expected["step"])
    np.testing.assert_array_equal(actual["rng"], expected["rng"])
    for name in ("params", "ema_params", "opt_state"):
        assert jax.tree_util.tree_structure(actual[name]) == jax.tree_util.tree_structure(
            expected[name]
        )
        jax.tree_util.tree_map(
            lambda x, y, name=name: np.testing.assert_allclose(
                x, y, **PARAM_TOLERANCE, err_msg=name
            ),
            actual[name],
            expected[name],
        )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> pathlib.Path:
    """1 process x 4 devices, K + 2 steps, with checkpoints at K and K + 2."""
    workdir = tmp_path_factory.mktemp("one_by_four")
    _train(workdir, K + 2, processes=1, devices=4)
    return workdir


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_two_processes_match_one_process(reference_run, tmp_path):
    _train(tmp_path, K, processes=2, devices=2)
    actual, expected = _load_state(tmp_path, K), _load_state(reference_run, K)
    _assert_same_state(actual, expected)
    # The tolerance is far below what two steps change, so a wrong batch would be caught.
    two_steps = _max_abs_diff(expected["params"], _load_state(reference_run, K + 2)["params"])
    assert two_steps > 50 * PARAM_TOLERANCE["atol"]
    diff = _max_abs_diff(actual["params"], expected["params"])
    print(f"max |params(2x2) - params(1x4)| after {K} steps = {diff:.3g}")
    data_files = sorted(p.name for p in (tmp_path / "checkpoints" / str(K) / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_fsdp_matches_data_parallel(reference_run, tmp_path):
    """fsdp=2 on the same 4 devices: the kernels with >= 2**14 elements (the time embedding's
    128x128 and two 3x3x64x32 convolutions), their EMA and Adam moments are split over pairs of
    devices; the global batch and every example's noise are unchanged, so the state is
    pure data parallelism's up to the reduction order."""
    _train(tmp_path, K, "--config.training.fsdp=2", processes=1, devices=4)
    actual, expected = _load_state(tmp_path, K), _load_state(reference_run, K)
    _assert_same_state(actual, expected)
    diff = _max_abs_diff(actual["params"], expected["params"])
    print(f"max |params(fsdp=2) - params(fsdp=1)| after {K} steps = {diff:.3g}")


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_resume_four_device_checkpoint_on_two_processes(reference_run, tmp_path):
    workdir = tmp_path / "workdir"
    shutil.copytree(reference_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(K + 2))
    log = _train(workdir, K + 2, processes=2, devices=1)
    assert f"Resumed from step {K}" in log
    actual, expected = _load_state(workdir, K + 2), _load_state(reference_run, K + 2)
    _assert_same_state(actual, expected)
    diff = _max_abs_diff(actual["params"], expected["params"])
    print(f"max |params(4 -> 2x1) - params(1x4)| after {K + 2} steps = {diff:.3g}")
    for process in range(2):
        position = workdir / "checkpoints" / str(K + 2) / "data" / f"process_{process}-of-2.json"
        assert json.loads(position.read_text()) == {"next_index": K + 2}


# Execs the launcher with SIGINT and SIGTERM at their defaults and no signal blocked, as a
# terminal starts it. The test process may not be like that: a library loaded by an earlier
# test can leave SIGINT ignored at the C level (invisible to signal.getsignal), children inherit
# that, and bash cannot trap a signal that was ignored when it started.
_EXEC_WITH_DEFAULT_SIGNALS = """
import os, signal, sys
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, [])
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.fixture
def start_local_sh():
    """Starts ``launch/local.sh`` in a process group of its own, killed as a whole when the test
    ends: a test that fails halfway leaves none of its processes running."""
    launchers = []

    def start(args: list[str], env: dict[str, str], **popen_kwargs) -> subprocess.Popen:
        launcher = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_DEFAULT_SIGNALS, str(LOCAL_SH), *args],
            cwd=REPO,
            env=env,
            start_new_session=True,
            **popen_kwargs,
        )
        launchers.append(launcher)
        return launcher

    yield start
    for launcher in launchers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_sigterm_to_local_sh_saves_and_stops_all_processes(start_local_sh, tmp_path):
    logs = tmp_path / "logs"
    flags = [*TINY_RUN, f"--workdir={tmp_path}", "--config.training.num_steps=100000"]
    launcher = start_local_sh(
        ["2", "1", "--", *flags, "--config.training.log_every=1"], _env(LOG_DIR=str(logs))
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while "step 2/" not in _read(logs / "process_0.log"):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.5)
    finally:
        launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=RUN_TIMEOUT_S) == 0
    _assert_nothing_left(launcher)
    last = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 2 <= last < 100000
    for process in range(2):
        assert f"saved step {last}, exiting" in _read(logs / f"process_{process}.log")


def _assert_nothing_left(launcher: subprocess.Popen):
    """Nothing that the launcher started (in its session) outlives it."""
    left = subprocess.run(
        ["ps", "-s", str(launcher.pid), "-o", "pid=,args="], capture_output=True, text=True
    ).stdout
    assert not left, f"still running after the launcher:\n{left}"


def _read(path: pathlib.Path) -> str:
    return path.read_text() if path.exists() else ""


# The launcher with a stub in place of Python: it sees exactly the arguments the program gets.
_STUB = textwrap.dedent(
    """\
    #!/usr/bin/env bash
    # Stub interpreter: records its arguments, then behaves as $STUB_MODE says.
    set -euo pipefail
    all_args="$* "
    id=${all_args##*--process_id=}
    id=${id%% *}
    on_term() {
        echo TERM > "$STUB_DIR/signal_$id"
        echo stopped
        kill $(jobs -p) 2>/dev/null || true
        wait
        exit 0
    }
    trap on_term TERM
    printf '%s\\n' "$@" > "$STUB_DIR/args_$id"
    case "$STUB_MODE:$id" in
        ok:*) exit 0 ;;
        print:*)
            # A line printed after the process has ended, by a child that inherited its output.
            (sleep 0.3; echo "last line") &
            exit 0
            ;;
        fail:1)
            # Fails once process 0 is running (with its handler installed).
            while [[ ! -e $STUB_DIR/args_0 ]]; do sleep 0.05; done
            exit 3
            ;;
        # Stops the launcher while it is still starting the processes after this one.
        signal:0) kill -INT "$PPID" ;;
        stubborn:*)
            trap '' TERM
            exec sleep 60
            ;;
    esac
    sleep 60 </dev/null >/dev/null 2>&1 &
    wait $!
    """
)


@pytest.fixture
def launch_stub(start_local_sh, tmp_path):
    """``launch_stub(mode, args, **env)`` runs the launcher with the stub as its interpreter."""
    stub = tmp_path / "stub_python"
    stub.write_text(_STUB)
    stub.chmod(0o755)

    def launch(mode: str, args: list[str], stdout=subprocess.DEVNULL, **env) -> subprocess.Popen:
        env = _env(
            PYTHON=str(stub), STUB_DIR=str(tmp_path), STUB_MODE=mode, **{"KILL_AFTER": "20", **env}
        )
        return start_local_sh(args, env, stdout=stdout, stderr=subprocess.DEVNULL)

    return launch


def _wait_until_started(launcher: subprocess.Popen, tmp_path, num_processes: int):
    """Until every stub process has installed its SIGTERM handler."""
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"args_{i}").exists() for i in range(num_processes)):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)


def _stub_args(tmp_path, process: int) -> list[str]:
    return (tmp_path / f"args_{process}").read_text().splitlines()


def test_local_sh_passes_flags(launch_stub, tmp_path):
    launcher = launch_stub("ok", ["3", "2", "--", "--workdir=/w"], PORT="12345")
    assert launcher.wait(timeout=30) == 0
    _assert_nothing_left(launcher)
    for process in range(3):
        assert _stub_args(tmp_path, process) == [
            "-m",
            "diffusion_jax.train",
            "--cpu_devices=2",
            "--coordinator_address=127.0.0.1:12345",
            "--num_processes=3",
            f"--process_id={process}",
            "--workdir=/w",
        ]


def test_local_sh_prints_all_output_before_it_exits(launch_stub, tmp_path):
    output = tmp_path / "output"
    with open(output, "w") as stdout:
        launcher = launch_stub("print", ["2", "1", "--"], stdout=stdout)
    assert launcher.wait(timeout=30) == 0
    assert sorted(output.read_text().splitlines()) == ["[0] last line", "[1] last line"]


def test_local_sh_stops_all_when_one_fails(launch_stub, tmp_path):
    start = time.monotonic()
    launcher = launch_stub("fail", ["2", "1", "--"])
    assert launcher.wait(timeout=30) == 3
    _assert_nothing_left(launcher)
    assert time.monotonic() - start < 15  # process 0 was stopped, not waited for
    assert (tmp_path / "signal_0").read_text().strip() == "TERM"


def test_local_sh_forwards_signals(launch_stub, tmp_path):
    launcher = launch_stub("wait", ["2", "1", "--"])
    _wait_until_started(launcher, tmp_path, 2)
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=30) == 0
    _assert_nothing_left(launcher)
    for process in range(2):
        assert (tmp_path / f"signal_{process}").read_text().strip() == "TERM"


def test_local_sh_ctrl_c_in_a_terminal(launch_stub, tmp_path):
    output = tmp_path / "output"
    with open(output, "w") as stdout:
        launcher = launch_stub("wait", ["2", "1", "--"], stdout=stdout)
    _wait_until_started(launcher, tmp_path, 2)
    # As the terminal does: to the whole foreground process group, output filters included.
    os.killpg(launcher.pid, signal.SIGINT)
    assert launcher.wait(timeout=30) == 0
    _assert_nothing_left(launcher)
    assert sorted(output.read_text().splitlines()) == ["[0] stopped", "[1] stopped"]


def test_local_sh_kills_the_processes_that_ignore_sigterm(launch_stub, tmp_path):
    launcher = launch_stub("stubborn", ["2", "1", "--"], KILL_AFTER="1")
    _wait_until_started(launcher, tmp_path, 2)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 128 + signal.SIGKILL
    _assert_nothing_left(launcher)


def test_local_sh_signal_while_starting_stops_every_process(launch_stub, tmp_path):
    # Many processes, so that the signal from process 0 arrives while the others are started.
    launcher = launch_stub("signal", ["64", "1", "--"])
    # Well before KILL_AFTER (20 s), so every process was sent SIGTERM; 143 if one got it before
    # installing its handler.
    assert launcher.wait(timeout=10) in (0, 128 + signal.SIGTERM)
    _assert_nothing_left(launcher)
    for process in range(64):
        if (tmp_path / f"args_{process}").exists():
            assert (tmp_path / f"signal_{process}").read_text().strip() == "TERM"


def test_local_sh_usage():
    result = subprocess.run([str(LOCAL_SH), "2"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "Usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS" in result.stderr


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm.sbatch"])
def test_launch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True, timeout=30)
