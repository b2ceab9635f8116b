"""``mode=bpd``: bits/dim over a data split, by the likelihood the objective has.

- ddpm: the full variational bound (``losses.bits_per_dim``, one scan over all T terms of the
  training process: T network evaluations per example), an upper bound on the NLL, with its
  prior, decoder and per-t terms.
- edm, flow: the probability-flow ODE's NLL of the dequantised images
  (``likelihood.ode_log_likelihood``, ``eval.ode_steps`` Heun steps: 2 evaluations and a
  Jacobian-vector product each), with its prior term; a Hutchinson estimate, unbiased for the
  log-likelihood of the dequantised data.

Each example's noise (its dequantisation and probe) is keyed by its index in the split, so the
numbers do not depend on the batch size or on the number of devices and processes. Batches are
sharded over the mesh; the last one is padded and masked. Sums over examples are kept on the host in
float64, in example order, and saved after every batch to ``eval/bpd_step<N>.partial.npz``: a
killed run restarts from the last finished batch and ends with bit-identical numbers. The
finished run leaves ``eval/bpd_step<N>.npz`` with every example's ``total_bpd``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import jax
import numpy as np

from diffusion_jax import generate, input_pipeline, likelihood, losses, sharding
from diffusion_jax import noise as noise_lib
from diffusion_jax.evaluators import common

VARIATIONAL_BOUND = "variational bound"
ODE = "probability-flow ODE"


def likelihood_kind(config) -> str:
    """Which likelihood ``mode=bpd`` computes for ``config``'s objective."""
    return VARIATIONAL_BOUND if config.objective.name == "ddpm" else ODE


def make_bound_fn(ctx: common.Context):
    """Jitted ``(params, batch) -> {"total_bpd", "prior_bpd": [B], ...}`` with ``batch =
    {"image", "label", "keys"}`` global arrays sharded over the batch axes; for the variational
    bound also ``"terms_bpd", "mse": [B, T]``."""
    config, model, objective = ctx.config, ctx.model, ctx.objective
    batch_sharding = sharding.batch_sharding(ctx.mesh)

    def network(params, y):
        def apply(x, t):
            x = jax.lax.with_sharding_constraint(x, batch_sharding)
            return model.apply({"params": params}, x, t, y, train=False)

        return apply

    def bound(params, batch):
        y = batch["label"] if model.num_classes is not None else None
        return losses.bits_per_dim(
            network(params, y),
            objective.schedule,
            batch["image"],
            batch["keys"],
            mean_type=config.diffusion.mean_type,
            var_type=config.diffusion.var_type,
            clip_denoised=config.sampling.clip_denoised,
            exact_cdf=config.eval.exact_cdf,
        )

    def ode_nll(params, batch):
        y = batch["label"] if model.num_classes is not None else None
        dequantize_keys, probe_keys = noise_lib.split(batch["keys"])
        x = likelihood.dequantize(batch["image"], dequantize_keys)
        out = likelihood.ode_log_likelihood(
            network(params, y), objective, x, probe_keys, num_steps=config.eval.ode_steps
        )
        dims = x[0].size
        # prior_bpd: the prior's -log p_T(x_T) in bits/dim, not a KL as in the bound.
        return {
            "total_bpd": likelihood.bits_per_dim(out["log_likelihood"], dims),
            "prior_bpd": -out["prior"] / (dims * np.log(2.0)),
        }

    fn = bound if likelihood_kind(config) == VARIATIONAL_BOUND else ode_nll
    return jax.jit(fn, in_shardings=(ctx.param_sharding, batch_sharding))


def _settings(ctx, num_examples: int) -> dict:
    """What the partial sums depend on; a saved partial file must match them to be resumed."""
    cfg = ctx.config
    settings = {
        "split": cfg.eval.split,
        "num_examples": num_examples,
        "batch_size": cfg.eval.batch_size,
        "seed": cfg.eval.seed,
    }
    if likelihood_kind(cfg) == VARIATIONAL_BOUND:
        settings.update(clip_denoised=cfg.sampling.clip_denoised, exact_cdf=cfg.eval.exact_cdf)
    else:
        settings.update(likelihood=ODE, ode_steps=cfg.eval.ode_steps)
    return settings


def _zero_sums(num_examples: int, num_terms: int) -> dict:
    return {
        "batches_done": np.zeros((), np.int64),
        "count": np.zeros((), np.int64),
        "total": np.zeros((), np.float64),
        "prior": np.zeros((), np.float64),
        "terms": np.zeros((num_terms,), np.float64),
        "mse": np.zeros((num_terms,), np.float64),
        "example_bpd": np.full((num_examples,), np.nan, np.float32),
    }


