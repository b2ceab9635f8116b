"""Guidance as network wrappers: each returns a function of the same kind as the one it wraps,
which samplers and likelihoods take unchanged (DDPM's ancestral, respaced, DDIM and later
samplers and ``losses.bits_per_dim`` take ``model_fn(x_t, t)``; the continuous objectives'
``ode_sampling`` and ``likelihood`` take the bare network ``(x_in, noise_input)``).

- ``classifier_free`` (Ho & Salimans 2022): ``out = (1 + w) f(x_t, t, y) - w f(x_t, t, null)``
  for a network trained with label dropout (``model.label_dropout``).
- ``classifier`` (Dhariwal & Nichol 2021, Algorithm 2 in its eps form):
  ``eps_hat = eps - s sigma(t) grad_x log p(y | x_t)``, in the objective's own process
  (DDPM: ``sigma = sqrt(1 - abar_t)``).
- ``autoguidance`` (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
  Itself"): ``out = (1 + w) D(x_t, t) - w D_guide(x_t, t)`` with a weaker model of the same task
  (smaller, or trained for less) as the guide.

The guided function returns the wrapped one's parameterisation (DDPM's ``mean_type``, plus the
variance half for ``learned_range``; EDM's F, flow's velocity), so the caller samples it as
without guidance. Only the mean half is guided; the variance half is the (conditional) model's.
``labels`` are int ``[B]`` (one per sample, fixed for the whole chain), ``scale`` a scalar or
``[B]``. Labels and scales are closed over: like parameters (see ``sampling``), pass them through
your own ``jax.jit`` to change them without recompiling.

Each wrapper takes an ``Interval`` of noise levels (Kynkaanniemi et al. 2024, "Applying
Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models"):
the scale applies where the noise level of the network's input lies in ``(lo, hi]``, and is 0
elsewhere, where each wrapper returns its unguided output: the conditional one, or the model
alone, bit for bit (classifier guidance of DDPM's x0, v and mu up to the rounding of their
round trip through eps). Both branches are still computed there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, objectives
from diffusion_jax.diffusion import check_option
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


def _check_scale(scale, batch: tuple[int, ...] | None):
    """``scale`` as float32, a scalar or one per example (``batch``: ``(B,)``; None: any
    ``B``); raises ValueError if it is neither."""
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim > 1 or (scale.ndim and batch is not None and scale.shape != batch):
        raise ValueError(f"scale must be a scalar or one per example {batch}, got {scale.shape}")
    return scale


def _per_example(scale, x):
    """``scale`` (scalar or ``[B]``) shaped to broadcast against ``x`` ``[B, ...]``."""
    return scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim))


def _check_batch(labels, x_t):
    if labels.shape[0] != x_t.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for a batch of {x_t.shape[0]} samples")


def check_interval(objective, lo: float, hi: float) -> None:
    """Raises ValueError unless ``0 <= lo < hi`` and ``(lo, hi]`` meets the objective's noise
    levels ``objective.noise_level_range`` (a bound beyond them is allowed: ``(0, inf)`` is
    every level), compared in float32 as ``Interval.contains`` compares them."""
    low, high = objective.noise_level_range
    lo32, hi32, low32, high32 = np.asarray([lo, hi, low, high], np.float32)
    if not 0 <= lo32 < hi32:  # NaN fails too
        raise ValueError(f"the guidance interval (lo, hi] needs 0 <= lo < hi, got ({lo}, {hi}]")
    if lo32 >= high32 or hi32 < low32:
        raise ValueError(
            f"the guidance interval ({lo}, {hi}] holds none of the noise levels sigma / alpha "
            f"of objective {objective.name!r}, which lie in [{low:.6g}, {high:.6g}]"
        )


@dataclasses.dataclass(frozen=True)
class Interval:
    """The noise levels ``(lo, hi]`` where guidance applies, on the objective's scale
    ``objective.noise_level`` (sigma / alpha: EDM's sigma; DDPM's ``sqrt((1 - abar_t) /
    abar_t)`` of the model's timestep; flow's ``t / (1 - t)``).

    The level is recovered from the network's noise input (``objective.from_network_inputs``)
    in float32: a bound placed exactly on a continuous sampler's noise level may fall on
    either side of it by rounding (DDPM's integer timesteps look theirs up exactly)."""

    objective: Any
    lo: float
    hi: float

    def __post_init__(self):
        check_interval(self.objective, self.lo, self.hi)

    def contains(self, x_in, noise_input):
        """bool ``[B]``: whether each example's noise level lies in ``(lo, hi]``."""
        _, t = self.objective.from_network_inputs(x_in, noise_input)
        level = self.objective.noise_level(t)
        return (level > self.lo) & (level <= self.hi)


def _scale_at(scale, interval: Interval | None, x_in, noise_input):
    """The scale at each example's noise level: ``scale``, 0 outside ``interval``."""
    if interval is None:
        return scale
    return jnp.where(interval.contains(x_in, noise_input), scale, 0.0)


def _extrapolate(output, other, scale, var_type: str):
    """``output + w (output - other)`` on the mean half (``scale`` w, scalar or ``[B]``), and
    ``output``'s variance half for ``learned_range``. ``(1 + w) output - w other``: the
    coefficients sum to one, so with both outputs of one parameterisation (every objective's is
    affine in eps and x0 at fixed ``(x_t, t)``) it is the same combination of their eps, of
    their x0, and exactly ``output`` at w = 0."""
    mean, var_values = diffusion.split_model_output(output, var_type)
    other_mean, _ = diffusion.split_model_output(other, var_type)
    guided = mean + _per_example(scale, mean) * (mean - other_mean)
    return guided if var_values is None else jnp.concatenate([guided, var_values], axis=-1)


def classifier_free(
    model_fn,
    labels,
    scale,
    *,
    null_label: int,
    var_type: str = "fixed_large",
    interval: Interval | None = None,
):
    """Classifier-free guidance: ``out = (1 + w) f(x_t, t, y) - w f(x_t, t, null_label)``.

    Args:
      model_fn: ``(x_t [B, ...], t [B], y [B]) -> output``, a network trained with label
        dropout (for EDM and flow the bare network, ``(x_in, noise_input, y)``);
        ``y == null_label`` asks for the unconditional prediction.
      labels: int ``[B]`` in ``[0, null_label)``.
      scale: ``w``, scalar or ``[B]``: 0 is conditional sampling, -1 unconditional.
      null_label: the model's "no label" index (the U-Net's ``num_classes``).
      var_type: the model's; with ``learned_range`` the variance half is the conditional one.
      interval: the noise levels where ``w`` applies (None: all); elsewhere the conditional
        output.

    Both branches run as one batched call ``[2B]`` per step (rows ``2i, 2i + 1``: example
    ``i`` conditional, then unconditional). The combination's coefficients sum to one and every
    objective's output is affine in eps and x0 at fixed ``(x_t, t)`` (DDPM's eps, x0, v, mu;
    EDM's F; flow's velocity), so guiding the network's own output equals guiding eps and
    converting back: no ``mean_type``, no objective.
    """
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 1:
        raise ValueError(
            f"classifier-free guidance needs a class-conditional model: null_label must be its "
            f"number of classes (an int >= 1), got {null_label!r}"
        )
    check_option("var_type", var_type, diffusion.VAR_TYPES)
    labels = check_labels(labels, null_label)
    scale = _check_scale(scale, labels.shape)
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
        return _extrapolate(both[:, 0], both[:, 1], _scale_at(scale, interval, x_t, t), var_type)

    return guided_fn


def autoguidance(
    model_fn,
    guide_fn,
    scale,
    *,
    var_type: str = "fixed_large",
    interval: Interval | None = None,
):
    """Autoguidance: ``out = (1 + w) D(x_t, t) - w D_guide(x_t, t)``.

    Args:
      model_fn: ``(x_in [B, ...], noise_input [B]) -> output``, the model as its sampler takes
        it (DDPM: ``(x_t, t)``; EDM and flow the bare network), its labels (if any) closed
        over.
      guide_fn: the same of the guide, a weaker model of the same task with the same
        parameterisation (objective, process, DDPM's ``mean_type`` and ``var_type``), given
        the same labels if it is conditional.
      scale: ``w``, scalar or ``[B]``: 0 is the model alone. EDM2's guidance weight ``g``
        (``D_0 + g (D_1 - D_0)``, ``D_1`` the model, ``D_0`` the guide) is ``1 + w``.
      var_type: both networks'; with ``learned_range`` the variance half is the model's.
      interval: the noise levels where ``w`` applies (None: all); elsewhere the model alone.

    Two network calls per step, one per model (different parameters, or networks).
    """
    check_option("var_type", var_type, diffusion.VAR_TYPES)
    scale = _check_scale(scale, None)

    def guided_fn(x_in, noise_input):
        _check_scale(scale, x_in.shape[:1])
        output, weak = model_fn(x_in, noise_input), guide_fn(x_in, noise_input)
        return _extrapolate(output, weak, _scale_at(scale, interval, x_in, noise_input), var_type)

    return guided_fn


def classifier(
    model_fn,
    log_prob_fn,
    labels,
    scale,
    objective,
    *,
    mean_type: str | None = None,
    var_type: str | None = None,
    num_classes: int | None = None,
    interval: Interval | None = None,
):
    """Classifier guidance: ``eps_hat = eps - s sigma(t) grad_x log p(y | x_t)``.

    Args:
      model_fn: the network as the objective's sampler takes it, ``(x_in [B, ...],
        noise_input [B]) -> output`` (DDPM: ``(x_t, t)``), conditional or not (the classifier
        adds the label).
      log_prob_fn: ``(x_in, noise_input, y [B]) -> log p(y | x_t)`` ``[B]``, a noisy-image
        classifier fed the objective's network inputs ``objective.network_inputs(x_t, t)`` as
        in its training (DDPM: ``(x_t, t)``); example i's value may depend on ``x_t[i]`` only
        (its gradient is taken through the sum over the batch).
      labels: int ``[B]`` (checked against ``num_classes`` when given).
      scale: ``s``, scalar or ``[B]``; 0 leaves the model unchanged.
      objective: the model's objective (``objectives.DDPM``, ``EDM``, ``Flow``), or DDPM's
        *training* ``Schedule`` (all T steps: ``t`` is the timestep the model receives, the
        original one even when the sampler runs a respaced chain) with the model's
        ``mean_type`` and ``var_type`` (default eps, fixed_large), which is
        ``objectives.DDPM(schedule, mean_type=..., var_type=...)``.
      interval: the noise levels where ``s`` applies (None: all); elsewhere the model alone.

    The gradient is taken with respect to ``x_t`` (``objective.from_network_inputs``); the
    network output becomes the one whose eps is shifted (``objective.shift_eps``: DDPM's eps
    directly, its x0, v and mu through eps with a ``learned_range`` variance half passed
    through; EDM's F; flow's velocity, unguided at t = 1 where eps is ``x_t`` whatever the
    output).
    """
    objective = _objective(objective, mean_type, var_type)
    labels = check_labels(labels, num_classes)
    scale = _check_scale(scale, labels.shape)
    grad_log_prob = jax.grad(
        lambda x_t, t: jnp.sum(log_prob_fn(*objective.network_inputs(x_t, t), labels))
    )

    def guided_fn(x_in, noise_input):
        _check_batch(labels, x_in)
        x_t, t = objective.from_network_inputs(x_in, noise_input)
        sigma = _per_example(objective.sigma(t), x_t)
        scale_t = _scale_at(scale, interval, x_in, noise_input)
        delta = -(_per_example(scale_t, x_t) * sigma * grad_log_prob(x_t, t))
        return objective.shift_eps(model_fn(x_in, noise_input), x_t, t, delta)

    return guided_fn


def _objective(objective, mean_type, var_type):
    """``objective``, or the DDPM objective of a ``Schedule`` with ``mean_type``, ``var_type``."""
    if isinstance(objective, Schedule):
        mean_type, var_type = mean_type or "eps", var_type or "fixed_large"
        check_option("mean_type", mean_type, diffusion.MEAN_TYPES)
        check_option("var_type", var_type, diffusion.VAR_TYPES)
        return objectives.DDPM(objective, mean_type=mean_type, var_type=var_type)
    if mean_type is not None or var_type is not None:
        raise ValueError(
            f"mean_type and var_type come with a DDPM Schedule; objective {objective.name!r} "
            "has its own"
        )
    return objective
