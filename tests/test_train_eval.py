"""Evaluation during training (``train_eval``): the logged numbers against the evaluation
program's for the same checkpoints, a run interrupted inside an evaluation (an exception; a
SIGKILL of the program) resumed to the same log, the evaluation functions traced once for every
step, and bad input refused in one line before anything is built.

The runs are the tiny digits network of ``tests/test_train.py`` for 2 steps, evaluated after
each (fid and bpd of 12 samples and examples, in batches of 8): all but the config checks take
tens of seconds on a 2-core CPU and run in the slow pass.
"""

import json
import pathlib
import re
import signal

import chex
import jax
import pytest

from diffusion_jax import (
    config_lib,
    digits_classifier,
    evaluators,
    pretrained,
    reporting,
    sharding,
    train,
    train_eval,
)
from diffusion_jax.evaluators import bpd
from tests.test_train import (
    _TINY,
    REPO,
    _config,
    _load_module,
    _run,
    _start,
    _tiny,
    _wait_for,
    cache_dir,  # noqa: F401  (the fixture, for this module too)
    nothing_built,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.usefixtures("cache_dir")

_STEPS = 2
_EVAL = {
    "training.num_steps": _STEPS,
    "training.checkpoint_every": _STEPS,
    "training.keep_checkpoints": _STEPS,
    "training.eval_every": 1,
    "training.eval_modes": ("fid", "bpd"),
    "training.eval_num_samples": 12,
    "training.eval_num_examples": 12,
    "eval.batch_size": 8,  # two batches, the second padded
    "sampling.num_steps": 10,
    # The EMA follows the parameters closely: each step's numbers differ.
    "optim.warmup_steps": 0,
    "optim.ema_decay": 0.5,
}
# What the log holds besides the numbers: the time taken (and bpd's throughput).
_TIMINGS = ("seconds", "images_per_s")
_LINES = [(step, mode) for step in range(1, _STEPS + 1) for mode in ("fid", "bpd")]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """mode=fid's cache: the digits classifier, trained once, and no reference features."""
    directory = tmp_path_factory.mktemp("reference")
    digits_classifier.load_or_train(directory)
    return directory


def _eval_config(reference_dir, **overrides):
    return _tiny(**{**_EVAL, "eval.reference_dir": str(reference_dir), **overrides})


def _log(workdir) -> list[dict]:
    return train_eval.read_log(pathlib.Path(workdir) / "eval" / train_eval.LOG_NAME)


def _numbers(records: list[dict]) -> list[tuple]:
    """``(step, mode, metrics)`` of each record, without timings, in the JSON form."""
    return [
        (
            r["step"],
            r["mode"],
            {k: v for k, v in json.loads(json.dumps(r["metrics"])).items() if k not in _TIMINGS},
        )
        for r in records
    ]


@pytest.fixture(scope="module")
def uninterrupted(reference_dir, tmp_path_factory):
    """A workdir trained for _STEPS steps in this process and evaluated after each."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train.train_and_evaluate(_eval_config(reference_dir), workdir)
    return workdir


@pytest.mark.slow  # about 40 s with its fixture on a 2-core CPU
def test_logged_numbers_are_the_evaluation_programs_for_the_same_checkpoint(
    uninterrupted, reference_dir
):
    records = _log(uninterrupted)
    assert [(r["step"], r["mode"]) for r in records] == _LINES
    assert all(r["seconds"] > 0 for r in records)
    logged = {(step, mode): metrics for step, mode, metrics in _numbers(records)}
    overrides = {
        "eval.num_samples": _EVAL["training.eval_num_samples"],
        "eval.num_examples": _EVAL["training.eval_num_examples"],
    }
    for step in range(1, _STEPS + 1):
        evaluators.evaluate(uninterrupted, "sample", step, overrides)
        for mode in ("fid", "bpd"):
            result = evaluators.evaluate(uninterrupted, mode, step, overrides)
            [(_, _, expected)] = _numbers([{"step": step, "mode": mode, "metrics": result}])
            expected.pop("sample_dir", None)  # mode=fid's samples are files; training's not
            assert logged[step, mode] == expected, (step, mode)
        assert logged[step, "fid"]["num_samples"] == 12
        assert logged[step, "bpd"]["num_examples"] == 12
    # The EMA moved between the steps: the log is of each step's own parameters.
    assert logged[1, "bpd"]["total_bpd"] != logged[2, "bpd"]["total_bpd"]
    compare_runs = _load_module(REPO / "bench" / "compare_runs.py")
    for mode, key in (("fid", "fid"), ("bpd", "total_bpd")):
        scalars = compare_runs.read_scalars(uninterrupted, f"eval/{mode}/{key}")
        assert scalars == pytest.approx({s: logged[s, mode][key] for s in (1, 2)}, rel=1e-6)


class _Killed(Exception):
    """Stands for the kill of a run in the middle of an evaluation."""


@pytest.mark.slow  # about 30 s on a 2-core CPU, with the uninterrupted run built
def test_run_interrupted_inside_an_evaluation_resumes_to_the_same_log(
    uninterrupted, reference_dir, tmp_path, monkeypatch
):
    """The bound of step 2 raises after fid's line of step 2 is written; the restarted run
    restores step 2 (its checkpoint was complete before the evaluation began), adds bpd's line
    only, and trains no further."""
    evaluate = bpd._evaluate

    def killed_at_the_last_step(ctx, bound_fn):
        if ctx.step == _STEPS:
            raise _Killed
        return evaluate(ctx, bound_fn)

    workdir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(bpd, "_evaluate", killed_at_the_last_step)
        with pytest.raises(_Killed):
            train.train_and_evaluate(_eval_config(reference_dir), workdir)
    assert [(r["step"], r["mode"]) for r in _log(workdir)] == _LINES[:-1]

    train.train_and_evaluate(_eval_config(reference_dir), workdir)

    assert _numbers(_log(workdir)) == _numbers(_log(uninterrupted))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [1, 2]


@pytest.mark.slow  # about 20 s on a 2-core CPU, with the uninterrupted run built
def test_evaluations_trace_once_and_equal_the_loops_from_restored_checkpoints(
    uninterrupted, reference_dir, tmp_path
):
    """One ``Evaluations`` evaluates the EMA parameters restored from both checkpoints of the
    uninterrupted run, every jitted function of its build traced once (the second step reuses
    the first's programs), and logs the numbers the training loop logged from its own state."""
    config = _eval_config(reference_dir)
    mesh = sharding.make_mesh()
    model, _, param_sharding = pretrained.restore_ema(config, uninterrupted, 1, mesh)
    chex.clear_trace_counter()
    jit = jax.jit
    restored = [pretrained.restore_ema(config, uninterrupted, s, mesh)[1] for s in (1, 2)]
    reporter = reporting.Reporter(tmp_path, total_steps=_STEPS, batch_size=16, active=False)
    with pytest.MonkeyPatch.context() as patch:
        # Also while evaluating: a function jitted anew for each step would trace again.
        patch.setattr(jax, "jit", lambda fn, **kw: jit(chex.assert_max_traces(fn, n=1), **kw))
        evaluations = train_eval.build(config, tmp_path, mesh, model, param_sharding)
        for step, params in enumerate(restored, 1):
            evaluations.run(step, params, reporter)
            assert evaluations.due(step) == []
    assert _numbers(_log(tmp_path)) == _numbers(_log(uninterrupted))


@pytest.mark.slow  # three runs of the program: about 2 minutes on a 2-core CPU
def test_program_killed_while_evaluating_resumes_to_the_uninterrupted_log(
    reference_dir,
    cache_dir,  # noqa: F811  (the fixture)
    tmp_path,
):
    """SIGKILL as soon as the checkpoint of the last step is complete: its evaluation has
    begun (the loop waits for the checkpoint, then evaluates) and its lines are missing. The
    restarted program evaluates that step from the restored checkpoint and its log equals an
    uninterrupted program's (both subprocesses: the program's XLA flags are not this
    process's)."""
    overrides = {**_TINY, **_EVAL}
    reference = f"--config.eval.reference_dir={reference_dir}"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, tmp_path / "straight.log", cache_dir, reference, overrides=overrides)
    log = tmp_path / "killed.log"
    process = _start(resumed, log, cache_dir, reference, overrides=overrides)
    last = resumed / "checkpoints" / str(_STEPS)
    try:
        _wait_for(last.is_dir, process, log, f"checkpoint {_STEPS}")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    lines = [(r["step"], r["mode"]) for r in _log(resumed)]
    assert lines in (_LINES[:2], _LINES[:3]), lines  # killed inside step 2's evaluation
    _run(resumed, tmp_path / "resumed.log", cache_dir, reference, overrides=overrides)
    assert f"Resumed from step {_STEPS}" in (tmp_path / "resumed.log").read_text()
    assert _numbers(_log(resumed)) == _numbers(_log(straight))


def _bad(name="digits", **overrides):
    return _config(name, **{"training.eval_every": 2, **overrides})


@pytest.mark.parametrize(
    "config, message",
    [
        (
            _bad(**{"training.eval_modes": ("fid", "sample")}),
            "Config key 'training.eval_modes' (('fid', 'sample')): 'sample' is not a mode; "
            "valid: fid, bpd, accuracy",
        ),
        (
            _bad(**{"training.eval_modes": ()}),
            "Config key 'training.eval_modes' (()) is empty but 'training.eval_every' is 2",
        ),
        (
            _bad(**{"training.eval_modes": ("bpd", "bpd")}),
            "Config key 'training.eval_modes' (('bpd', 'bpd')) names a mode twice",
        ),
        (
            _bad(**{"training.eval_modes": ("accuracy",)}),
            "Config key 'training.eval_modes' (('accuracy',)): mode=accuracy evaluates a "
            "classifier, but this run trained a denoiser (model.kind 'denoiser'); its modes: "
            "fid, bpd",
        ),
        (
            _bad("digits_classifier", **{"training.eval_modes": ("fid",)}),
            "mode=fid evaluates a denoiser, but this run trained a classifier (model.kind "
            "'classifier'); its modes: accuracy",
        ),
        (
            _bad("digits_latent", **{"training.eval_modes": ("fid", "bpd")}),
            "mode=bpd of a model of latents is not computed: its likelihood would be the "
            "latents' (nats of z, not of images) and its figures need the image chain; its "
            "modes: fid (samples decoded to images)",
        ),
        (
            _bad("cifar10"),
            "Config key 'training.eval_modes' (('fid',)): Config key 'eval.inception_weights' "
            "is empty: mode=fid needs the FID Inception weights",
        ),
        (_bad(**{"training.eval_every": -1}), "'training.eval_every' must be >= 0, got -1"),
        (
            _bad(**{"training.eval_num_samples": 0}),
            "'training.eval_num_samples' must be >= 1, got 0",
        ),
    ],
)
@pytest.mark.usefixtures("nothing_built")
def test_bad_evaluation_config_fails_before_anything_is_built(config, message, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)) as error:
        train.train_and_evaluate(config, workdir)
    assert "\n" not in str(error.value)
    assert not workdir.exists()


def test_evaluation_keys_may_change_on_resume():
    changes = config_lib.check_resume(
        _tiny(), _tiny(**{"training.eval_every": 7, "training.eval_modes": ("bpd",)}), "run"
    )
    assert changes == ["training.eval_every 0 -> 7", "training.eval_modes ['fid'] -> ['bpd']"]
