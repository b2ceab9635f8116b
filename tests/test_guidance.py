"""Label dropout and the guidance wrappers, against a Gaussian mixture with one component per
class: its conditional and unconditional optimal denoisers and its exact class posterior
p(y | x_t) are closed forms (tests/closed_form.py), in DDPM's process and as the exact EDM and
flow matching networks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from diffusion_jax import (
    config_defaults,
    config_lib,
    diffusion,
    guidance,
    losses,
    objectives,
    ode_sampling,
    sampling,
    schedules,
    sharding,
    train_step,
)
from diffusion_jax.schedules import Schedule
from tests.closed_form import (
    ancestral_moments,
    class_conditional_eps_fn,
    class_log_posterior_fn,
    edm_inputs_undone,
    edm_network,
    flow_inputs_undone,
    flow_network,
    mixture_denoiser,
    mixture_eps_fn,
    mixture_log_posterior,
    probability_flow_x0,
)

BETAS = schedules.get_betas("linear", 200)
SCHED = Schedule.from_betas(BETAS)
# Three overlapping classes in 2-D: guidance visibly sharpens them.
WEIGHTS = np.array([0.2, 0.5, 0.3])
MEANS = np.array([[-0.3, 0.1], [0.1, -0.2], [0.3, 0.3]])
STDS = np.array([[0.2, 0.25], [0.3, 0.2], [0.2, 0.25]])
K = len(WEIGHTS)  # also the null label
COND_FN = class_conditional_eps_fn(SCHED.alphas_cumprod, WEIGHTS, MEANS, STDS)
UNCOND_FN = mixture_eps_fn(SCHED.alphas_cumprod, WEIGHTS, MEANS, STDS)
LOG_POST_FN = class_log_posterior_fn(SCHED.alphas_cumprod, WEIGHTS, MEANS, STDS)
N = 4096


def _sample(model_fn, num=N, key=0):
    return np.asarray(
        sampling.sample(model_fn, SCHED, (num, 2), jax.random.PRNGKey(key), clip_denoised=False)
    )


def _noisy_points(num=64, seed=0):
    """Random ``(x_t, t)`` spread over the whole chain."""
    rng = np.random.default_rng(seed)
    t = jnp.asarray(rng.integers(0, len(BETAS), num), jnp.int32)
    return jnp.asarray(rng.normal(0.0, 0.8, (num, 2)), jnp.float32), t


def _as_mean_type(eps_fn, mean_type):
    """A ``(x_t, t, *y) -> prediction`` of kind ``mean_type`` equivalent to ``eps_fn``."""

    def fn(x_t, t, *y):
        eps = eps_fn(x_t, t, *y)
        x0 = diffusion.x0_from_eps(SCHED, x_t, t, eps)
        return diffusion.training_target(SCHED, x0, x_t, t, eps, mean_type)

    return fn


def _to_eps(prediction, x_t, t, mean_type):
    x0 = diffusion.predict_x0(SCHED, x_t, t, prediction, mean_type)
    return diffusion.eps_from_x0(SCHED, x_t, t, x0)


def test_conditional_sampling_lands_on_the_class_and_w0_guidance_is_conditional():
    labels = jnp.arange(N, dtype=jnp.int32) % K
    conditional = _sample(lambda x_t, t: COND_FN(x_t, t, labels))
    for k in range(K):
        x = conditional[np.asarray(labels) == k]
        for d in range(2):
            m, v = ancestral_moments(BETAS, MEANS[k, d], STDS[k, d], var_type="fixed_large")
            assert x[:, d].mean() == pytest.approx(m, abs=4 * np.sqrt(v / len(x)))
            assert x[:, d].std() == pytest.approx(np.sqrt(v), abs=4 * np.sqrt(v / (2 * len(x))))
    guided = _sample(guidance.classifier_free(COND_FN, labels, 0.0, null_label=K))
    np.testing.assert_array_equal(guided, conditional)


def test_larger_guidance_shrinks_the_spread():
    """Classifier-free w in (0, 1, 3), and classifier guidance with the exact posterior on the
    unconditional model, s in (1, 2, 4), each as one per-example scale: the per-dimension std of
    class 0's samples falls by more than 4 standard errors at every step, from class 0's exact
    moments at w = 0 and s = 1 (std 0.205, 0.255). Measured (dims 0, 1):
    (0.205, 0.253), (0.162, 0.214), (0.152, 0.186), standard error 0.003, the same for w and
    s = 1 + w (the same guided eps, see the next test)."""
    labels = jnp.zeros(3 * N, jnp.int32)
    for wrap, scales in (
        (lambda w: guidance.classifier_free(COND_FN, labels, w, null_label=K), (0.0, 1.0, 3.0)),
        (lambda s: guidance.classifier(UNCOND_FN, LOG_POST_FN, labels, s, SCHED), (1, 2, 4)),
    ):
        per_example = np.repeat(np.array(scales, np.float32), N)
        x = _sample(wrap(jnp.asarray(per_example)), 3 * N)
        stds = np.array([x[per_example == scale].std(0) for scale in scales])
        assert np.all(np.diff(stds, axis=0) < -4 * stds[:-1] / np.sqrt(2 * N)), stds
        # w = 0 and s = 1 sample class 0: its exact moments.
        for d in range(2):
            m, v = ancestral_moments(BETAS, MEANS[0, d], STDS[0, d], var_type="fixed_large")
            assert x[:N, d].mean() == pytest.approx(m, abs=4 * np.sqrt(v / N))
            assert x[:N, d].std() == pytest.approx(np.sqrt(v), abs=4 * np.sqrt(v / (2 * N)))


def test_classifier_guidance_with_the_exact_posterior_is_conditional():
    """grad log p(x_t) + s grad log p(y | x_t) is the score of p(x_t | y) at s = 1, of
    p(x_t | y)^s p(x_t)^(1 - s) otherwise: classifier guidance at scale s on the unconditional
    denoiser equals the conditional one (s = 1) and classifier-free guidance at w = s - 1."""
    x_t, t = _noisy_points()
    labels = jnp.asarray(np.arange(64) % K, jnp.int32)
    scale = jnp.where(jnp.arange(64) % 2 == 0, 1.0, 2.5)
    clf = guidance.classifier(UNCOND_FN, LOG_POST_FN, labels, scale, SCHED)(x_t, t)
    cfg = guidance.classifier_free(COND_FN, labels, scale - 1.0, null_label=K)(x_t, t)
    np.testing.assert_allclose(clf, cfg, atol=2e-5)
    np.testing.assert_allclose(clf[::2], COND_FN(x_t, t, labels)[::2], atol=2e-5)


def test_classifier_term_matches_a_finite_difference_gradient():
    x_t, t = _noisy_points(seed=1)
    labels = jnp.asarray(np.arange(64) % K, jnp.int32)
    scale = jnp.linspace(0.5, 3.0, 64)
    guided = guidance.classifier(UNCOND_FN, LOG_POST_FN, labels, scale, SCHED)(x_t, t)
    h = 1e-2
    fd = jnp.stack(
        [
            (LOG_POST_FN(x_t + h * e, t, labels) - LOG_POST_FN(x_t - h * e, t, labels)) / (2 * h)
            for e in jnp.eye(2)
        ],
        axis=-1,
    )
    sigma = SCHED.sqrt_one_minus_alphas_cumprod[t][:, None]
    expected = UNCOND_FN(x_t, t) - scale[:, None] * sigma * fd
    # Central difference in float32: truncation O(h^2), rounding ~1e-7 / h.
    np.testing.assert_allclose(guided, expected, atol=2e-4, rtol=1e-3)


def test_ddpm_classifier_guidance_is_the_eps_formula_bit_for_bit():
    """For an eps network the guided output is ``eps - (s sqrt(1 - abar_t)) grad log p`` with
    no other rounding, operation by operation, whether given the schedule or the objective."""
    x_t, t = _noisy_points(seed=9)
    labels = jnp.asarray(np.arange(64) % K, jnp.int32)
    scale = jnp.linspace(0.5, 3.0, 64)
    grad = jax.grad(lambda x: jnp.sum(LOG_POST_FN(x, t, labels)))(x_t)
    sigma = SCHED.sqrt_one_minus_alphas_cumprod[t][:, None]
    expected = UNCOND_FN(x_t, t) - scale[:, None] * sigma * grad
    for process in (SCHED, objectives.DDPM(SCHED)):
        guided = guidance.classifier(UNCOND_FN, LOG_POST_FN, labels, scale, process)(x_t, t)
        np.testing.assert_array_equal(guided, expected)


@pytest.mark.parametrize("mean_type", ["x0", "v", "mu"])
def test_other_parameterisations_are_guided_in_eps_and_converted_back(mean_type):
    x_t, t = _noisy_points(seed=2)
    labels = jnp.asarray(np.arange(64) % K, jnp.int32)
    cfg = lambda f: guidance.classifier_free(f, labels, 2.0, null_label=K)
    clf = lambda f, **kw: guidance.classifier(f, LOG_POST_FN, labels, 2.0, SCHED, **kw)
    # Away from t = 0, where mu -> x0 -> eps divides by sqrt(1 - abar_0) ~ 0.01.
    keep = np.asarray(t) > 5
    for guided, reference in (
        (cfg(_as_mean_type(COND_FN, mean_type)), cfg(COND_FN)),
        (clf(_as_mean_type(UNCOND_FN, mean_type), mean_type=mean_type), clf(UNCOND_FN)),
    ):
        np.testing.assert_allclose(
            _to_eps(guided(x_t, t), x_t, t, mean_type)[keep],
            reference(x_t, t)[keep],
            atol=1e-3,
            rtol=1e-3,
        )


def _with_variance(eps_fn):
    """Appends a learned_range variance half that depends on x_t, t and (if given) y."""

    def fn(x_t, t, *y):
        var_values = jnp.tanh(x_t + t[:, None] / 100.0)
        if y:
            var_values = var_values * jnp.cos(y[0][:, None])
        return jnp.concatenate([eps_fn(x_t, t, *y), var_values], axis=-1)

    return fn


def test_learned_range_guides_the_mean_half_only():
    """The mean half as without a variance; the variance half the conditional branch's."""
    x_t, t = _noisy_points(seed=3)
    labels = jnp.asarray(np.arange(64) % K, jnp.int32)
    cfg = lambda f, **kw: guidance.classifier_free(f, labels, 2.0, null_label=K, **kw)
    clf = lambda f, **kw: guidance.classifier(f, LOG_POST_FN, labels, 2.0, SCHED, **kw)
    for wrap, fn, model_args in ((cfg, COND_FN, (labels,)), (clf, UNCOND_FN, ())):
        guided = wrap(_with_variance(fn), var_type="learned_range")(x_t, t)
        np.testing.assert_allclose(guided[:, :2], wrap(fn)(x_t, t), rtol=1e-6)
        np.testing.assert_array_equal(guided[:, 2:], _with_variance(fn)(x_t, t, *model_args)[:, 2:])


