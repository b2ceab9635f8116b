"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", section 3 and appendix C): the EMA of any length, chosen after training.

    python -m diffusion_jax.posthoc_ema --workdir=RUN --sigma_rel=0.08 [--step=N] [--out=DIR]
    python -m diffusion_jax.evaluate --workdir=RUN/posthoc_ema/sigma_rel0.08 --mode=sample \\
        --mode=fid

Profiles. Steps ``t`` are one-based: ``theta_t`` are the parameters after ``t`` updates. The
power-function EMA of exponent ``gamma > -1`` is tracked by ``ema_t = beta_t ema_{t-1} + (1 -
beta_t) theta_t`` with ``beta_t = (1 - 1/t)^(gamma + 1)`` (``beta_1 = 0``: the initial
parameters get no weight). It weighs ``theta_tau`` by ``(tau^(gamma+1) - (tau-1)^(gamma+1)) /
t^(gamma+1)``, exactly the integral over ``(tau - 1, tau]`` of the continuous profile ``p_t(s)
= (gamma + 1) s^gamma / t^(gamma + 1)`` on ``[0, t]``: the discrete EMA is the continuous
profile applied to the trajectory held constant between updates, so everything below is exact
for the EMAs training tracks. A profile's length is its relative standard deviation
``sigma_rel``, the standard deviation of ``p_t`` divided by ``t`` (a fraction of the training
so far, independent of ``t``): ``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))``.
It is largest, ``MAX_SIGMA_REL`` = 0.3003, at ``gamma = (sqrt(5) - 3) / 2``; EDM2's 0.05 and
0.10 are ``gamma`` 16.97 and 6.94.

Training (``training.posthoc_ema_stds``, ``training.posthoc_ema_every``) tracks one profile
per ``sigma_rel`` in the train state and writes each to ``WORKDIR/posthoc_ema/`` every
``posthoc_ema_every`` steps and at the last step: one ``.npz`` per snapshot, named by its step
and ``sigma_rel`` (``write_snapshots``).

Reconstruction. The snapshots ``i`` (step ``t_i``, exponent ``gamma_i``) up to step ``N`` are
combined with the coefficients ``x`` that minimise the L2 distance between ``sum_i x_i
p_{t_i, gamma_i}`` and the target profile ``p_{N, gamma}`` (their inner products in closed
form, ``inner_products``), scaled to sum to 1 so that the result is an average of parameters.
The combined parameters then differ from the target EMA by ``integral r(s) (theta(s) - c) ds``
for the residual profile ``r`` and any constant ``c``: at most ``|r| |theta - c|`` (L2).
The command refuses a ``sigma_rel`` whose relative residual ``|r| / |p_{N, gamma}|`` would
exceed ``MAX_RELATIVE_RESIDUAL`` and names the range around the stored profiles where it does
not (``reconstructable_range``): from EDM2's two profiles and 20 snapshots of each, evenly
spaced, 0.0246 to 0.244; from 15, 0.0287 to 0.229. (With a few snapshots only, values between
the stored profiles can be refused too: from both profiles at the last step only, 0.07.)

The reconstruction is written as a workdir that the evaluation program reads like a run's: its
``checkpoints/<N>`` holds the reconstructed parameters as ``ema_params`` and the run's config
(``checkpointing.save_ema_params``), ``reconstruction_step<N>.json`` what they were made
from. It runs on one process; training writes the snapshots from any number.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

# sigma_rel of the widest profile, at gamma = (sqrt(5) - 3) / 2 where d sigma_rel / d gamma = 0.
MAX_SIGMA_REL = 0.30028310600077757
# Largest |r| / |p_target| (L2) of a reconstruction the command writes: the reconstructed
# profile within 5% of the target's, where EDM2's two profiles (0.05 and 0.10) differ by 47%
# and 69% of their norms.
MAX_RELATIVE_RESIDUAL = 0.05
SNAPSHOT_DIR = "posthoc_ema"
_SNAPSHOT_NAME = re.compile(r"(\d+)_sigma_rel(.+)\.npz")


