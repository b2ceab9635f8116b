"""Tests of the training program: exact resume after SIGKILL, SIGTERM and SIGINT, interrupted and
corrupt checkpoints, non-finite loss, config errors, the CIFAR-10 configs and gradient
accumulation.

Most runs use a tiny network on the digits (``_TINY``), in-process where possible; the signal
and exit-code checks run ``python -m diffusion_jax.train`` as a subprocess. Compiled programs
are shared between all of them through a persistent compilation cache in a temporary directory.
"""

import hashlib
import importlib.util
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from jax.experimental.compilation_cache import compilation_cache
from PIL import Image

from diffusion_jax import (
    checkpointing,
    config_lib,
    generate,
    input_pipeline,
    losses,
    pretrained,
    reporting,
    sharding,
    train,
    train_step,
)

REPO = pathlib.Path(__file__).resolve().parents[1]

_TINY = {
    "model.unet.ch": 32,
    "model.unet.ch_mult": (1,),
    "model.unet.attn_resolutions": (),
    "model.unet.num_res_blocks": 1,
    "diffusion.num_timesteps": 50,
    "training.batch_size": 16,
    "training.log_every": 1,
    "training.sample_every": 0,
}
# Steps of the reference run; it saves at _HALF and _STEPS.
_STEPS, _HALF = 4, 2
_SUBPROCESS_TIMEOUT_S = 300


def _load_module(path: pathlib.Path):
    """The Python file at ``path`` (a config or a bench script), imported as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(name="digits", **overrides) -> ml_collections.ConfigDict:
    """``configs/<name>.py`` with ``overrides`` (dotted keys, as on the command line)."""
    module = _load_module(REPO / "configs" / f"{name}.py")
    return config_lib.apply_overrides(module.get_config(), overrides)


def _tiny(**overrides) -> ml_collections.ConfigDict:
    return _config("digits", **{**_TINY, **overrides})


def _flags(overrides: dict) -> list[str]:
    """Command-line overrides; strings as they are (the flag parser would keep repr's quotes)."""
    return [
        f"--config.{key}={value if isinstance(value, str) else repr(value)}"
        for key, value in overrides.items()
    ]


def _env(cache_dir) -> dict[str, str]:
    return dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )


def _start(
    workdir,
    log_path,
    cache_dir,
    *args,
    config_file="configs/digits.py",
    overrides=_TINY,
    env=None,
) -> subprocess.Popen:
    """Starts the training program with ``overrides`` (dotted keys) and the variables ``env``
    added to its environment; output goes to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "diffusion_jax.train",
                f"--config={config_file}",
                f"--workdir={workdir}",
                *_flags(overrides),
                *args,
            ],
            cwd=REPO,
            env={**_env(cache_dir), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _run(workdir, log_path, cache_dir, *args, **kwargs):
    """Runs the training program (``_start``'s arguments) to the end; it must succeed."""
    process = _start(workdir, log_path, cache_dir, *args, **kwargs)
    process.wait(timeout=_SUBPROCESS_TIMEOUT_S)
    assert process.returncode == 0, log_path.read_text()


def _wait_for(condition, process, log_path, what):
    deadline = time.monotonic() + _SUBPROCESS_TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"exited ({process.returncode}) before {what}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}:\n{log_path.read_text()}")
        time.sleep(0.02)


