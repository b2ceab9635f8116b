"""Guidance and class labels in the programs: the ``sampling.*`` keys, ``generate`` with
classifier-free and classifier guidance (ddpm and flow matching) against hand-built guided
chains, the checks of a classifier's run against the model it guides, preview grids with one
row per class, and label agreement of scored samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import (
    config_defaults,
    config_lib,
    evaluators,
    generate,
    objectives,
    ode_sampling,
    pretrained,
    reporting,
    sampling,
    schedules,
    sharding,
    train,
    train_step,
)
from diffusion_jax.evaluators import fid
from tests import test_classifier
from tests.closed_form import flow_exact_network
from tests.test_evaluate import tiny_config
from tests.test_folder_data import folder  # noqa: F401  (the fixture, for this module too)

CONDITIONAL = {"model.class_conditional": True, "model.label_dropout": 0.1}
AUTO = {"sampling.guidance": "autoguidance", "sampling.guide_step": 1}
# GroupNorm over single channels (32 groups of 32 channels) would remove the per-channel offset
# by which the time and label embeddings enter each residual block: labels would not matter.
GROUPS = {"model.unet.num_groups": 8}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sampling.guidance_scale": 2.0}, "'sampling.guidance_scale' .* 'sampling.guidance' is"),
        ({"sampling.guidance": "cfg"}, "'sampling.guidance' is 'cfg'; valid: none, classifier_fr"),
        (
            {"sampling.guidance": "classifier_free"},
            "needs a class-conditional model, but 'model.class_conditional' is False",
        ),
        (
            {"model.class_conditional": True, "sampling.guidance": "classifier_free"},
            "trained with 0, so its null label means nothing",
        ),
        (
            {**CONDITIONAL, "sampling.guidance": "classifier_free", "sampling.guidance_scale": -1},
            "'sampling.guidance_scale' must be >= 0, got -1",
        ),
        ({"sampling.guidance": "classifier"}, "'sampling.classifier_workdir' .* go together"),
        ({"sampling.classifier_workdir": "/c"}, "'sampling.classifier_workdir' .* go together"),
        ({"sampling.labels": (1, 2)}, "'sampling.labels' .* the model is not class-conditional"),
        ({**CONDITIONAL, "sampling.labels": (1, -2)}, "'sampling.labels' must hold ints >= 0"),
        (
            {"sampling.guidance_interval": (0.1, 1.0)},
            r"'sampling.guidance_interval' \(\(0.1, 1.0\)\) is set but 'sampling.guidance' is",
        ),
        ({"sampling.guide_step": 3}, "'sampling.guide_step' .* choose autoguidance's guide"),
        ({"sampling.guide_workdir": "/g"}, "'sampling.guide_workdir' .* choose autoguidance's"),
        ({**AUTO, "sampling.guide_step": 0}, "the guide would be this run's newest model"),
        ({**AUTO, "sampling.guide_step": -1}, "'sampling.guide_step' must be >= 0, got -1"),
        (
            {**AUTO, "sampling.guidance_interval": (2.0, 1.0)},
            r"'sampling.guidance_interval': the guidance interval \(lo, hi\] needs 0 <= lo < hi",
        ),
        (
            {**AUTO, "sampling.guidance_interval": (1.0,)},
            r"'sampling.guidance_interval' must be \(\) or \(lo, hi\), two numbers, got \(1.0,\)",
        ),
        (
            {**AUTO, "sampling.guidance_interval": (400.0, float("inf"))},
            r"holds none of the noise levels sigma / alpha of objective 'ddpm', which lie in "
            r"\[0.0447661, 359.331\]",
        ),
    ],
)
def test_bad_guidance_config_names_the_key(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message) as info:
        config_lib.validate(tiny_config(**overrides))
    assert "\n" not in str(info.value)


def test_a_label_the_data_set_lacks_is_named():
    config = tiny_config(**CONDITIONAL, **{"sampling.labels": (3, 10)})
    config_lib.validate(config)  # the number of classes comes with the data
    with pytest.raises(
        config_lib.ConfigError,
        match=r"is \(3, 10\): label 10 is not a class of data set 'digits' \(valid labels: 0..9\)",
    ):
        config_lib.check_sampling_labels(config, 10)
    with pytest.raises(config_lib.ConfigError, match="label 3 .* none: it has no labels"):
        config_lib.check_sampling_labels(config, None)


def test_labels_cycle_through_the_requested_classes():
    indices = np.arange(3, 15)
    assert generate.sample_labels(tiny_config(), 10, indices) is None
    every = generate.sample_labels(tiny_config(**CONDITIONAL), 10, indices)
    np.testing.assert_array_equal(every, [3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4])
    chosen = tiny_config(**CONDITIONAL, **{"sampling.labels": (7, 2, 2)})
    np.testing.assert_array_equal(generate.sample_labels(chosen, 10, indices), [7, 2, 2] * 4)


def perturbed_params(config, model, mesh):
    """Initial parameters of ``model`` (laid out over ``mesh``) perturbed: a zero-initialised
    output layer would make every guided prediction zero."""
    setup = config_lib.make_train_setup(config, model=model)
    _, shardings = train_step.state_shardings(setup, (8, 8, 1), mesh)
    state = train_step.create_train_state(setup, (8, 8, 1), shardings, config.seed)
    leaves, tree = jax.tree_util.tree_flatten(state.ema_params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, leaves)


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_classifier_free_generation_equals_a_hand_guided_chain():
    """``generate`` with guidance against ``sampling.sample`` driven by an independent
    combination of two separate network calls; w = 0 is conditional sampling."""
    num, w = 12, 2.5
    config = tiny_config(
        **CONDITIONAL,
        **GROUPS,
        **{"sampling.guidance": "classifier_free", "sampling.guidance_scale": w},
    )
    config.sampling.num_steps = 10
    model, mesh = config_lib.make_model(config, 10), sharding.make_mesh(1)
    params = perturbed_params(config, model, mesh)
    rng = jax.random.PRNGKey(7)
    first = 5
    guided = generate.make_generate_fn(config, model, mesh, sharding.replicated(mesh), num)
    samples = np.asarray(guided(params, rng, first))

    labels = jnp.asarray(generate.sample_labels(config, 10, first + np.arange(num)))
    apply = lambda x, t, y: model.apply({"params": params}, x, t, y, train=False)

    def by_hand(x_t, t):
        cond, uncond = apply(x_t, t, labels), apply(x_t, t, jnp.full_like(labels, 10))
        return (1 + w) * cond - w * uncond

    keys = generate.sample_keys(jax.random.split(rng)[1], first + jnp.arange(num))
    expected = sampling.sample(
        by_hand,
        config_lib.make_sampling_schedule(config),
        (num, 8, 8, 1),
        keys,
        **config_lib.sampler_options(config),
    )
    np.testing.assert_allclose(samples, np.clip(expected, -1, 1), atol=2e-5)

    config.sampling.guidance_scale = 0.0
    at_zero = generate.make_generate_fn(config, model, mesh, sharding.replicated(mesh), num)
    config.sampling.guidance = "none"
    conditional = generate.make_generate_fn(config, model, mesh, sharding.replicated(mesh), num)
    np.testing.assert_allclose(
        np.asarray(at_zero(params, rng, first)),
        np.asarray(conditional(params, rng, first)),
        atol=2e-5,
    )
    assert np.abs(samples - np.asarray(conditional(params, rng, first))).max() > 0.05


def test_generate_refuses_a_missing_or_unasked_classifier():
    config = tiny_config()
    model = config_lib.make_model(config)
    mesh = sharding.make_mesh(1)
    with pytest.raises(ValueError, match="exactly when it is 'classifier'"):
        generate.make_generate_fn(config, model, mesh, None, 4, guide=object())


def test_rows_by_class_puts_each_class_on_its_own_row():
    images = np.arange(7, dtype=np.float32)[:, None, None, None] * np.ones((7, 2, 2, 1))
    labels = np.array([4, 1, 4, 1, 4, 1, 9])
    cells, cols = reporting.rows_by_class(images / 10, labels)
    assert cols == 3
    np.testing.assert_array_equal(
        cells[:, 0, 0, 0] * 10,
        [1, 3, 5, 0, 2, 4, 6, 0, 0],  # rows: 1, 4, 9; grey fill
    )


def test_label_agreement_is_the_argmax_match_rate():
    logits = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    result = fid._label_agreement(logits, np.array([1, 0, 0, 0]))
    assert result["label_agreement"] == 0.5
    assert result["label_agreement_by_class"] == {0: 1 / 3, 1: 1.0}


# --- classifier guidance from a classifier's workdir -------------------------------------------


@pytest.fixture(scope="module")
def classifier_workdir(tmp_path_factory):
    """A tiny digits classifier of the same process as ``tiny_config`` (T = 50), 2 steps."""
    workdir = tmp_path_factory.mktemp("classifier")
    train.train_and_evaluate(test_classifier.tiny_config(), workdir)
    return workdir


def _classifier_guided(workdir, scale, **overrides):
    config = tiny_config(
        **GROUPS,
        **{
            "sampling.guidance": "classifier",
            "sampling.guidance_scale": scale,
            "sampling.classifier_workdir": str(workdir),
            "sampling.num_steps": 10,
            **overrides,
        },
    )
    return config_lib.validate(config)


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_classifier_guided_generation_equals_a_hand_guided_chain(classifier_workdir):
    """``generate`` with the classifier of a workdir against eps - s sqrt(1 - abar_t) grad
    log p(y | x_t) written out with ``jax.grad`` of the restored classifier's log-softmax, on a
    respaced chain (the gradient's sigma and the classifier's t are the training process's);
    s = 0 is unguided sampling."""
    num, s, first = 12, 40.0, 3
    config = _classifier_guided(classifier_workdir, s)
    model, mesh = config_lib.make_model(config), sharding.make_mesh(1)
    params = perturbed_params(config, model, mesh)
    classifier = pretrained.load_guide(config, mesh, None)
    assert classifier.step == 2
    guided = generate.make_generate_fn(
        config, model, mesh, sharding.replicated(mesh), num, classifier
    )
    rng = jax.random.PRNGKey(4)
    samples = np.asarray(guided(params, rng, first))

    labels = jnp.asarray(generate.sample_labels(config, 10, first + np.arange(num)))
    abar = config_lib.make_schedule(config).alphas_cumprod

    def log_prob_sum(x_t, t):
        logits = classifier.model.apply({"params": classifier.params}, x_t, t, train=False)
        return jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(num), labels])

    def by_hand(x_t, t):
        eps = model.apply({"params": params}, x_t, t, None, train=False)
        sigma = jnp.sqrt(1.0 - abar[t])[:, None, None, None]
        return eps - s * sigma * jax.grad(log_prob_sum)(x_t, t)

    keys = generate.sample_keys(jax.random.split(rng)[1], first + jnp.arange(num))
    schedule = config_lib.make_sampling_schedule(config)
    options = config_lib.sampler_options(config)
    expected = sampling.sample(by_hand, schedule, (num, 8, 8, 1), keys, **options)
    np.testing.assert_allclose(samples, np.clip(expected, -1, 1), atol=2e-5)

    unguided_config = tiny_config(**GROUPS, **{"sampling.num_steps": 10})
    unguided = generate.make_generate_fn(
        unguided_config, model, mesh, sharding.replicated(mesh), num
    )
    unguided = np.asarray(unguided(params, rng, first))
    config.sampling.guidance_scale = 0.0
    at_zero = generate.make_generate_fn(
        config, model, mesh, sharding.replicated(mesh), num, classifier
    )
    np.testing.assert_allclose(np.asarray(at_zero(params, rng, first)), unguided, atol=2e-5)
    assert np.abs(samples - unguided).max() > 0.05


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_a_classifier_for_other_images_or_noise_is_refused_before_anything_is_written(
    classifier_workdir,
    folder,  # noqa: F811  (the fixture)
    tmp_path,
):
    rgb16 = {"data.name": "folder", "data.path": str(folder), "data.image_size": 16}
    cases = [
        (
            classifier_workdir,
            {**rgb16, "data.channels": 3},
            "the classifier there was trained on images of 8x8x1, the model sampled here "
            "generates 16x16x3",
        ),
        (
            classifier_workdir,
            {"diffusion.num_timesteps": 40},
            "trained on the noise schedule 'linear' x 50, the model sampled here uses "
            "'linear' x 40",
        ),
        (tmp_path / "nothing", {}, "holds no usable run"),
    ]
    for workdir, overrides, message in cases:
        config = _classifier_guided(workdir, 1.0, **{"training.sample_every": 1, **overrides})
        run = tmp_path / "run"
        with pytest.raises(config_lib.ConfigError, match=message) as info:
            train.train_and_evaluate(config, run)
        assert "'sampling.classifier_workdir'" in str(info.value)
        assert "\n" not in str(info.value)
        assert not run.exists()


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_a_classifier_of_another_objective_or_input_scaling_is_refused(classifier_workdir):
    """The ddpm classifier for a flow model: refused before anything is restored, naming
    objective.name. EDM's sigma_data scales the classifier's input: refused, naming the key;
    the options that only shape the training distribution of t or the sampler's grid (flow's
    shift, EDM's p_mean and sigma_max) may differ."""
    flow = config_defaults.use_objective(_classifier_guided(classifier_workdir, 1.0), "flow")
    with pytest.raises(config_lib.ConfigError) as info:
        pretrained.load_guide(flow, sharding.make_mesh(1), None)
    assert (
        "the classifier there was trained with objective 'ddpm', the model sampled here 'flow' "
        "(objective.name)" in str(info.value)
    )
    assert "\n" not in str(info.value)

    def objective_config(name, **overrides):
        config = config_defaults.use_objective(tiny_config(), name)
        config.sampling.guidance = "classifier"
        return config_lib.apply_overrides(config, overrides)

    edm_classifier = objective_config("edm", **{"model.kind": "classifier"})
    with pytest.raises(config_lib.ConfigError) as info:
        pretrained._check_guide(
            objective_config("edm", **{"objective.edm.sigma_data": 1.0}), edm_classifier, "/c"
        )
    assert (
        "was trained on the input scaling 0.5, the model sampled here uses 1.0 "
        "(objective.edm.sigma_data)" in str(info.value)
    )
    pretrained._check_guide(
        objective_config("edm", **{"objective.edm.p_mean": 0.0, "objective.edm.sigma_max": 40.0}),
        edm_classifier,
        "/c",
    )
    pretrained._check_guide(
        objective_config("flow", **{"objective.flow.shift": 3.0}),
        objective_config("flow", **{"model.kind": "classifier"}),
        "/c",
    )


class _GaussianFlowModel:
    """The exact flow network of ``N(mean, std^2)`` data (``params``: mean, std) with a U-Net's
    ``apply``."""

    num_classes = None

    def apply(self, variables, x_in, noise_input, y, train):
        params = variables["params"]
        return flow_exact_network(params["mean"], params["std"])(x_in, noise_input)


class _HandSetClassifier:
    """A noisy classifier of flow's network inputs ``(x_t, 1000 t)`` with a NoisyClassifier's
    ``apply``: logits ``(2 - noise_input / 1000) x . w``, so it also tells whether it was given
    ``1000 t`` or ``t``."""

    num_classes = 3

    def apply(self, variables, x_in, noise_input, train):
        logits = x_in.reshape(x_in.shape[0], -1) @ variables["params"]["w"]
        return logits * (2.0 - noise_input[:, None] / 1000.0)


def _flow_guided_by_hand(model_apply, classifier_apply, labels, scale):
    """Classifier guidance of a flow model written out: at ``(x, 1000 t)``, ``eps = x + (1 - t) v``,
    ``eps_hat = eps - s t grad_x log p(y | x)`` with the classifier given ``(x, 1000 t)``, and the
    velocity ``eps_hat - x0_hat``, ``x0_hat = (x - t eps_hat) / (1 - t)``; unguided at t = 1,
    where every velocity gives the noise prediction x."""

    def network(x, noise_input):
        t = (noise_input / 1000.0).reshape((-1, 1, 1, 1))
        v = model_apply(x, noise_input)

        def log_prob_sum(x):
            logits = classifier_apply(x, noise_input)
            return jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), labels])

        eps_hat = x + (1.0 - t) * v - scale * t * jax.grad(log_prob_sum)(x)
        return jnp.where(t < 1.0, eps_hat - (x - t * eps_hat) / (1.0 - t), v)

    return network