def test_bits_per_dim_takes_the_wrapper_unchanged():
    labels = jnp.arange(32, dtype=jnp.int32) % K
    x0 = jnp.round(jnp.asarray(np.random.default_rng(4).normal(0, 0.3, (32, 2))) * 127.5) / 127.5
    x0 = jnp.clip(x0, -1.0, 1.0).astype(jnp.float32)
    kw = dict(mean_type="eps", var_type="fixed_large")
    key = jax.random.PRNGKey(5)
    guided = losses.bits_per_dim(
        guidance.classifier_free(COND_FN, labels, 0.0, null_label=K), SCHED, x0, key, **kw
    )
    conditional = losses.bits_per_dim(lambda x, t: COND_FN(x, t, labels), SCHED, x0, key, **kw)
    assert np.all(np.isfinite(guided["total_bpd"]))
    np.testing.assert_array_equal(guided["total_bpd"], conditional["total_bpd"])


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: guidance.classifier_free(COND_FN, jnp.array([0, K]), 1.0, null_label=K),
            r"labels must lie in \[0, 3\), got values in \[0, 3\]",
        ),
        (
            lambda: guidance.classifier_free(COND_FN, jnp.array([-1, 0]), 1.0, null_label=K),
            r"labels must lie in \[0, 3\)",
        ),
        (
            lambda: guidance.classifier(
                UNCOND_FN, LOG_POST_FN, jnp.array([3]), 1.0, SCHED, num_classes=K
            ),
            r"labels must lie in \[0, 3\)",
        ),
        (
            lambda: guidance.classifier_free(UNCOND_FN, jnp.array([0]), 1.0, null_label=None),
            "needs a class-conditional model",
        ),
        (
            lambda: guidance.classifier_free(COND_FN, jnp.array([[0]]), 1.0, null_label=K),
            r"labels must be an int array \[B\]",
        ),
        (
            lambda: guidance.classifier_free(COND_FN, jnp.array([0.0]), 1.0, null_label=K),
            r"labels must be an int array \[B\]",
        ),
        (
            lambda: guidance.classifier_free(COND_FN, jnp.array([0, 1]), jnp.ones(3), null_label=K),
            r"scale must be a scalar or one per example \(2,\), got \(3,\)",
        ),
        (
            lambda: guidance.classifier(
                UNCOND_FN, LOG_POST_FN, jnp.array([0]), 1.0, SCHED, mean_type="score"
            ),
            "Unknown mean_type 'score'",
        ),
        (
            lambda: guidance.classifier_free(COND_FN, jnp.array([0, 1]), 1.0, null_label=K)(
                *_noisy_points(num=3)
            ),
            "2 labels for a batch of 3 samples",
        ),
        (
            lambda: guidance.classifier(
                UNCOND_FN, LOG_POST_FN, jnp.array([0]), 1.0, objectives.EDM(), mean_type="x0"
            ),
            "mean_type and var_type come with a DDPM Schedule; objective 'edm' has its own",
        ),
    ],
)
def test_bad_input_fails_with_one_line(make, message):
    with pytest.raises(ValueError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_concrete_labels_are_checked_inside_a_jit_trace_too():
    """A wrapper built inside a jitted function from labels made outside it."""
    points = _noisy_points(num=2)
    wrapped = lambda labels: jax.jit(
        lambda x, t: guidance.classifier_free(COND_FN, labels, 1.0, null_label=K)(x, t)
    )
    assert np.all(np.isfinite(wrapped(jnp.array([0, 2]))(*points)))
    with pytest.raises(ValueError, match=r"got values in \[0, 3\]"):
        wrapped(jnp.array([0, 3]))(*points)


def test_labels_are_checked_only_when_concrete():
    fn = jax.jit(
        lambda y: guidance.classifier_free(COND_FN, y, 1.0, null_label=K)(*_noisy_points(num=2))
    )
    assert np.all(np.isfinite(fn(jnp.array([0, 2]))))


# --- the deterministic samplers ---------------------------------------------------------------

# 20 quadratically spaced steps of the 200: the model and classifier guidance's sigma_t take the
# original timesteps.
KEPT = schedules.spaced_timesteps(BETAS, 20, "quad")
SUB = schedules.respace(BETAS, KEPT)
CFG_SCALES, CLF_SCALES = (0.0, 1.0, 3.0), (0.0, 1.0, 2.0, 4.0)
# Each method's discretisation error here: the largest distance of its conditional samples from
# the exact flow's (measured: ddim 0.081, dpmpp_2m 0.021, dpmpp_3m 0.0052, heun 0.014), with a
# margin: below the components' stds (0.2 to 0.3) and far below their means' distances (0.50 to
# 0.63).
FLOW_ERROR = {"ddim": 0.1, "dpmpp_2m": 0.03, "dpmpp_3m": 0.008, "heun": 0.02}
M = 3 * 1024  # starting points, 1024 per class
X_START = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (M, 2)))
LABELS = np.arange(M) % K


