"""``mode=figures``: the DDPM paper's figures (Ho et al. 2020) from a trained model, as PNG.

Written to ``eval/figures_step<N>/``:
  - ``progressive.png`` (Fig. 6): rows are samples; columns the predicted x0 along the reverse
    chain (every tenth of the steps), the last column the sample;
  - ``shared_latent.png`` (Fig. 7): for two test images and ``t`` at 100%, 75%, 50% and 25% of
    the chain, a row: the image, its ``x_t ~ q(x_t | x0)``, then six samples of
    ``p(x0 | x_t)``;
  - ``interpolation.png`` (Fig. 9): for two pairs of test images and ``t`` at 25%, 50% and 75%,
    a row: image a, 11 decodings of ``(1 - lam) x_t^a + lam x_t^b`` (lam = 0, 0.1, .., 1) with
    shared reverse noise, image b;
  - ``rate_distortion.png`` and ``.json`` (Fig. 5): over ``eval.split``, after n reverse
    steps the rate (bits/dim received: L_prior plus the last n terms of the bound) and the
    distortion (RMSE of the x0 predicted from the current x_t, on the 0..255 scale), from the
    ``bpd`` mode's per-timestep sums (read from ``eval/bpd_step<N>.json``, else computed).
All chains run the sampler of ``sampling.*`` (its schedule, method and guidance); t is the
zero-based index of its steps. With class labels (a class-conditional model, classifier
guidance), the chains of sample i (Fig. 6), test image i (Fig. 7) and pair i (Fig. 9) get the
label generated sample i gets: label i of the cycled ``sampling.labels``
(``generate.sample_labels``). Each figure's chains, at all of its values of t, run as one
compiled program.
"""

from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax import (
    config_lib,
    diffusion,
    generate,
    input_pipeline,
    pretrained,
    reporting,
    sampling,
)
from diffusion_jax.evaluators import bpd, common

# The figures follow DDPM's discrete chain (its timesteps, its variational bound's terms).
OBJECTIVES = ("ddpm",)

NUM_PROGRESSIVE = 8
SHARED_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
NUM_SHARED_SAMPLES = 6
INTERPOLATION_FRACTIONS = (0.25, 0.5, 0.75)
LAMBDAS = np.linspace(0.0, 1.0, 11)


def _steps_at(fractions, num_steps: int) -> list[int]:
    """Zero-based steps at these fractions of the chain (1.0 is the first step, T - 1)."""
    return sorted({max(0, round(f * num_steps) - 1) for f in fractions}, reverse=True)


def _test_images(ctx: common.Context, num: int) -> np.ndarray:
    """The first ``num`` images of ``eval.split``, the same on every process."""
    batch = next(
        input_pipeline.eval_batches(
            ctx.config.data,
            ctx.config.eval.split,
            global_batch_size=num,
            process_index=0,
            process_count=1,
        )
    )
    if not batch["mask"].all():
        raise ValueError(f"figures need {num} images of split {ctx.config.eval.split!r}")
    return batch["image"]


