"""Gaussian noise from one PRNG key or from one key per example.

The samplers and ``losses.bits_per_dim`` take either a single key (the noise of the whole
batch is one draw) or a batch of keys, one per example (``uint32 [B, 2]`` raw keys or typed
keys ``[B]``). With a batch of keys, example ``i``'s noise depends on key ``i`` alone, so an
example keyed by its global index gets the same noise whatever batch, device or process it is
computed in (``diffusion_jax.generate`` relies on this).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_key_batch(rng) -> bool:
    """True if ``rng`` holds one key per example rather than a single key."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng.ndim == 1
    return rng.ndim == 2


def split(rng, num: int = 2):
    """``jax.random.split`` of a key, or of every key of a key batch (then ``num`` batches)."""
    if is_key_batch(rng):
        keys = jax.vmap(lambda k: jax.random.split(k, num))(rng)
        return tuple(keys[:, i] for i in range(num))
    return tuple(jax.random.split(rng, num))


def fold_in(rng, data):
    """``jax.random.fold_in`` of a key, or of every key of a key batch."""
    if is_key_batch(rng):
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, data)
    return jax.random.fold_in(rng, data)


def normal(rng, shape, dtype=jnp.float32):
    """Standard normal noise of ``shape`` ``[B, ...]``: one draw from a key, or row ``i`` from
    key ``i`` of a key batch of length B."""
    return _per_key(rng, shape, lambda k, s: jax.random.normal(k, s, dtype))


def _per_key(rng, shape, draw):
    """``draw(key, shape)`` of the whole batch from a key, or row ``i`` from key ``i``."""
    if not is_key_batch(rng):
        return draw(rng, tuple(shape))
    if rng.shape[0] != shape[0]:
        raise ValueError(f"{rng.shape[0]} per-example keys for a batch of {shape[0]}")
    return jax.vmap(lambda k: draw(k, tuple(shape[1:])))(rng)


def uniform(rng, shape):
    """float32 noise uniform in [0, 1) of ``shape``, keyed like ``normal``."""
    return _per_key(rng, shape, lambda k, s: jax.random.uniform(k, s, jnp.float32))


def rademacher(rng, shape, dtype=jnp.float32):
    """Signs, +1 or -1 with probability 1/2 each, of ``shape``, keyed like ``normal``."""
    return _per_key(rng, shape, lambda k, s: jax.random.rademacher(k, s, dtype))
