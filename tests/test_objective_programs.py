"""EDM and flow matching through the programs: the train step's loss against the objectives
written out from their papers, generation and ``mode=bpd`` against direct calls of the sampler
and the ODE likelihood on the restored parameters, and one-line errors for options that belong
to another objective or sampler."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import (
    config_defaults,
    config_lib,
    evaluators,
    generate,
    likelihood,
    ode_sampling,
    sharding,
    train,
    train_step,
)
from diffusion_jax.evaluators import common, samples
from tests.test_evaluate import _test_split_pixels, tiny_config
from tests.test_train import _tiny

OBJECTIVES = ("edm", "flow")


def tiny_objective_config(name, **overrides):
    """The tiny digits config of the evaluation tests trained with objective ``name``, Heun
    over 3 steps (5 evaluations)."""
    config = config_defaults.use_objective(tiny_config(), name, num_steps=3)
    return config_lib.apply_overrides(config, overrides)


def written_out_loss(name, network, x0, t_key, noise):
    """The per-example loss of one example, from the papers: EDM (Karras et al. 2022, Table 1
    and eq. 2/8 with its defaults) and flow matching with SD3's logit-normal t."""
    n = jax.random.normal(t_key, ())
    if name == "edm":
        sigma, s_d = jnp.exp(-1.2 + 1.2 * n), 0.5
        x = x0 + sigma * noise
        c_skip = s_d**2 / (sigma**2 + s_d**2)
        c_out = sigma * s_d / jnp.sqrt(sigma**2 + s_d**2)
        c_in = 1 / jnp.sqrt(sigma**2 + s_d**2)
        denoised = c_skip * x + c_out * network(c_in * x, jnp.log(sigma) / 4)
        weight = (sigma**2 + s_d**2) / (sigma * s_d) ** 2
        return weight * jnp.mean((denoised - x0) ** 2)
    t = jax.nn.sigmoid(n)
    x = (1 - t) * x0 + t * noise
    return jnp.mean((network(x, 1000 * t) - (noise - x0)) ** 2)


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
@pytest.mark.parametrize("name", OBJECTIVES)
def test_first_step_loss_is_the_objective_written_out(name):
    config = tiny_objective_config(name, **{"training.batch_size": 8})
    config_lib.validate(config)
    setup = config_lib.make_train_setup(config)
    model = setup.model
    mesh, image_shape = sharding.make_mesh(1), (8, 8, 1)
    _, shardings = train_step.state_shardings(setup, image_shape, mesh)
    state = train_step.create_train_state(setup, image_shape, shardings, config.seed)
    params, rng = jax.device_get((state.params, state.rng))  # the step donates the state
    step_fn = train_step.make_train_step(setup, mesh, shardings)
    images = np.random.default_rng(0).uniform(-1, 1, (8, *image_shape)).astype(np.float32)
    batch = {"image": images, "label": np.zeros(8, np.int32)}
    _, metrics = step_fn(state, sharding.global_batch(mesh, batch))

    # The keys of the train step's documented scheme: example i of step 0 draws its noise
    # level and noise from split(fold_in(split(fold_in(rng, 0))[0], i)).
    example_root = jax.random.split(jax.random.fold_in(rng, 0))[0]

    def network(x, noise_input):
        return model.apply({"params": params}, x[None], noise_input[None], None, train=False)[0]

    expected = []
    for i in range(8):
        t_key, noise_key = jax.random.split(jax.random.fold_in(example_root, i))
        noise = jax.random.normal(noise_key, image_shape)
        expected.append(written_out_loss(name, network, images[i], t_key, noise))
    assert float(metrics["loss"]) == pytest.approx(float(np.mean(expected)), rel=1e-5)
    counts = [metrics[f"loss_q{q}_count"] for q in range(4)]
    assert sum(counts) == 8


