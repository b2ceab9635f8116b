"""The noisy-image classifier (``model.kind = "classifier"``): the network and its shared trunk,
one train step against an independent computation, 1 vs 4 devices, training and exact resume
through the training program, config errors, and ``mode=accuracy`` of the evaluation program.

Tiny networks on the digits throughout (``tiny_config``: one level, ch 32, T = 50).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from diffusion_jax import (
    config_defaults,
    config_lib,
    evaluators,
    guidance,
    input_pipeline,
    schedules,
    sharding,
    train,
    train_step,
)
from diffusion_jax.evaluators import accuracy, common
from diffusion_jax.models import NoisyClassifier, UNet
from diffusion_jax.models.classifier import log_prob_fn
from tests.test_evaluate import run_on_4_devices
from tests.test_train import (
    _config,
    _read_checkpoint,
    _steps,
    cache_dir,  # noqa: F401  (the fixture, for this module too)
    nothing_built,  # noqa: F401  (the fixture)
)

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
NUM_TIMESTEPS = 50
# One persistent compilation cache for the module: the training program's runs share programs.
pytestmark = pytest.mark.usefixtures("cache_dir")


def tiny_config(**overrides):
    """``configs/digits_classifier.py`` without attention, with GroupNorm(8), T = 50 and batch
    16. (GroupNorm(32) of 32 channels normalises each channel on its own: the biases added
    before it do nothing and get gradients of rounding noise, which Adam's first step turns
    into updates of +-learning rate, different on every layout of the batch.)"""
    return _config(
        "digits_classifier",
        **{
            "model.unet.ch": 32,
            "model.unet.ch_mult": (1, 2),
            "model.unet.attn_resolutions": (),
            "model.unet.num_res_blocks": 1,
            "model.unet.num_groups": 8,
            "diffusion.num_timesteps": NUM_TIMESTEPS,
            "optim.warmup_steps": 0,
            "training.batch_size": 16,
            "training.num_steps": 2,
            "training.checkpoint_every": 2,
            "training.log_every": 1,
            **overrides,
        },
    )


@functools.partial(jax.jit, static_argnames=("model",))
def _logits(model, variables, x, t):
    """The classifier's logits, ``train=False`` (jitted: op-by-op Flax is slow on CPU)."""
    return model.apply(variables, x, t, train=False)