def _steps(workdir) -> list[int]:
    """Finalised checkpoint steps (orbax renames a save to ``<step>`` once complete)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _read_checkpoint(workdir, step):
    """``(train state as a tree of numpy arrays, data iterator state)`` as saved on disk."""
    manager = ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=("state", "data"),
    )
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    data_file = pathlib.Path(workdir) / "checkpoints" / str(step) / "data" / "process_0-of-1.json"
    return jax.device_get(restored["state"]), data_file.read_text()


def _snapshot(directory) -> dict[str, str]:
    """Every file under ``directory`` with a hash of its contents."""
    root = pathlib.Path(directory)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _copy_checkpoints(source, workdir, steps):
    for step in steps:
        shutil.copytree(
            pathlib.Path(source) / "checkpoints" / str(step),
            pathlib.Path(workdir) / "checkpoints" / str(step),
        )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A persistent compilation cache for this module's in-process and subprocess runs."""
    path = tmp_path_factory.mktemp("jax_cache")
    previous = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """Workdir of a straight tiny run of _STEPS steps, checkpointed at _HALF and _STEPS."""
    workdir = tmp_path_factory.mktemp("reference")
    train.train_and_evaluate(
        _tiny(**{"training.num_steps": _STEPS, "training.checkpoint_every": _HALF}), workdir
    )
    assert _steps(workdir) == [_HALF, _STEPS]
    return workdir


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_resume_after_sigkill_is_exact(cache_dir, tmp_path):
    # All three runs are the program itself: it sets XLA flags (the CPU convolution kernels) that
    # this test process lacks, and those change the last bits of the results.
    every_half = f"--config.training.checkpoint_every={_HALF}"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(
        straight,
        tmp_path / "straight.log",
        cache_dir,
        f"--config.training.num_steps={_STEPS}",
        every_half,
    )

    log = tmp_path / "killed.log"
    process = _start(
        resumed,
        log,
        cache_dir,
        "--config.training.num_steps=100000",
        "--config.training.keep_checkpoints=100000",
        every_half,
    )
    try:
        _wait_for(
            lambda: (resumed / "checkpoints" / str(_HALF)).is_dir(),
            process,
            log,
            f"checkpoint {_HALF}",
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    # The process may have saved later steps before the kill landed; drop them so that the
    # restart has to resume from _HALF (any in-flight save stays, as a kill would leave it).
    for step in _steps(resumed):
        if step > _HALF:
            shutil.rmtree(resumed / "checkpoints" / str(step))
    # The restart also keeps the memory XLA frees (--reuse_freed_memory): an allocator setting,
    # which must not change a bit of the results.
    _run(
        resumed,
        tmp_path / "resumed.log",
        cache_dir,
        f"--config.training.num_steps={_STEPS}",
        every_half,
        "--reuse_freed_memory",
    )
    assert f"Resumed from step {_HALF}" in (tmp_path / "resumed.log").read_text()

    fresh = input_pipeline.create_train_iterator(
        _tiny().data, global_batch_size=_TINY["training.batch_size"], seed=0
    )
    positions = {}
    for step in (_HALF, _STEPS):
        expected_state, expected_data = _read_checkpoint(straight, step)
        state, data = _read_checkpoint(resumed, step)
        # params, ema_params, opt_state (Adam moments and count), step, rng.
        chex.assert_trees_all_equal(expected_state, state, strict=True)
        assert int(state["step"]) == step
        # Data order: both runs stopped at the same position in the stream, and it is the
        # position after exactly `step` batches, so the resumed run neither repeated nor
        # skipped a batch (and equal params confirm the batches were the same).
        while len(positions) < step:
            next(fresh)
            positions[len(positions) + 1] = fresh.get_state()
        assert data == expected_data
        assert json.loads(data) == positions[step]


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stop_signal_saves_and_exits_zero_then_resumes(
    stop_signal, cache_dir, tmp_path, monkeypatch
):
    """SIGTERM (preemption) and SIGINT (Ctrl-C) both save the step reached and exit 0."""
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    num_steps = 100000
    process = _start(
        workdir,
        log,
        cache_dir,
        f"--config.training.num_steps={num_steps}",
        f"--config.training.checkpoint_every={num_steps}",
    )
    try:
        _wait_for(lambda: "step 1/" in log.read_text(), process, log, "the first step")
        process.send_signal(stop_signal)
        process.wait(timeout=_SUBPROCESS_TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 0, log.read_text()
    [stopped_at] = _steps(workdir)
    assert 1 <= stopped_at < num_steps
    assert f"Stop requested ({stop_signal.name}): saved step {stopped_at}, exiting" in (
        log.read_text()
    )

    def fail(*args, **kwargs):
        raise AssertionError("initialised a fresh train state instead of resuming")

    monkeypatch.setattr(train_step, "create_train_state", fail)
    train.train_and_evaluate(_tiny(**{"training.num_steps": stopped_at + 1}), workdir)
    assert _steps(workdir) == [stopped_at, stopped_at + 1]
    state, _ = _read_checkpoint(workdir, stopped_at + 1)
    assert int(state["step"]) == stopped_at + 1


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_interrupted_save_is_ignored_and_cleaned_up(reference, tmp_path):
    """A kill during an async save leaves ``<step>.orbax-checkpoint-tmp`` (orbax 0.12 writes
    there and renames to ``<step>`` when complete). Plant two such half-written saves next to
    the complete checkpoint at _HALF: the run resumes from _HALF as if they were not there."""
    workdir = tmp_path / "run"
    _copy_checkpoints(reference, workdir, [_HALF])
    for step in (_HALF + 1, _STEPS):  # a stop-signal save that was killed; a periodic one
        partial = workdir / "checkpoints" / f"{step}.orbax-checkpoint-tmp"
        shutil.copytree(reference / "checkpoints" / str(_STEPS), partial)
        for item in ("state", "data"):
            (partial / item).rename(partial / f"{item}.orbax-checkpoint-tmp")
        for path in partial.rglob("commit_success.txt"):
            path.unlink()
        for path in (partial / "state.orbax-checkpoint-tmp").rglob("*"):
            if path.is_file():
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    train.train_and_evaluate(
        _tiny(**{"training.num_steps": _STEPS, "training.checkpoint_every": _HALF}), workdir
    )

    assert _steps(workdir) == [_HALF, _STEPS]
    assert not list((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    expected_state, expected_data = _read_checkpoint(reference, _STEPS)
    state, data = _read_checkpoint(workdir, _STEPS)
    chex.assert_trees_all_equal(expected_state, state, strict=True)
    assert data == expected_data


def test_corrupt_checkpoint_fails_clearly_and_is_left_untouched(reference, cache_dir, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    _copy_checkpoints(reference, workdir, [_HALF, _STEPS])
    for path in (workdir / "checkpoints" / str(_STEPS) / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the array data files
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = _snapshot(workdir / "checkpoints")

    process = _start(workdir, log, cache_dir, f"--config.training.num_steps={_STEPS + 2}")
    process.wait(timeout=_SUBPROCESS_TIMEOUT_S)

    output = log.read_text()
    assert process.returncode != 0
    assert f"error: Cannot restore checkpoint {_STEPS} in {workdir / 'checkpoints'}" in output
    assert _snapshot(workdir / "checkpoints") == before


def _reference_config(**overrides) -> ml_collections.ConfigDict:
    """The config of the ``reference`` run, with ``overrides``."""
    return _tiny(**{"training.num_steps": _STEPS, "training.checkpoint_every": _HALF, **overrides})


def test_resume_with_a_changed_batch_size_stops_and_changes_nothing(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    before = _snapshot(workdir)
    config = _reference_config(**{"training.num_steps": _STEPS + 2, "training.batch_size": 8})
    with pytest.raises(config_lib.ConfigError) as error:
        train.train_and_evaluate(config, workdir)
    assert str(error.value) == (
        f"Cannot resume {workdir} (step {_STEPS}) with a changed config: "
        "training.batch_size 16 -> 8. Use a new --workdir, or restore these values."
    )
    assert _snapshot(workdir) == before  # checkpoints, config.json, TensorBoard events


def test_resume_lists_every_changed_key_that_is_not_safe(reference, tmp_path):
    workdir = tmp_path / "run"
    _copy_checkpoints(reference, workdir, [_HALF, _STEPS])
    config = _reference_config(
        **{
            "seed": 1,
            "model.unet.ch": 64,
            "diffusion.schedule": "cosine",
            "training.num_steps": _STEPS + 2,  # safe: not listed
            "sampling.num_steps": 10,
        }
    )
    with pytest.raises(config_lib.ConfigError) as error:
        train.train_and_evaluate(config, workdir)
    assert str(error.value) == (
        f"Cannot resume {workdir} (step {_STEPS}) with a changed config: "
        "diffusion.schedule 'linear' -> 'cosine', model.unet.ch 32 -> 64, seed 0 -> 1. "
        "Use a new --workdir, or restore these values."
    )
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints"]


def test_checkpoint_without_a_recorded_config_is_checked_against_config_json(reference, tmp_path):
    """Checkpoints saved before they recorded their config: ``config.json`` stands in (then the
    config of the latest start, which saved them)."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for step in (_HALF, _STEPS):
        shutil.rmtree(workdir / "checkpoints" / str(step) / "config")
    with pytest.raises(config_lib.ConfigError, match=r"training.batch_size 16 -> 8\."):
        train.train_and_evaluate(_reference_config(**{"training.batch_size": 8}), workdir)
    config, step = pretrained.load_config(workdir, None)
    assert step == _STEPS and config.to_dict() == _reference_config().to_dict()


def test_a_run_without_posthoc_ema_saves_the_state_it_always_saved(reference):
    """No ``posthoc_ema`` entry at all (not an empty one) without training.posthoc_ema_stds:
    such runs write, and restore, the checkpoints of before post-hoc EMA existed."""
    state, _ = _read_checkpoint(reference, _STEPS)
    assert sorted(state) == [
        "ema_params",
        "loss_history",
        "opt_state",
        "params",
        "rng",
        "step",
    ]


def test_resume_with_more_steps_continues_and_keeps_every_runs_config(reference, tmp_path):
    """The longer run also keeps 2 checkpoints instead of 3: its save deletes the oldest one,
    which the first run wrote, and the restart restores the latest."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    first = (workdir / "config.json").read_bytes()
    longer = _reference_config(**{"training.num_steps": _STEPS + 1, "training.keep_checkpoints": 2})

    train.train_and_evaluate(longer, workdir)

    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
        str(_STEPS),
        str(_STEPS + 1),
    ]
    assert (workdir / "config.json").read_bytes() == first
    (history,) = workdir.glob("config_step*.json")
    assert re.fullmatch(rf"config_step{_STEPS}_\d{{8}}T\d{{6}}Z\.json", history.name)
    assert json.loads(history.read_text())["training"]["num_steps"] == _STEPS + 1
    # Each checkpoint records the config that trained it; the evaluation program uses it.
    assert pretrained.load_config(workdir, _STEPS + 1)[0].training.num_steps == _STEPS + 1
    assert pretrained.load_config(workdir, _STEPS)[0].training.num_steps == _STEPS
    # A restart with the same config (after a preemption, say) adds no file.
    train.train_and_evaluate(longer, workdir)
    assert len(list(workdir.glob("config*.json"))) == 2


@pytest.mark.parametrize(
    "key, value",
    [
        ("seed", 1),
        ("data.name", "cifar10"),
        ("data.split", "test"),
        ("data.image_size", 16),
        ("data.channels", 3),
        ("data.shuffle", False),
        ("data.random_flip", True),
        ("data.num_workers", 2),
        ("training.batch_size", 8),
        ("training.compute_dtype", "bfloat16"),
        ("model.unet.ch_mult", (1, 2)),
        ("model.unet.dropout", 0.2),
        ("model.class_conditional", True),
        ("model.kind", "classifier"),
        ("diffusion.num_timesteps", 100),
        ("diffusion.mean_type", "v"),
        ("diffusion.var_type", "learned_range"),
        ("diffusion.loss_type", "hybrid"),
    ],
)
def test_resume_refuses_a_change_of_data_noise_or_model(key, value):
    with pytest.raises(config_lib.ConfigError, match=rf"with a changed config: {re.escape(key)} "):
        config_lib.check_resume(_tiny(), _tiny(**{key: value}), "run")


@pytest.mark.parametrize(
    "key, value",
    [
        ("training.num_steps", 10**6),
        ("training.log_every", 7),
        ("training.checkpoint_every", 7),
        ("training.keep_checkpoints", 7),
        ("training.sample_every", 7),
        ("training.grad_accum_steps", 2),
        ("training.fsdp", 2),
        ("optim.learning_rate", 1e-5),
        ("sampling.method", "ddim"),
        ("eval.num_samples", 7),
        ("data.prefetch", 0),
        ("data.data_dir", "/elsewhere"),
    ],
)
def test_resume_allows_a_change_of_length_logging_layout_or_sampling(key, value):
    changes = config_lib.check_resume(_tiny(), _tiny(**{key: value}), "run")
    assert len(changes) == 1 and changes[0].startswith(f"{key} ")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize(
    "learning_rate",
    # 1e39 overflows float32 in the cast: moved out of the default suite (10-minute budget).
    [1e30, pytest.param(1e39, marks=pytest.mark.slow)],
)
def test_non_finite_loss_stops_and_keeps_last_checkpoint(reference, tmp_path, learning_rate):
    """The first step moves every parameter by about the learning rate (Adam), which
    overflows the update's norm (1e30) or the parameters themselves (1e39 is inf in float32)
    while that step's loss and gradients are still finite; nothing of it may be saved."""
    workdir = tmp_path / "run"
    _copy_checkpoints(reference, workdir, [_HALF, _STEPS])
    before = _snapshot(workdir / "checkpoints")
    config = _tiny(
        **{
            "optim.learning_rate": learning_rate,
            "optim.warmup_steps": 0,
            "training.num_steps": _STEPS + 4,
            "training.checkpoint_every": 1,
            "training.log_every": 100,
        }
    )

    with pytest.raises(train.NonFiniteLossError, match=f"update_norm at step {_STEPS + 1} "):
        train.train_and_evaluate(config, workdir)

    assert _snapshot(workdir / "checkpoints") == before
    state, _ = _read_checkpoint(workdir, _STEPS)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state))


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails the test if the program gets as far as building the state, step or checkpoints."""

    def fail(*args, **kwargs):
        raise AssertionError("built the model or checkpoints despite a bad config")

    monkeypatch.setattr(train_step, "create_train_state", fail)
    monkeypatch.setattr(train_step, "make_train_step", fail)
    monkeypatch.setattr(checkpointing, "Checkpointer", fail)


def _replace_group(config, group, **values):
    """Replaces a whole group, which bypasses ConfigDict's type checks on assignment (as a
    config file that builds its groups from dicts does)."""
    config[group] = ml_collections.ConfigDict({**config[group].to_dict(), **values})
    return config


@pytest.mark.parametrize(
    "config, message",
    [
        (_tiny(**{"training.bach_size": 3}), "Unknown config key 'training.bach_size'"),
        (
            _replace_group(_tiny(), "training", batch_size="16"),
            "'training.batch_size' must be int, got str '16'",
        ),
        (
            _tiny(**{"diffusion.schedule": "cosine2"}),
            "'diffusion.schedule' is 'cosine2'; valid: linear, cosine, ",
        ),
        (
            _tiny(**{"diffusion.mean_type": "epsilon"}),
            "'diffusion.mean_type' is 'epsilon'; valid: eps, x0, v, mu",
        ),
        (
            _tiny(**{"diffusion.var_type": "learned"}),
            "'diffusion.var_type' is 'learned'; valid: fixed_small, fixed_large, learned_range",
        ),
        (
            _tiny(**{"diffusion.loss_type": "l2"}),
            "'diffusion.loss_type' is 'l2'; valid: simple, vlb, hybrid",
        ),
        (_tiny(**{"diffusion.num_timesteps": 0}), "'diffusion.num_timesteps' must be >= 1, got 0"),
        (
            _tiny(**{"diffusion.schedule": "linear", "diffusion.num_timesteps": 10}),
            "'diffusion.schedule' ('linear') and 'diffusion.num_timesteps' (10) give no valid",
        ),
        (
            _tiny(**{"diffusion.schedule": "linear", "diffusion.num_timesteps": 20}),
            "(20) give no valid schedule: linear schedule: beta_start=0.005, beta_end=1.0 ",
        ),
        (
            _tiny(**{"model.unet.ch": 16}),
            "'model.unet.num_groups' (32) must divide the channels of every level",
        ),
        (_tiny(**{"model.unet.dropout": 1.0}), "'model.unet.dropout' must lie in [0, 1), got 1.0"),
        (
            _tiny(**{"model.unet.dropout": -0.1}),
            "'model.unet.dropout' must lie in [0, 1), got -0.1",
        ),
        (_tiny(**{"optim.beta1": 1.0}), "'optim.beta1' must lie in [0, 1), got 1.0"),
        (_tiny(**{"optim.beta1": -0.1}), "'optim.beta1' must lie in [0, 1), got -0.1"),
        (_tiny(**{"optim.beta2": 1.0}), "'optim.beta2' must lie in [0, 1), got 1.0"),
        (_tiny(**{"optim.eps": 0.0}), "'optim.eps' must be > 0, got 0.0"),
        (_tiny(**{"optim.grad_clip_norm": -1.0}), "'optim.grad_clip_norm' must be >= 0, got -1.0"),
        (_tiny(**{"optim.learning_rate": 0.0}), "'optim.learning_rate' must be > 0, got 0.0"),
        (
            _tiny(**{"diffusion.vlb_weight": -0.001}),
            "'diffusion.vlb_weight' must be >= 0, got -0.001",
        ),
        (
            _tiny(**{"diffusion.min_snr_gamma": 0.0}),
            "'diffusion.min_snr_gamma' must be > 0, got 0.0",
        ),
        (_tiny(**{"diffusion.p2_k": 0.0}), "'diffusion.p2_k' must be > 0, got 0.0"),
        (_tiny(**{"diffusion.p2_gamma": -0.5}), "'diffusion.p2_gamma' must be >= 0, got -0.5"),
        (_tiny(**{"diffusion.p2_k": float("nan")}), "'diffusion.p2_k' must be > 0, got nan"),
        (
            _tiny(**{"model.unet.ch_mult": (1, 2, 2, 2, 2)}),
            "'data.image_size' (8) must be divisible by 2**(len(model.unet.ch_mult) - 1) = 16",
        ),
    ],
)
def test_bad_config_fails_before_anything_is_built(config, message, tmp_path, nothing_built):
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)) as error:
        train.train_and_evaluate(config, workdir)
    assert "\n" not in str(error.value)
    assert not workdir.exists()


def test_grad_clip_norm_zero_means_no_clipping():
    """Two Adam steps with gradients of norm 5 and 500: clipping at 1 would make them equal."""
    config = _tiny(**{"optim.grad_clip_norm": 0.0, "optim.warmup_steps": 0})
    config_lib.validate(config)
    optimizer, _ = train_step.make_optimizer(config.optim)
    adam = optax.adam(config.optim.learning_rate, config.optim.beta1, config.optim.beta2)
    params = {"w": np.zeros(2, np.float32)}
    state, adam_state = optimizer.init(params), adam.init(params)
    for grad in ([3.0, 4.0], [300.0, -400.0]):
        grads = {"w": np.asarray(grad, np.float32)}
        updates, state = optimizer.update(grads, state, params)
        expected, adam_state = adam.update(grads, adam_state, params)
        np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)


def test_weight_decay_is_adamw_and_keeps_the_optimizer_state():
    """``optim.weight_decay`` gives optax.adamw's updates (clipping off, no warmup), and the
    optimizer state has the same structure with and without it (resume may change it)."""
    config = _tiny(
        **{"optim.grad_clip_norm": 0.0, "optim.warmup_steps": 0, "optim.weight_decay": 0.05}
    )
    config_lib.validate(config)
    optimizer, _ = train_step.make_optimizer(config.optim)
    adamw = optax.adamw(
        config.optim.learning_rate, config.optim.beta1, config.optim.beta2, weight_decay=0.05
    )
    params = {"w": np.asarray([1.0, -2.0], np.float32)}
    state, adamw_state = optimizer.init(params), adamw.init(params)
    for grad in ([3.0, 4.0], [-0.5, 0.25]):
        grads = {"w": np.asarray(grad, np.float32)}
        updates, state = optimizer.update(grads, state, params)
        expected, adamw_state = adamw.update(grads, adamw_state, params)
        np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
        params = optax.apply_updates(params, updates)
    plain, _ = train_step.make_optimizer(_tiny().optim)
    assert jax.tree_util.tree_structure(plain.init(params)) == jax.tree_util.tree_structure(state)
    with pytest.raises(config_lib.ConfigError, match="'optim.weight_decay' must be >= 0"):
        config_lib.validate(_tiny(**{"optim.weight_decay": -0.1}))


def test_batch_not_divisible_by_devices():
    valid = config_lib.validate(_tiny(), num_devices=4)
    assert valid.training.batch_size == 16
    with pytest.raises(
        config_lib.ConfigError,
        match=re.escape(
            "'training.batch_size' (16) must be divisible by the number of devices (3)"
        ),
    ):
        config_lib.validate(_tiny(), num_devices=3)


def test_images_of_the_wrong_shape(tmp_path, nothing_built):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"\(16, 16, 1\).*\(8, 8, 1\)"):
        train.train_and_evaluate(_tiny(**{"data.image_size": 16}), workdir)
    assert not workdir.exists()


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.training.bach_size=3", 'Did you mean "batch_size" instead of "bach_size"?'),
        ("--config.training.batch_size=abc", "flag --config.training.batch_size=abc: invalid"),
    ],
)
def test_bad_key_or_value_on_the_command_line(flag, message, cache_dir, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    process = _start(workdir, log, cache_dir, flag)
    process.wait(timeout=_SUBPROCESS_TIMEOUT_S)
    assert process.returncode != 0
    assert message in log.read_text()
    assert not workdir.exists()


def test_unknown_key_in_a_config_file(cache_dir, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    config_file = tmp_path / "typo.py"
    config_file.write_text(
        "from diffusion_jax import config_defaults\n\n\n"
        "def get_config():\n"
        "    config = config_defaults.get_config()\n"
        "    config.training.bach_size = 3\n"
        "    return config\n"
    )
    process = _start(workdir, log, cache_dir, config_file=config_file)
    process.wait(timeout=_SUBPROCESS_TIMEOUT_S)
    assert process.returncode != 0
    assert "error: Unknown config key 'training.bach_size'" in log.read_text()
    assert not workdir.exists()


# The DDPM program's numbers: configs/digits.py as it is, 50 steps of
# ``python -m diffusion_jax.train`` on CPU, logging every 10 steps. Recorded with JAX and jaxlib
# 0.10.2 on x86-64; on one machine the run repeats bit for bit. After an intended change of the
# math, record them again (the failure gives the new value of every number that moved).
_DIGITS_RUN = {
    "training.num_steps": 50,
    "training.log_every": 10,
    "training.checkpoint_every": 50,
    "training.sample_every": 0,
}
# TensorBoard's train/loss (float32) at step k: the mean loss of steps k - 9 to k.
_DIGITS_LOSSES = {
    10: 0.9800182580947876,
    20: 0.9389421343803406,
    30: 0.7796949744224548,
    40: 0.5955026149749756,
    50: 0.38031840324401855,
}
# Parameters at step 50 by top-level module: (count, float64 sum, float64 sum of squares).
_DIGITS_PARAMS = {
    "conv_in": (320, -0.8446020601259079, 1.870511968861345),
    "conv_out": (289, -0.13500335067510605, 0.047290321265012966),
    "down_0_block_0": (22752, 68.97908143932995, 149.07744256460205),
    "down_0_downsample": (9248, 5.36462714110894, 31.52033618496627),
    "down_1_attn_0": (16768, 68.9082817996369, 255.8179391119457),
    "down_1_block_0": (65984, 68.17210943977322, 267.14564134104734),
    "mid_attn": (16768, 58.73298590557892, 255.9749005753707),
    "mid_block_0": (82368, 121.40173723361532, 278.8822794150884),
    "mid_block_1": (82368, 91.14834746731012, 278.30570469779707),
    "norm_out": (64, 33.043419271707535, 33.06197048226716),
    "temb_dense0": (4224, -2.0163618439582933, 50.5869997033352),
    "temb_dense1": (16512, 6.811296421864199, 128.32982190077126),
    "up_0_block_0": (44416, 125.02353916447024, 274.36315116393524),
    "up_0_block_1": (34112, 115.16643696197926, 234.88626582611585),
    "up_1_attn_0": (16768, 36.221949263632204, 254.28781954959942),
    "up_1_attn_1": (16768, 54.09614172684444, 256.4831434527011),
    "up_1_block_0": (127616, 171.15324199471016, 446.4344399272943),
    "up_1_block_1": (107072, 149.12981939881047, 397.62303123473697),
    "up_1_upsample": (36928, -1.9325328034128688, 62.45734852554817),
}
# Another core count or CPU sums float32 in another order. Measured on this run (1 core against
# 2, and XLA's fast-compile flags): the losses and the sums of squares moved by < 1e-7 of
# themselves, the sums by < 2e-7 of sqrt(count * sum of squares), the largest a sum can be:
# Adam turns round-off into steps of the learning rate where the true gradient is 0 (biases
# before a GroupNorm of one channel per group), and such parameters can change sign.
_DIGITS_RTOL = 1e-6


def _module_checksums(params) -> dict[str, tuple[int, float, float]]:
    """``{top-level module: (count, sum, sum of squares)}`` of its parameters, in float64."""
    checksums = {}
    for name, module in params.items():
        leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree_util.tree_leaves(module)]
        checksums[name] = (
            sum(leaf.size for leaf in leaves),
            float(sum(leaf.sum() for leaf in leaves)),
            float(sum(np.square(leaf).sum() for leaf in leaves)),
        )
    return checksums


def _named_numbers(losses, checksums) -> dict[str, tuple[float, float]]:
    """``{name: (value, how far it may move)}`` of a digits run's losses and checksums."""
    numbers = {
        f"loss at step {step}": (loss, _DIGITS_RTOL * abs(loss)) for step, loss in losses.items()
    }
    for module, (count, total, squares) in checksums.items():
        numbers[f"{module}: parameter count"] = (count, 0)
        numbers[f"{module}: sum"] = (total, _DIGITS_RTOL * math.sqrt(count * squares))
        numbers[f"{module}: sum of squares"] = (squares, _DIGITS_RTOL * squares)
    return numbers


def _describe_change(name, stored, now) -> str:
    """One line of the regression's failure: a number that moved, appeared or disappeared."""
    if stored is None or now is None:
        return f"{name}: {'no longer measured' if now is None else 'not recorded'}"
    return f"{name}: stored {stored!r}, now {now!r} ({(now - stored) / stored:+.1e} relative)"


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_digits_ddpm_run_reproduces_its_recorded_numbers(cache_dir, tmp_path):
    """The regression of the DDPM program, against ``_DIGITS_LOSSES`` and ``_DIGITS_PARAMS``:
    a change of the objective, its weighting, the noise process, the schedule, the network, the
    optimizer or the data order moves them, a reordering of float32 sums does not. The failure
    lists every number that moved."""
    workdir = tmp_path / "run"
    _run(
        workdir,
        tmp_path / "run.log",
        cache_dir,
        overrides=_DIGITS_RUN,
        env={"JAX_PLATFORMS": "cpu"},  # the numbers are the CPU's
    )
    compare_runs = _load_module(REPO / "bench" / "compare_runs.py")
    state, _ = _read_checkpoint(workdir, _DIGITS_RUN["training.num_steps"])
    now = _named_numbers(
        compare_runs.read_scalars(workdir, "train/loss"), _module_checksums(state["params"])
    )
    stored = _named_numbers(_DIGITS_LOSSES, _DIGITS_PARAMS)
    changed = [
        _describe_change(name, stored.get(name, (None,))[0], now.get(name, (None,))[0])
        for name in sorted(stored.keys() | now.keys())
        if name not in stored
        or name not in now
        or abs(now[name][0] - stored[name][0]) > stored[name][1]
    ]
    if changed:
        pytest.fail("The 50-step digits run changed:\n" + "\n".join(changed), pytrace=False)


def _assert_finite(metrics):
    assert metrics and all(np.isfinite(value) for value in metrics.values()), metrics


_REDUCED_NETWORK = {
    "model.unet.ch": 32,
    "model.unet.ch_mult": (1, 2),
    "model.unet.num_res_blocks": 1,
    "training.batch_size": 2,
    "training.log_every": 1,
    "training.sample_every": 0,
}


@pytest.mark.slow  # tests/test_datasets.py trains this config, reduced, on prepared files
def test_cifar10_config_reduced_network_on_mock_data(tmp_path):
    config = _config("cifar10", **{**_REDUCED_NETWORK, "training.num_steps": 1})
    with tfds.testing.mock_data(num_examples=8):
        metrics = train.train_and_evaluate(config, tmp_path)
    _assert_finite(metrics)
    assert _steps(tmp_path) == [1]


@pytest.mark.slow  # long end to end: runs in CI's slow pass
def test_improved_ddpm_config_reduced_network_on_mock_data(tmp_path):
    config = _config("cifar10_improved", **{**_REDUCED_NETWORK, "training.num_steps": 2})
    with tfds.testing.mock_data(num_examples=8):
        metrics = train.train_and_evaluate(config, tmp_path)
    _assert_finite(metrics)
    assert "vlb_bpd" in metrics


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_config_file_is_valid(path):
    config_lib.validate(_config(path.stem))


@pytest.mark.slow
def test_cifar10_config_full_network_on_mock_data(tmp_path):
    config = _config(
        "cifar10",
        **{"training.batch_size": 2, "training.num_steps": 1, "training.sample_every": 0},
    )
    with tfds.testing.mock_data(num_examples=8):
        metrics = train.train_and_evaluate(config, tmp_path)
    _assert_finite(metrics)
    state, _ = _read_checkpoint(tmp_path, 1)
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(state["params"])) == 35_746_307


@pytest.mark.slow  # long end to end: runs in CI's slow pass
def test_bfloat16_class_conditional_run_with_a_sample_grid(cache_dir, tmp_path, monkeypatch):
    """One short run covers three features no other run trains with. bfloat16 compute: the
    loss falls, parameters stay float32. Class labels: the batches' labels, and only those,
    train the label embedding, and the output depends on the label. Sample grids: the PNG is
    the EMA sampler's output, quantised, one row per requested label (samples 0, 2, 4 get the
    first, 1, 3, 5 the second)."""
    steps, scale = 30, 10  # a grid of 2 x 3 tiles of 8x8, upscaled 256 // (3 * 8)
    config = _tiny(
        **{
            "model.class_conditional": True,
            "training.compute_dtype": "bfloat16",
            "optim.warmup_steps": 0,
            "training.num_steps": steps,
            "training.sample_every": steps,
            "sampling.num_samples": 6,
            "sampling.labels": (5, 3),
        }
    )
    logged_loss = {}
    log_train = reporting.Reporter.log_train

    def record(reporter, step, metrics):
        logged_loss[step] = metrics["loss"]
        log_train(reporter, step, metrics)

    monkeypatch.setattr(reporting.Reporter, "log_train", record)
    train.train_and_evaluate(config, tmp_path)
    state, _ = _read_checkpoint(tmp_path, steps)

    loss = np.array([logged_loss[step] for step in range(1, steps + 1)])
    assert np.all(np.isfinite(loss))
    assert loss[-5:].mean() < 0.5 * loss[:5].mean()
    for leaf in jax.tree_util.tree_leaves((state["params"], state["ema_params"])):
        assert leaf.dtype == np.float32

    # The label embedding gets gradients from the third step on, once the zero-initialised
    # last convolutions (of the output, then of the residual blocks) have moved: the rows
    # with a non-zero Adam first moment are exactly the labels of batches 3, 4, ...
    iterator = input_pipeline.create_train_iterator(
        config.data, global_batch_size=config.training.batch_size, seed=config.seed
    )
    batch_labels = [set(next(iterator)["label"].tolist()) for _ in range(steps)]
    adam_mu = state["opt_state"][1]["mu"]["label_emb"]["embedding"]  # [11, 128]
    trained_rows = set(np.flatnonzero(np.any(adam_mu != 0, axis=1)).tolist())
    assert trained_rows == set().union(*batch_labels[2:])
    model = config_lib.make_model(config, num_classes=10)
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.array([10, 10])
    output = model.apply({"params": state["params"]}, x, t, jnp.array([0, 1]), train=False)
    assert np.abs(np.asarray(output[0] - output[1], np.float32)).max() > 1e-3

    with Image.open(tmp_path / "samples" / f"step_{steps:08d}.png") as png:
        grid = np.asarray(png)
    assert grid.shape == ((2 * 9 - 1) * scale, (3 * 9 - 1) * scale)
    mesh = sharding.make_mesh(1)
    num = config.sampling.num_samples
    generate_fn = generate.make_generate_fn(config, model, mesh, sharding.replicated(mesh), num)
    rng = jax.random.PRNGKey(config.seed + steps)
    samples = np.asarray(generate_fn(state["ema_params"], rng, 0))[:num, ..., 0]
    quantised = np.round(127.5 * np.clip(samples, -1, 1) + 127.5).astype(np.uint8)
    for i, image in enumerate(quantised):
        row, col = 1 - i % 2, i // 2  # label 3 (odd samples) is the first row
        tile = grid[row * 9 * scale :: scale, col * 9 * scale :: scale][:8, :8]
        np.testing.assert_array_equal(tile, image, err_msg=f"sample {i}")
    # Sample i's label is labels[i % 2]: asking for label 5 alone changes the odd samples only
    # (slightly: after 30 steps the EMA of the label embedding has barely moved).
    config.sampling.labels = (5,)
    generate_fn = generate.make_generate_fn(config, model, mesh, sharding.replicated(mesh), num)
    fives = np.asarray(generate_fn(state["ema_params"], rng, 0))[:num, ..., 0]
    np.testing.assert_array_equal(fives[0::2], samples[0::2])
    assert np.abs(fives[1::2] - samples[1::2]).max() > 2e-5


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_importance_sampled_timesteps(tmp_path):
    """Hybrid loss with importance-sampled t on the digits. T=4 (cosine; linear needs T >= 21)
    and 16 examples a step fill the 10-loss history of every t within the first steps, so the
    last step samples t from it."""
    num_steps = 6
    config = _tiny(
        **{
            "diffusion.schedule": "cosine",
            "diffusion.num_timesteps": 4,
            "diffusion.var_type": "learned_range",
            "diffusion.loss_type": "hybrid",
            "diffusion.timestep_sampling": "importance",
            "training.num_steps": num_steps,
            "training.checkpoint_every": num_steps - 1,
        }
    )
    metrics = train.train_and_evaluate(config, tmp_path)
    _assert_finite(metrics)
    before_last, _ = _read_checkpoint(tmp_path, num_steps - 1)
    np.testing.assert_array_equal(before_last["loss_history"]["counts"], 10)
    last, _ = _read_checkpoint(tmp_path, num_steps)
    assert np.all(np.isfinite(last["loss_history"]["history"]))


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_importance_sampling_draws_t_from_the_history_and_weights_the_loss():
    """One train step from a warmed-up hand-made history over T = 4 whose losses have root mean
    square 1 at t = 1 and 2 at t = 3, 0 elsewhere: p(t) = 0.999 (0, 1/3, 0, 2/3) + 0.001 / 4.
    With T = 4 the metrics' loss quarters are single timesteps: they count each t's draws
    and sum its examples' losses T L_t, so the objective must be their sum weighted by
    1 / (T p(t)) (0.75 at t = 1, 0.375 at t = 3)."""
    T, batch = 4, 128
    config = _tiny(
        **{
            "diffusion.schedule": "cosine",
            "diffusion.num_timesteps": T,
            "diffusion.loss_type": "vlb",
            "diffusion.timestep_sampling": "importance",
            "training.batch_size": batch,
        }
    )
    config_lib.validate(config)
    setup = config_lib.make_train_setup(config)
    mesh, image_shape = sharding.make_mesh(1), (8, 8, 1)
    _, shardings = train_step.state_shardings(setup, image_shape, mesh)
    state = train_step.create_train_state(setup, image_shape, shardings, config.seed)
    rms = np.array([0.0, 1.0, 0.0, 2.0], np.float32)
    state = state.replace(
        loss_history=losses.LossHistory(
            history=jnp.asarray(np.repeat(rms[:, None], 10, axis=1)),
            counts=jnp.full((T,), 10, jnp.int32),
        )
    )
    step_fn = train_step.make_train_step(setup, mesh, shardings)
    images = np.round(np.random.default_rng(0).uniform(0, 255, (batch, *image_shape))) / 127.5 - 1
    inputs = {"image": images.astype(np.float32), "label": np.zeros(batch, np.int32)}
    _, metrics = step_fn(state, sharding.global_batch(mesh, inputs))
    metrics = jax.device_get(metrics)

    counts = np.array([metrics[f"loss_q{t}_count"] for t in range(T)])
    sums = np.array([metrics[f"loss_q{t}_sum"] for t in range(T)])
    p = 0.999 * rms / rms.sum() + 0.001 / T
    assert counts.sum() == batch
    # 0.06 draws expected at t = 0 and 2 together (uniform t would give 64); t = 1 is binomial
    # with mean 42.7 and standard deviation 5.3: within 4 of them.
    assert counts[0] + counts[2] <= 1
    assert abs(counts[1] - batch * p[1]) <= 4 * np.sqrt(batch * p[1] * (1 - p[1]))
    assert float(metrics["loss"]) == pytest.approx(np.sum(sums / (T * p)) / batch, rel=1e-5)


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_gradient_accumulation_matches_one_big_batch(reference, tmp_path):
    config = _tiny(**{"training.num_steps": _STEPS, "training.grad_accum_steps": 2})
    train.train_and_evaluate(config, tmp_path)
    expected, _ = _read_checkpoint(reference, _STEPS)
    accumulated, _ = _read_checkpoint(tmp_path, _STEPS)
    for key in ("params", "ema_params"):
        chex.assert_trees_all_close(expected[key], accumulated[key], rtol=1e-5, atol=1e-7)


def _train_states(config, num_steps=1, accumulate=None) -> list[train_step.TrainState]:
    """Host copies of the train state of ``config`` at steps 0, 1, ..., ``num_steps``: from its
    initial state, on this process's devices, with ``make_train_step(accumulate=...)`` on the
    first batches of the data. The step must trace only once (``chex.assert_max_traces``):
    each later call, with new values of the same types, reuses the first call's program."""
    config = config_lib.validate(config)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    mesh = sharding.make_mesh()
    setup = config_lib.make_train_setup(config)
    _, shardings = train_step.state_shardings(setup, image_shape, mesh)
    state = train_step.create_train_state(setup, image_shape, shardings, config.seed)
    chex.clear_trace_counter()  # chex tells functions apart by their source and call stack
    jit = jax.jit
    with pytest.MonkeyPatch.context() as patch:
        # make_train_step jits its step itself: the trace counter must wrap it before the jit.
        patch.setattr(jax, "jit", lambda fn, **kw: jit(chex.assert_max_traces(fn, n=1), **kw))
        step = train_step.make_train_step(setup, mesh, shardings, accumulate=accumulate)
    batches = input_pipeline.create_train_iterator(
        config.data, global_batch_size=config.training.batch_size, seed=0
    )
    states = [jax.tree_util.tree_map(np.array, state)]  # copies: the step donates the state
    for _ in range(num_steps):
        state, _ = step(state, sharding.global_batch(mesh, next(batches)))
        states.append(jax.tree_util.tree_map(np.array, state))
    return states


def test_train_step_traces_once_and_moves_the_ema_by_its_decay(cache_dir):
    """Three steps of one compiled program (``_train_states``; the ``reference`` run's program,
    which the compilation cache serves once that run is built); after each, ``ema = decay *
    ema_before + (1 - decay) * params_after`` leaf by leaf. With the digits' decay, 0.995,
    decay and 1 - decay swapped would move the EMA by 0.99 of each step's change of the
    parameters (about the learning rate, 1e-5 and 2e-5 in steps 2 and 3 of the warmup; step
    1's is 0)."""
    config = _tiny()
    decay = config.optim.ema_decay
    states = _train_states(config, num_steps=3)
    for before, after in itertools.pairwise(states):
        expected = jax.tree_util.tree_map(
            lambda e, p: decay * e.astype(np.float64) + (1 - decay) * p.astype(np.float64),
            before.ema_params,
            after.params,
        )
        chex.assert_trees_all_close(after.ema_params, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_scan_and_loop_accumulation_match_one_big_batch(cache_dir):
    """One step of 2 micro-batches, as a scan and as a loop, against 1 micro-batch. Importance
    sampling over T=4 with 16 examples puts several examples on each t; the loss history
    appends them in batch order, so it only matches if every example kept its own key and the
    outputs were put back in batch order."""
    overrides = {
        "diffusion.schedule": "cosine",
        "diffusion.num_timesteps": 4,
        "diffusion.var_type": "learned_range",
        "diffusion.loss_type": "hybrid",
        "diffusion.timestep_sampling": "importance",
    }
    expected = _train_states(_tiny(**overrides))[-1]
    for accumulate in ("scan", "loop"):
        config = _tiny(**overrides, **{"training.grad_accum_steps": 2})
        state = _train_states(config, accumulate=accumulate)[-1]
        for key in ("params", "ema_params", "loss_history"):
            chex.assert_trees_all_close(
                getattr(expected, key),
                getattr(state, key),
                rtol=1e-5,
                atol=1e-7,
                custom_message=f"{accumulate} {key}",
            )


_HLO_OF_ACCUMULATION = """
import json, sys
from diffusion_jax import xla_flags
xla_flags.configure(cpu_devices=4)
import jax, ml_collections
from diffusion_jax import config_lib, sharding, train_step

config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
mesh = sharding.make_mesh()
abstract, shardings = train_step.state_shardings(
    config_lib.make_train_setup(config), image_shape, mesh
)
state = jax.tree_util.tree_map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
)
batch_size = config.training.batch_size
batch = {
    "image": jax.ShapeDtypeStruct(
        (batch_size,) + image_shape, "float32", sharding=sharding.batch_sharding(mesh)
    ),
    "label": jax.ShapeDtypeStruct((batch_size,), "int32", sharding=sharding.batch_sharding(mesh)),
}
counts = {}
for accumulate, accum in (("scan", 2), ("scan", 4), ("loop", 4)):
    config.training.grad_accum_steps = accum
    step = train_step.make_train_step(
        config_lib.make_train_setup(config), mesh, shardings, accumulate=accumulate
    )
    hlo = step.lower(state, batch).compile().as_text()
    ops = ("convolution", "all-to-all", "collective-permute", "all-gather", "all-reduce")
    counts[f"{accumulate}{accum}"] = {op: hlo.count(f" {op}(") for op in ops}
print(json.dumps(counts))
"""


@pytest.mark.slow  # long end to end: runs in CI's slow pass
def test_accumulation_program_on_four_devices():
    """The compiled step on 4 CPU devices: the scan holds one copy of the network whatever the
    number of micro-batches, the loop one per micro-batch; and taking the micro-batches moves
    no example between devices (no all-to-all, permute or all-gather; the gradients' and
    metrics' all-reduces remain)."""
    config = _tiny().to_dict()
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
        JAX_PLATFORMS="cpu",
    )
    result = subprocess.run(
        [sys.executable, "-c", _HLO_OF_ACCUMULATION, json.dumps(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=_SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    counts = json.loads(result.stdout)
    convs = {name: c["convolution"] for name, c in counts.items()}
    assert convs["scan2"] > 0
    assert convs["scan2"] == convs["scan4"], convs
    assert convs["loop4"] == 4 * convs["scan4"], convs
    for name, c in counts.items():
        assert c["all-to-all"] == c["collective-permute"] == c["all-gather"] == 0, (name, c)
        assert c["all-reduce"] > 0, (name, c)