@pytest.fixture(scope="module", params=OBJECTIVES)
def objective_workdir(request, tmp_path_factory):
    """A tiny run of each objective, 2 steps."""
    workdir = tmp_path_factory.mktemp(request.param)
    train.train_and_evaluate(tiny_objective_config(request.param), workdir)
    return request.param, workdir


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_samples_and_bpd_equal_direct_calls_on_the_restored_parameters(objective_workdir):
    name, workdir = objective_workdir
    overrides = {
        "eval.num_samples": 4,
        "eval.batch_size": 4,
        "eval.num_examples": 4,
        "eval.ode_steps": 3,
        "eval.split": "test",
    }
    sampled = evaluators.evaluate(workdir, "sample", None, overrides)
    assert sampled["num_evaluations"] == 5  # Heun, 3 steps, the last one Euler
    bound = evaluators.evaluate(workdir, "bpd", None, overrides)
    assert bound["likelihood"] == "probability-flow ODE" and "terms_bpd" not in bound

    config = config_lib.apply_overrides(tiny_objective_config(name), overrides)
    ctx = common.restore(config, workdir, None)
    objective = config_lib.make_objective(config)

    def network(x, noise_input):
        return ctx.model.apply({"params": ctx.params}, x, noise_input, None, train=False)

    # Samples: generate's keys (sample i from fold_in(split(PRNGKey(seed))[1], i)).
    keys = generate.sample_keys(jax.random.split(jax.random.PRNGKey(0))[1], jnp.arange(4))
    direct = ode_sampling.sample(
        network, objective, (4, 8, 8, 1), keys, **config_lib.ode_sampler_options(config)
    )
    stored = samples.load_samples(sampled["sample_dir"])
    np.testing.assert_array_equal(stored, generate.to_uint8(np.clip(direct, -1, 1)))

    # bits/dim: the first 4 test digits, dequantised and probed with their index keys.
    test_images = (_test_split_pixels()[:4] / 127.5 - 1).astype(np.float32)
    example_keys = common.example_keys(0, np.arange(4))
    dequantize_keys, probe_keys = jax.vmap(jax.random.split, out_axes=1)(example_keys)
    x = likelihood.dequantize(jnp.asarray(test_images), dequantize_keys)
    out = likelihood.ode_log_likelihood(network, objective, x, probe_keys, num_steps=3)
    expected = np.mean(np.asarray(likelihood.bits_per_dim(out["log_likelihood"], 64)))
    assert bound["total_bpd"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_figures_of_a_continuous_objective_is_one_line(objective_workdir):
    name, workdir = objective_workdir
    with pytest.raises(config_lib.ConfigError) as error:
        evaluators.evaluate(workdir, "figures", None, {})
    assert f"objective ddpm only; {workdir} was trained with objective '{name}'" in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"objective.name": "flow", "objective.edm.p_mean": -1.0},
            "Config key 'objective.edm.p_mean' (-1.0) is an option of objective 'edm', but "
            "'objective.name' is 'flow'",
        ),
        (
            {"objective.name": "edm", "diffusion.mean_type": "v"},
            "Config key 'diffusion.mean_type' ('v') is an option of objective 'ddpm', but "
            "'objective.name' is 'edm'",
        ),
        (
            {"objective.flow.shift": 3.0},
            "Config key 'objective.flow.shift' (3.0) is an option of objective 'flow', but "
            "'objective.name' is 'ddpm'",
        ),
        (
            {"objective.name": "edm", "sampling.method": "ancestral"},
            "Config key 'sampling.method' is 'ancestral', which objective 'edm' cannot run; "
            "valid: euler, heun, edm_stochastic",
        ),
        (
            {"sampling.method": "euler"},
            "'sampling.method' is 'euler'; valid: ancestral, ddim, dpmpp_2m, dpmpp_3m, heun",
        ),
        (
            {"objective.name": "flow", "sampling.num_steps": 0},
            "Config key 'sampling.num_steps' (0) must be >= 1 for objective 'flow'",
        ),
        (
            {"objective.name": "flow", "sampling.spacing": "quad"},
            "Config key 'sampling.spacing' ('quad') applies to the ddpm objective's samplers",
        ),
        (
            {"objective.name": "edm", "sampling.churn": 10.0},
            "Config key 'sampling.churn' (10.0) applies to sampling.method 'edm_stochastic' "
            "only, not 'heun'",
        ),
        (
            {"objective.name": "edm", "objective.edm.sigma_min": 90.0},
            "'objective.edm.sigma_max' (80.0) must exceed 'objective.edm.sigma_min' (90.0)",
        ),
        (
            {"objective.name": "flow", "objective.flow.time_sampling": "beta"},
            "'objective.flow.time_sampling' is 'beta'; valid: uniform, logit_normal",
        ),
        ({"objective.name": "vp"}, "'objective.name' is 'vp'; valid: ddpm, edm, flow"),
    ],
)
def test_an_option_of_another_objective_or_sampler_is_one_line(overrides, message):
    config = _tiny(**{"sampling.num_steps": 3, "sampling.method": "heun"})
    config.diffusion = config_defaults.get_config().diffusion
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)) as error:
        config_lib.validate(config_lib.apply_overrides(config, overrides))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_a_classifier_trains_and_guides_with_every_objective(name):
    """A noisy classifier with objective edm or flow, and classifier guidance of a model of
    that objective, are valid configs (a classifier's run is checked against the model it
    guides when it is loaded: tests/test_guided_generation.py)."""
    config = config_defaults.use_objective(_tiny(), name)
    config.model.kind = "classifier"
    config.training.sample_every = 0
    config_lib.validate(config)
    config = config_defaults.use_objective(_tiny(), name)
    config.sampling.update(guidance="classifier", classifier_workdir="/some/run")
    config_lib.validate(config)