def gamma_to_sigma_rel(gamma):
    """``sigma_rel`` (fraction of the training so far) of the profile of exponent ``gamma``
    (> -1; float or array)."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel):
    """The exponent ``gamma`` of the profile of relative standard deviation ``sigma_rel`` (in
    ``(0, MAX_SIGMA_REL]``; float or array): the largest root of ``gamma^3 + 7 gamma^2 + (16 -
    s) gamma + (12 - s) = 0``, ``s = sigma_rel^-2`` (EDM2's cubic; the other roots give
    ``gamma < (sqrt(5) - 3) / 2``, the profiles that narrow again towards ``gamma = -1``).

    In that range the cubic has three real roots; the largest, by the trigonometric solution
    of its depressed form ``u^3 + p u + q`` (``gamma = u - 7/3``), is ``2 sqrt(-p/3)
    cos(arccos(3q / (2p) sqrt(-3/p)) / 3)``.
    """
    s = np.float64(sigma_rel) ** -2
    p = -(1 + 3 * s) / 3
    q = (2 + 36 * s) / 27
    # Rounding may take the argument a hair beyond -1 at MAX_SIGMA_REL, where two roots meet.
    angle = np.arccos(np.clip(1.5 * q / p * np.sqrt(-3 / p), -1.0, 1.0))
    return 2 * np.sqrt(-p / 3) * np.cos(angle / 3) - 7 / 3


def update(profile, params, t, gamma: float):
    """One step of the power-function EMA: ``beta profile + (1 - beta) params`` leaf by leaf,
    ``beta = (1 - 1/t)^(gamma + 1)`` at the one-based step ``t`` (``params`` are those after
    ``t`` updates; a traced scalar is fine).

    ``beta`` and ``1 - beta`` come from ``log1p`` and ``expm1``: in float32, ``1 - 1/t`` itself
    would carry a relative error of ``6e-8 t`` into ``1 - beta`` (5% at step 800,000).
    """
    log_beta = (gamma + 1) * jnp.log1p(-1.0 / jnp.asarray(t, jnp.float32))
    beta, one_minus_beta = jnp.exp(log_beta), -jnp.expm1(log_beta)
    return jax.tree_util.tree_map(lambda e, p: beta * e + one_minus_beta * p, profile, params)


def inner_products(t_a, gamma_a, t_b, gamma_b):
    """``integral p_{t_a, gamma_a}(s) p_{t_b, gamma_b}(s) ds`` of the continuous profiles
    (steps ``t`` > 0, exponents ``gamma`` > -1; arrays broadcast). With ``t_a <= t_b``:
    ``(gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) t_b) (t_a / t_b)^gamma_b``."""
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(*map(np.float64, (t_a, gamma_a, t_b, gamma_b)))
    later = np.maximum(t_a, t_b)
    gamma_later = np.where(t_a >= t_b, gamma_a, gamma_b)
    ratio = np.minimum(t_a, t_b) / later
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * later) * ratio**gamma_later


def solve(snapshot_steps, snapshot_sigma_rels, step: int, sigma_rel: float):
    """``(coefficients [N], relative_residual)``: the least-squares combination of the snapshot
    profiles (steps ``[N]``, one-based, and their ``sigma_rel`` ``[N]``) closest to the profile
    of ``sigma_rel`` at ``step``, scaled to sum to 1, and the L2 norm of what it misses
    relative to that profile's."""
    steps = np.float64(snapshot_steps)
    gammas = sigma_rel_to_gamma(np.float64(snapshot_sigma_rels))
    gamma = sigma_rel_to_gamma(sigma_rel)
    gram = inner_products(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    target = inner_products(steps, gammas, step, gamma)
    coefficients = np.linalg.lstsq(gram, target, rcond=None)[0]
    coefficients = coefficients / np.sum(coefficients)
    norm2 = inner_products(step, gamma, step, gamma)
    residual2 = coefficients @ gram @ coefficients - 2 * coefficients @ target + norm2
    return coefficients, float(np.sqrt(max(residual2, 0.0) / norm2))


def reconstructable_range(snapshot_steps, snapshot_sigma_rels, step: int) -> tuple[float, float]:
    """``(lowest, highest)`` ``sigma_rel`` at ``step`` whose relative residual (``solve``) is at
    most ``MAX_RELATIVE_RESIDUAL``: bisected (in log sigma_rel, to 1e-4 relative) below the
    narrowest snapshot profile and above the widest, whose own residual is 0 when they were
    taken at ``step``, and which it grows away from."""

    def fits(sigma):
        return solve(snapshot_steps, snapshot_sigma_rels, step, sigma)[1] <= MAX_RELATIVE_RESIDUAL

    def edge(inside, outside):
        if fits(outside):
            return outside
        while abs(math.log(outside / inside)) > 1e-4:
            middle = math.sqrt(inside * outside)
            inside, outside = (middle, outside) if fits(middle) else (inside, middle)
        return inside

    sigmas = np.float64(snapshot_sigma_rels)
    return edge(float(sigmas.min()), 1e-4), edge(float(sigmas.max()), MAX_SIGMA_REL)


def combine(trees, coefficients):
    """``sum_i coefficients[i] trees[i]`` leaf by leaf, accumulated in float64 and returned in
    the leaves' dtype; ``trees`` may be an iterator (one tree in memory at a time)."""
    total, dtypes = None, None
    for tree, coefficient in zip(trees, coefficients, strict=True):
        scaled = jax.tree_util.tree_map(lambda x, c=coefficient: c * np.float64(x), tree)
        if total is None:
            total, dtypes = scaled, jax.tree_util.tree_map(lambda x: np.asarray(x).dtype, tree)
        else:
            total = jax.tree_util.tree_map(np.add, total, scaled)
    return jax.tree_util.tree_map(lambda x, dtype: x.astype(dtype), total, dtypes)


def snapshot_path(workdir, step: int, sigma_rel: float):
    """``WORKDIR/posthoc_ema/<step, 9 digits>_sigma_rel<repr of sigma_rel>.npz``."""
    from etils import epath

    return epath.Path(workdir) / SNAPSHOT_DIR / f"{step:09d}_sigma_rel{sigma_rel!r}.npz"


def write_snapshots(workdir, step: int, profiles, sigma_rels) -> None:
    """Writes ``profiles[k]`` (the train state's ``posthoc_ema``: parameter trees, sharded as
    in training) as the snapshot of ``sigma_rels[k]`` at ``step``, each file atomically,
    flattened to ``"a/b/kernel"`` keys. A snapshot that exists is left as it is (a resumed run
    recomputes the same values). Every process must call it: it gathers the parameters
    (``process_allgather``) and process 0 writes; all processes see the same files."""
    from flax import traverse_util
    from jax.experimental import multihost_utils

    from diffusion_jax.evaluators import common

    for profile, sigma_rel in zip(profiles, sigma_rels, strict=True):
        path = snapshot_path(workdir, step, sigma_rel)
        if path.exists():
            continue
        gathered = multihost_utils.process_allgather(profile, tiled=True)
        if jax.process_index() == 0:
            flat = traverse_util.flatten_dict(jax.device_get(gathered), sep="/")
            common.write_atomically(path, common.npz_bytes(**flat))


def list_snapshots(workdir) -> list[tuple[int, float, object]]:
    """``[(step, sigma_rel, path)]`` of the snapshots in ``WORKDIR/posthoc_ema``, by step."""
    from etils import epath

    found = []
    directory = epath.Path(workdir) / SNAPSHOT_DIR
    for path in directory.glob("*.npz") if directory.exists() else ():
        if match := _SNAPSHOT_NAME.fullmatch(path.name):
            found.append((int(match[1]), float(match[2]), path))
    return sorted(found, key=lambda item: (item[0], item[1]))


def read_snapshot(path):
    """The parameter tree (nested dicts of float32 arrays) of the snapshot file ``path``."""
    from flax import traverse_util

    from diffusion_jax.evaluators import common

    return traverse_util.unflatten_dict(common.read_npz(path), sep="/")


def reconstruct(workdir, sigma_rel: float, step: int | None = None, out=None) -> dict:
    """Writes the parameters of the profile of ``sigma_rel`` at ``step`` (a snapshot's step;
    None: the last) combined from ``workdir``'s snapshots up to ``step`` as the EMA parameters
    of checkpoint ``step`` of the workdir ``out`` (None: ``WORKDIR/posthoc_ema/sigma_rel<σ>``),
    with the config of ``workdir``'s latest checkpoint; returns what
    ``reconstruction_step<N>.json`` records. Raises ConfigError (one line) for a step without
    snapshots or a ``sigma_rel`` out of ``reconstructable_range``. A reconstruction that
    exists is left as it is."""
    from etils import epath

    from diffusion_jax import checkpointing, config_lib, pretrained
    from diffusion_jax.evaluators import common

    snapshots = list_snapshots(workdir)
    if not snapshots:
        raise config_lib.ConfigError(
            f"No post-hoc EMA snapshots in {epath.Path(workdir) / SNAPSHOT_DIR}: train with "
            "training.posthoc_ema_stds set"
        )
    steps = sorted({s for s, _, _ in snapshots})
    step = steps[-1] if step is None else step
    if step not in steps:
        raise config_lib.ConfigError(
            f"--step={step} has no post-hoc EMA snapshots; snapshot steps: "
            f"{', '.join(map(str, steps))}"
        )
    used = [(s, sigma, path) for s, sigma, path in snapshots if s <= step]
    used_steps, used_sigmas = [s for s, _, _ in used], [sigma for _, sigma, _ in used]
    residual = math.inf
    if 0 < sigma_rel <= MAX_SIGMA_REL:
        coefficients, residual = solve(used_steps, used_sigmas, step, sigma_rel)
    if not residual <= MAX_RELATIVE_RESIDUAL:
        lowest, highest = reconstructable_range(used_steps, used_sigmas, step)
        raise config_lib.ConfigError(
            f"--sigma_rel={sigma_rel} is not reconstructed by the {len(used)} snapshots up to "
            f"step {step} (relative residual of its profile {residual:.3g} > "
            f"{MAX_RELATIVE_RESIDUAL}); they reconstruct [{lowest:.4f}, {highest:.4f}]"
        )
    out = epath.Path(workdir) / SNAPSHOT_DIR / f"sigma_rel{sigma_rel!r}" if out is None else out
    record = {
        "workdir": str(workdir),
        "sigma_rel": sigma_rel,
        "gamma": float(sigma_rel_to_gamma(sigma_rel)),
        "step": step,
        "relative_residual": residual,
        "snapshots": [
            {"step": s, "sigma_rel": sigma, "coefficient": float(c)}
            for (s, sigma, _), c in zip(used, coefficients, strict=True)
        ],
        "out": str(out),
    }
    writer = checkpointing.Checkpointer(out, keep=None, async_save=False)  # every step's
    try:
        if step in writer.all_steps():
            return record
        config, _ = pretrained.load_config(workdir, None)
        params = combine((read_snapshot(path) for _, _, path in used), coefficients)
        writer.save_ema_params(step, params, config)
    finally:
        writer.close()
    common.write_json(epath.Path(out) / f"reconstruction_step{step}.json", record)
    return record


def main(argv, flag_values):
    """The command (its flags: ``_define_flags``)."""
    from absl import app

    from diffusion_jax import checkpointing, config_lib, runtime

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if flag_values.workdir is None or flag_values.sigma_rel is None:
        raise app.UsageError("--workdir and --sigma_rel are required")
    runtime.init_runtime()

    def run():
        record = reconstruct(
            flag_values.workdir, flag_values.sigma_rel, flag_values.step, flag_values.out
        )
        print(
            f"sigma_rel {record['sigma_rel']} (gamma {record['gamma']:.3f}) at step "
            f"{record['step']} from {len(record['snapshots'])} snapshots, relative residual "
            f"{record['relative_residual']:.2g} -> {record['out']}",
            flush=True,
        )

    runtime.run_or_exit(run, (config_lib.ConfigError, checkpointing.CheckpointError, OSError))


def _define_flags():
    """The command's flags; defined only when it runs (the training program, which imports this
    module, has its own ``--workdir``)."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "A training workdir with post-hoc EMA snapshots.")
    flags.DEFINE_float("sigma_rel", None, "Relative standard deviation of the EMA to build.")
    flags.DEFINE_integer("step", None, "A snapshot step to reconstruct at; default: the last.")
    flags.DEFINE_string("out", None, "Output workdir; default: WORKDIR/posthoc_ema/sigma_rel<σ>.")
    return flags.FLAGS


if __name__ == "__main__":
    from absl import app

    from diffusion_jax import runtime

    _flags = _define_flags()
    app.run(lambda argv: main(argv, _flags), flags_parser=runtime.parse_flags)