def _combination(labels, w):
    """``(1 + w) f(x_t, t, y) - w f(x_t, t, null)`` written out; ``w`` ``[B]``."""
    nulls = jnp.full_like(labels, K)
    w = w[:, None]
    return lambda x_t, t: (1 + w) * COND_FN(x_t, t, labels) - w * COND_FN(x_t, t, nulls)


def _side_by_side(model_fns, sizes):
    """One model function whose rows are split, in order, into blocks of ``sizes`` rows, block i
    given to ``model_fns[i]``."""
    ends = np.cumsum(sizes)[:-1]

    def model_fn(x_t, t):
        blocks = zip(model_fns, jnp.split(x_t, ends), jnp.split(t, ends), strict=True)
        return jnp.concatenate([fn(x_block, t_block) for fn, x_block, t_block in blocks])

    return model_fn


def _at_scales(wrap, scales):
    """``wrap(labels, scale)``, a model function, over ``LABELS`` once per scale: rows
    ``[len(scales) * M]``."""
    labels = jnp.asarray(np.tile(LABELS, len(scales)), jnp.int32)
    return wrap(labels, jnp.repeat(jnp.asarray(scales), M))


@pytest.fixture(scope="module", params=list(FLOW_ERROR))
def chains(request):
    """``(method, samples)``, from ``X_START`` (``LABELS``) once per scale, the same points at
    every scale: ``samples["cfg"]`` with w in ``CFG_SCALES``, ``["classifier"]`` (exact
    posterior, unconditional model) with s in ``CLF_SCALES`` and ``["combination"]`` with
    w = s - 1, each ``[scales, M, 2]``. One chain (one compilation) with its rows split between
    the three model functions: the samplers treat rows independently."""
    guided = {
        "cfg": (CFG_SCALES, lambda y, w: guidance.classifier_free(COND_FN, y, w, null_label=K)),
        "classifier": (
            CLF_SCALES,
            lambda y, s: guidance.classifier(UNCOND_FN, LOG_POST_FN, y, s, SCHED),
        ),
        "combination": (tuple(s - 1 for s in CLF_SCALES), _combination),
    }
    counts = [len(scales) for scales, _ in guided.values()]
    x = sampling.sample(
        _side_by_side(
            [_at_scales(wrap, scales) for scales, wrap in guided.values()],
            [count * M for count in counts],
        ),
        SUB,
        (sum(counts) * M, 2),
        jax.random.PRNGKey(0),  # unused: the start is given and the chains have no noise
        x_start=jnp.tile(X_START, (sum(counts), 1)),
        method=request.param,
        clip_denoised=False,
    )
    x = np.asarray(x).reshape(sum(counts), M, 2)
    return request.param, dict(zip(guided, np.split(x, np.cumsum(counts)[:-1]), strict=True))


