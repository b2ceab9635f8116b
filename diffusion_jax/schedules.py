"""Noise schedules: beta sequences, the per-timestep arrays derived from them, and respacing.

Conventions: the time index ``t`` is zero-based, ``t in [0, T)``; index ``t`` is the
paper's step ``t + 1``. Everything is computed in float64 with NumPy and stored as float32 arrays
in a :class:`Schedule` pytree, which can be passed into ``jax.jit`` / ``lax.scan``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "cosine", "quad", "const", "sigmoid", "jsd")
SPACINGS = ("even", "quad", "logsnr", "trailing")


def _check_num_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")


def get_betas(name: str, num_timesteps: int, **kw) -> np.ndarray:
    """Returns the float64 betas ``[T]`` of a named schedule, every one in (0, 1).

    A beta of 1 would make ``abar`` 0 from that step on: nothing of x0 is left in ``x_t`` and
    the x0 prediction divides by ``sqrt(abar) = 0``. The two schedules whose formula ends at
    ``beta = 1`` (cosine, jsd) are clipped at ``max_beta = 0.999`` as in Improved DDPM; the
    others take their end points from the caller, and an end point of 1 or more is an error.

    Args:
        name: one of ``BETA_SCHEDULES``.
            - ``linear``: DDPM (Ho et al. 2020), ``beta_start..beta_end`` (defaults 1e-4..0.02 at
                T=1000). With ``scale_to_timesteps=True`` (default) both ends are multiplied by
                ``1000 / T`` (Improved DDPM), so any T gives a comparable total noise; the
                scaled ``beta_end`` is 1 at T=20, so T >= 21.
            - ``cosine``: Improved DDPM (Nichol & Dhariwal 2021),
                ``abar(t) = cos^2((t/T + s)/(1 + s) * pi/2)`` with ``s=0.008``; betas clipped at
                ``max_beta=0.999`` (unclipped, the last one is 1).
            - ``quad``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``.
            - ``const``: ``beta_end`` everywhere.
            - ``sigmoid``: ``sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start``.
            - ``jsd``: ``1 / linspace(T, 1, T)`` (DDPM's code), whose last beta (1) is clipped at
                ``max_beta=0.999``.
        num_timesteps: T >= 1.
        **kw: ``beta_start``, ``beta_end``, ``scale_to_timesteps`` (linear/quad/sigmoid/const),
            ``s``, ``max_beta`` (cosine, jsd).

    Returns:
        float64 array ``[T]`` with values in (0, 1).
    """
    _check_num_timesteps(num_timesteps)
    T = int(num_timesteps)
    if name == "cosine":
        s = kw.pop("s", 0.008)
        max_beta = kw.pop("max_beta", 0.999)
        _reject_unknown(name, kw)
        steps = np.arange(T + 1, dtype=np.float64) / T
        abar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1.0 - abar[1:] / abar[:-1]
        return np.clip(betas, 0.0, max_beta)
    if name == "jsd":
        max_beta = kw.pop("max_beta", 0.999)
        _reject_unknown(name, kw)
        return np.minimum(1.0 / np.linspace(T, 1, T, dtype=np.float64), max_beta)
    if name not in BETA_SCHEDULES:
        raise ValueError(f"Unknown beta schedule {name!r}; valid: {', '.join(BETA_SCHEDULES)}")

    scale = 1000.0 / T if kw.pop("scale_to_timesteps", True) else 1.0
    beta_start = kw.pop("beta_start", 1e-4) * scale
    beta_end = kw.pop("beta_end", 0.02) * scale
    _reject_unknown(name, kw)
    if not 0.0 < beta_start < 1.0 or not 0.0 < beta_end < 1.0:
        raise ValueError(
            f"{name} schedule: beta_start={beta_start}, beta_end={beta_end} (after scaling by "
            f"1000/T={scale}) must lie in (0, 1)"
        )
    if name == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if name == "quad":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if name == "const":
        return np.full(T, beta_end, dtype=np.float64)
    # sigmoid
    x = np.linspace(-6, 6, T, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start


def _reject_unknown(name: str, kw: dict) -> None:
    if kw:
        raise ValueError(f"Unexpected arguments for the {name!r} schedule: {sorted(kw)}")


@flax.struct.dataclass
class Schedule:
    """Per-timestep arrays of a Gaussian diffusion, all float32 ``[T]`` (``timestep_map`` int32).

    ``T = betas.shape[0]`` is static under jit. ``timestep_map[i]`` is the timestep of the
    original (unrespaced) process that step ``i`` of this schedule corresponds to: the value the
    network is conditioned on. For an unrespaced schedule it is ``arange(T)``.
    """

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    alphas_cumprod_next: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    log_betas: jnp.ndarray
    timestep_map: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas, timestep_map: Sequence[int] | None = None) -> Schedule:
        """Derives every array from ``betas`` ``[T]`` in float64, then stores them as float32.

        ``posterior_log_variance_clipped[0]`` uses ``posterior_variance[1]`` since the posterior
        variance at t=0 is 0 (for T == 1 it falls back to ``betas[0]``).
        """
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        valid = (betas > 0) & (betas < 1)
        if not np.all(valid):
            raise ValueError(
                f"betas must lie in (0, 1) (a beta of 1 leaves nothing of x0 in x_t); got values "
                f"such as {betas[~valid][:3]}"
            )
        T = betas.shape[0]
        if timestep_map is None:
            timestep_map = np.arange(T)
        timestep_map = np.asarray(timestep_map)
        if timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have shape ({T},), got {timestep_map.shape}")

        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        abar_next = np.append(abar[1:], 0.0)
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        first_log_var = post_var[1] if T > 1 else betas[0]
        with np.errstate(divide="ignore"):
            log_one_minus_abar = np.log(1.0 - abar)
        f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
        return cls(
            betas=f32(betas),
            alphas_cumprod=f32(abar),
            alphas_cumprod_prev=f32(abar_prev),
            alphas_cumprod_next=f32(abar_next),
            sqrt_alphas_cumprod=f32(np.sqrt(abar)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
            log_one_minus_alphas_cumprod=f32(log_one_minus_abar),
            sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / abar)),
            sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / abar - 1.0)),
            posterior_variance=f32(post_var),
            posterior_log_variance_clipped=f32(np.log(np.append(first_log_var, post_var[1:]))),
            posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
            posterior_mean_coef2=f32((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)),
            log_betas=f32(np.log(betas)),
            timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
        )

    @classmethod
    def create(cls, name: str, num_timesteps: int, **kw) -> Schedule:
        """``Schedule.from_betas(get_betas(name, num_timesteps, **kw))``."""
        return cls.from_betas(get_betas(name, num_timesteps, **kw))


def space_timesteps(num_timesteps: int, section_counts) -> np.ndarray:
    """Chooses which of the original ``T`` steps a respaced process keeps (sorted, int64).

    Args:
        num_timesteps: T of the original process.
        section_counts: one of
            - an int K: K steps evenly spaced over ``[0, T-1]``, both ends included;
            - ``"ddimK"``: DDIM's even stride, ``range(0, T, T // K)`` with K steps (requires it to
                give exactly K steps);
            - ``"quadK"``: DDIM's quadratic spacing, ``(linspace(0, sqrt(0.8 T), K) ** 2)`` rounded
                down, duplicates removed (dense near t=0);
            - a sequence or comma-separated string of counts: Improved DDPM's sections, the T steps
                split into ``len(counts)`` equal sections, each evenly strided with its count.

    Returns:
        int64 array ``[K]`` of kept zero-based timesteps, strictly increasing.
    """
    _check_num_timesteps(num_timesteps)
    T = int(num_timesteps)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            k = int(section_counts[len("ddim") :])
            _check_count(k, T, section_counts)
            steps = np.arange(0, T, T // k)
            if len(steps) != k:
                raise ValueError(
                    f"{section_counts!r}: stride T//K={T // k} gives {len(steps)} steps, "
                    f"not {k}; use an int K for even spacing instead"
                )
            return steps.astype(np.int64)
        if section_counts.startswith("quad"):
            k = int(section_counts[len("quad") :])
            _check_count(k, T, section_counts)
            steps = np.unique((np.linspace(0, np.sqrt(T * 0.8), k) ** 2).astype(np.int64))
            return steps
        section_counts = [int(c) for c in section_counts.split(",")]
    if isinstance(section_counts, (int, np.integer)):
        k = int(section_counts)
        _check_count(k, T, section_counts)
        return np.unique(np.round(np.linspace(0, T - 1, k)).astype(np.int64))

    counts = list(section_counts)
    size_per, extra = divmod(T, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        _check_count(count, size, section_counts)
        stride = (size - 1) / (count - 1) if count > 1 else 1
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return np.asarray(kept, dtype=np.int64)


def spaced_timesteps(betas, num_steps: int, spacing: str) -> np.ndarray:
    """The ``num_steps`` timesteps a K-step sampler of the process ``betas`` visits (sorted, int64).

    Args:
        betas: the ``[T]`` betas of the process the network was trained on.
        num_steps: K in ``[1, T]``; K = T gives every timestep, K = 1 the top one, T - 1,
            whatever the spacing.
        spacing: one of ``SPACINGS``; with ``j = 0 .. K - 1``, the targets are
            - ``even``: ``linspace(0, T - 1, K)`` (as ``space_timesteps(T, K)``);
            - ``quad``: ``linspace(0, sqrt(T - 1), K) ** 2``, dense near t = 0, both ends kept
              (unlike ``"quadK"`` of ``space_timesteps``, DDIM's CIFAR-10 choice, which stops at
              0.8 T);
            - ``logsnr``: uniform in ``log(abar / (1 - abar))`` from t = T - 1 to t = 0, each
              target the timestep (interpolated linearly between integers) of that log-SNR;
            - ``trailing``: ``T (j + 1) / K - 1`` (Lin et al. 2024): from T - 1 down to
              ``T / K - 1``, so the sampler's final x0 prediction comes from that step, not t = 0.

    Returns:
        int64 ``[K]``, strictly increasing: the targets rounded to the nearest integer; where
        rounding makes neighbours collide (dense ends, K close to T), they move to the nearest
        free timesteps, ``t_j = j + clip(cummax(round(target_j) - j), 0, T - K)``, rather than
        being dropped, so the chain has exactly K steps.
    """
    betas = np.asarray(betas, dtype=np.float64)
    T = betas.shape[0]
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an int, got {num_steps!r}")
    _check_count(num_steps, T, f"{spacing} spacing")
    K, j = int(num_steps), np.arange(num_steps)
    if K == 1:
        return np.array([T - 1])
    if spacing == "even":
        targets = np.linspace(0, T - 1, K)
    elif spacing == "quad":
        targets = np.linspace(0, np.sqrt(T - 1), K) ** 2
    elif spacing == "logsnr":
        abar = np.cumprod(1.0 - betas)
        log_snr = np.log(abar) - np.log1p(-abar)  # decreasing in t
        wanted = np.linspace(log_snr[0], log_snr[-1], K)
        targets = np.interp(-wanted, -log_snr, np.arange(T))
    else:
        targets = T * (j + 1) / K - 1
    shift = np.maximum.accumulate(np.round(targets).astype(np.int64) - j)
    return j + np.clip(shift, 0, T - K)


def _check_count(count: int, available: int, spec) -> None:
    if not 1 <= count <= available:
        raise ValueError(f"Respacing {spec!r}: cannot keep {count} of {available} steps")


def respace(betas, use_timesteps) -> Schedule:
    """The schedule of the process that visits only ``use_timesteps`` of the original one.

    New betas come from the kept ``alphas_cumprod``: ``beta'_i = 1 - abar[k_i] / abar[k_{i-1}]``
    (``abar[k_{-1}] = 1``), so ``q(x_{k_i} | x_0)`` is unchanged. The returned ``timestep_map`` maps
    new step i to the original ``k_i`` the network must be conditioned on.
    """
    betas = np.asarray(betas, dtype=np.float64)
    kept = np.asarray(sorted(set(int(t) for t in np.asarray(use_timesteps).ravel())))
    if kept.size == 0 or kept[0] < 0 or kept[-1] >= betas.shape[0]:
        raise ValueError(
            f"use_timesteps must be non-empty and within [0, {betas.shape[0]}), "
            f"got {use_timesteps!r}"
        )
    abar = np.cumprod(1.0 - betas)[kept]
    new_betas = 1.0 - abar / np.append(1.0, abar[:-1])
    return Schedule.from_betas(new_betas, timestep_map=kept)
