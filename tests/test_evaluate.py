"""The evaluation program: the bound over a split against its closed form, sharded evaluation and
generation equal to unsharded, resumption after SIGKILL, samples, bound and scores of 2
processes equal to 1, the scores and figures, and one-line errors for bad input.

The program runs on a tiny class-conditional U-Net trained for a few seconds on the digits
(``trained_workdir``), enough for its bound and samples to be far from an untrained network's;
one uninterrupted run of it is the reference of the resumed and the multi-process runs. The
closed-form checks evaluate the exact denoiser of a Gaussian (or of a mixture), which stands
in for the network in the evaluator's own ``Context``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from PIL import Image

from diffusion_jax import (
    checkpointing,
    config_defaults,
    config_lib,
    digits_classifier,
    evaluators,
    input_pipeline,
    metrics,
    schedules,
    sharding,
)
from diffusion_jax.evaluators import bpd, common, fid, figures
from tests.closed_form import class_conditional_eps_fn, expected_bound_bpd, gaussian_eps_fn
from tests.test_train import _config

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
# Halves XLA:CPU compile time, which dominates these tiny runs.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def tiny_config(**overrides):
    """The digits config with a one-level U-Net and T = 50."""
    return _config(
        "digits",
        **{
            "model.unet.ch": 32,
            "model.unet.ch_mult": (1,),
            "model.unet.attn_resolutions": (),
            "model.unet.num_res_blocks": 1,
            "diffusion.num_timesteps": 50,
            "training.batch_size": 16,
            "training.num_steps": 2,
            "training.checkpoint_every": 2,
            "training.log_every": 1,
            "training.sample_every": 0,
            **overrides,
        },
    )


class ExactGaussianModel:
    """The MSE-optimal eps-predictor of N(mean, std^2) data, with a U-Net's ``apply``."""

    num_classes = None

    def __init__(self, alphas_cumprod, mean, std):
        self._eps_fn = gaussian_eps_fn(alphas_cumprod, mean, std)

    def apply(self, variables, x_t, t, y, train):
        return self._eps_fn(x_t, t)


class ExactMixtureModel:
    """The MSE-optimal eps-predictor of a class-conditional mixture of diagonal Gaussians (one
    per class; the null label asks for the mixture's), with a conditional U-Net's ``apply``."""

    def __init__(self, alphas_cumprod, means, stds):
        self.num_classes = len(means)
        weights = np.full(self.num_classes, 1 / self.num_classes)
        self._eps_fn = class_conditional_eps_fn(alphas_cumprod, weights, means, stds)

    def apply(self, variables, x_t, t, y, train):
        return self._eps_fn(x_t.reshape(len(x_t), -1), t, y).reshape(x_t.shape)


def _test_split_pixels() -> np.ndarray:
    source = input_pipeline.DigitsSource("test")
    return np.stack([source[i]["image"] for i in range(len(source))])


def gaussian_bound_bpd(num_timesteps: int, num_examples: int | None = None):
    """``(prior, decoder L_0, [L_1 .. L_{T-1}])`` in bits/dim: the exact expected bound over
    the digits test split (its first ``num_examples``) of the exact denoiser of the Gaussian
    with their pixel mean and std (linear schedule, "fixed_large", no clipping, exact CDF)."""
    pixels = _test_split_pixels()[:num_examples]
    pmf = np.bincount(pixels.ravel(), minlength=256) / pixels.size
    scaled = pixels / 127.5 - 1
    betas = schedules.get_betas("linear", num_timesteps)
    return expected_bound_bpd(betas, "fixed_large", pmf, scaled.mean(), scaled.std())


def exact_gaussian_context(workdir, mesh, *, batch_size: int, num_timesteps: int = 1000):
    """An evaluation context whose model is the exact denoiser of the Gaussian with the digits
    test split's pixel mean and std; bound without clipping and with the exact CDF."""
    config = tiny_config(
        **{
            "diffusion.num_timesteps": num_timesteps,
            "sampling.clip_denoised": False,
            "eval.exact_cdf": True,
            "eval.batch_size": batch_size,
        }
    )
    pixels = _test_split_pixels() / 127.5 - 1
    schedule = config_lib.make_schedule(config)
    model = ExactGaussianModel(schedule.alphas_cumprod, pixels.mean(), pixels.std())
    return closed_form_context(workdir, mesh, config, model)


def closed_form_context(workdir, mesh, config, model) -> common.Context:
    """An evaluation context of step 0 of ``workdir`` whose network is ``model``, a closed form
    without parameters."""
    return common.Context(
        config=config,
        workdir=pathlib.Path(workdir),
        step=0,
        mesh=mesh,
        model=model,
        objective=config_lib.make_objective(config),
        params={},
        param_sharding={},
        eval_dir=pathlib.Path(workdir) / "eval",
    )