def _flow_chain(network, config, rng, first, num):
    """``ode_sampling.sample`` of ``network`` with ``config``'s sampler from the noise of
    ``generate``'s samples ``first .. first + num - 1`` (its keys: ``fold_in(split(rng)[1], i)``),
    keys and chain in one compiled program."""

    @jax.jit
    def chain(rng):
        keys = generate.sample_keys(jax.random.split(rng)[1], first + jnp.arange(num))
        options = config_lib.ode_sampler_options(config)
        return ode_sampling.sample(network, objectives.Flow(), (num, 8, 8, 1), keys, **options)

    return np.asarray(chain(rng))


def _flow_classifier_config(scale, **overrides):
    config = config_defaults.use_objective(tiny_config(), "flow", method="euler", num_steps=3)
    config.sampling.update(
        guidance="classifier", guidance_scale=scale, classifier_workdir="/a/classifier/run"
    )
    return config_lib.validate(config_lib.apply_overrides(config, overrides))


def test_classifier_guided_flow_generation_equals_a_hand_guided_chain():
    """``generate`` of a flow model (the exact network of Gaussian data) guided by a hand-set
    classifier against Euler over the velocity written out (``_flow_guided_by_hand``): the
    objective's guidance, and the classifier fed flow's network inputs ``(x_t, 1000 t)``."""
    num, s, first = 6, 2.0, 3
    config = _flow_classifier_config(s)
    mesh, replicated = sharding.make_mesh(1), sharding.replicated(sharding.make_mesh(1))
    model, classifier_model = _GaussianFlowModel(), _HandSetClassifier()
    params = {"mean": jnp.float32(0.1), "std": jnp.float32(0.5)}
    w = jnp.asarray(np.random.default_rng(2).normal(0.0, 0.3, (64, 3)), jnp.float32)
    classifier = pretrained.Guide(classifier_model, {"w": w}, {"w": replicated}, "hand-set", 0)
    guided = generate.make_generate_fn(
        config, model, mesh, {"mean": replicated, "std": replicated}, num, classifier
    )
    rng = jax.random.PRNGKey(4)
    samples = np.asarray(guided(params, rng, first))

    labels = jnp.asarray(generate.sample_labels(config, 3, first + np.arange(num)))
    np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2])
    model_apply = lambda x, c: model.apply({"params": params}, x, c, None, train=False)
    classifier_apply = lambda x, c: classifier_model.apply({"params": {"w": w}}, x, c, train=False)
    by_hand = _flow_guided_by_hand(model_apply, classifier_apply, labels, s)
    expected = _flow_chain(by_hand, config, rng, first, num)
    np.testing.assert_allclose(samples, np.clip(expected, -1, 1), atol=2e-5)
    # The guidance moves the velocity: at t = 1/3 about data-like points, by more than the
    # data's std 0.5 (measured: 2.0).
    x = jnp.asarray(np.random.default_rng(0).normal(0.1, 0.5, (num, 8, 8, 1)), jnp.float32)
    c = jnp.full((num,), 1000.0 / 3)
    assert np.abs(jax.jit(lambda x: by_hand(x, c) - model_apply(x, c))(x)).max() > 0.5


