"""``mode=sample``: ``eval.num_samples`` samples as uint8 ``.npz`` shards, resumable.

Shard ``k`` (``shard_<k>.npz``, key ``images``, uint8 ``[n, H, W, C]``) holds samples
``k * eval.batch_size ...`` generated in one sharded call of ``generate``; a shard is written
atomically, so a killed run keeps its finished shards and a rerun continues with the next one.
Sample ``i``'s noise is keyed by ``i`` and ``eval.seed``, so the set is the same whatever the
device or process count. ``meta.json`` records what the samples came from; a rerun with other
settings stops instead of mixing two sets. Also writes a PNG grid of the first 100 samples
(one row per class for labelled samples) next to the directory: ``<directory>.png``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath

from diffusion_jax import (
    checkpointing,
    config_defaults,
    config_lib,
    generate,
    input_pipeline,
    latents,
    pretrained,
    reporting,
)
from diffusion_jax.evaluators import common

SHARD_PATTERN = "shard_*.npz"
GRID_SIZE = 100  # 10 x 10; with labels, 10 per class of 10


def sample_dir(ctx: common.Context) -> epath.Path:
    """``eval.sample_dir``, or ``eval/samples_step<N>`` of the workdir."""
    if ctx.config.eval.sample_dir:
        return epath.Path(ctx.config.eval.sample_dir)
    return ctx.eval_dir / f"samples_step{ctx.step}"


def _meta(ctx: common.Context, guide) -> dict:
    cfg = ctx.config
    meta = {
        "workdir": str(checkpointing.absolute(ctx.workdir)),
        "step": ctx.step,
        "num_samples": cfg.eval.num_samples,
        "batch_size": cfg.eval.batch_size,
        "seed": cfg.eval.seed,
        "sampling": _sampling_settings(cfg.sampling),
    }
    if cfg.sampling.guidance == "classifier":
        meta["classifier_step"] = guide.step
    elif guide is not None:  # the step and run that "" and 0 (this run, the latest) stand for
        meta["guide_workdir"] = str(checkpointing.absolute(guide.workdir))
        meta["guide_step"] = guide.step
    return meta


def _sampling_settings(sampling) -> dict:
    """The ``sampling`` group but its preview size, in its JSON form (tuples as lists), as
    meta.json gives it back."""
    return {k: v for k, v in json.loads(sampling.to_json()).items() if k != "num_samples"}


def _check_meta(directory: epath.Path, meta: dict) -> None:
    path = directory / "meta.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    # A directory made before a sampling key existed was made with the key's default (which
    # keeps the sampler as it was).
    defaults = _sampling_settings(config_defaults.get_config().sampling)
    saved["sampling"] = {**defaults, **saved.get("sampling", {})}
    common.check_same_settings(
        directory,
        saved,
        meta,
        "Use another eval.sample_dir, or delete it to start over.",
    )


@dataclasses.dataclass(frozen=True)
class Sampler:
    """``eval.num_samples`` samples of a run in shards of ``eval.batch_size`` (``counts``: the
    samples of each), from one compiled program (``generate.make_generate_fn``) of ``counts[0]``
    samples: fewer samples than a batch are all it computes; the short last shard of several
    computes a whole batch rather than compile a second program."""

    config: Any
    counts: list[int]
    generate_fn: Callable
    guide: Any
    num_classes: int | None

    def shard(self, params, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Shard ``k`` of the samples of ``params``: uint8 ``[counts[k], H, W, C]`` and their
        int32 class labels (None without labels). Every process must call it."""
        first = k * self.config.eval.batch_size
        rng = jax.random.PRNGKey(self.config.eval.seed)
        images = generate.to_host(self.generate_fn(params, rng, first))[: self.counts[k]]
        labels = generate.sample_labels(
            self.config, self.num_classes, first + np.arange(self.counts[k])
        )
        return generate.to_uint8(images), labels

    def all(self, params) -> tuple[np.ndarray, np.ndarray | None]:
        """Every shard of ``params``'s samples, concatenated (no files)."""
        shards = [self.shard(params, k) for k in range(len(self.counts))]
        images = np.concatenate([images for images, _ in shards])
        labels = None if shards[0][1] is None else np.concatenate([y for _, y in shards])
        return images, labels