def test_bound_over_the_test_split_matches_its_closed_form(tmp_path):
    ctx = exact_gaussian_context(tmp_path, sharding.make_mesh(), batch_size=128)
    result = bpd.run(ctx)
    prior, decoder, kls = gaussian_bound_bpd(1000)
    with np.load(tmp_path / "eval" / "bpd_step0.npz") as saved:
        per_example = saved["example_bpd"]
    assert result["num_examples"] == len(per_example) == 297 and result["split"] == "test"
    # The data average is exact; only the noise is Monte Carlo. The spread of the per-example
    # bounds (data and noise together) bounds its standard error from above.
    stderr = per_example.std() / np.sqrt(len(per_example))
    assert result["total_bpd"] == pytest.approx(prior + decoder + kls.sum(), abs=4 * stderr)
    assert result["total_bpd"] == pytest.approx(float(per_example.mean()), rel=1e-5)
    # L_prior has no noise; float32 round-off of 1 - abar_T ~ 4e-5 limits it to ~1e-8 bits.
    assert result["prior_bpd"] == pytest.approx(prior, abs=1e-8)
    assert result["decoder_bpd"] == pytest.approx(decoder, rel=0.02)
    assert sum(result["terms_bpd"][1:]) == pytest.approx(kls.sum(), rel=0.02)
    assert len(result["terms_bpd"]) == len(result["mse"]) == 1000


def run_on_4_devices(module: str) -> dict:
    """The JSON line that ``python -m <module>`` prints, run with 4 CPU devices."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}",
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, "-m", module],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def sharded_runs():
    return run_on_4_devices("tests.sharded_eval")


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_bound_per_example_is_the_same_on_1_and_4_devices_and_any_batch(sharded_runs):
    one = sharded_runs["bpd_1x40"]
    assert len(one["examples"]) == 297  # 7 batches of 40 and one of 17 padded to 40
    assert np.all(np.isfinite(one["examples"]))
    for other in ("bpd_4x40", "bpd_4x64"):
        np.testing.assert_allclose(sharded_runs[other]["examples"], one["examples"], rtol=1e-6)
        assert sharded_runs[other]["total"] == pytest.approx(one["total"], rel=1e-7)


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_generation_is_split_over_devices_and_device_count_invariant(sharded_runs):
    one, four = sharded_runs["generate_1"], sharded_runs["generate_4"]
    assert one["conv_batches"] == [64]
    assert four["conv_batches"] == [16]  # each of 4 devices computes a quarter of 64
    np.testing.assert_allclose(four["samples"], one["samples"], atol=1e-6)
    assert np.std(one["samples"]) > 0.1  # not a constant


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_fewer_samples_than_a_batch_compute_only_those(sharded_runs):
    run = sharded_runs["sample_6_of_500"]
    # 6 samples padded to 8 for 4 devices, not eval.batch_size's 500 (125 per device).
    assert run["network_batches"] == [8]
    assert run["saved"] == 6


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_classifier_free_guidance_keeps_both_branches_on_the_examples_device(sharded_runs):
    one, four = sharded_runs["guided_1"], sharded_runs["guided_4"]
    assert four["collectives"] == []
    np.testing.assert_allclose(four["samples"], one["samples"], atol=1e-4)
    assert np.std(one["samples"]) > 0.1


TRAINED_STEPS = 60


def trained_config():
    """``tiny_config`` made class-conditional, trained for ``TRAINED_STEPS`` steps at a high
    learning rate after a short warmup, its EMA close behind the parameters. 8 groups of 4
    channels: GroupNorm over single channels would remove the per-channel offsets by which the
    time and label embeddings enter the residual blocks (a network blind to t)."""
    config = tiny_config(
        **{
            "model.unet.num_groups": 8,
            "optim.learning_rate": 3e-3,
            "optim.warmup_steps": 5,
            "optim.ema_decay": 0.9,
            "training.num_steps": TRAINED_STEPS,
            "training.checkpoint_every": TRAINED_STEPS,
            "training.log_every": TRAINED_STEPS,
        }
    )
    return config_defaults.make_class_conditional(config)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    from diffusion_jax import train

    workdir = tmp_path_factory.mktemp("trained")
    train.train_and_evaluate(trained_config(), workdir)
    return workdir


def _evaluate_flags(workdir, modes, *flags) -> list[str]:
    """The evaluation program's flags for ``workdir``: one mode, or a list run in turn."""
    modes = [modes] if isinstance(modes, str) else modes
    return [f"--workdir={workdir}", *(f"--mode={mode}" for mode in modes), *flags]


