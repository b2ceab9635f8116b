"""``mode=accuracy``: a noisy-image classifier's accuracy and cross-entropy over a data split,
overall and by quarter of the training distribution of noise levels.

Each example ``i`` of ``eval.split`` (all of it, or its first ``eval.num_examples``) is noised
as in training by the classifier's objective, from its own key
``fold_in(PRNGKey(eval.seed), i)``: ``t_key, noise_key = split(key)``, t drawn by
``objective.draw`` (DDPM: uniform in [0, T); EDM: log-normal sigma; flow: its t distribution),
``x_t = objective.noisy(x0, t, noise)``. The EMA classifier (``train=False``) scores x_t; the
example counts as right when its largest logit is its label's, and its cross-entropy is
``-log p(label | x_t)`` in nats. Keys depend on the index alone, so the numbers do not depend on
the batch size or on the number of devices and processes; the last batch is padded and masked.
``eval/accuracy_step<N>.npz`` keeps every example's ``t``, its ``quarter``
(``objective.quarter``: DDPM's quarter of [0, T)), ``label``, ``predicted`` and
``cross_entropy``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import generate, input_pipeline, sharding
from diffusion_jax.evaluators import common
from diffusion_jax.models.classifier import label_log_prob

# model.kind this mode evaluates (see evaluators.evaluate).
MODEL_KIND = "classifier"


def noised(objective, x0, keys):
    """``(x_t, t)`` of images ``x0`` ``[B, ...]`` from one key per example: ``t_key, noise_key =
    split(key)``, t from ``objective.draw`` (its training distribution, without importance
    sampling), the noise standard normal (the train step's draw)."""
    t_keys, noise_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    t, _ = objective.draw(t_keys)
    noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(noise_keys)
    return objective.noisy(x0, t, noise), t


def make_score_fn(ctx: common.Context):
    """Jitted ``(params, batch) -> {"t", "quarter", "predicted": int [B], "cross_entropy":
    [B]}`` with ``batch = {"image", "label", "keys"}`` global arrays sharded over the batch
    axes."""
    model, objective = ctx.model, ctx.objective
    batch_sharding = sharding.batch_sharding(ctx.mesh)

    def score(params, batch):
        x_t, t = noised(objective, batch["image"], batch["keys"])
        x_t = jax.lax.with_sharding_constraint(x_t, batch_sharding)
        logits = model.apply({"params": params}, *objective.network_inputs(x_t, t), train=False)
        return {
            "t": t,
            "quarter": objective.quarter(t).astype(jnp.int32),
            "predicted": jnp.argmax(logits, axis=-1).astype(jnp.int32),
            "cross_entropy": -label_log_prob(logits, batch["label"]),
        }

    return jax.jit(score, in_shardings=(ctx.param_sharding, batch_sharding))


def run(ctx: common.Context) -> dict:
    return make_evaluate(ctx)(ctx)


def make_evaluate(ctx: common.Context) -> Callable[[common.Context], dict]:
    """``evaluate(ctx) -> dict``: ``run`` on a context of the same run (its model, mesh and
    settings; any step and parameters), from one compiled program (``make_score_fn``)."""
    return functools.partial(_evaluate, score_fn=make_score_fn(ctx))


def _evaluate(ctx: common.Context, score_fn) -> dict:
    cfg = ctx.config
    split, batch_size = cfg.eval.split, cfg.eval.batch_size
    num_examples = common.num_examples(cfg)
    progress = common.Progress(f"accuracy on {split}", num_examples, "images")
    per_example = {
        # DDPM's timesteps are int32, the continuous objectives' noise levels float32.
        "t": np.zeros(num_examples, np.int32 if cfg.objective.name == "ddpm" else np.float32),
        "quarter": np.zeros(num_examples, np.int32),
        "label": np.zeros(num_examples, np.int32),
        "predicted": np.zeros(num_examples, np.int32),
        "cross_entropy": np.zeros(num_examples, np.float32),
    }
    count = 0
    batches = input_pipeline.eval_batches(
        cfg.data, split, global_batch_size=batch_size, num_examples=num_examples
    )
    for b, local in enumerate(batches):
        batch = common.keyed_batch(ctx, local)
        out = generate.to_host(score_fn(ctx.params, batch))
        labels = generate.to_host(batch["label"])
        index = b * batch_size + np.arange(batch_size)  # the global batch, all processes
        mask = index < num_examples
        for key, values in (*out.items(), ("label", labels)):
            per_example[key][index[mask]] = values[mask]
        count += int(mask.sum())
        progress.update(count)
    if count != num_examples:
        raise RuntimeError(f"accuracy: {count} examples evaluated, expected {num_examples}")

    result = {
        **summarize(per_example),
        "split": split,
        "objective": cfg.objective.name,
        "seed": cfg.eval.seed,
        "images_per_s": progress.rate(count),
    }
    if ctx.is_main:
        path = ctx.eval_dir / f"accuracy_step{ctx.step}.npz"
        common.write_atomically(path, common.npz_bytes(**per_example))
    return result


def summarize(per_example: dict) -> dict:
    """Accuracy and mean cross-entropy (nats) of per-example ``quarter``, ``label``,
    ``predicted``, ``cross_entropy``, overall and for each quarter K of the noise levels
    (``objective.quarter``), in float64; a quarter without examples gets None."""
    correct = (per_example["predicted"] == per_example["label"]).astype(np.float64)
    cross_entropy = per_example["cross_entropy"].astype(np.float64)
    quarter = per_example["quarter"]
    result = {
        "accuracy": float(correct.mean()),
        "cross_entropy": float(cross_entropy.mean()),
        "num_examples": len(correct),
    }
    for q in range(4):
        in_q = quarter == q
        n = int(in_q.sum())
        result[f"accuracy_q{q}"] = float(correct[in_q].mean()) if n else None
        result[f"cross_entropy_q{q}"] = float(cross_entropy[in_q].mean()) if n else None
        result[f"num_examples_q{q}"] = n
    return result


def summary(result: dict) -> str:
    quarters = ", ".join(
        "-" if result[f"accuracy_q{q}"] is None else f"{result[f'accuracy_q{q}']:.3f}"
        for q in range(4)
    )
    return (
        f"accuracy {result['accuracy']:.4f}, cross-entropy {result['cross_entropy']:.4f} nats on "
        f"{result['num_examples']} examples of '{result['split']}'; by quarter of t: {quarters}"
    )