def make_sampler(ctx: common.Context) -> Sampler:
    """The ``Sampler`` of ``ctx``'s config, model and mesh (and its guide: the classifier of
    classifier guidance or the weak model of autoguidance; and its latent decoder), compiled on
    its first call."""
    cfg = ctx.config
    num, batch_size = cfg.eval.num_samples, cfg.eval.batch_size
    num_classes = input_pipeline.dataset_spec(cfg.data)[1]
    config_lib.check_sampling_labels(cfg, num_classes)
    guide = pretrained.load_guide(cfg, ctx.mesh, ctx.workdir)
    counts = [min(batch_size, num - start) for start in range(0, num, batch_size)]
    generate_fn = generate.make_generate_fn(
        cfg,
        ctx.model,
        ctx.mesh,
        ctx.param_sharding,
        counts[0],
        guide,
        latents.load_decoder(cfg, ctx.mesh),
    )
    return Sampler(cfg, counts, generate_fn, guide, num_classes)


def run(ctx: common.Context) -> dict:
    cfg = ctx.config
    num = cfg.eval.num_samples
    directory = sample_dir(ctx)
    sampler = make_sampler(ctx)
    meta = _meta(ctx, sampler.guide)
    _check_meta(directory, meta)
    if ctx.is_main:
        common.write_json(directory / "meta.json", meta)
    counts = sampler.counts
    paths = [directory / f"shard_{k:06d}.npz" for k in range(len(counts))]
    # Every process decides from the same files (a shared file system), so all of them take
    # part in the same sharded calls.
    todo = [k for k, path in enumerate(paths) if not path.exists()]
    progress = common.Progress("sample", num, "samples", done=num - sum(counts[k] for k in todo))
    for k in todo:
        images, labels = sampler.shard(ctx.params, k)
        if ctx.is_main:
            arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
            common.write_atomically(paths[k], common.npz_bytes(**arrays))
        progress.update(min(num, (k + 1) * cfg.eval.batch_size))
    grid_path = directory.parent / f"{directory.name}.png"  # eval/samples_step<N>.png by default
    if ctx.is_main:
        grid, labels = load_samples(directory, limit=GRID_SIZE, with_labels=True)
        reporting.save_sample_grid(grid_path, grid.astype(np.float32) / 127.5 - 1.0, labels)
    return {
        "num_samples": num,
        "sample_dir": str(directory),
        "num_shards": len(counts),
        "shards_generated_now": len(todo),
        "samples_per_s": progress.rate(num) if todo else None,
        "grid": str(grid_path),
        "sampling": meta["sampling"],
        "num_evaluations": config_lib.num_evaluations(cfg),  # network evaluations per sample
    }


def load_samples(directory, limit: int | None = None, *, with_labels: bool = False):
    """The uint8 ``[N, H, W, C]`` samples of ``directory``'s shards in order (at most
    ``limit``); with ``with_labels``, ``(samples, labels)``: their int32 ``[N]`` class labels,
    or None for samples generated without labels. Raises ValueError for a directory without
    shards, with mixed image shapes or with labels for some shards only."""
    directory = epath.Path(directory)
    paths = sorted(directory.glob(SHARD_PATTERN))
    if not paths:
        raise ValueError(f"No sample shards ({SHARD_PATTERN}) in {directory}")
    chunks, label_chunks, total = [], [], 0
    for path in paths:
        try:
            arrays = common.read_npz(path)
            images = arrays["images"]
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"Cannot read samples from {path}: {e}") from e
        if chunks and ("labels" in arrays) != bool(label_chunks):
            raise ValueError(f"{path}: some shards of {directory} have labels, others not")
        if "labels" in arrays:
            label_chunks.append(arrays["labels"])
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"{path}: 'images' must be uint8 [n, H, W, C], got {images.dtype} "
                f"{list(images.shape)}"
            )
        if chunks and images.shape[1:] != chunks[0].shape[1:]:
            raise ValueError(
                f"{path} holds images of shape {images.shape[1:]}, others {chunks[0].shape[1:]}"
            )
        chunks.append(images)
        total += len(images)
        if limit is not None and total >= limit:
            break
    images = np.concatenate(chunks)[:limit]
    if not with_labels:
        return images
    return images, np.concatenate(label_chunks)[:limit] if label_chunks else None


def summary(result: dict) -> str:
    sampling = result["sampling"]
    steps = sampling["num_steps"] or "all"
    return (
        f"{result['num_samples']} samples ({sampling['method']}, {steps} steps, "
        f"{result['num_evaluations']} network evaluations each) in "
        f"{result['sample_dir']}; grid {result['grid']}"
    )