def _evaluate_command(workdir, modes, *flags):
    return [
        sys.executable,
        "-m",
        "diffusion_jax.evaluate",
        *_evaluate_flags(workdir, modes, *flags),
    ]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A reference directory of mode=fid holding the digits classifier, trained once, and no
    reference features."""
    directory = tmp_path_factory.mktemp("classifier")
    digits_classifier.load_or_train(directory)
    return directory


def _reference_dir(classifier_dir, path) -> pathlib.Path:
    """A new reference directory ``path`` holding the digits classifier only."""
    path.mkdir()
    shutil.copy(digits_classifier.cache_path(classifier_dir), path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: fast compilation, and one persistent compilation cache for all
    of this module's runs (a program's second run loads it instead of compiling)."""
    return dict(
        os.environ,
        XLA_FLAGS=FAST_COMPILE,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )


def _run_to_end(command, env):
    out = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _kill_when(command, condition, env):
    """Starts ``command`` and SIGKILLs it as soon as ``condition()`` holds."""
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert process.poll() is None, f"exited before the kill: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _copy(workdir, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(workdir, copy)
    return copy


# The settings of every run of the program on the trained network below, so that each program
# compiles once (``env``'s cache) and one uninterrupted run is the reference of the resumed and
# the 2-process runs: the bound (and the sampler) without clipping and with the exact CDF, as
# the bound's closed form for a Gaussian takes it; 100 test examples and 100 samples in batches
# of 40, the last ones padded.
RUN_MODES = ["sample", "bpd", "fid"]
RUN_EXAMPLES = RUN_SAMPLES = 100
RUN_FLAGS = [
    "--config.eval.batch_size=40",
    f"--config.eval.num_examples={RUN_EXAMPLES}",
    f"--config.eval.num_samples={RUN_SAMPLES}",
    "--config.sampling.clip_denoised=False",
    "--config.eval.exact_cdf=True",
]


@pytest.fixture(scope="module")
def uninterrupted(trained_workdir, classifier_dir, tmp_path_factory, env):
    """``(workdir, reference_dir)``: a copy of the trained workdir after one uninterrupted run
    of ``RUN_MODES`` in 1 process of 1 device, and the reference directory where its
    mode=fid computed the reference features."""
    root = tmp_path_factory.mktemp("uninterrupted")
    workdir = root / "workdir"
    shutil.copytree(trained_workdir, workdir)
    reference = _reference_dir(classifier_dir, root / "reference")
    flags = [*RUN_FLAGS, f"--config.eval.reference_dir={reference}"]
    _run_to_end(_evaluate_command(workdir, RUN_MODES, *flags), env)
    return workdir, reference


def _eval_path(workdir, name) -> pathlib.Path:
    """``workdir/eval/<name>_step<TRAINED_STEPS>``."""
    return workdir / "eval" / f"{name}_step{TRAINED_STEPS}"


def _eval_json(workdir, mode) -> dict:
    return json.loads(_eval_path(workdir, mode).with_suffix(".json").read_text())


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_bpd_killed_and_restarted_equals_an_uninterrupted_run(
    trained_workdir, uninterrupted, tmp_path, env
):
    straight, _ = uninterrupted
    resumed = _copy(trained_workdir, tmp_path, "resumed")
    partial = _eval_path(resumed, "bpd").with_suffix(".partial.npz")

    def one_batch_done():
        try:
            with np.load(partial) as saved:
                return int(saved["batches_done"]) >= 1
        except (OSError, ValueError, KeyError):
            return False

    _kill_when(_evaluate_command(resumed, "bpd", *RUN_FLAGS), one_batch_done, env)
    with np.load(partial) as saved:
        assert 1 <= int(saved["batches_done"]) < 3  # killed mid-run
    _run_to_end(_evaluate_command(resumed, "bpd", *RUN_FLAGS), env)
    assert not partial.exists()
    with (
        np.load(_eval_path(straight, "bpd").with_suffix(".npz")) as a,
        np.load(_eval_path(resumed, "bpd").with_suffix(".npz")) as b,
    ):
        np.testing.assert_array_equal(a["example_bpd"], b["example_bpd"])
        np.testing.assert_array_equal(a["terms"], b["terms"])
    numbers = [_eval_json(d, "bpd") for d in (straight, resumed)]
    for key in ("total_bpd", "prior_bpd", "decoder_bpd", "num_examples", "terms_bpd"):
        assert numbers[0][key] == numbers[1][key]
    assert numbers[0]["num_examples"] == RUN_EXAMPLES and numbers[0]["split"] == "test"
    # The network has learnt more than the pixels' mean and std: its bound is below that of
    # the Gaussian's exact denoiser (6.8 bits/dim; an untrained network, eps_hat = 0, the
    # Gaussian's std -> inf limit, gets 17.3).
    prior, decoder, kls = gaussian_bound_bpd(trained_config().diffusion.num_timesteps, RUN_EXAMPLES)
    assert 0 < numbers[0]["total_bpd"] < prior + decoder + kls.sum()