@pytest.mark.slow
def test_a_flow_classifier_run_guides_a_flow_model(tmp_path):
    """End to end: a classifier trained 2 steps with objective flow (the train step feeds it
    ``(x_t, 1000 t)``) guides the generation of a flow U-Net as the velocity written out with
    its restored parameters; ``mode=accuracy`` scores it on flow matching's own noise (its
    record says which objective, and its noise levels are flow's t in (0, 1))."""
    workdir = tmp_path / "classifier"
    classifier_config = config_defaults.use_objective(test_classifier.tiny_config(), "flow")
    classifier_config.training.sample_every = 0
    train.train_and_evaluate(classifier_config, workdir)
    num, s, first = 6, 40.0, 0
    config = _flow_classifier_config(s, **GROUPS, **{"sampling.classifier_workdir": str(workdir)})
    model, mesh = config_lib.make_model(config), sharding.make_mesh(1)
    params = perturbed_params(config, model, mesh)
    classifier = pretrained.load_guide(config, mesh, None)
    guided = generate.make_generate_fn(
        config, model, mesh, sharding.replicated(mesh), num, classifier
    )
    rng = jax.random.PRNGKey(5)
    samples = np.asarray(guided(params, rng, first))

    labels = jnp.asarray(generate.sample_labels(config, 10, first + np.arange(num)))
    model_apply = lambda x, c: model.apply({"params": params}, x, c, None, train=False)
    classifier_apply = lambda x, c: classifier.model.apply(
        {"params": classifier.params}, x, c, train=False
    )
    expected = _flow_chain(
        _flow_guided_by_hand(model_apply, classifier_apply, labels, s), config, rng, first, num
    )
    np.testing.assert_allclose(samples, np.clip(expected, -1, 1), atol=2e-5)
    unguided = _flow_chain(model_apply, config, rng, first, num)
    assert np.abs(samples - np.clip(unguided, -1, 1)).max() > 0.05
    scored = evaluators.evaluate(workdir, "accuracy", None, {"eval.num_examples": 40})
    assert scored["objective"] == "flow" and scored["num_examples"] == 40
    with np.load(workdir / "eval" / "accuracy_step2.npz") as saved:
        assert saved["t"].dtype == np.float32 and 0 < saved["t"].min() < saved["t"].max() < 1