def test_deterministic_guided_chains_follow_the_combination_written_out(chains):
    """Classifier-free guidance samples as ``(1 + w) f(x_t, t, y) - w f(x_t, t, null)``, at
    w = 0 bit for bit: there both are the conditional model exactly (``1 f - 0 f_null``).
    Classifier guidance with the exact posterior samples as the combination at w = s - 1: for
    the mixture ``sigma_t grad log p(y | x_t) = eps(x_t) - eps(x_t, y)`` (each component's
    ``eps_k = -sigma_t grad log p_k(x_t)``), so ``eps - s sigma_t grad log p(y | x_t) =
    (1 - s) eps(x_t) + s eps(x_t, y)``; at s = 0 that is the unconditional model exactly
    (``0 f + f_null``), which the classifier's chain matches to float32 rounding only (XLA
    compiles the model beside the gradient differently). Largest difference measured: 1.6e-6."""
    _, x = chains
    np.testing.assert_array_equal(x["cfg"][0], x["combination"][1])
    np.testing.assert_allclose(x["cfg"], x["combination"][1:], atol=1e-5)
    np.testing.assert_allclose(x["classifier"], x["combination"], atol=1e-5)


def test_deterministic_conditional_chains_land_on_their_component(chains):
    """Conditional sampling (w = 0) and classifier guidance with the exact posterior at s = 1
    follow each label's own component: every sample lies within the method's discretisation
    error of the exact flow of that component's Gaussian from its starting point."""
    method, x = chains
    exact = probability_flow_x0(
        np.cumprod(1 - BETAS), X_START, KEPT[-1], KEPT[0], MEANS[LABELS], STDS[LABELS]
    )
    for name, samples in (("w = 0", x["cfg"][0]), ("s = 1", x["classifier"][1])):
        np.testing.assert_allclose(samples, exact, atol=FLOW_ERROR[method], err_msg=name)


def test_deterministic_chains_narrow_as_the_scale_grows(chains):
    """Class 0's samples, from the same starting points at every scale: the per-dimension std
    falls by more than 4 standard errors (of an independent estimate) at each step of w in
    ``CFG_SCALES`` and of s in ``CLF_SCALES`` (from the whole mixture at s = 0). Measured,
    dims 0 and 1, ddim: (0.309, 0.294) at s = 0, (0.183, 0.229), (0.123, 0.190),
    (0.091, 0.147) at s = 1 + w = 1, 2, 4; dpmpp_2m, the closest steps: (0.207, 0.258),
    (0.148, 0.218), (0.119, 0.173); standard errors 0.002 to 0.008."""
    _, x = chains
    class_0 = LABELS == 0
    for name in ("cfg", "classifier"):
        stds = x[name][:, class_0].std(axis=1)
        assert np.all(np.diff(stds, axis=0) < -4 * stds[:-1] / np.sqrt(2 * class_0.sum())), (
            name,
            stds,
        )


# --- EDM and flow matching ---------------------------------------------------------------------

DENOISER = mixture_denoiser(WEIGHTS, MEANS, STDS)
LOG_POSTERIOR = mixture_log_posterior(WEIGHTS, MEANS, STDS)
CONTINUOUS = {"edm": objectives.EDM(), "flow": objectives.Flow()}
ODE_STEPS = 32
# Each objective's and method's discretisation error here: the largest distance of its conditional
# samples from their component's exact flow (measured: edm euler 0.086, heun 0.017; flow euler
# 0.055, heun 0.0070), with a margin; below the components' stds (0.2 to 0.3).
ODE_ERROR = {
    ("edm", "euler"): 0.1,
    ("edm", "heun"): 0.025,
    ("flow", "euler"): 0.07,
    ("flow", "heun"): 0.01,
}
ODE_CFG_SCALES, ODE_CLF_SCALES = (0.0, 1.0, 3.0), (1.0, 2.0, 4.0)


def _fenced(network):
    """``network`` between optimisation barriers: XLA compiles it alike in every program, where
    its fusion with the surrounding arithmetic would otherwise round differently from one chain
    to the next, so bit-for-bit comparisons see the wrappers' arithmetic alone."""
    return lambda *args: jax.lax.optimization_barrier(network(*jax.lax.optimization_barrier(args)))


def _exact(objective):
    """``(network, classifier)``: the mixture's exact network ``(x_in, noise_input, y)`` of
    ``objective`` (``y == K``: the unconditional one) and its exact class posterior as a
    classifier of the same inputs, ``(x_in, noise_input, y) -> log p(y | x_t)``."""
    if objective.name == "edm":
        undone = functools.partial(edm_inputs_undone, objective.sigma_data)
        network = edm_network(objective.sigma_data, DENOISER)
    else:
        undone, network = flow_inputs_undone, flow_network(DENOISER)
    classifier = lambda x_in, noise_input, y: LOG_POSTERIOR(*undone(x_in, noise_input), y)
    return _fenced(network), classifier


def _start(objective):
    """``X_START`` scaled to the objective's ``t_max`` (``sigma(t_max) z``, as the sampler draws
    it), and where each component's exact probability-flow ODE carries it: it conserves the
    standardised value ``(x - alpha m) / sqrt(alpha^2 s^2 + sigma^2)``, so ``x0 = m + s z``."""
    process = objective.process
    alpha, sigma = float(process.alpha(process.t_max)), float(process.sigma(process.t_max))
    x_start = sigma * X_START
    means, stds = MEANS[LABELS], STDS[LABELS]
    z = (x_start - alpha * means) / np.sqrt(alpha**2 * stds**2 + sigma**2)
    return x_start, means + stds * z