def _shards(directory):
    shards = sorted(pathlib.Path(directory).glob("shard_*.npz"))
    arrays = []
    for path in shards:
        with np.load(path) as shard:
            arrays.append(shard["images"])
    return [path.name for path in shards], arrays


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_samples_killed_and_restarted_equal_an_uninterrupted_run(
    trained_workdir, uninterrupted, tmp_path, env
):
    straight, _ = uninterrupted
    resumed = _copy(trained_workdir, tmp_path, "resumed")
    first = _eval_path(resumed, "samples") / "shard_000000.npz"
    _kill_when(_evaluate_command(resumed, "sample", *RUN_FLAGS), first.exists, env)
    names_killed, _ = _shards(first.parent)
    assert 1 <= len(names_killed) < 3
    _run_to_end(_evaluate_command(resumed, "sample", *RUN_FLAGS), env)
    names_a, a = _shards(_eval_path(straight, "samples"))
    names_b, b = _shards(first.parent)
    assert names_a == names_b == [f"shard_{k:06d}.npz" for k in range(3)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert [len(x) for x in a] == [40, 40, 20]
    assert a[0].dtype == np.uint8 and a[0].shape[1:] == (8, 8, 1)
    # The samples have the digits' mean image (dark borders, bright strokes in the middle),
    # which noise lacks (an untrained network's samples: a correlation near 0).
    mean_image = np.concatenate(a).mean(axis=0, dtype=np.float64).ravel()
    train_images, _ = digits_classifier.split_arrays("train")
    data_mean_image = train_images.mean(axis=0, dtype=np.float64).ravel()
    correlation = np.corrcoef(mean_image, data_mean_image)[0, 1]
    assert correlation > 0.8
    grid = Image.open(_eval_path(straight, "samples").with_suffix(".png"))
    assert grid.size[0] == grid.size[1] > 10 * 8  # 100 samples, upscaled


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_samples_bound_and_scores_are_the_same_on_2_processes_of_2_devices(
    trained_workdir, classifier_dir, uninterrupted, tmp_path, env
):
    """``RUN_MODES`` in one run of 2 processes of 2 devices, which computes its own reference
    features, against the uninterrupted run of 1 process."""
    single, single_reference = uninterrupted
    multi = _copy(trained_workdir, tmp_path, "multi")
    multi_reference = _reference_dir(classifier_dir, tmp_path / "reference")
    flags = [*RUN_FLAGS, f"--config.eval.reference_dir={multi_reference}"]
    env = dict(
        env,
        MODULE="diffusion_jax.evaluate",
        PYTHON=sys.executable,
        PORT=str(portpicker.pick_unused_port()),
    )
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "local.sh"), "2", "2", "--"]
        + _evaluate_flags(multi, RUN_MODES, *flags),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    names_a, a = _shards(_eval_path(single, "samples"))
    names_b, b = _shards(_eval_path(multi, "samples"))
    assert names_a == names_b and len(names_a) == 3
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)

    with (
        np.load(_eval_path(single, "bpd").with_suffix(".npz")) as one,
        np.load(_eval_path(multi, "bpd").with_suffix(".npz")) as two,
    ):
        assert one["example_bpd"].shape == (RUN_EXAMPLES,)
        assert np.all(np.isfinite(one["example_bpd"]))
        np.testing.assert_allclose(two["example_bpd"], one["example_bpd"], rtol=1e-6)
        np.testing.assert_allclose(two["terms"], one["terms"], rtol=1e-6)
    bound = [_eval_json(d, "bpd") for d in (single, multi)]
    assert bound[1]["num_examples"] == bound[0]["num_examples"] == RUN_EXAMPLES
    assert bound[1]["total_bpd"] == pytest.approx(bound[0]["total_bpd"], rel=1e-6)

    scores = [_eval_json(d, "fid") for d in (single, multi)]
    for key in ("num_samples", "reference", "feature_network", "classifier_test_accuracy"):
        assert scores[1][key] == scores[0][key]
    assert scores[0]["num_samples"] == RUN_SAMPLES
    assert scores[0]["reference"]["num_examples"] == 1500
    for key in (
        "fid",
        "inception_score",
        "inception_score_std",
        "kid",
        "kid_std",
        "precision",
        "recall",
        "label_agreement",
        "fid_real_test",
        "fid_samples_at_real_test_n",
    ):
        assert scores[1][key] == pytest.approx(scores[0][key], rel=1e-5), key
    [one], [two] = (sorted(d.glob("digits-*.npz")) for d in (single_reference, multi_reference))
    assert one.name == two.name
    np.testing.assert_allclose(np.load(two)["features"], np.load(one)["features"], rtol=1e-5)


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_fid_mode_precision_is_of_the_samples_and_recall_of_the_data(
    trained_workdir, classifier_dir, tmp_path
):
    """Samples that are the train split's zeros, scored against the train split: every sample
    lies on the data's manifold (precision 1), and covers a small part of it (recall)."""
    images, labels = digits_classifier.split_arrays("train")
    zeros = images[labels == 0]
    samples_dir = tmp_path / "zeros"
    samples_dir.mkdir()
    np.savez(samples_dir / "shard_000000.npz", images=zeros)
    workdir = _copy(trained_workdir, tmp_path, "fid")
    overrides = {
        "eval.sample_dir": str(samples_dir),
        "eval.num_samples": len(zeros),
        "eval.reference_dir": str(classifier_dir),
    }
    result = evaluators.evaluate(workdir, "fid", overrides=overrides)
    assert result["reference"] == {"split": "train", "num_examples": len(images)}
    # Each sample is a reference image: at distance 0 from the centre of its ball.
    assert result["precision"] == 1.0
    # The real zeros lie in the balls of the samples, some real images next to them too.
    params = digits_classifier.load_or_train(classifier_dir)
    _, recall = metrics.precision_recall(
        digits_classifier.features(params, images)["features"],
        digits_classifier.features(params, zeros)["features"],
    )
    assert result["recall"] == pytest.approx(recall, abs=3 / len(images))  # 3 borderline images
    assert len(zeros) / len(images) <= result["recall"] < 0.2