def random_params(params, seed=0, scale=0.2):
    """N(0, scale^2) parameters shaped like ``params``: every layer does something (at
    initialisation the residual branches' last layers are zero)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params
    )


def _tiny_model_and_params(config=None, seed=0):
    config = config or tiny_config()
    model = config_lib.make_model(config, 10)
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), train=False
        )
    )
    return model, random_params(shapes["params"], seed)


class LinearDigitsClassifier:
    """Template matching with a NoisyClassifier's ``apply``: logits ``4 x_t . (m_c - m)`` with
    ``m_c`` the mean training image of class c and ``m`` that of all; at T = 50, accuracy about
    0.76 at t in the first quarter and chance in the last."""

    num_classes = 10

    @staticmethod
    def fit() -> dict:
        source = input_pipeline.DigitsSource("train")
        x = np.stack([source[i]["image"].ravel() for i in range(len(source))]) / 127.5 - 1.0
        y = np.asarray([source[i]["label"] for i in range(len(source))])
        templates = np.stack([x[y == c].mean(0) for c in range(10)]) - x.mean(0)
        return {"w": jnp.asarray(4.0 * templates.T, jnp.float32)}

    def apply(self, variables, x_t, t, *, train):
        return x_t.reshape(x_t.shape[0], -1) @ variables["params"]["w"]


def linear_context(workdir, mesh, *, batch_size: int, **overrides) -> common.Context:
    """An evaluation context whose classifier is ``LinearDigitsClassifier`` (replicated)."""
    config = tiny_config(**{"eval.batch_size": batch_size, **overrides})
    params = LinearDigitsClassifier.fit()
    replicated = sharding.replicated(mesh)
    return common.Context(
        config=config,
        workdir=pathlib.Path(workdir),
        step=0,
        mesh=mesh,
        model=LinearDigitsClassifier(),
        objective=config_lib.make_objective(config),
        params=jax.device_put(params, replicated),
        param_sharding=jax.tree.map(lambda _: replicated, params),
        eval_dir=pathlib.Path(workdir) / "eval",
    )


def _cross_entropy(logits, labels) -> np.ndarray:
    """Per-example cross-entropy in nats, by optax (not the code under test)."""
    return np.asarray(
        optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels))
    )


def _noised(x0, keys, num_timesteps):
    """x_t and t of each example from its key, written out here: ``t_key, noise_key =
    split(key)``, t uniform in [0, T), ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` with
    abar from the betas in float64."""
    abar = np.cumprod(1.0 - schedules.get_betas("linear", num_timesteps))
    t = np.array(
        [int(jax.random.randint(jax.random.split(k)[0], (), 0, num_timesteps)) for k in keys]
    )
    noise = np.stack(
        [np.asarray(jax.random.normal(jax.random.split(k)[1], x0.shape[1:])) for k in keys]
    )
    a = abar[t].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(a) * x0 + np.sqrt(1.0 - a) * noise
    return x_t.astype(np.float32), t


# The network.


def test_logits_shape_dtype_and_bfloat16():
    model = NoisyClassifier(num_classes=7, ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=4)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 8, 8, 2), minval=-1, maxval=1)
    t = jnp.array([0, 10, 999])
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, train=False))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
    params = random_params(shapes)
    logits = _logits(model, params, x, t)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    bf16 = _logits(
        NoisyClassifier(
            num_classes=7, ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, dtype=jnp.bfloat16
        ),
        params,
        x,
        t,
    )
    assert bf16.dtype == jnp.float32 and float(jnp.abs(logits).max()) > 0.1
    np.testing.assert_allclose(bf16, logits, atol=0.05 * float(jnp.abs(logits).max()))
    assert not np.allclose(logits[0], logits[1])
    with pytest.raises(ValueError, match="t must have shape"):
        model.apply(params, x, t[:2], train=False)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        jax.eval_shape(
            lambda: NoisyClassifier(num_classes=1, ch=16, num_groups=4).init(
                jax.random.PRNGKey(0), x, t, train=False
            )
        )


def test_trunk_is_the_unets_down_half_and_middle_block():
    """Same layers under the same names: the U-Net's parameters minus its up path and output are
    the classifier's minus its head and its own final GroupNorm (so their initial values, keyed
    by name, are equal too)."""
    kw = dict(ch=16, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), num_groups=4)
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    unet = jax.eval_shape(lambda: UNet(**kw).init(jax.random.PRNGKey(0), x, t, train=False))
    clf = NoisyClassifier(num_classes=10, **kw)
    clf = jax.eval_shape(lambda: clf.init(jax.random.PRNGKey(0), x, t, train=False))
    trunk = {k: v for k, v in clf["params"].items() if k not in ("head", "norm_out")}
    unet_trunk = {
        k: v
        for k, v in unet["params"].items()
        if not k.startswith("up_") and k not in ("conv_out", "norm_out")
    }
    assert len(trunk) == 13 and sorted(trunk) == sorted(unet_trunk)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(trunk) == shapes(unet_trunk)
    assert shapes(clf["params"]["head"]) == {
        "kernel": ((32, 10), jnp.float32),
        "bias": ((10,), jnp.float32),
    }
    # The DDPM CIFAR-10 network's down half and middle block, and a 10-way head.
    cifar = config_lib.make_model(_config("cifar10_classifier"), 10)
    shapes = jax.eval_shape(
        lambda: cifar.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), t, train=False)
    )
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(shapes)) == 13_414_794


def test_log_prob_fn_is_the_log_softmax_of_the_label_and_guides():
    model, params = _tiny_model_and_params()
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 1))
    t, y = jnp.array([0, 5, 20, 49]), jnp.array([3, 0, 9, 3])
    schedule = schedules.Schedule.create("linear", NUM_TIMESTEPS)

    log_prob = log_prob_fn(model, params)
    # As guidance.classifier's log_prob_fn: eps_hat = eps - s sqrt(1 - abar_t) grad log p.
    guided_fn = guidance.classifier(lambda x_t, t: jnp.zeros_like(x_t), log_prob, y, 2.0, schedule)

    @jax.jit  # one program for all of it (compiling dominates here)
    def compute(x):
        guided = guided_fn(x, t)
        grad = jax.grad(lambda x: jnp.sum(log_prob(x, t, y)))(x)
        logits = model.apply({"params": params}, x, t, train=False)
        return log_prob(x, t, y), logits, guided, grad

    log_prob, logits, guided, grad = compute(x)
    np.testing.assert_allclose(log_prob, -_cross_entropy(logits, y), rtol=1e-6, atol=1e-6)
    assert log_prob.shape == (4,) and log_prob.dtype == jnp.float32
    sigma = np.sqrt(1.0 - np.asarray(schedule.alphas_cumprod)[np.asarray(t)])
    np.testing.assert_allclose(guided, -2.0 * sigma[:, None, None, None] * grad, rtol=1e-5)
    assert float(jnp.abs(grad).max()) > 0


# One train step.


class OneStep:
    """One train step of the tiny classifier (batch 64) from one state with random parameters,
    for configs that differ in how the step runs (accumulation, compute dtype); compiled once
    per config. On ``devices`` (default: all) with ``training.fsdp=fsdp``."""

    def __init__(self, fsdp: int = 1, devices=None):
        self.base = {"training.batch_size": 64, "training.fsdp": fsdp}
        self.mesh = sharding.make_mesh(fsdp, devices=devices)
        self.config = self._config()
        setup = config_lib.make_train_setup(self.config, 10)
        self.model = setup.model
        _, self.shardings = train_step.state_shardings(setup, (8, 8, 1), self.mesh)
        state = train_step.create_train_state(setup, (8, 8, 1), self.shardings, self.config.seed)
        params = random_params(jax.device_get(state.params))
        self.state = jax.device_get(state.replace(params=params, ema_params=params))
        self.batch = next(
            input_pipeline.create_train_iterator(self.config.data, global_batch_size=64, seed=0)
        )
        self._steps = {}

    def _config(self, **overrides):
        config = tiny_config(**{**self.base, **overrides})
        return config_lib.validate(config, num_devices=self.mesh.size)

    def __call__(self, batch=None, **overrides):
        """``(state, metrics)`` on the host after one step on ``batch`` (default: the first
        training batch) with ``overrides`` of the config."""
        key = json.dumps(overrides, sort_keys=True)
        if key not in self._steps:
            setup = config_lib.make_train_setup(self._config(**overrides), 10)
            self._steps[key] = train_step.make_train_step(setup, self.mesh, self.shardings)
        state = jax.device_put(self.state, self.shardings)  # donated by the step
        batch = sharding.global_batch(self.mesh, self.batch if batch is None else batch)
        return jax.device_get(self._steps[key](state, batch))

    def logits(self) -> np.ndarray:
        """The logits of the state's parameters for the batch's images at t = 0, 3, ..., 189,
        the batch sharded over the mesh."""
        x, t = self.batch["image"], np.arange(64, dtype=np.int32) * 3
        x, t = sharding.global_batch(self.mesh, (x, t))
        params = jax.device_put(self.state.params, self.shardings.params)
        return np.asarray(_logits(self.model, {"params": params}, x, t))


@pytest.fixture(scope="module")
def one_step():
    return OneStep()


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_one_train_step_metrics_equal_an_independent_computation(one_step):
    model, params, rng = one_step.model, one_step.state.params, one_step.state.rng
    # Example i's key: fold_in(example_root, step * B + i), example_root from fold_in(rng, 0).
    example_root = jax.random.split(jax.random.fold_in(rng, 0))[0]
    keys = [jax.random.fold_in(example_root, i) for i in range(64)]
    x_t, t = _noised(one_step.batch["image"], keys, NUM_TIMESTEPS)
    logits = np.asarray(_logits(model, {"params": params}, x_t, t))  # dropout is 0
    # Random parameters are right by chance; labels that are the prediction for 2 of every 3
    # examples (x_t does not depend on them) make the accuracy informative.
    predicted = logits.argmax(-1)
    labels = np.where(np.arange(64) % 3, predicted, (predicted + 1) % 10).astype(np.int32)
    _, metrics = one_step({"image": one_step.batch["image"], "label": labels})
    cross_entropy = _cross_entropy(logits, labels)
    correct = (predicted == labels).astype(np.float64)

    assert float(metrics["loss"]) == pytest.approx(cross_entropy.mean(), rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(correct.mean(), abs=1e-7)
    assert "mse" not in metrics and "vlb_bpd" not in metrics
    averaged = train_step.average_metrics([metrics])
    quarter = t * 4 // NUM_TIMESTEPS
    for q in range(4):
        in_q = quarter == q
        assert in_q.sum() > 5
        assert metrics[f"loss_q{q}_count"] == metrics[f"accuracy_q{q}_count"] == in_q.sum()
        # A hand-computed masked mean over the examples whose t is in quarter q.
        expected = np.sum(correct * in_q) / np.sum(in_q)
        assert averaged[f"accuracy_q{q}"] == pytest.approx(expected, abs=1e-7)
        assert averaged[f"loss_q{q}"] == pytest.approx(cross_entropy[in_q].mean(), rel=1e-5)
    assert not any(k.endswith(("_sum", "_count")) for k in averaged)


def test_average_metrics_pools_every_sum_and_count_pair_over_steps():
    steps = [
        {"loss": 1.0, "accuracy_q0_sum": 3.0, "accuracy_q0_count": 4.0, "x_q1_sum": 0.0},
        {"loss": 3.0, "accuracy_q0_sum": 0.0, "accuracy_q0_count": 0.0, "x_q1_sum": 1.0},
        {"loss": 2.0, "accuracy_q0_sum": 1.0, "accuracy_q0_count": 4.0, "x_q1_sum": 2.0},
    ]
    for m in steps:
        m["x_q1_count"] = 0.0
    averaged = train_step.average_metrics(steps)
    # 4 correct of 8 examples, not the mean of the steps' accuracies (0.75, -, 0.25); x_q1 had no
    # examples and is left out.
    assert averaged == {"loss": 2.0, "accuracy_q0": 0.5}


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_gradient_accumulation_gives_the_one_batch_step(one_step):
    expected, metrics = one_step()
    accumulated, accumulated_metrics = one_step(**{"training.grad_accum_steps": 2})
    # Adam's first step: see test_logits_and_train_step_are_the_same_on_1_and_4_devices.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        expected.params,
        accumulated.params,
    )
    for key in ("loss", "accuracy", "loss_q1_sum", "accuracy_q2_sum", "grad_norm"):
        assert accumulated_metrics[key] == pytest.approx(metrics[key], rel=1e-5), key


@pytest.mark.slow
def test_bfloat16_step_stays_close_and_keeps_float32_parameters(one_step):
    _, metrics = one_step()
    bf16, bf16_metrics = one_step(**{"training.compute_dtype": "bfloat16"})
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(bf16.params))
    # The step does compute in bfloat16: its gradient is off float32's by more than float32
    # rounding (1e-5 relative, as between device layouts); measured 3.4e-4. (The loss, near
    # log 10 at these parameters, hardly moves: 2e-5.)
    assert abs(bf16_metrics["grad_norm"] / metrics["grad_norm"] - 1) > 1e-5
    assert bf16_metrics["loss"] == pytest.approx(metrics["loss"], rel=0.02)
    assert bf16_metrics["accuracy"] == pytest.approx(metrics["accuracy"], abs=0.05)


# 1 vs 4 devices.


@pytest.fixture(scope="module")
def sharded_runs():
    return run_on_4_devices("tests.sharded_classifier")


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_logits_and_train_step_are_the_same_on_1_and_4_devices(sharded_runs, one_step):
    """The subprocess's ``OneStep`` on 4 devices with ``training.fsdp=2`` (the batch split 4
    ways, large parameters 2 ways) against this process's on 1."""
    logits, four = one_step.logits(), sharded_runs["logits"]
    assert np.abs(logits).max() > 0.1
    # Equal up to float32 rounding (the convolutions' batch differs); measured: 1.4e-6 relative.
    np.testing.assert_allclose(four, logits, rtol=1e-5, atol=1e-6)
    assert np.all(np.argmax(four, -1) == np.argmax(logits, -1))
    state, metrics = one_step()
    run = sharded_runs["step"]
    for key in ("loss", "accuracy", "accuracy_q0_sum", "loss_q3_sum", "grad_norm"):
        assert run["metrics"][key] == pytest.approx(float(metrics[key]), rel=1e-5), key
    # Adam's first step divides each gradient by its own magnitude, which turns rounding
    # differences of the cross-device sums into parameter differences of up to 2.2e-6
    # (learning rate 1e-3).
    for a, b in zip(jax.tree.leaves(state.params), run["params"], strict=True):
        np.testing.assert_allclose(np.asarray(b).reshape(a.shape), a, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_accuracy_mode_is_the_same_on_1_and_4_devices_and_any_batch(sharded_runs, tmp_path):
    ctx = linear_context(tmp_path, sharding.make_mesh(), batch_size=40)
    summary = accuracy.run(ctx)
    with np.load(ctx.eval_dir / "accuracy_step0.npz") as saved:
        one = {key: saved[key] for key in saved.files}
    four = sharded_runs["accuracy"]  # 4 devices, batches of 64
    assert len(one["t"]) == len(four["examples"]["t"]) == 297
    for key in ("t", "label", "predicted"):
        np.testing.assert_array_equal(four["examples"][key], one[key], err_msg=key)
    # Batches of 40 and 64 sum the logits' products in different orders: the cross-entropy of a
    # confident prediction (-log p near 0, from logits of order 10-20) keeps an absolute
    # round-off of a few float32 ulps of the logits, hence the atol.
    np.testing.assert_allclose(
        four["examples"]["cross_entropy"], one["cross_entropy"], rtol=1e-5, atol=2e-6
    )
    assert four["summary"]["accuracy"] == summary["accuracy"]


# The training program.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier trained 4 steps, saved at 2 and 4 (batch 64, as ``OneStep``: they
    share compiled programs through the persistent cache)."""
    workdir = tmp_path_factory.mktemp("classifier")
    config = tiny_config(**{"training.num_steps": 4, "training.batch_size": 64})
    metrics = train.train_and_evaluate(config, workdir)
    return workdir, config, metrics


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_training_program_logs_accuracy_by_quarter_and_saves(trained):
    workdir, _, metrics = trained
    assert _steps(workdir) == [2, 4]
    assert {"loss", "accuracy", "grad_norm"} <= set(metrics)
    assert {f"{name}_q{q}" for name in ("loss", "accuracy") for q in range(4)} <= set(metrics)
    assert not (workdir / "samples").exists()
    state, _ = _read_checkpoint(workdir, 4)
    assert state["params"]["head"]["kernel"].shape == (64, 10)


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_resume_is_exact_and_a_changed_kind_is_refused(trained, tmp_path):
    reference, config, _ = trained
    workdir = tmp_path / "run"
    train.train_and_evaluate(
        tiny_config(**{"training.num_steps": 2, "training.batch_size": 64}), workdir
    )
    assert _steps(workdir) == [2]
    train.train_and_evaluate(config, workdir)  # resumes at 2
    assert _steps(workdir) == [2, 4]
    for step in (2, 4):
        expected_state, expected_data = _read_checkpoint(reference, step)
        state, data = _read_checkpoint(workdir, step)
        chex.assert_trees_all_equal(expected_state, state, strict=True)
        assert data == expected_data
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    with pytest.raises(config_lib.ConfigError) as error:
        train.train_and_evaluate(
            tiny_config(
                **{"model.kind": "denoiser", "training.num_steps": 6, "training.batch_size": 64}
            ),
            workdir,
        )
    assert str(error.value) == (
        f"Cannot resume {workdir} (step 4) with a changed config: model.kind 'classifier' -> "
        "'denoiser'. Use a new --workdir, or restore these values."
    )
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def _low_t_accuracy(model, params) -> float:
    """Accuracy on the 297 held-out digits at t drawn uniformly from the first quarter [0, T/4)."""
    source = input_pipeline.DigitsSource("test")
    x0 = np.stack([source[i]["image"] for i in range(len(source))]) / 127.5 - 1.0
    labels = np.asarray([source[i]["label"] for i in range(len(source))])
    t = np.random.default_rng(0).integers(0, NUM_TIMESTEPS // 4, len(source))
    abar = np.cumprod(1.0 - schedules.get_betas("linear", NUM_TIMESTEPS))[t].reshape(-1, 1, 1, 1)
    noise = np.random.default_rng(1).standard_normal(x0.shape)
    x_t = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise).astype(np.float32)
    logits = _logits(model, {"params": params}, x_t, t)
    return float(np.mean(np.argmax(logits, -1) == labels))


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_training_raises_low_t_accuracy_above_chance(tmp_path):
    """60 steps of the tiny classifier through the training program (about 5 s): on the
    held-out digits at t in the first quarter, the accuracy rises from chance (measured: 0.104
    at initialisation, 0.108 after 20 steps, 0.347 after 40) to 0.468."""
    steps = 60
    config = tiny_config(
        **{
            "training.num_steps": steps,
            "training.batch_size": 64,
            "training.checkpoint_every": steps,
            "training.log_every": 20,
        }
    )
    metrics = train.train_and_evaluate(config, tmp_path)
    setup = config_lib.make_train_setup(config, 10)
    model = setup.model
    _, shardings = train_step.state_shardings(setup, (8, 8, 1), sharding.make_mesh())
    initial = train_step.create_train_state(setup, (8, 8, 1), shardings, config.seed)
    before = _low_t_accuracy(model, jax.device_get(initial.params))
    after = _low_t_accuracy(model, _read_checkpoint(tmp_path, steps)[0]["params"])
    assert abs(before - 0.1) < 0.05
    assert after > 0.3, after
    # The training program's own numbers (steps 41-60) show the same.
    assert metrics["accuracy_q0"] > 0.3 and metrics["loss_q0"] < metrics["loss_q3"]


# Config errors.


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.kind": "critic"}, "'model.kind' is 'critic'; valid: denoiser, classifier"),
        (
            {"model.class_conditional": True},
            "'model.class_conditional' is True, but model.kind 'classifier' needs False: it "
            "predicts the label instead of being given one",
        ),
        (
            {"model.class_conditional": True, "model.label_dropout": 0.1},
            "'model.class_conditional' is True, but model.kind 'classifier' needs False",
        ),
        (
            {"model.label_dropout": 0.1},
            "'model.label_dropout' is 0.1, but model.kind 'classifier' needs 0.0",
        ),
        (
            {"diffusion.loss_type": "hybrid"},
            "'diffusion.loss_type' is 'hybrid', but model.kind 'classifier' needs 'simple'",
        ),
        (
            {"diffusion.loss_weighting": "min_snr"},
            "'diffusion.loss_weighting' is 'min_snr', but model.kind 'classifier' needs 'none'",
        ),
        (
            {"diffusion.loss_type": "vlb", "diffusion.timestep_sampling": "importance"},
            "'diffusion.loss_type' is 'vlb', but model.kind 'classifier' needs 'simple'",
        ),
        (
            {"diffusion.timestep_sampling": "importance"},
            "'diffusion.timestep_sampling' is 'importance', but model.kind 'classifier' needs "
            "'uniform'",
        ),
        (
            {"training.sample_every": 1000},
            "'training.sample_every' is 1000, but model.kind 'classifier' needs 0: it draws no "
            "samples",
        ),
    ],
)
@pytest.mark.usefixtures("nothing_built")
def test_bad_classifier_config_fails_before_anything_is_built(overrides, message, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)) as error:
        train.train_and_evaluate(tiny_config(**overrides), workdir)
    assert "\n" not in str(error.value)
    assert not workdir.exists()


@pytest.mark.parametrize("subdirectories", [False, True], ids=["unlabeled", "one_class"])
@pytest.mark.usefixtures("nothing_built")
def test_classifier_on_data_without_classes_fails_before_anything_is_built(
    subdirectories, tmp_path
):
    folder = tmp_path / "images"
    for i in range(3):
        path = folder / ("only_class" if subdirectories else "") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(path)
    config = tiny_config(**{"data.name": "folder", "data.path": str(folder)})
    workdir = tmp_path / "run"
    what = "one class" if subdirectories else "no class labels"
    with pytest.raises(
        config_lib.ConfigError,
        match=re.escape(
            "Config key 'model.kind' is 'classifier', which needs a data set with class labels, "
            f"but data set 'folder' ({folder}) has {what}"
        ),
    ):
        train.train_and_evaluate(config, workdir)
    assert not workdir.exists()


def test_classifier_configs_validate_and_share_the_denoisers_process():
    for name, denoiser in (("digits_classifier", "digits"), ("cifar10_classifier", "cifar10")):
        config = config_lib.validate(_config(name), num_devices=1)
        assert config.model.kind == "classifier"
        assert config.diffusion.to_dict() == _config(denoiser).diffusion.to_dict(), name
        for key in ("data.name", "data.image_size", "data.channels"):
            assert config_lib._get(config, key) == config_lib._get(_config(denoiser), key)


# The evaluation program.


def test_accuracy_mode_noises_with_the_classifiers_objective(tmp_path):
    """An EDM classifier is scored on EDM's noise, written out here from Karras et al.: sigma
    = exp(P_mean + P_std n) with n from the example's t key, x = x0 + sigma noise, the network
    sees x / sqrt(sigma^2 + sigma_data^2) (and ln(sigma) / 4, which the linear classifier
    ignores); quarters are those of the log-normal."""
    ctx = linear_context(tmp_path, sharding.make_mesh(), batch_size=40)
    config = config_defaults.use_objective(tiny_config(**{"eval.batch_size": 40}), "edm")
    ctx = dataclasses.replace(ctx, config=config, objective=config_lib.make_objective(config))
    result = accuracy.run(ctx)
    source = input_pipeline.DigitsSource("test")
    x0 = np.stack([source[i]["image"] for i in range(len(source))]) / 127.5 - 1.0
    labels = np.asarray([source[i]["label"] for i in range(len(source))])
    keys = [jax.random.fold_in(jax.random.PRNGKey(config.eval.seed), i) for i in range(297)]
    edm = config.objective.edm
    n = np.array([float(jax.random.normal(jax.random.split(k)[0], ())) for k in keys])
    sigma = np.exp(edm.p_mean + edm.p_std * n)
    noise = np.stack(
        [np.asarray(jax.random.normal(jax.random.split(k)[1], (8, 8, 1))) for k in keys]
    )
    x_in = (x0 + sigma[:, None, None, None] * noise) / np.sqrt(sigma**2 + edm.sigma_data**2)[
        :, None, None, None
    ]
    logits = x_in.reshape(297, -1) @ np.asarray(jax.device_get(ctx.params)["w"], np.float64)
    correct = logits.argmax(-1) == labels
    quarter = np.floor(2 * (1 + np.vectorize(math.erf)(n / math.sqrt(2)))).astype(int)
    with np.load(ctx.eval_dir / "accuracy_step0.npz") as saved:
        np.testing.assert_allclose(saved["t"], sigma, rtol=1e-5)
        np.testing.assert_array_equal(saved["quarter"], quarter)
    assert result["objective"] == "edm"
    assert result["accuracy"] == pytest.approx(correct.mean(), abs=1e-12)
    for q in range(4):
        in_q = quarter == q
        assert result[f"accuracy_q{q}"] == pytest.approx(correct[in_q].mean(), abs=1e-12)
    # Less accurate at more noise (EDM's top quarter, sigma > 0.67, still leaves digits legible).
    assert result["accuracy_q0"] > result["accuracy_q3"] + 0.1


def test_accuracy_mode_equals_an_independent_computation(tmp_path):
    ctx = linear_context(tmp_path, sharding.make_mesh(), batch_size=40)
    result = accuracy.run(ctx)
    source = input_pipeline.DigitsSource("test")
    x0 = np.stack([source[i]["image"] for i in range(len(source))]) / 127.5 - 1.0
    labels = np.asarray([source[i]["label"] for i in range(len(source))])
    keys = [jax.random.fold_in(jax.random.PRNGKey(ctx.config.eval.seed), i) for i in range(297)]
    x_t, t = _noised(x0.astype(np.float32), keys, NUM_TIMESTEPS)
    params = jax.device_get(ctx.params)
    logits = x_t.reshape(297, -1).astype(np.float64) @ params["w"]
    correct = logits.argmax(-1) == labels
    cross_entropy = _cross_entropy(logits, labels).astype(np.float64)
    assert result["num_examples"] == 297 and result["split"] == "test"
    assert result["accuracy"] == pytest.approx(correct.mean(), abs=1e-12)
    assert result["cross_entropy"] == pytest.approx(cross_entropy.mean(), rel=1e-5)
    quarter = t * 4 // NUM_TIMESTEPS
    by_quarter = []
    for q in range(4):
        in_q = quarter == q
        assert result[f"num_examples_q{q}"] == in_q.sum() > 40
        by_quarter.append(correct[in_q].mean())
        assert result[f"accuracy_q{q}"] == pytest.approx(by_quarter[-1], abs=1e-12)
        assert result[f"cross_entropy_q{q}"] == pytest.approx(cross_entropy[in_q].mean(), rel=1e-5)
    assert by_quarter[0] > 0.6 and by_quarter[3] < 0.25  # informative at low t only
    with np.load(ctx.eval_dir / "accuracy_step0.npz") as saved:
        np.testing.assert_array_equal(saved["t"], t)
        np.testing.assert_array_equal(saved["label"], labels)
        np.testing.assert_array_equal(saved["predicted"], logits.argmax(-1))
    # eval.num_examples: the first N examples only; another eval.seed: other t and noise.
    first = accuracy.run(
        linear_context(tmp_path, ctx.mesh, batch_size=40, **{"eval.num_examples": 100})
    )
    assert first["num_examples"] == 100
    assert first["accuracy"] == pytest.approx(correct[:100].mean(), abs=1e-12)
    other_seed = linear_context(tmp_path, ctx.mesh, batch_size=40, **{"eval.seed": 1})
    accuracy.run(other_seed)
    with np.load(ctx.eval_dir / "accuracy_step0.npz") as saved:
        assert np.mean(saved["t"] == t) < 0.1


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_evaluation_program_on_a_classifier_workdir(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    result = evaluators.evaluate(workdir, "accuracy", overrides={"eval.batch_size": 100})
    saved = json.loads((workdir / "eval" / "accuracy_step4.json").read_text())
    assert saved["mode"] == "accuracy" and saved["step"] == 4
    assert saved["accuracy"] == result["accuracy"] and result["num_examples"] == 297
    assert sum(result[f"num_examples_q{q}"] for q in range(4)) == 297
    # Mismatched modes: a ConfigError, which the program prints as one line "error: ..." with
    # exit status 1 (runtime.run_or_exit, as tests/test_evaluate.py checks for other errors),
    # raised before anything is restored or written.
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    for mode in ("bpd", "sample", "fid", "figures"):
        with pytest.raises(config_lib.ConfigError) as error:
            evaluators.evaluate(workdir, mode)
        assert str(error.value) == (
            f"mode={mode} evaluates a denoiser, but {workdir} trained a classifier "
            "(model.kind 'classifier'); its modes: accuracy"
        )
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before
    with pytest.raises(config_lib.ConfigError) as error:
        evaluators.check_model_kind("accuracy", _config("digits"), "run")
    assert str(error.value) == (
        "mode=accuracy evaluates a classifier, but run trained a denoiser (model.kind "
        "'denoiser'); its modes: bpd, sample, fid, figures"
    )


@pytest.mark.slow
def test_cifar10_classifier_config_reduced_network_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    config = _config(
        "cifar10_classifier",
        **{
            "model.unet.ch": 32,
            "model.unet.ch_mult": (1, 2),
            "model.unet.num_res_blocks": 1,
            "training.batch_size": 4,
            "training.num_steps": 2,
            "training.log_every": 1,
        },
    )
    with tfds.testing.mock_data(num_examples=8):
        metrics = train.train_and_evaluate(config, tmp_path)
        result = evaluators.evaluate(
            tmp_path, "accuracy", overrides={"eval.batch_size": 4, "eval.num_examples": 8}
        )
    assert all(np.isfinite(v) for v in metrics.values()) and "accuracy" in metrics
    assert result["num_examples"] == 8 and 0 <= result["accuracy"] <= 1