# Each chain compiles for seconds: one of each method and objective by default, the others slow.
ODE_CHAINS = [
    ("edm", "heun"),
    ("flow", "euler"),
    pytest.param(("edm", "euler"), marks=pytest.mark.slow),
    pytest.param(("flow", "heun"), marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=ODE_CHAINS, ids=lambda p: "-".join(p))
def ode_chains(request):
    """``(name, method, samples)``, from ``X_START`` (``LABELS``) scaled to ``t_max``, the same
    points at every scale: ``samples["cfg"]`` with w in ``ODE_CFG_SCALES``,
    ``["combination"]`` written out at the same w, ``["conditional"]`` the conditional network
    alone and ``["classifier"]`` (exact posterior, unconditional network) with s in
    ``ODE_CLF_SCALES``, each ``[scales, M, 2]``; one chain with its rows split between them."""
    name, method = request.param
    objective = CONTINUOUS[name]
    network, classifier = _exact(objective)
    nulls = lambda y: jnp.full_like(y, K)

    def combination(y, w):
        w = w[:, None]
        return lambda x, c: (1 + w) * network(x, c, y) - w * network(x, c, nulls(y))

    guided = {
        "cfg": (
            ODE_CFG_SCALES,
            lambda y, w: guidance.classifier_free(network, y, w, null_label=K),
        ),
        "combination": (ODE_CFG_SCALES, combination),
        "conditional": ((0.0,), lambda y, _: lambda x, c: network(x, c, y)),
        "classifier": (
            ODE_CLF_SCALES,
            lambda y, s: guidance.classifier(
                lambda x, c: network(x, c, nulls(y)), classifier, y, s, objective
            ),
        ),
    }
    counts = [len(scales) for scales, _ in guided.values()]
    x_start, _ = _start(objective)
    x = ode_sampling.sample(
        _side_by_side(
            [_at_scales(wrap, scales) for scales, wrap in guided.values()],
            [count * M for count in counts],
        ),
        objective,
        (sum(counts) * M, 2),
        jax.random.PRNGKey(0),  # unused: the start is given and the ODE has no noise
        method=method,
        num_steps=ODE_STEPS,
        x_start=jnp.asarray(np.tile(x_start, (sum(counts), 1)), jnp.float32),
    )
    x = np.asarray(x).reshape(sum(counts), M, 2)
    return name, method, dict(zip(guided, np.split(x, np.cumsum(counts)[:-1]), strict=True))


def test_ode_guided_chains_follow_the_combination_written_out(ode_chains):
    """EDM's and flow's Euler and Heun chains of classifier-free guidance follow
    ``(1 + w) F(x, y) - w F(x, null)`` of the bare network, and at w = 0 are conditional
    sampling bit for bit. Largest difference from the combination measured: 4e-7."""
    *_, x = ode_chains
    np.testing.assert_array_equal(x["cfg"][0], x["conditional"][0])
    np.testing.assert_allclose(x["cfg"], x["combination"], atol=1e-5)


def test_ode_conditional_chains_land_on_their_component(ode_chains):
    """Conditional sampling (w = 0) and classifier guidance with the exact posterior at s = 1
    on the unconditional network follow each label's own component: every sample within the
    sampler's discretisation error of that component's exact flow from its start.

    Flow's classifier chain starts with one unguided step: at t = 1 the noise prediction is
    x_t whatever the network says (and the exact posterior has no gradient), while the
    conditional velocity there is ``x - m_y``. That first step, of order h, costs it 0.0012 of
    distance from the conditional chain (heun; 0.0023 at 16 steps), within the error above."""
    name, method, x = ode_chains
    _, exact = _start(CONTINUOUS[name])
    for label, samples in (("w = 0", x["cfg"][0]), ("s = 1", x["classifier"][0])):
        np.testing.assert_allclose(
            samples, exact, atol=ODE_ERROR[name, method], err_msg=f"{name} {method} {label}"
        )


def test_ode_chains_narrow_as_the_scale_grows(ode_chains):
    """Class 0's samples, from the same starting points at every scale: the per-dimension std
    falls by more than 4 standard errors (of an independent estimate) at each step of w in
    ``ODE_CFG_SCALES`` and of s in ``ODE_CLF_SCALES``."""
    *_, x = ode_chains
    class_0 = LABELS == 0
    for name in ("cfg", "classifier"):
        stds = x[name][:, class_0].std(axis=1)
        assert np.all(np.diff(stds, axis=0) < -4 * stds[:-1] / np.sqrt(2 * class_0.sum())), (
            name,
            stds,
        )


def _continuous_points(objective, num=64, seed=7):
    """Random ``(x_t, t)`` of ``objective``: ``t`` inside the sampler's range, away from its
    ends (EDM: sigma from 0.05 to 20; flow: t from 0.05 to 0.95)."""
    rng = np.random.default_rng(seed)
    if objective.name == "edm":
        t = np.exp(rng.uniform(np.log(0.05), np.log(20.0), num))
    else:
        t = rng.uniform(0.05, 0.95, num)
    x_t = rng.normal(0.0, 1.0, (num, 2)) * np.sqrt(0.1 + t[:, None] ** 2)
    return jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32)