def _frechet_by_definition(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets, float64."""
    import scipy.linalg

    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * root))


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_fid_mode_reports_fd_dinov2_of_the_features(trained_workdir, classifier_dir, tmp_path):
    """``eval.dinov2_weights``: FD-DINOv2 beside FID, with a tiny random DINOv2 saved with the
    official key names (the real weights cannot be downloaded here). It equals the Fréchet
    distance of the features computed directly (all images in one call, grey copied to RGB),
    against the test split, through batches of 40 (the last padded); the reference features
    are cached under their own name beside the classifier's."""
    from safetensors.numpy import save_file

    from diffusion_jax import dinov2

    weights = tmp_path / "dinov2_tiny.safetensors"
    save_file(dinov2.random_state_dict(dinov2.TINY, seed=0), weights)
    samples = digits_classifier.split_arrays("train")[0][:100]
    samples_dir = tmp_path / "samples"
    samples_dir.mkdir()
    np.savez(samples_dir / "shard_000000.npz", images=samples)
    reference_dir = _reference_dir(classifier_dir, tmp_path / "reference")
    overrides = {
        "eval.sample_dir": str(samples_dir),
        "eval.num_samples": len(samples),
        "eval.batch_size": 40,
        "eval.reference_split": "test",
        "eval.reference_dir": str(reference_dir),
        "eval.dinov2_weights": str(weights),
    }
    result = evaluators.evaluate(
        _copy(trained_workdir, tmp_path, "fid"), "fid", overrides=overrides
    )

    params, config = dinov2.load_params(weights)
    reference = digits_classifier.split_arrays("test")[0]
    rgb = lambda images: np.repeat(images, 3, axis=-1)
    f_samples = np.asarray(dinov2.features(params, rgb(samples), config), np.float64)
    f_reference = np.asarray(dinov2.features(params, rgb(reference), config), np.float64)
    direct = _frechet_by_definition(f_samples, f_reference)
    assert direct > 0.01  # the samples (train images) are not the test split
    assert result["fd_dinov2"] == pytest.approx(direct, rel=1e-3)
    name = result["fd_dinov2_network"]
    cached = reference_dir / f"digits-test-8x8x1-{name}.npz"
    np.testing.assert_allclose(np.load(cached)["features"], f_reference, rtol=1e-4, atol=1e-5)
    classifier = f"digits-test-8x8x1-{result['feature_network']}.npz"
    assert name.startswith("dinov2-") and (reference_dir / classifier).exists()
    assert "FD-DINOv2" in fid.summary(result)


def test_rate_distortion_from_hand_made_terms():
    curve = figures.rate_distortion([3.0, 0.5, 0.25], [0.0004, 0.01, 0.04], prior_bpd=0.125)
    assert curve["reverse_steps"] == [0, 1, 2, 3]
    np.testing.assert_allclose(curve["rate_bpd"], [0.125, 0.375, 0.875, 3.875])
    np.testing.assert_allclose(
        curve["distortion_rmse"], [0.2 * 127.5, 0.1 * 127.5, 0.02 * 127.5, 0.0]
    )


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_figures_of_a_trained_class_conditional_model(trained_workdir, tmp_path):
    workdir = _copy(trained_workdir, tmp_path, "figures")
    result = evaluators.evaluate(workdir, "figures", overrides={"eval.batch_size": 100})
    files = {name: pathlib.Path(path) for name, path in result["figures"].items()}
    assert set(files) == {"progressive", "shared_latent", "interpolation", "rate_distortion"}
    scale = 6  # 8x8 images upscaled to 48 pixels
    cell = 9 * scale  # image plus the 1-pixel separator, upscaled
    # Fig. 6: 8 samples x (10 records of 50 steps + the sample).
    assert Image.open(files["progressive"]).size == (11 * cell - scale, 8 * cell - scale)
    # Fig. 7: 2 images x 4 values of t; the image, x_t, 6 samples.
    assert Image.open(files["shared_latent"]).size == (8 * cell - scale, 8 * cell - scale)
    # Fig. 9: 2 pairs x 3 values of t; image a, 11 decodings, image b.
    assert Image.open(files["interpolation"]).size == (13 * cell - scale, 6 * cell - scale)
    curve = json.loads((files["rate_distortion"].parent / "rate_distortion.json").read_text())
    bound = _eval_json(workdir, "bpd")
    rate = np.asarray(curve["rate_bpd"])
    assert len(rate) == 51 and np.all(np.diff(rate) >= 0)  # KL terms are >= 0
    assert rate[-1] == pytest.approx(bound["total_bpd"], rel=1e-6)
    assert rate[0] == pytest.approx(bound["prior_bpd"], rel=1e-6)
    assert curve["distortion_rmse"][-1] == 0.0 and curve["distortion_rmse"][0] > 30


def _figure_cells(path, cols: int, size: int = 8) -> np.ndarray:
    """The images ``[rows, cols, size, size]`` in [-1, 1] of a figure's grid of ``cols``
    columns (upscaled, 1-pixel separators)."""
    step = size + 1
    grid = np.asarray(Image.open(path), np.float64)
    scale = grid.shape[1] // (cols * step - 1)
    grid = grid[::scale, ::scale] / 127.5 - 1
    rows = (grid.shape[0] + 1) // step
    return np.array(
        [
            [grid[r * step : r * step + size, k * step : k * step + size] for k in range(cols)]
            for r in range(rows)
        ]
    )


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_figures_of_a_class_conditional_model_label_each_chain_as_generation_does(tmp_path):
    """The exact denoiser of a mixture whose class c is every pixel near m_c: a chain's label
    shows as its images' mean (the cycled labels 7, 2, 5, ...: sample, image and pair i get
    the label of generated sample i)."""
    config = config_defaults.make_class_conditional(
        tiny_config(
            **{
                "sampling.clip_denoised": False,
                "sampling.labels": (7, 2, 5),
                "eval.num_examples": 8,
                "eval.batch_size": 8,
            }
        )
    )
    class_means = np.linspace(-0.9, 0.9, 10)  # 0.2 apart
    model = ExactMixtureModel(
        config_lib.make_schedule(config).alphas_cumprod,
        np.repeat(class_means[:, None], 64, axis=1),
        np.full((10, 64), 0.05),
    )
    ctx = closed_form_context(tmp_path, sharding.make_mesh(), config, model)
    files = figures.run(ctx)["figures"]

    def labels_shown(cells):
        return np.round((cells.mean(axis=(-2, -1)) - class_means[0]) / 0.2).astype(int)

    progressive = _figure_cells(files["progressive"], cols=11)[:, -1]  # the samples
    np.testing.assert_array_equal(labels_shown(progressive), [7, 2, 5, 7, 2, 5, 7, 2])
    # Rows: image 0 at 4 values of t, then image 1; its 6 samples after the image and x_t.
    shared = _figure_cells(files["shared_latent"], cols=8)[:, 2:]
    np.testing.assert_array_equal(labels_shown(shared), np.repeat([[7] * 6, [2] * 6], 4, axis=0))
    # Rows: pair 0 at 3 values of t, then pair 1; its 11 decodings between the two images.
    decoded = _figure_cells(files["interpolation"], cols=13)[:, 1:-1]
    np.testing.assert_array_equal(labels_shown(decoded), np.repeat([[7] * 11, [2] * 11], 3, axis=0))


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_bad_input_is_one_line_and_writes_nothing(trained_workdir, tmp_path, env):
    workdir = _copy(trained_workdir, tmp_path, "bad")
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    with pytest.raises(
        checkpointing.CheckpointError,
        match=r"No checkpoint of step 7 in .*; "
        rf"available steps: {TRAINED_STEPS}",
    ):
        evaluators.evaluate(workdir, "bpd", step=7)
    with pytest.raises(config_lib.ConfigError, match="'eval.num_samples' must be >= 1, got 0"):
        evaluators.evaluate(workdir, "sample", overrides={"eval.num_samples": 0})
    with pytest.raises(checkpointing.CheckpointError, match="No checkpoint in .*nothing to eval"):
        evaluators.evaluate(tmp_path / "nowhere", "bpd")
    assert not (tmp_path / "nowhere").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(workdir / "config.json", empty)
    with pytest.raises(checkpointing.CheckpointError, match="No checkpoint in .*nothing to eval"):
        evaluators.evaluate(empty, "bpd")
    assert sorted(p.name for p in empty.iterdir()) == ["config.json"]
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before
    # From the command line: one line on stderr, exit status 1.
    out = subprocess.run(
        _evaluate_command(workdir, "sample", "--step=7"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: No checkpoint of step 7")


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_sample_directory_of_other_settings_is_not_mixed(trained_workdir, tmp_path):
    workdir = _copy(trained_workdir, tmp_path, "mixed")
    overrides = {"eval.batch_size": 16, "eval.num_samples": 16}
    evaluators.evaluate(workdir, "sample", overrides=overrides)
    shard = _eval_path(workdir, "samples") / "shard_000000.npz"
    written = shard.read_bytes()
    with pytest.raises(
        ValueError,
        match=r"was made with sampling=.*'method': "
        r"'ancestral'.*delete it to start over",
    ):
        evaluators.evaluate(workdir, "sample", overrides={**overrides, "sampling.method": "ddim"})
    assert shard.read_bytes() == written
    # A directory made before a sampling key existed was made with its default: it resumes.
    meta_path = shard.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["sampling"]["guidance_interval"]
    meta_path.write_text(json.dumps(meta))
    result = evaluators.evaluate(workdir, "sample", overrides=overrides)
    assert result["shards_generated_now"] == 0 and shard.read_bytes() == written


def test_eval_batches_pad_the_last_batch_and_split_rows_over_processes():
    data = tiny_config().data
    batches = [
        list(
            input_pipeline.eval_batches(
                data, "test", global_batch_size=40, process_index=p, process_count=2
            )
        )
        for p in range(2)
    ]
    assert len(batches[0]) == len(batches[1]) == 8
    index = np.concatenate(
        [np.concatenate([b0["index"], b1["index"]]) for b0, b1 in zip(*batches, strict=True)]
    )
    mask = np.concatenate(
        [np.concatenate([b0["mask"], b1["mask"]]) for b0, b1 in zip(*batches, strict=True)]
    )
    np.testing.assert_array_equal(index, np.arange(320))
    np.testing.assert_array_equal(mask, np.arange(320) < 297)
    source = input_pipeline.DigitsSource("test")
    last = batches[1][-1]  # rows 300..319 of the padded batch 280..319: all padding
    assert not last["mask"].any()
    first = batches[0][0]
    expected = np.stack([source[i]["image"] for i in range(20)]).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(first["image"], expected, atol=1e-6)
    resumed = next(
        input_pipeline.eval_batches(
            data, "test", global_batch_size=40, start_batch=7, process_index=0, process_count=1
        )
    )
    np.testing.assert_array_equal(resumed["index"], np.arange(280, 320))
    assert resumed["mask"].sum() == 17


@pytest.fixture(scope="module")
def cifar_workdir(tmp_path_factory):
    """A tiny 32x32 RGB model trained for one step on mocked CIFAR-10, 6 samples of it, and
    random FID Inception weights (no real ones can be downloaded here)."""
    import tensorflow_datasets as tfds

    from diffusion_jax import inception, train

    root = tmp_path_factory.mktemp("cifar")
    weights = root / "inception.npz"
    np.savez(weights, **inception.random_state_dict(0))
    config = tiny_config(
        **{
            "data.name": "cifar10",
            "data.image_size": 32,
            "data.channels": 3,
            "training.batch_size": 2,
            "training.num_steps": 1,
            "training.checkpoint_every": 1,
        }
    )
    overrides = {
        "eval.num_samples": 6,
        "eval.batch_size": 4,
        "eval.inception_weights": str(weights),
        "eval.reference_dir": str(root / "reference"),
    }
    with tfds.testing.mock_data(num_examples=10):
        train.train_and_evaluate(config, root / "run")
        evaluators.evaluate(root / "run", "sample", overrides=overrides)
    return root / "run", overrides, weights


def _direct_inception(weights, images):
    from diffusion_jax import inception

    out = inception.features(inception.load_params(weights), images)
    return np.asarray(out["pool3"], np.float64), np.asarray(out["logits"], np.float64)


@pytest.mark.slow  # long end to end: runs in CI's slow pass
def test_fid_mode_equals_a_direct_computation_and_caches_the_reference(cifar_workdir):
    import tensorflow_datasets as tfds

    from diffusion_jax import metrics

    workdir, overrides, weights = cifar_workdir
    with tfds.testing.mock_data(num_examples=10):
        result = evaluators.evaluate(workdir, "fid", overrides=overrides)
        source = tfds.data_source("cifar10", split="train")
        reference = np.stack([source[i]["image"] for i in range(len(source))])
    samples_dir = workdir / "eval" / "samples_step1"
    generated = np.concatenate([np.load(p)["images"] for p in sorted(samples_dir.glob("*.npz"))])
    assert generated.shape == (6, 32, 32, 3) and len(reference) == 10
    # Independently of the program's batching, padding, sharding and caching: features of all
    # images in one call, float64 moments by NumPy.
    f_gen, logits = _direct_inception(weights, generated)
    f_ref, _ = _direct_inception(weights, reference)
    direct = metrics.frechet_distance(
        f_gen.mean(0), np.cov(f_gen, rowvar=False), f_ref.mean(0), np.cov(f_ref, rowvar=False)
    )
    assert result["fid"] == pytest.approx(direct, rel=1e-3)
    is_direct = metrics.inception_score(logits, num_splits=6)[0]
    assert result["inception_score"] == pytest.approx(is_direct, rel=1e-4)
    assert result["num_samples"] == 6 and result["reference"]["num_examples"] == 10
    network = result["feature_network"]
    assert network.startswith("inception-2015-12-05-")  # and a digest of the weights
    for key in ("kid", "precision", "recall"):
        assert np.isfinite(result[key])
    reference_dir = pathlib.Path(overrides["eval.reference_dir"])
    cached = list(reference_dir.glob("*.npz"))
    assert [p.name for p in cached] == [f"cifar10-train-32x32x3-{network}.npz"]
    np.testing.assert_allclose(np.load(cached[0])["features"], f_ref, rtol=1e-4, atol=1e-5)
    # A second run reads the cache (the mocked data set is gone) and gives the same numbers.
    again = evaluators.evaluate(workdir, "fid", overrides=overrides)
    assert again["fid"] == result["fid"] and again["kid"] == result["kid"]
    # Other Inception weights are another feature network: the cached features of the first
    # are not reused, the reference is computed with the new weights and cached beside them.
    from diffusion_jax import inception

    other_weights = weights.parent / "inception_other.npz"
    np.savez(other_weights, **inception.random_state_dict(1))
    other_overrides = {**overrides, "eval.inception_weights": str(other_weights)}
    with tfds.testing.mock_data(num_examples=10):
        other = evaluators.evaluate(workdir, "fid", overrides=other_overrides)
    f_gen, _ = _direct_inception(other_weights, generated)
    f_ref, _ = _direct_inception(other_weights, reference)
    other_direct = metrics.frechet_distance(
        f_gen.mean(0), np.cov(f_gen, rowvar=False), f_ref.mean(0), np.cov(f_ref, rowvar=False)
    )
    assert other["fid"] == pytest.approx(other_direct, rel=1e-3)
    assert other["fid"] != pytest.approx(result["fid"], rel=1e-2)
    assert other["feature_network"] != network and len(list(reference_dir.glob("*.npz"))) == 2


@pytest.mark.slow  # long end to end: runs in CI's slow pass
def test_fid_bad_input_is_one_line_and_loses_nothing(cifar_workdir, tmp_path):
    from diffusion_jax import inception

    workdir, overrides, _ = cifar_workdir
    samples_dir = workdir / "eval" / "samples_step1"
    before = {p: p.read_bytes() for p in samples_dir.iterdir()}
    with pytest.raises(config_lib.ConfigError, match="'eval.inception_weights' is empty"):
        evaluators.evaluate(workdir, "fid", overrides={**overrides, "eval.inception_weights": ""})
    missing = {**overrides, "eval.inception_weights": str(tmp_path / "nope.npz")}
    with pytest.raises(inception.WeightsNotFoundError, match="pt_inception-2015-12-05"):
        evaluators.evaluate(workdir, "fid", overrides=missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(inception.CheckpointError, match="not a readable .npz"):
        evaluators.evaluate(
            workdir, "fid", overrides={**overrides, "eval.inception_weights": str(garbage)}
        )
    wrong = tmp_path / "wrong_size"
    wrong.mkdir()
    np.savez(wrong / "shard_000000.npz", images=np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"are 16x16x3 images, but .* give 32x32x3"):
        evaluators.evaluate(workdir, "fid", overrides={**overrides, "eval.sample_dir": str(wrong)})
    assert {p: p.read_bytes() for p in samples_dir.iterdir()} == before