class _Chains:
    """The sampler's chains the figures run, each jitted with the parameters (the network's
    and a guide's) and the labels as arguments."""

    def __init__(self, ctx: common.Context):
        config = ctx.config
        self.schedule = config_lib.make_sampling_schedule(config)
        self.options = config_lib.sampler_options(config)
        self.ctx = ctx
        self.num_classes = input_pipeline.dataset_spec(config.data)[1]
        self.guide = pretrained.load_guide(config, ctx.mesh, ctx.workdir)

    def _run(self, chain, indices, *args):
        """``chain(model_fn, *args)`` on the host, ``model_fn`` given the labels of samples
        ``indices`` (one per row of its batch)."""
        labels = generate.sample_labels(self.ctx.config, self.num_classes, indices)
        guide_params = self.guide and self.guide.params

        @jax.jit
        def run(params, guide_params, labels, *args):
            model_fn = generate.sampler_model_fn(
                self.ctx.config, self.ctx.model, params, labels, self.guide, guide_params
            )
            return chain(model_fn, *args)

        return generate.to_host(run(self.ctx.params, guide_params, labels, *args))

    def progressive(self, keys, record_every: int):
        """Samples ``i`` (a chain per key ``i``) and their trajectories."""

        def chain(model_fn, keys):
            shape = (keys.shape[0],) + self.ctx.image_shape
            return sampling.sample(
                model_fn, self.schedule, shape, keys, record_every=record_every, **self.options
            )

        return self._run(chain, np.arange(len(keys)), keys)

    def from_x_t(self, x_ts, keys, indices, start_steps):
        """Samples of ``p(x0 | x_t)`` for each ``x_t`` of ``x_ts`` at its step of
        ``start_steps`` (their ``keys``), in one program; row ``j`` of each with the label of
        sample ``indices[j]``."""

        def chain(model_fn, x_ts, keys):
            return [
                sampling.sample(
                    model_fn,
                    self.schedule,
                    x_t.shape,
                    keys_t,
                    x_start=x_t,
                    start_step=t,
                    **self.options,
                )
                for x_t, keys_t, t in zip(x_ts, keys, start_steps, strict=True)
            ]

        return self._run(chain, indices, x_ts, keys)

    def interpolate(self, x0_a, x0_b, rngs, start_steps):
        """``[len(LAMBDAS), B, ...]`` decodings through the latents at each step of
        ``start_steps`` (with its key of ``rngs``), in one program; pair ``i`` with the label
        of sample ``i``."""

        def chain(model_fn, x0_a, x0_b, rngs):
            return [
                sampling.interpolate(
                    model_fn,
                    self.schedule,
                    x0_a,
                    x0_b,
                    LAMBDAS,
                    rng,
                    start_step=t,
                    **self.options,
                )
                for rng, t in zip(rngs, start_steps, strict=True)
            ]

        # The chain's batch is lambda-major: row l * B + i decodes pair i.
        indices = np.tile(np.arange(len(x0_a)), len(LAMBDAS))
        return self._run(chain, indices, x0_a, x0_b, rngs)


def _progressive(chains: _Chains, seed: int, out_dir) -> str:
    num_steps = chains.schedule.num_timesteps
    every = max(1, num_steps // 10)
    keys = common.example_keys(seed, np.arange(NUM_PROGRESSIVE))
    x0, records = chains.progressive(keys, every)
    # [records, samples, ...] -> rows of samples, columns of time, the sample last.
    columns = np.concatenate([records["pred_x0"], np.clip(x0, -1, 1)[None]], axis=0)
    images = np.swapaxes(columns, 0, 1).reshape((-1,) + x0.shape[1:])
    return _save(out_dir / "progressive.png", images, cols=columns.shape[0])


def _shared_latent(chains: _Chains, images: np.ndarray, seed: int, out_dir) -> str:
    schedule = chains.schedule
    steps = _steps_at(SHARED_FRACTIONS, schedule.num_timesteps)
    x_ts, sample_keys = [], []
    for t in steps:
        t_batch = jnp.full((len(images),), t, jnp.int32)
        keys = common.example_keys(seed + t, np.arange(len(images) * (1 + NUM_SHARED_SAMPLES)))
        noise = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:]))(keys[: len(images)])
        x_ts.append(np.asarray(diffusion.q_sample(schedule, images, t_batch, noise)))
        sample_keys.append(keys[len(images) :])
    repeated = [np.repeat(x_t, NUM_SHARED_SAMPLES, axis=0) for x_t in x_ts]
    image_index = np.repeat(np.arange(len(images)), NUM_SHARED_SAMPLES)
    samples = chains.from_x_t(repeated, sample_keys, image_index, steps)
    rows = {}
    for t, x_t, samples_t in zip(steps, x_ts, samples, strict=True):
        samples_t = samples_t.reshape((len(images), NUM_SHARED_SAMPLES) + images.shape[1:])
        for i in range(len(images)):
            rows[i, t] = np.concatenate([images[i : i + 1], x_t[i : i + 1], samples_t[i]])
    grid = np.concatenate([rows[key] for key in sorted(rows, key=lambda k: (k[0], -k[1]))])
    return _save(out_dir / "shared_latent.png", grid, cols=2 + NUM_SHARED_SAMPLES)


def _interpolation(chains: _Chains, images: np.ndarray, seed: int, out_dir) -> str:
    first, second = images[0::2], images[1::2]  # pairs (0, 1) and (2, 3)
    steps = _steps_at(INTERPOLATION_FRACTIONS, chains.schedule.num_timesteps)
    rngs = [jax.random.PRNGKey(seed + t) for t in steps]
    rows = {}
    for t, decoded in zip(steps, chains.interpolate(first, second, rngs, steps), strict=True):
        for i in range(len(first)):
            rows[i, t] = np.concatenate([first[i : i + 1], decoded[:, i], second[i : i + 1]])
    grid = np.concatenate([rows[key] for key in sorted(rows, key=lambda k: (k[0], -k[1]))])
    return _save(out_dir / "interpolation.png", grid, cols=len(LAMBDAS) + 2)