@pytest.mark.parametrize("name", list(CONTINUOUS))
def test_ode_classifier_guidance_is_eps_minus_s_sigma_grad_log_p(name):
    """At random ``(x_t, t)`` the guided network's output is ``eps - s sigma grad_x log p(y | x_t)``
    converted back to the objective's output, written out here from the papers (EDM:
    ``D = c_skip x + c_out F``, ``eps = (x - D) / sigma``; flow: ``x0 = x - t v``,
    ``eps = x + (1 - t) v``), with the gradient of the exact posterior in ``x_t``. With the
    exact posterior it is conditional at s = 1 and classifier-free guidance at w = s - 1 (see
    the ddpm tests above)."""
    objective = CONTINUOUS[name]
    network, classifier = _exact(objective)
    x_t, t = _continuous_points(objective)
    labels = jnp.asarray(np.arange(64) % K, jnp.int32)
    nulls = jnp.full_like(labels, K)
    scale = jnp.linspace(0.5, 3.0, 64)
    uncond = lambda x, c: network(x, c, nulls)

    def written_out(x_t, t):
        x_in, noise_input = objective.network_inputs(x_t, t)
        sigma = t[:, None]
        if name == "edm":
            s_d = objective.sigma_data
            alpha, c_skip = 1.0, s_d**2 / (sigma**2 + s_d**2)
            c_out = sigma * s_d / jnp.sqrt(sigma**2 + s_d**2)
            eps = (x_t - (c_skip * x_t + c_out * uncond(x_in, noise_input))) / sigma
        else:
            alpha = 1.0 - sigma
            eps = x_t + alpha * uncond(x_in, noise_input)
        grad = jax.grad(lambda x: jnp.sum(LOG_POSTERIOR(x, alpha, sigma, labels)))(x_t)
        eps_hat = eps - scale[:, None] * sigma * grad
        x0_hat = (x_t - sigma * eps_hat) / alpha
        return (x0_hat - c_skip * x_t) / c_out if name == "edm" else eps_hat - x0_hat

    @jax.jit
    def outputs(x_t, t):
        """The guided outputs at ``scale`` and at s = 1, the written-out one, the conditional
        network's, and classifier-free guidance's at w = s - 1 (one program: one compilation)."""
        inputs = objective.network_inputs(x_t, t)
        guided = lambda s: guidance.classifier(uncond, classifier, labels, s, objective)(*inputs)
        cfg = guidance.classifier_free(network, labels, scale - 1.0, null_label=K)
        conditional = network(*inputs, labels)
        return guided(scale), guided(1.0), written_out(x_t, t), conditional, cfg(*inputs)

    guided, at_one, expected, conditional, cfg = outputs(x_t, t)
    tolerance = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(guided, expected, **tolerance)
    np.testing.assert_allclose(at_one, conditional, **tolerance)
    np.testing.assert_allclose(guided, cfg, **tolerance)


def test_flow_classifier_guidance_leaves_pure_noise_unguided():
    """At t = 1 every velocity gives the noise prediction x_t: the output is the unguided one,
    finite, and so is its gradient (the likelihood's divergence differentiates the network)."""
    objective = CONTINUOUS["flow"]
    network, classifier = _exact(objective)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(8, 2)), jnp.float32)
    c = jnp.full((8,), 1000.0)
    labels = jnp.asarray(np.arange(8) % K, jnp.int32)
    uncond = lambda x, c: network(x, c, jnp.full_like(labels, K))
    guided = guidance.classifier(uncond, classifier, labels, 3.0, objective)
    outputs = jax.jit(
        lambda x: (guided(x, c), uncond(x, c), jax.grad(lambda x: jnp.sum(guided(x, c)))(x))
    )
    at_noise, unguided, gradient = outputs(x)
    np.testing.assert_array_equal(at_noise, unguided)
    assert np.all(np.isfinite(gradient))


# --- autoguidance and guidance limited to an interval of noise levels --------------------------

# Autoguidance's deliberately bad model: the exact denoiser of the mixture with every component
# twice as wide and its mean halfway to the origin, as a network of each objective; given the
# same labels as the good one.
WEAK = (WEIGHTS, 0.5 * MEANS, 2.0 * STDS)
WEAK_DENOISER = mixture_denoiser(*WEAK)
WEAK_FN = class_conditional_eps_fn(SCHED.alphas_cumprod, *WEAK)
DDPM = objectives.DDPM(SCHED)


def _networks(objective):
    """``(good, weak, classifier)``, each of ``(x_in, noise_input, y)``: the mixture's exact
    network of ``objective``, the ``WEAK`` mixture's, and the exact class posterior (DDPM: the
    eps networks of timesteps)."""
    if objective.name == "ddpm":
        return _fenced(COND_FN), _fenced(WEAK_FN), LOG_POST_FN
    good, classifier = _exact(objective)
    if objective.name == "edm":
        weak = edm_network(objective.sigma_data, WEAK_DENOISER)
    else:
        weak = flow_network(WEAK_DENOISER)
    return good, _fenced(weak), classifier


def _mixture_x0s(objective, x_t, t, labels):
    """The x0 of the mixture's and of the ``WEAK`` mixture's exact denoisers at ``(x_t, t)`` of
    ``objective``, the closed forms given alpha and sigma written out (``x_t = alpha x0 +
    sigma eps``: DDPM ``alpha = sqrt(abar_t)``, EDM 1, flow ``1 - t``)."""
    t = np.asarray(t)
    if objective.name == "ddpm":
        abar = np.cumprod(1.0 - np.asarray(BETAS, np.float64))[t][:, None]
        alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    elif objective.name == "edm":
        alpha, sigma = np.ones_like(t[:, None]), t[:, None]
    else:
        alpha, sigma = 1.0 - t[:, None], t[:, None]
    both = jax.jit(lambda *args: (DENOISER(*args)[0], WEAK_DENOISER(*args)[0]))
    return both(x_t, jnp.asarray(alpha), jnp.asarray(sigma), labels)


def _points(objective, num=64, seed=11):
    """Random ``(x_t, t)`` of ``objective``: DDPM's timesteps, else ``_continuous_points``."""
    if objective.name == "ddpm":
        return _noisy_points(num, seed)
    return _continuous_points(objective, num, seed)


OBJECTIVES = {"ddpm": DDPM, **CONTINUOUS}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_autoguidance_extrapolates_the_denoised_image_away_from_the_weak_model(name):
    """With the exact denoiser of the mixture as the model and that of the ``WEAK`` mixture as
    the guide, the guided network output is the one whose x0 is ``(1 + w) x0_good - w x0_weak``
    of the closed forms, at every ``w`` of a per-example scale from 0 to 3."""
    objective = OBJECTIVES[name]
    good, weak, _ = _networks(objective)
    x_t, t = _points(objective)
    labels = jnp.asarray(np.arange(64) % K, jnp.int32)
    w = np.linspace(0.0, 3.0, 64)
    guided = guidance.autoguidance(
        lambda x, c: good(x, c, labels), lambda x, c: weak(x, c, labels), jnp.asarray(w)
    )
    x0, _ = objective.denoise(jax.jit(guided)(*objective.network_inputs(x_t, t)), x_t, t)
    good_x0, weak_x0 = _mixture_x0s(objective, x_t, t, labels)
    expected = (1.0 + w[:, None]) * good_x0 - w[:, None] * weak_x0
    np.testing.assert_allclose(x0, expected, atol=2e-4, rtol=1e-4)
    # The guide matters: the guided x0 lies well away from the model's, beyond the tolerance.
    assert np.abs(expected - good_x0).max() > 0.1


