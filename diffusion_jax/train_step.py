"""Train state and the sharded train step, built from the objects of a ``TrainSetup`` (the
training program builds one from its validated config: ``config_lib.make_train_setup``).

Randomness: one base key in the state; step ``s`` splits ``fold_in(key, s)`` into an example
root and a dropout root. Example ``i`` of the global batch draws its t and noise from
``fold_in(example_root, s * batch_size + i)``, so noise and t never depend on how many devices
or processes share the batch, nor on gradient accumulation (with A micro-batches, micro-batch
``j`` holds examples ``{i * A + j}``, each with its own key). Dropout masks of micro-batch ``j``
come from ``fold_in(dropout_root, j)`` over the whole micro-batch; JAX's partitionable threefry
makes them sharding-invariant too, but gradient accumulation changes their shapes and hence
their values. With ``model.label_dropout`` p > 0, example ``i``'s label is replaced by the null
label (``num_classes``) with probability p, drawn from the same example key (``drop_labels``),
so which examples lose their label does not depend on devices or accumulation either.

The step is generic over the training objective (``diffusion_jax.objectives``: DDPM, EDM, flow
matching), which draws each example's noise level t from the example's key, forms ``x_t``,
preconditions the network's input and turns its output into the per-example terms. The terms
per example depend on ``model.kind`` (``example_terms_fn``): a denoiser's are the objective's
losses of its output, a classifier's the cross-entropy of its logits against the example's
label (nats) and whether its argmax is right; an autoencoder's the reconstruction error of a
posterior sample and its KL term (the noise level the step draws is not used).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import posthoc_ema, sharding
from diffusion_jax.losses import LossHistory
from diffusion_jax.models import autoencoder
from diffusion_jax.models.classifier import label_log_prob


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The train state, a pytree. ``posthoc_ema``: one parameter tree per
    ``training.posthoc_ema_stds`` (``diffusion_jax.posthoc_ema``), or None, which is no node
    of the tree at all: a run without post-hoc EMA saves the checkpoints it saved before the
    field existed, and restores those."""

    step: jnp.ndarray  # int32 scalar: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jnp.ndarray  # base PRNG key (uint32 [2]); per-step keys are folded in
    loss_history: LossHistory | None  # importance sampling of t only
    posthoc_ema: tuple | None = None

    def replace(self, **updates) -> TrainState:
        return dataclasses.replace(self, **updates)


def _state_fields(state: TrainState) -> tuple[str, ...]:
    return tuple(
        field.name
        for field in dataclasses.fields(TrainState)
        if field.name != "posthoc_ema" or state.posthoc_ema is not None
    )


def _flatten_with_keys(state: TrainState):
    names = _state_fields(state)
    return [(jax.tree_util.GetAttrKey(name), getattr(state, name)) for name in names], names


def _flatten(state: TrainState):
    names = _state_fields(state)
    return [getattr(state, name) for name in names], names