# --- autoguidance in the programs --------------------------------------------------------------


def _flow_autoguided_config(scale, **overrides):
    config = config_defaults.use_objective(tiny_config(), "flow", method="euler", num_steps=6)
    config.sampling.update(guidance="autoguidance", guidance_scale=scale, guide_step=1)
    return config_lib.validate(config_lib.apply_overrides(config, overrides))


def test_autoguided_flow_generation_in_an_interval_equals_a_hand_guided_chain():
    """``generate`` of a flow model (the exact network of N(0.1, 0.5^2) data) guided by a
    worse one (that of N(-0.2, 1)) only where ``t / (1 - t)`` lies in (0.4, 3] (Euler's 6 steps
    evaluate t = 1, 5/6, 2/3, 1/2, 1/3, 1/6: guided at the middle three), against Euler over
    the velocity written out: ``(1 + w) v - w v_guide`` there, ``v`` elsewhere."""
    num, w, first = 6, 2.0, 3
    config = _flow_autoguided_config(w, **{"sampling.guidance_interval": (0.4, 3.0)})
    mesh = sharding.make_mesh(1)
    replicated = sharding.replicated(mesh)
    model = _GaussianFlowModel()
    params = {"mean": jnp.float32(0.1), "std": jnp.float32(0.5)}
    weak = {"mean": jnp.float32(-0.2), "std": jnp.float32(1.0)}
    layout = {"mean": replicated, "std": replicated}
    guide = pretrained.Guide(model, weak, layout, "hand-set", 1)
    guided = generate.make_generate_fn(config, model, mesh, layout, num, guide)
    rng = jax.random.PRNGKey(4)
    samples = np.asarray(guided(params, rng, first))

    velocity = lambda p: lambda x, c: model.apply({"params": p}, x, c, None, train=False)

    def by_hand(x, noise_input):
        t = noise_input / 1000.0
        inside = ((t / (1.0 - t) > 0.4) & (t / (1.0 - t) <= 3.0)).reshape(-1, 1, 1, 1)
        v, v_guide = velocity(params)(x, noise_input), velocity(weak)(x, noise_input)
        return jnp.where(inside, (1.0 + w) * v - w * v_guide, v)

    expected = _flow_chain(by_hand, config, rng, first, num)
    np.testing.assert_allclose(samples, np.clip(expected, -1, 1), atol=2e-5)
    unguided = _flow_chain(velocity(params), config, rng, first, num)
    assert np.abs(samples - np.clip(unguided, -1, 1)).max() > 0.05