def _load_partial(path, settings: dict, num_examples: int, num_terms: int) -> dict:
    if not path.exists():
        return _zero_sums(num_examples, num_terms)
    sums = common.read_npz(path)
    saved_settings = json.loads(str(sums.pop("settings")))
    common.check_same_settings(
        path,
        saved_settings,
        settings,
        "Restore those settings to resume these partial sums, or delete the file to start over.",
    )
    return sums


def _save(path, sums: dict, settings: dict) -> None:
    common.write_atomically(
        path, common.npz_bytes(settings=json.dumps(settings, sort_keys=True), **sums)
    )


def run(ctx: common.Context) -> dict:
    return make_evaluate(ctx)(ctx)


def make_evaluate(ctx: common.Context) -> Callable[[common.Context], dict]:
    """``evaluate(ctx) -> dict``: ``run`` on a context of the same run (its model, mesh and
    settings; any step and parameters), from one compiled program (``make_bound_fn``)."""
    return functools.partial(_evaluate, bound_fn=make_bound_fn(ctx))


def _evaluate(ctx: common.Context, bound_fn) -> dict:
    cfg = ctx.config
    split, batch_size = cfg.eval.split, cfg.eval.batch_size
    num_examples = common.num_examples(cfg)
    kind = likelihood_kind(cfg)
    # Per-t terms of the variational bound; the ODE's NLL has none.
    num_terms = cfg.diffusion.num_timesteps if kind == VARIATIONAL_BOUND else 0
    settings = _settings(ctx, num_examples)
    partial_path = ctx.eval_dir / f"bpd_step{ctx.step}.partial.npz"
    sums = _load_partial(partial_path, settings, num_examples, num_terms)
    start = int(sums["batches_done"])

    progress = common.Progress(f"bpd on {split}", num_examples, "images", int(sums["count"]))
    batches = input_pipeline.eval_batches(
        cfg.data,
        split,
        global_batch_size=batch_size,
        num_examples=num_examples,
        start_batch=start,
    )
    for b, local in enumerate(batches, start):
        batch = common.keyed_batch(ctx, local)
        out = generate.to_host(bound_fn(ctx.params, batch))
        index = b * batch_size + np.arange(batch_size)  # the global batch, all processes
        mask = index < num_examples
        for i in np.flatnonzero(mask):  # example order: sums do not depend on the batching
            sums["total"] += np.float64(out["total_bpd"][i])
            sums["prior"] += np.float64(out["prior_bpd"][i])
            if num_terms:
                sums["terms"] += out["terms_bpd"][i].astype(np.float64)
                sums["mse"] += out["mse"][i].astype(np.float64)
        sums["example_bpd"][index[mask]] = out["total_bpd"][mask]
        sums["count"] += int(mask.sum())
        sums["batches_done"] += 1
        if ctx.is_main:
            _save(partial_path, sums, settings)
        count = int(sums["count"])
        progress.update(count, f"{sums['total'] / count:.4f} bits/dim so far")

    count = int(sums["count"])
    if count != num_examples:
        raise RuntimeError(f"bpd: {count} examples evaluated, expected {num_examples}")
    result = {
        "likelihood": kind,
        "total_bpd": float(sums["total"] / count),
        "prior_bpd": float(sums["prior"] / count),
        "num_examples": count,
        "split": split,
        "images_per_s": progress.rate(count) if count > progress.start_done else None,
    }
    if kind == VARIATIONAL_BOUND:
        result.update(
            decoder_bpd=float(sums["terms"][0] / count),
            num_timesteps=num_terms,
            terms_bpd=(sums["terms"] / count).tolist(),
            mse=(sums["mse"] / count).tolist(),
        )
    else:
        result["ode_steps"] = cfg.eval.ode_steps
    if ctx.is_main:
        _save(ctx.eval_dir / f"bpd_step{ctx.step}.npz", sums, settings)
        partial_path.unlink(missing_ok=True)
    return result


def summary(result: dict) -> str:
    where = f"{result['num_examples']} examples of '{result['split']}'"
    if result["likelihood"] == ODE:
        return (
            f"{result['total_bpd']:.4f} bits/dim (probability-flow ODE NLL of the dequantised "
            f"data, {result['ode_steps']} Heun steps) on {where} (prior term -log p_T(x_T): "
            f"{result['prior_bpd']:.3f})"
        )
    return (
        f"{result['total_bpd']:.4f} bits/dim (variational bound) on {where} (prior "
        f"{result['prior_bpd']:.5f}, decoder L_0 {result['decoder_bpd']:.4f})"
    )