jax.tree_util.register_pytree_with_keys(
    TrainState,
    _flatten_with_keys,
    lambda names, children: TrainState(**dict(zip(names, children, strict=True))),
    _flatten,
)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a train step is built from.

    ``model``: the network (``kind`` "denoiser": called ``(x_in, noise_input, y, train=)``;
    "classifier": ``(x_in, noise_input, train=)`` to logits); ``objective``: the training
    objective (``diffusion_jax.objectives``); ``optimizer`` and ``lr_schedule``: from
    ``make_optimizer``; ``batch_size``: global examples per step, split into
    ``grad_accum_steps`` micro-batches; ``ema_decay``: of the EMA parameters;
    ``label_dropout``: probability that a class-conditional denoiser trains on the null label
    (``drop_labels``); ``kl_weight``: of an autoencoder's KL term (``example_terms_fn``);
    ``posterior``: the batches are latent posteriors (``"image"`` their mean, ``"std"``
    their standard deviation, ``diffusion_jax.latents``), and each step trains on a sample
    ``x0 = mean + std eps`` drawn from the example's key; ``posthoc_ema_stds``: the
    ``sigma_rel`` of the power-function EMAs the state tracks besides (``posthoc_ema``).
    """

    model: Any
    objective: Any
    optimizer: optax.GradientTransformation
    lr_schedule: Callable
    batch_size: int
    kind: str = "denoiser"
    grad_accum_steps: int = 1
    ema_decay: float = 0.9999
    label_dropout: float = 0.0
    kl_weight: float = 0.0
    posterior: bool = False
    posthoc_ema_stds: tuple[float, ...] = ()


def make_optimizer(optim_config):
    """``(optimizer, learning_rate_schedule)``: global-norm clipping (none when
    ``grad_clip_norm`` is 0), then Adam (AdamW with ``weight_decay`` > 0) with a linear warmup
    to a constant learning rate."""
    warmup = optim_config.warmup_steps
    lr = (
        optax.join_schedules(
            [
                optax.linear_schedule(0.0, optim_config.learning_rate, warmup),
                optax.constant_schedule(optim_config.learning_rate),
            ],
            [warmup],
        )
        if warmup
        else optax.constant_schedule(optim_config.learning_rate)
    )
    clip = optim_config.grad_clip_norm
    adam = optax.scale_by_adam(b1=optim_config.beta1, b2=optim_config.beta2, eps=optim_config.eps)
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        _with_weight_decay(adam, optim_config.weight_decay),
        optax.scale_by_learning_rate(lr),
    ), lr


def _with_weight_decay(adam, weight_decay: float):
    """``adam`` followed by ``+ weight_decay * params`` (AdamW's decoupled decay, before the
    learning rate scales the update, as ``optax.adamw``), keeping ``adam``'s state as it is: the
    optimizer state has the same structure with and without decay, so checkpoints restore
    either way and ``optim.weight_decay`` may change on resume like the other optim keys."""
    if not weight_decay:
        return adam

    def update(updates, state, params):
        updates, state = adam.update(updates, state, params)
        return jax.tree_util.tree_map(lambda u, p: u + weight_decay * p, updates, params), state

    return optax.GradientTransformation(adam.init, update)


def _init_state(setup: TrainSetup, image_shape, rng):
    init_key, state_key = jax.random.split(rng)
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    model = setup.model
    if setup.kind == "autoencoder":
        params = model.init({"params": init_key}, x)["params"]
    elif setup.kind == "classifier":
        params = model.init({"params": init_key}, x, t, train=False)["params"]
    else:
        y = jnp.zeros((1,), jnp.int32) if model.num_classes is not None else None
        params = model.init({"params": init_key}, x, t, y, train=False)["params"]
    profiles = tuple(jax.tree_util.tree_map(jnp.copy, params) for _ in setup.posthoc_ema_stds)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        opt_state=setup.optimizer.init(params),
        rng=state_key,
        loss_history=setup.objective.init_history(),
        posthoc_ema=profiles or None,
    )


def state_shardings(setup: TrainSetup, image_shape, mesh):
    """``(abstract_state, shardings)``: shapes/dtypes of the state and where each leaf lives.

    Parameters, their EMAs and the optimizer state follow the tensor and FSDP rules
    (``sharding``); the step, the RNG key and the loss history are replicated: every device
    reads them whole. Raises ValueError when the mesh's ``tensor`` axis does not divide the
    network's heads or hidden units (``sharding.check_tensor_parallel``).
    """
    abstract = jax.eval_shape(
        functools.partial(_init_state, setup, image_shape), jax.random.PRNGKey(0)
    )
    sharding.check_tensor_parallel(setup.model, abstract.params, mesh.shape.get("tensor", 1))
    replicated = jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), abstract)
    return abstract, replicated.replace(
        params=sharding.param_shardings(mesh, abstract.params),
        ema_params=sharding.param_shardings(mesh, abstract.ema_params),
        opt_state=sharding.param_shardings(mesh, abstract.opt_state),
        posthoc_ema=sharding.param_shardings(mesh, abstract.posthoc_ema),
    )


def create_train_state(setup: TrainSetup, image_shape, shardings, seed: int):
    """Initialises the state from ``PRNGKey(seed)`` directly in ``shardings`` (from
    ``state_shardings``; no host-side full copy)."""
    init = jax.jit(functools.partial(_init_state, setup, image_shape), out_shardings=shardings)
    return init(jax.random.PRNGKey(seed))


def _per_example_keys(step_key, step, batch_size):
    indices = step.astype(jnp.uint32) * batch_size + jnp.arange(batch_size, dtype=jnp.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, indices)


def drop_labels(keys, labels, rate, null_label):
    """Labels ``[B]`` with each replaced by ``null_label`` with probability ``rate``.

    Example ``i``'s decision is a Bernoulli draw from ``split(keys[i], 3)[2]``: a stream of its
    own key apart from the t and noise keys (``split(keys[i])``), so it depends on the example
    (its global index) alone.
    """
    drop = jax.vmap(lambda k: jax.random.bernoulli(jax.random.split(k, 3)[2], rate))(keys)
    return jnp.where(drop, null_label, labels)


# Per-example terms each model.kind reports besides the objective: their batch means, and their
# means by quarter of t (as ``<name>_qK_sum`` / ``<name>_qK_count``; see ``average_metrics``).
REPORTED_TERMS = {
    "denoiser": {"mean": ("mse", "vlb_bpd"), "by_quarter": ("loss",)},
    "classifier": {"mean": ("accuracy",), "by_quarter": ("loss", "accuracy")},
    "autoencoder": {"mean": ("reconstruction", "kl"), "by_quarter": ()},
}
# The stream of an example's key that draws its posterior sample (an autoencoder's own in
# training it, a latent data set's for latent diffusion).
_POSTERIOR_STREAM = 0x706F7374


def posterior_sample(keys, mean, std):
    """``mean + std eps`` ``[B, ...]`` with example i's eps from ``fold_in(keys[i],
    _POSTERIOR_STREAM)``."""
    eps = jax.vmap(
        lambda k: jax.random.normal(
            jax.random.fold_in(k, _POSTERIOR_STREAM), mean.shape[1:], mean.dtype
        )
    )(keys)
    return mean + std * eps


def example_terms_fn(setup: TrainSetup):
    """The per-example terms of ``setup.kind``:
    ``terms(params, batch, x_t, t, noise, dropout_key) -> {name: [B]}``, always with ``"loss"``
    (the term the step minimises, averaged over the batch).

    ``batch`` holds the micro-batch's ``image`` (x0), ``label`` and ``keys`` (one per example);
    ``x_t = objective.noisy(x0, t, noise)``; the network sees
    ``objective.network_inputs(x_t, t)``. Denoiser: ``objective.losses`` of the network's
    output (labels, some of them dropped, for a class-conditional one). Classifier:
    ``loss``, the cross-entropy ``-log p(label | x_t)`` in nats, and ``accuracy``, 1 where the
    largest logit is the label's, else 0. Autoencoder: ``reconstruction``, the mean squared
    error of the decoded posterior sample ``z = mean + std eps`` (eps from the example's key),
    ``kl``, ``KL(q(z | x) || N(0, I))`` summed over the latent (nats), and ``loss =
    reconstruction + kl_weight kl``.
    """
    model, objective = setup.model, setup.objective
    if setup.kind == "autoencoder":

        def autoencoder_terms(params, batch, x_t, t, noise, dropout_key):
            x0 = batch["image"]
            mean, logvar = model.apply({"params": params}, x0, method=model.encode)
            z = posterior_sample(batch["keys"], mean, jnp.exp(0.5 * logvar))
            reconstruction = model.apply({"params": params}, z, method=model.decode)
            error = jnp.mean(jnp.square(reconstruction - x0), axis=(1, 2, 3))
            kl = autoencoder.kl_divergence(mean, logvar)
            return {"loss": error + setup.kl_weight * kl, "reconstruction": error, "kl": kl}

        return autoencoder_terms
    if setup.kind == "classifier":

        def classifier_terms(params, batch, x_t, t, noise, dropout_key):
            logits = model.apply(
                {"params": params},
                *objective.network_inputs(x_t, t),
                train=True,
                rngs={"dropout": dropout_key},
            )
            labels = batch["label"]
            return {
                "loss": -label_log_prob(logits, labels),
                "accuracy": (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32),
            }

        return classifier_terms

    conditional = model.num_classes is not None
    label_dropout = setup.label_dropout
    if label_dropout and not conditional:
        raise ValueError(f"label_dropout={label_dropout} needs a class-conditional model")

    def denoiser_terms(params, batch, x_t, t, noise, dropout_key):
        y = batch["label"] if conditional else None
        if label_dropout:
            y = drop_labels(batch["keys"], y, label_dropout, model.num_classes)
        x_in, noise_input = objective.network_inputs(x_t, t)
        output = model.apply(
            {"params": params}, x_in, noise_input, y, train=True, rngs={"dropout": dropout_key}
        )
        return objective.losses(output, batch["image"], x_t, t, noise)

    return denoiser_terms


def default_accumulate(mesh) -> str:
    """How ``make_train_step`` runs micro-batches on ``mesh`` by default: ``"loop"`` on CPU
    meshes, ``"scan"`` on accelerators."""
    # XLA:CPU runs the network ~15x slower inside a while loop: digits network, batch 128,
    # 4 micro-batches, 2 shared cores, two runs of bench/accumulate.py: 3.7 and 4.6 s per
    # step as a scan, 0.25 and 0.28 s as a loop.
    return "loop" if mesh.devices.flat[0].platform == "cpu" else "scan"


def make_train_step(setup: TrainSetup, mesh, state_sharding, *, accumulate=None):
    """The jitted ``train_step(state, batch) -> (state, metrics)`` (state donated).

    ``batch = {"image": float32 [B, H, W, C], "label": int32 [B]}`` as global arrays sharded
    over the batch axes. Metrics are replicated scalars: ``loss`` (the optimised objective),
    ``grad_norm``, ``update_norm`` (global norm of the change applied to the parameters),
    ``learning_rate``; the batch means of the ``REPORTED_TERMS`` of ``setup.kind`` (denoiser:
    ``mse``, ``vlb_bpd`` for DDPM's vlb/hybrid; classifier: ``accuracy``); and per quarter of
    t, ``<name>_qK_sum`` / ``<name>_qK_count`` (K = 0..3: the summed per-example term and the
    number of examples whose t lies in quarter K of the training distribution of noise levels,
    ``objective.quarter``: for DDPM quarter K of [0, T); denoiser: ``loss``, classifier:
    ``loss`` and ``accuracy``; see ``average_metrics``). The post-hoc EMA profiles, if any, move
    by ``posthoc_ema.update`` at the one-based step ``state.step + 1``.

    ``accumulate``: how ``setup.grad_accum_steps > 1`` micro-batches are run: ``"scan"``
    (``lax.scan``: one copy of the network in the program), ``"loop"`` (unrolled: one copy per
    micro-batch) or ``None``: the loop on CPU meshes, the scan on accelerators.
    """
    batch_size, accum = setup.batch_size, setup.grad_accum_steps
    objective, optimizer = setup.objective, setup.optimizer
    accumulate = accumulate or default_accumulate(mesh)
    if accumulate not in ("scan", "loop"):
        raise ValueError(f"accumulate must be 'scan', 'loop' or None, got {accumulate!r}")
    use_scan = accumulate == "scan" and accum > 1
    terms_fn = example_terms_fn(setup)
    reported = REPORTED_TERMS[setup.kind]
    gammas = [float(posthoc_ema.sigma_rel_to_gamma(s)) for s in setup.posthoc_ema_stds]

    def example_losses(params, micro, dropout_key, history):
        t_keys, noise_keys = jax.vmap(jax.random.split, out_axes=1)(micro["keys"])
        t, weights = objective.draw(t_keys, history)
        x0 = micro["image"]
        if setup.posterior:
            x0 = posterior_sample(micro["keys"], x0, micro["std"])
            micro = dict(micro, image=x0)
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(noise_keys)
        x_t = objective.noisy(x0, t, noise)
        terms = terms_fn(params, micro, x_t, t, noise, dropout_key)
        minimised = jnp.sum(terms["loss"] * weights) / batch_size
        return minimised, (terms, t)

    grad_fn = jax.value_and_grad(example_losses, has_aux=True)

    def accumulate_grads(state, micro_batches, dropout_root):
        """Summed gradients and per-micro-batch outputs stacked along a leading [accum] axis."""
        step = lambda micro, index: grad_fn(
            state.params, micro, jax.random.fold_in(dropout_root, index), state.loss_history
        )
        if use_scan:

            def body(grads, xs):
                (obj, (terms, t)), g = step(*xs)
                return jax.tree_util.tree_map(jnp.add, grads, g), (obj, terms, t)

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            return jax.lax.scan(body, zeros, (micro_batches, jnp.arange(accum)))
        grads, outputs = None, []
        for index in range(accum):
            micro = jax.tree_util.tree_map(lambda x, i=index: x[i], micro_batches)
            (obj, (terms, t)), g = step(micro, index)
            grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
            outputs.append((obj, terms, t))
        return grads, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outputs)

    def train_step(state, batch):
        example_root, dropout_root = jax.random.split(jax.random.fold_in(state.rng, state.step))
        keys = _per_example_keys(example_root, state.step, batch_size)
        batch = {**batch, "keys": keys}
        # Micro-batch j holds examples {i * accum + j}: each device's contiguous rows split into
        # accum strided sets, so that no example (nor its key) leaves its device.
        micro_batches = jax.tree_util.tree_map(
            lambda x: jax.lax.with_sharding_constraint(
                jnp.swapaxes(x.reshape((batch_size // accum, accum) + x.shape[1:]), 0, 1),
                NamedSharding(mesh, P(None, sharding.BATCH_AXES, *([None] * (x.ndim - 1)))),
            ),
            batch,
        )
        with sharding.tracing_mesh(mesh):
            grads, (objs, terms, t) = accumulate_grads(state, micro_batches, dropout_root)
        # Per-example outputs [accum, B / accum] back to batch order [B].
        terms, t = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1), (terms, t))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = setup.ema_decay
        ema = jax.tree_util.tree_map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
        )
        history = objective.update_history(state.loss_history, t, terms)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema_params=ema,
            opt_state=opt_state,
            loss_history=history,
        )
        if state.posthoc_ema is not None:
            new_state = new_state.replace(
                posthoc_ema=tuple(
                    posthoc_ema.update(profile, params, state.step + 1, gamma)
                    for profile, gamma in zip(state.posthoc_ema, gammas, strict=True)
                )
            )
        metrics = {
            "loss": jnp.sum(objs),
            "grad_norm": optax.global_norm(grads),
            # Finite loss and gradients can still give non-finite parameters (a learning rate
            # beyond float32); a finite update norm rules that out before the state is saved.
            "update_norm": optax.global_norm(updates),
            "learning_rate": setup.lr_schedule(state.step),
        }
        for name in reported["mean"]:
            if name in terms:
                metrics[name] = jnp.mean(terms[name])
        quarter = objective.quarter(t)
        for q in range(4):
            mask = (quarter == q).astype(jnp.float32)
            for name in reported["by_quarter"]:
                metrics[f"{name}_q{q}_sum"] = jnp.sum(terms[name] * mask)
                metrics[f"{name}_q{q}_count"] = jnp.sum(mask)
        return new_state, metrics

    names = ("image", "label", "std") if setup.posterior else ("image", "label")
    batch_shardings = {name: sharding.batch_sharding(mesh) for name in names}
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_shardings),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def average_metrics(step_metrics: list[dict]) -> dict[str, float]:
    """Averages the host copies of several steps' metrics for logging.

    Scalars are averaged over steps. Every pair ``<name>_sum`` / ``<name>_count`` (such as
    ``loss_q2_sum`` / ``loss_q2_count``) becomes ``<name>``: the sum over those steps divided by
    the count, i.e. the mean per-example term over all examples of those steps whose t fell in
    that quarter (left out if none did), exact however they were spread.
    """
    totals = {k: float(sum(m[k] for m in step_metrics)) for k in step_metrics[0]}
    pairs = [k[: -len("_sum")] for k in totals if k.endswith("_sum")]
    pairs = [name for name in pairs if f"{name}_count" in totals]
    in_pairs = {f"{name}_{part}" for name in pairs for part in ("sum", "count")}
    averaged = {k: v / len(step_metrics) for k, v in totals.items() if k not in in_pairs}
    for name in pairs:
        if count := totals[f"{name}_count"]:
            averaged[name] = totals[f"{name}_sum"] / count
    return averaged
