"""Guidance as model-function wrappers: each returns a ``model_fn(x_t, t)`` that samplers and
``losses.bits_per_dim`` take unchanged (ancestral, respaced, DDIM and any later sampler).

- ``classifier_free`` (Ho & Salimans 2022): ``out = (1 + w) f(x_t, t, y) - w f(x_t, t, null)``
  for a network trained with label dropout (``model.label_dropout``).
- ``classifier`` (Dhariwal & Nichol 2021, Algorithm 2 in its eps form):
  ``eps_hat = eps - s sqrt(1 - abar_t) grad_x log p(y | x_t)``.

The wrapped ``model_fn(x_t, t, y)`` returns its ``mean_type`` prediction (plus the variance
half for ``learned_range``); the guided function returns the same parameterisation, so the
caller passes the same ``mean_type`` / ``var_type`` to the sampler as without guidance. Only the
mean half is guided; the variance half is the conditional one. ``labels`` are int ``[B]``
(one per sample, fixed for the whole chain), ``scale`` a scalar or ``[B]``. Labels and scales
are closed over: like parameters (see ``sampling``), pass them through your own ``jax.jit`` to
change them without recompiling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.diffusion import check_option, extract
from diffusion_jax.schedules import Schedule


def check_labels(labels, num_classes: int | None):
    """``labels`` as an int array ``[B]``; raises ValueError if it is not one, or (when the
    values are concrete) if one lies outside ``[0, num_classes)`` (``[0, inf)`` for None)."""
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an int array [B], got {labels.dtype} {labels.shape}")
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        # NumPy, not jnp: inside a jit trace, jnp's min of a concrete array is a tracer.
        values = np.asarray(labels)
        low, high = int(values.min()), int(values.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got values in [{low}, {high}]"
            )
    return labels


def _check_scale(scale, labels):
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim and scale.shape != labels.shape:
        raise ValueError(
            f"scale must be a scalar or one per label {labels.shape}, got {scale.shape}"
        )
    return scale


def _per_example(scale, x):
    """``scale`` (scalar or ``[B]``) shaped to broadcast against ``x`` ``[B, ...]``."""
    return scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim))


def _check_batch(labels, x_t):
    if labels.shape[0] != x_t.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for a batch of {x_t.shape[0]} samples")


def classifier_free(model_fn, labels, scale, *, null_label: int, var_type: str = "fixed_large"):
    """Classifier-free guidance: ``out = (1 + w) f(x_t, t, y) - w f(x_t, t, null_label)``.

    Args:
      model_fn: ``(x_t [B, ...], t [B], y [B]) -> output``, a network trained with label
        dropout; ``y == null_label`` asks for the unconditional prediction.
      labels: int ``[B]`` in ``[0, null_label)``.
      scale: ``w``, scalar or ``[B]``: 0 is conditional sampling, -1 unconditional.
      null_label: the model's "no label" index (the U-Net's ``num_classes``).
      var_type: the model's; with ``learned_range`` the variance half is the conditional one.

    Both branches run as one batched call ``[2B]`` per step (rows ``2i, 2i + 1``: example
    ``i`` conditional, then unconditional). The combination's coefficients sum to one and eps,
    x0, v and mu are affine in each other at fixed ``(x_t, t)``, so guiding the model's own
    parameterisation equals guiding eps and converting back: no ``mean_type``.
    """
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 1:
        raise ValueError(
            f"classifier-free guidance needs a class-conditional model: null_label must be its "
            f"number of classes (an int >= 1), got {null_label!r}"
        )
    check_option("var_type", var_type, diffusion.VAR_TYPES)
    labels = check_labels(labels, null_label)
    scale = _check_scale(scale, labels)
    nulls = jnp.full_like(labels, null_label)

    def guided_fn(x_t, t):
        _check_batch(labels, x_t)
        # Rows 2i and 2i + 1 are example i's two branches: a batch split over devices keeps
        # both next to their example, with no data moved between devices.
        both = model_fn(
            jnp.repeat(x_t, 2, axis=0),
            jnp.repeat(t, 2, axis=0),
            jnp.stack([labels, nulls], axis=1).reshape(-1),
        )
        both = both.reshape((x_t.shape[0], 2) + both.shape[1:])
        cond, var_values = diffusion.split_model_output(both[:, 0], var_type)
        uncond, _ = diffusion.split_model_output(both[:, 1], var_type)
        # c + w (c - u) = (1 + w) c - w u, and exactly c at w = 0.
        guided = cond + _per_example(scale, cond) * (cond - uncond)
        return guided if var_values is None else jnp.concatenate([guided, var_values], axis=-1)

    return guided_fn


def classifier(
    model_fn,
    log_prob_fn,
    labels,
    scale,
    schedule: Schedule,
    *,
    mean_type: str = "eps",
    var_type: str = "fixed_large",
    num_classes: int | None = None,
):
    """Classifier guidance: ``eps_hat = eps - s sqrt(1 - abar_t) grad_x log p(y | x_t)``.

    Args:
      model_fn: ``(x_t [B, ...], t [B]) -> output`` (conditional or not: the classifier adds
        the label).
      log_prob_fn: ``(x_t [B, ...], t [B], y [B]) -> log p(y | x_t)`` ``[B]``, a noisy-image
        classifier; example i's value may depend on ``x_t[i]`` only (its gradient is taken
        through the sum over the batch).
      labels: int ``[B]`` (checked against ``num_classes`` when given).
      scale: ``s``, scalar or ``[B]``; 0 leaves the model unchanged.
      schedule: the *training* process (all T steps): ``t`` is the timestep the model
        receives, the original one even when the sampler runs a respaced chain.
      mean_type, var_type: the model's. Its mean prediction is converted to eps, guided and
        converted back (``x0``, ``v``, ``mu``); with ``learned_range`` the variance half passes
        through.
    """
    check_option("mean_type", mean_type, diffusion.MEAN_TYPES)
    check_option("var_type", var_type, diffusion.VAR_TYPES)
    labels = check_labels(labels, num_classes)
    scale = _check_scale(scale, labels)
    grad_log_prob = jax.grad(lambda x, t: jnp.sum(log_prob_fn(x, t, labels)))

    def guided_fn(x_t, t):
        _check_batch(labels, x_t)
        prediction, var_values = diffusion.split_model_output(model_fn(x_t, t), var_type)
        eps = prediction
        if mean_type != "eps":
            x0 = diffusion.predict_x0(schedule, x_t, t, prediction, mean_type)
            eps = diffusion.eps_from_x0(schedule, x_t, t, x0)
        sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        eps = eps - _per_example(scale, x_t) * sigma * grad_log_prob(x_t, t)
        if mean_type == "eps":
            guided = eps
        else:
            x0 = diffusion.x0_from_eps(schedule, x_t, t, eps)
            guided = diffusion.training_target(schedule, x0, x_t, t, eps, mean_type)
        return guided if var_values is None else jnp.concatenate([guided, var_values], axis=-1)

    return guided_fn
