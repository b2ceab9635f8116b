"""Training objectives as one interface: DDPM, EDM and flow matching.

An objective owns everything that distinguishes one way of training a denoiser from another,
and the rest of the library (train step, samplers, guidance, evaluation) speaks to it only
through these methods (``x`` arrays ``[B, ...]``, noise levels ``t`` ``[B]``):

- ``draw(keys, history) -> (t, weights)``: each example's noise level from its own key
  (``keys`` ``[B]``), and importance weights (ones unless the objective samples ``t`` by
  importance; ``history`` is its state, ``None`` for the others);
- ``noisy(x0, t, noise) -> x_t``: the forward process;
- ``network_inputs(x_t, t) -> (x_in, noise_input)``: the preconditioning of the network's
  input, and the noise-level value its time embedding receives;
- ``from_network_inputs(x_in, noise_input) -> (x_t, t)``: the inverse of ``network_inputs``,
  for what wraps the bare network (classifier guidance);
- ``denoise(output, x_t, t) -> (x0, eps)``: the denoiser view of a network output, what
  samplers, guidance and likelihoods use;
- ``sigma(t) -> [B]``: the noise's coefficient ``sigma(t)`` in ``x_t = alpha x0 + sigma eps``;
- ``noise_level(t) -> [B]``: the noise-to-signal ratio ``sigma(t) / alpha(t)``, EDM's sigma of
  the same point (``x_t / alpha = x0 + (sigma / alpha) eps``), the common scale on which
  noise levels of every objective compare; ``noise_level_range``: its ``(lowest, highest)``
  over the times the objective's samplers can reach;
- ``shift_eps(output, x_t, t, delta) -> output``: the network output whose noise prediction at
  ``(x_t, t)`` is ``output``'s plus ``delta`` ``[B, ...]`` (classifier guidance's
  ``-s sigma grad log p(y | x_t)``);
- ``losses(output, x0, x_t, t, noise) -> {name: [B]}``: the per-example terms, ``"loss"`` the
  one minimised;
- ``quarter(t) -> int [B]``: which quarter (0 = least noise) of the training distribution of
  noise levels ``t`` falls in, for the per-quarter metrics;
- ``reported``: the terms besides ``loss`` that training logs;
- ``process``: the noise process (``diffusion_jax.process``) of a continuous objective, or
  ``None`` for DDPM's discrete schedule (``schedule``).

``OBJECTIVES`` maps each ``objective.name`` of the config to its class; ``from_config`` builds
the one a config chooses, so nothing past the programs' boundary reads the ConfigDict.
"""

from diffusion_jax.objectives.ddpm import DDPM
from diffusion_jax.objectives.edm import EDM
from diffusion_jax.objectives.flow import Flow

OBJECTIVES = {"ddpm": DDPM, "edm": EDM, "flow": Flow}


def from_config(config):
    """The objective of ``config.objective.name`` with its options (``diffusion.*`` for ddpm,
    ``objective.<name>.*`` for the others)."""
    return OBJECTIVES[config.objective.name].from_config(config)