def test_autoguidance_is_the_model_at_zero_and_guides_the_mean_half_only():
    """On given outputs ``[B, 4]`` of two ``learned_range`` networks: the mean half is
    ``m + w (m - m_guide)``, the variance half the model's, and at w = 0 (row 0) the output is
    the model's bit for bit."""
    rng = np.random.default_rng(12)
    output, guide_output = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
    w = np.linspace(0.0, 3.0, 8, dtype=np.float32)
    guided = guidance.autoguidance(
        lambda *_: output, lambda *_: guide_output, w, var_type="learned_range"
    )(*_noisy_points(num=8))
    expected = output[:, :2] + w[:, None] * (output[:, :2] - guide_output[:, :2])
    np.testing.assert_allclose(guided[:, :2], expected, rtol=1e-6)
    np.testing.assert_array_equal(guided[:, 2:], output[:, 2:])
    np.testing.assert_array_equal(guided[0], output[0])
    assert np.abs(guided[1:, :2] - output[1:, :2]).min() > 0


def _hand_levels(objective, t):
    """sigma / alpha of times ``t``, written out in float64: DDPM ``sqrt((1 - abar_t) / abar_t)``
    with ``abar_t`` the product of ``1 - beta`` up to ``t``, EDM sigma itself, flow
    ``t / (1 - t)``."""
    t = np.asarray(t, np.float64)
    if objective.name == "ddpm":
        abar = np.cumprod(1.0 - np.asarray(BETAS, np.float64))[t.astype(int)]
        return np.sqrt((1.0 - abar) / abar)
    if objective.name == "edm":
        return t
    with np.errstate(divide="ignore"):
        return t / (1.0 - t)