def rate_distortion(terms_bpd, mse, prior_bpd: float) -> dict:
    """DDPM Fig. 5 from the bound's per-timestep means.

    Args:
      terms_bpd: ``[T]`` mean ``L_t`` (bits/dim), t zero-based; ``t = 0`` is the decoder.
      mse: ``[T]`` mean squared error (over dims and examples, [-1, 1] scale) of the x0
        predicted from ``x_t``.
      prior_bpd: mean ``L_prior`` (bits/dim).

    Returns:
      ``reverse_steps`` n = 0..T, ``rate_bpd[n]`` = bits/dim received after n reverse steps
      (``L_prior + L_{T-1} + ... + L_{T-n}``) and ``distortion_rmse[n]``, the RMSE on the
      0..255 scale of the x0 predicted from the latent held then (x at index ``T-1-n``; exact
      after the decoder's step, n = T).
    """
    terms_bpd, mse = np.asarray(terms_bpd, np.float64), np.asarray(mse, np.float64)
    num_timesteps = len(terms_bpd)
    rate = prior_bpd + np.concatenate([[0.0], np.cumsum(terms_bpd[::-1])])
    distortion = np.append(np.sqrt(mse[::-1]) * 127.5, 0.0)
    return {
        "reverse_steps": list(range(num_timesteps + 1)),
        "rate_bpd": rate.tolist(),
        "distortion_rmse": distortion.tolist(),
    }


def _bound_result(ctx: common.Context) -> dict:
    """The ``bpd`` mode's result for this step and split: from its JSON file, else computed
    now (and its JSON written)."""
    path = ctx.eval_dir / f"bpd_step{ctx.step}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        wanted = ctx.config.eval
        if saved["split"] == wanted.split and saved["config"]["eval"]["num_examples"] == (
            wanted.num_examples
        ):
            return saved
    result = bpd.run(ctx)
    common.save_result(ctx, "bpd", result)
    return result


def _plot_rate_distortion(curve: dict, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps, rate, dist = curve["reverse_steps"], curve["rate_bpd"], curve["distortion_rmse"]
    axes[0].plot(steps, dist)
    axes[0].set(xlabel="reverse steps (T - t)", ylabel="distortion (RMSE, 0..255)")
    axes[1].plot(steps, rate)
    axes[1].set(xlabel="reverse steps (T - t)", ylabel="rate (bits/dim)")
    axes[2].plot(rate, dist)
    axes[2].set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE, 0..255)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    path.write_bytes(png.getvalue())
    return str(path)


def _save(path, images, *, cols: int) -> str:
    """Writes a grid of ``cols`` columns (main process only), upscaled to >= 48 pixels."""
    if jax.process_index() == 0:
        scale = max(1, 48 // images.shape[1])
        reporting.save_png(path, np.clip(images, -1, 1), scale=scale, cols=cols)
    return str(path)


def run(ctx: common.Context) -> dict:
    seed = ctx.config.eval.seed
    out_dir = ctx.eval_dir / f"figures_step{ctx.step}"
    chains = _Chains(ctx)
    images = _test_images(ctx, 4)
    files = {
        "progressive": _progressive(chains, seed, out_dir),
        "shared_latent": _shared_latent(chains, images[:2], seed, out_dir),
        "interpolation": _interpolation(chains, images, seed, out_dir),
    }
    bound = _bound_result(ctx)
    curve = rate_distortion(bound["terms_bpd"], bound["mse"], bound["prior_bpd"])
    curve.update(split=bound["split"], num_examples=bound["num_examples"])
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        common.write_json(out_dir / "rate_distortion.json", curve)
        files["rate_distortion"] = _plot_rate_distortion(curve, out_dir / "rate_distortion.png")
    else:
        files["rate_distortion"] = str(out_dir / "rate_distortion.png")
    return {
        "figures": files,
        "total_bpd": bound["total_bpd"],
        "split": bound["split"],
        "rate_distortion_points": len(curve["reverse_steps"]),
    }


def summary(result: dict) -> str:
    directory = epath.Path(result["figures"]["progressive"]).parent
    return f"{len(result['figures'])} figures in {directory}"