def _two_checkpoint_config(**overrides):
    """A tiny class-conditional digits run of 2 steps at a large learning rate, EMA off, a
    checkpoint after each step: step 1 a worse model than step 2."""
    return tiny_config(
        **CONDITIONAL,
        **GROUPS,
        **{
            "optim.learning_rate": 0.01,
            "optim.warmup_steps": 0,
            "optim.ema_decay": 0.0,
            "training.checkpoint_every": 1,
            "training.keep_checkpoints": 2,
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """The workdir of a ``_two_checkpoint_config`` run."""
    workdir = tmp_path_factory.mktemp("two_checkpoints")
    train.train_and_evaluate(_two_checkpoint_config(), workdir)
    return workdir


def _autoguided(workdir, **overrides):
    """``_two_checkpoint_config`` sampled with autoguidance by ``workdir``'s step 1."""
    config = _two_checkpoint_config(
        **{**AUTO, "sampling.guide_workdir": str(workdir), "sampling.num_steps": 10, **overrides}
    )
    return config_lib.validate(config)


@pytest.mark.slow  # trains a run: 18 s on 2 quiet cores, 50 s on loaded ones
def test_autoguided_generation_from_an_earlier_checkpoint_equals_a_hand_guided_chain(
    two_checkpoints,
):
    """``generate`` of the run's step 2 guided by its step 1 (restored by ``load_guide``) in an
    interval of noise levels, against ``sampling.sample`` over ``(1 + w) eps_2 - w eps_1`` of
    two separate network calls, with the same labels, where ``sqrt((1 - abar_t) / abar_t)``,
    written out from the betas, lies in the interval (the respaced chain's t = 11 .. 38 of
    its 0, 5, ..., 49), eps_2 elsewhere."""
    num, w, first = 12, 2.0, 5
    levels = np.sqrt(1.0 / np.cumprod(1.0 - schedules.get_betas("linear", 50)) - 1.0)
    lo, hi = float(levels[8]), float(levels[40])
    config = _autoguided(
        two_checkpoints, **{"sampling.guidance_scale": w, "sampling.guidance_interval": (lo, hi)}
    )
    mesh = sharding.make_mesh(1)
    model, params, _ = pretrained.restore_ema(config, two_checkpoints, 2, mesh)
    _, weak_params, _ = pretrained.restore_ema(config, two_checkpoints, 1, mesh)
    guide = pretrained.load_guide(config, mesh, two_checkpoints)
    assert (guide.workdir, guide.step) == (str(two_checkpoints), 1)
    guided = generate.make_generate_fn(config, model, mesh, sharding.replicated(mesh), num, guide)
    rng = jax.random.PRNGKey(7)
    samples = np.asarray(guided(params, rng, first))

    labels = jnp.asarray(generate.sample_labels(config, 10, first + np.arange(num)))
    apply = lambda p, x, t: model.apply({"params": p}, x, t, labels, train=False)
    inside = jnp.asarray((levels > lo) & (levels <= hi))

    def by_hand(x_t, t):
        eps, weak_eps = apply(params, x_t, t), apply(weak_params, x_t, t)
        return jnp.where(inside[t][:, None, None, None], (1 + w) * eps - w * weak_eps, eps)

    @jax.jit
    def chains(rng):
        keys = generate.sample_keys(jax.random.split(rng)[1], first + jnp.arange(num))
        schedule = config_lib.make_sampling_schedule(config)
        options = config_lib.sampler_options(config)
        run = lambda fn: sampling.sample(fn, schedule, (num, 8, 8, 1), keys, **options)
        return run(by_hand), run(lambda x_t, t: apply(params, x_t, t))

    expected, unguided = chains(rng)
    np.testing.assert_allclose(samples, np.clip(expected, -1, 1), atol=2e-5)
    assert np.abs(samples - np.clip(unguided, -1, 1)).max() > 0.05


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_a_missing_step_or_a_classifier_as_the_guide_is_refused_in_one_line(classifier_workdir):
    """``load_guide`` names the keys: a step the guide's run lacks, and a run that holds no
    denoiser (the classifier run's step 2)."""
    for step, message in (
        (7, "at 'sampling.guide_step' 7 holds no usable run: No checkpoint of step 7 in"),
        (2, "the guide model there is not a denoiser: model.kind 'classifier', the model sampled"),
    ):
        config = tiny_config(
            **{
                **AUTO,
                "sampling.guide_workdir": str(classifier_workdir),
                "sampling.guide_step": step,
            }
        )
        with pytest.raises(config_lib.ConfigError) as info:
            pretrained.load_guide(config_lib.validate(config), sharding.make_mesh(1), None)
        assert f"Config key 'sampling.guide_workdir' ('{classifier_workdir}')" in str(info.value)
        assert message in str(info.value)
        assert "\n" not in str(info.value)


def test_a_guide_of_another_task_is_refused_and_a_weaker_network_accepted():
    """A guide trained on other images, with another objective, process or output, on another
    data set or with other class conditioning: refused in one line naming what differs. A
    smaller network, trained for less, with other options of the training distribution:
    accepted."""
    sampled = tiny_config(**CONDITIONAL, **AUTO)
    guide = lambda **overrides: tiny_config(**CONDITIONAL, **overrides)
    flow = lambda config: config_defaults.use_objective(config, "flow", method="euler", num_steps=3)
    source = "Config key 'sampling.guide_workdir' ('/g') at 'sampling.guide_step' 1"
    cases = [
        (
            guide(**{"data.image_size": 16}),
            "trained on images of 16x16x1, the model sampled here generates 8x8x1",
        ),
        (flow(guide()), "trained with objective 'flow', the model sampled here 'ddpm'"),
        (
            guide(**{"diffusion.mean_type": "v"}),
            "trained on the noise schedule and output 'linear' x 50 x 'v' x 'fixed_large', the "
            "model sampled here uses 'linear' x 50 x 'eps' x 'fixed_large' (diffusion.schedule x "
            "diffusion.num_timesteps x diffusion.mean_type x diffusion.var_type)",
        ),
        (
            guide(**{"data.name": "folder", "data.path": "/images"}),
            "trained on data set 'folder' (path '/images'), the model sampled here on 'digits'",
        ),
        (
            tiny_config(),
            "has model.class_conditional False, the model sampled here True: both or neither",
        ),
    ]
    for guide_config, message in cases:
        with pytest.raises(config_lib.ConfigError) as info:
            pretrained._check_guide(sampled, guide_config, source)
        assert str(info.value).startswith(f"{source}: the guide model there ")
        assert message in str(info.value)
        assert "\n" not in str(info.value)
    weaker = {"model.unet.ch": 16, "training.num_steps": 1, "optim.learning_rate": 1e-4}
    pretrained._check_guide(sampled, guide(**weaker), source)
    edm = lambda **overrides: config_defaults.use_objective(tiny_config(**AUTO, **overrides), "edm")
    pretrained._check_guide(edm(), edm(**{"objective.edm.p_mean": 0.0}), source)
    with pytest.raises(config_lib.ConfigError, match=r"input scaling 1.0, .* uses 0.5"):
        pretrained._check_guide(edm(), edm(**{"objective.edm.sigma_data": 1.0}), source)


def test_sample_shards_give_back_their_labels_and_refuse_a_mix(tmp_path):
    from diffusion_jax.evaluators import common, samples

    images = np.zeros((3, 2, 2, 1), np.uint8)
    for k, labels in enumerate(([4, 5, 6], [7, 8, 9])):
        path = tmp_path / "labelled" / f"shard_{k:06d}.npz"
        common.write_atomically(path, common.npz_bytes(images=images, labels=np.array(labels)))
    got, labels = samples.load_samples(tmp_path / "labelled", limit=5, with_labels=True)
    assert got.shape == (5, 2, 2, 1)
    np.testing.assert_array_equal(labels, [4, 5, 6, 7, 8])
    assert samples.load_samples(tmp_path / "labelled", with_labels=False).shape[0] == 6

    unlabelled = tmp_path / "unlabelled" / "shard_000000.npz"
    common.write_atomically(unlabelled, common.npz_bytes(images=images))
    assert samples.load_samples(unlabelled.parent, with_labels=True)[1] is None
    common.write_atomically(
        unlabelled.with_name("shard_000001.npz"),
        common.npz_bytes(images=images, labels=np.array([1, 2, 3])),
    )
    with pytest.raises(ValueError, match="some shards of .* have labels, others not"):
        samples.load_samples(unlabelled.parent)