# By objective: (times, interval). DDPM: every timestep, the bounds the levels of t = 49 and 149
# exactly (49 outside, 149 inside: (lo, hi]); EDM and flow: times a relative 1e-5 either side of
# each bound (the level is recovered from the network's float32 noise input), and flow's pure
# noise t = 1 (level inf).
EITHER_SIDE = np.array([1.0 - 1e-5, 1.0 + 1e-5])
INTERVAL_CASES = {
    "ddpm": (np.arange(200), tuple(_hand_levels(DDPM, [49, 149]))),
    "edm": (
        np.concatenate([[0.002, 0.1, 1.0, 10.0, 80.0], 0.5 * EITHER_SIDE, 2.0 * EITHER_SIDE]),
        (0.5, 2.0),
    ),
    "flow": (
        np.concatenate([[0.01, 0.3, 0.9, 1.0], 0.2 * EITHER_SIDE, 0.8 * EITHER_SIDE]),
        (0.25, 4.0),  # t = 0.2 and 0.8
    ),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_guidance_applies_exactly_inside_the_interval(name):
    """Classifier-free guidance, autoguidance and classifier guidance with an interval: at the
    times whose hand-derived level sigma / alpha lies in ``(lo, hi]`` the wrapper's output
    without an interval, elsewhere its unguided one (the conditional network's, the model's).
    The two differ by more than 5e-4 at every time (measured: 1.1e-3 at least, at DDPM's
    t = 199), beyond the 1e-4 tolerance, so each row tells which it got. (Tolerance, not bits:
    XLA rounds a network differently in each wrapper's fusions, by up to 3e-5 measured where
    EDM's c_out is 0.002; 0 elsewhere.)"""
    objective = OBJECTIVES[name]
    times, (lo, hi) = INTERVAL_CASES[name]
    inside = (_hand_levels(objective, times) > lo) & (_hand_levels(objective, times) <= hi)
    assert 0 < inside.sum() < len(times)
    num = len(times)
    rng = np.random.default_rng(13)
    x_t = jnp.asarray(rng.normal(0.0, 1.0, (num, 2)), jnp.float32)
    t = jnp.asarray(times, jnp.int32 if name == "ddpm" else jnp.float32)
    labels = jnp.asarray(np.arange(num) % K, jnp.int32)
    good, weak, classifier = _networks(objective)
    model_fn = lambda x, c: good(x, c, labels)
    guided = {
        "classifier_free": lambda **kw: guidance.classifier_free(
            good, labels, 2.0, null_label=K, **kw
        ),
        "autoguidance": lambda **kw: guidance.autoguidance(
            model_fn, lambda x, c: weak(x, c, labels), 2.0, **kw
        ),
        "classifier": lambda **kw: guidance.classifier(
            model_fn, classifier, labels, 2.0, objective, **kw
        ),
    }
    interval = guidance.Interval(objective, lo, hi)

    @jax.jit
    def outputs(x_in, noise_input):
        return {
            kind: (wrap(interval=interval)(x_in, noise_input), wrap()(x_in, noise_input))
            for kind, wrap in guided.items()
        }, model_fn(x_in, noise_input)

    results, unguided = outputs(*objective.network_inputs(x_t, t))
    tolerance = dict(rtol=0.0, atol=1e-4)
    for kind, (limited, everywhere) in results.items():
        informative = np.abs(everywhere - unguided).max(axis=1) > 5e-4
        if kind != "classifier_free":
            # Flow's pure noise: both mixtures' velocity is x minus the same prior mean, and
            # classifier guidance leaves it unguided.
            informative |= times == 1.0
        assert informative.all(), kind
        np.testing.assert_allclose(limited[inside], everywhere[inside], **tolerance, err_msg=kind)
        np.testing.assert_allclose(limited[~inside], unguided[~inside], **tolerance, err_msg=kind)


@pytest.mark.parametrize("name", ["ddpm", "edm"])
def test_an_interval_over_every_level_samples_as_plain_guidance_bit_for_bit(name):
    """Classifier-free guidance with the interval ``(0, inf)`` and without one: the same
    samples, bit for bit (DDPM: DDIM over 20 quadratically spaced steps, the interval read at
    the original timesteps; EDM: Heun, two network calls a step; flow reads its level alike)."""
    objective = OBJECTIVES[name]
    good, _, _ = _networks(objective)
    labels = jnp.asarray(np.arange(256) % K, jnp.int32)
    cfg = lambda **kw: guidance.classifier_free(good, labels, 2.0, null_label=K, **kw)
    if name == "ddpm":
        run = lambda fn: sampling.sample(
            fn, SUB, (256, 2), jax.random.PRNGKey(0), method="ddim", clip_denoised=False
        )
    else:
        run = lambda fn: ode_sampling.sample(
            fn, objective, (256, 2), jax.random.PRNGKey(0), method="heun", num_steps=8
        )
    interval = guidance.Interval(objective, 0.0, float("inf"))
    limited, plain = jax.jit(lambda: (run(cfg(interval=interval)), run(cfg())))()
    np.testing.assert_array_equal(limited, plain)


TOP = float(_hand_levels(DDPM, 199))
BOTTOM = float(_hand_levels(DDPM, 0))


@pytest.mark.parametrize(
    "name, bounds, message",
    [
        ("ddpm", (2.0, 1.0), r"needs 0 <= lo < hi, got \(2.0, 1.0\]"),
        ("edm", (-0.5, 1.0), r"needs 0 <= lo < hi, got \(-0.5, 1.0\]"),
        ("flow", (float("nan"), 1.0), "needs 0 <= lo < hi"),
        (
            "ddpm",
            (TOP, float("inf")),
            "holds none of the noise levels sigma / alpha of objective 'ddpm'",
        ),
        (
            "ddpm",
            (0.0, BOTTOM * (1 - 1e-6)),
            r"objective 'ddpm', which lie in \[0.0223663, 181.61\]",
        ),
        ("edm", (80.0, 100.0), r"of objective 'edm', which lie in \[0, 80\]"),
    ],
)
def test_an_interval_without_levels_of_the_process_is_refused_in_one_line(name, bounds, message):
    """Refused: bounds out of order or negative, and an interval that holds no level of the
    process (DDPM's from timestep 0 to 199, 0.0224 to 182 at T = 200 linear, written out
    here; EDM up to sigma_max). Accepted: one that holds only the bottom or top level, and
    every lower bound of flow's unbounded levels."""
    with pytest.raises(ValueError, match=message) as info:
        guidance.Interval(OBJECTIVES[name], *bounds)
    assert "\n" not in str(info.value)
    for name, bounds in (
        ("ddpm", (0.0, BOTTOM)),
        ("ddpm", (TOP * (1 - 1e-6), TOP)),
        ("edm", (79.9, 80.0)),
        ("flow", (1e6, float("inf"))),
    ):
        guidance.Interval(OBJECTIVES[name], *bounds)


# --- label dropout in training ----------------------------------------------------------------


def test_label_drop_depends_on_the_example_key_alone():
    keys = train_step._per_example_keys(jax.random.PRNGKey(0), jnp.int32(3), N)
    labels = jnp.arange(N, dtype=jnp.int32) % 10
    half = np.asarray(train_step.drop_labels(keys, labels, 0.5, 10))
    # About half, each independently (binomial: 4 standard deviations).
    assert abs((half == 10).mean() - 0.5) < 4 * 0.5 / np.sqrt(N)
    np.testing.assert_array_equal(half[half != 10], np.asarray(labels)[half != 10])
    # Computed in pieces (as on several devices) or whole: the same draws.
    pieces = [train_step.drop_labels(keys[i::2], labels[i::2], 0.5, 10) for i in range(2)]
    np.testing.assert_array_equal(np.stack(pieces, axis=1).reshape(-1), half)
    assert np.all(np.asarray(train_step.drop_labels(keys, labels, 1.0, 10)) == 10)
    np.testing.assert_array_equal(train_step.drop_labels(keys, labels, 0.0, 10), labels)


class _LabelEcho(nn.Module):
    """A "network" whose output is its label times a parameter: the loss sees every label."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, t, y, *, train):
        scale = self.param("scale", nn.initializers.ones, ())
        return jnp.zeros_like(x) + scale * y[:, None, None, None].astype(x.dtype)


def _first_step_fn(label_dropout, batch_size=16):
    """``labels -> metrics`` of the first train step of ``_LabelEcho`` on fixed images."""
    config = config_defaults.get_config()
    config.model.update(class_conditional=True, label_dropout=label_dropout)
    config.diffusion.num_timesteps = 50
    config.training.batch_size = batch_size
    setup = config_lib.make_train_setup(config, model=_LabelEcho())
    mesh, image_shape = sharding.make_mesh(1), (2, 2, 1)
    _, shardings = train_step.state_shardings(setup, image_shape, mesh)
    step_fn = train_step.make_train_step(setup, mesh, shardings)
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size, *image_shape))
    state = train_step.create_train_state(setup, image_shape, shardings, config.seed)

    def run(labels):
        inputs = {"image": images.astype(np.float32), "label": np.asarray(labels, np.int32)}
        fresh = jax.tree_util.tree_map(jnp.copy, state)  # the step donates its state
        return jax.device_get(step_fn(fresh, sharding.global_batch(mesh, inputs))[1])

    return run


def test_label_dropout_one_trains_on_the_null_label_only():
    """With p = 1 the step sees only the null label 10: the same loss and gradient as p = 0
    with every label set to 10, and different ones from p = 0 with the real labels (p = 1 is
    rejected by the config check; make_train_step takes it)."""
    labels = np.arange(16) % 10
    dropped = _first_step_fn(1.0)(labels)
    undropped = _first_step_fn(0.0)
    null, real = undropped(np.full(16, 10)), undropped(labels)
    for key in ("loss", "grad_norm"):
        assert dropped[key] == null[key]
        assert dropped[key] != pytest.approx(real[key], rel=0.1)


def test_label_dropout_needs_a_conditional_model():
    config = config_defaults.get_config()
    config.model.label_dropout = 0.1
    with pytest.raises(config_lib.ConfigError, match="needs 'model.class_conditional' True"):
        config_lib.validate(config)
    config.model.update(class_conditional=True, label_dropout=1.0)
    with pytest.raises(config_lib.ConfigError, match=r"label_dropout' must lie in \[0, 1\)"):
        config_lib.validate(config)
