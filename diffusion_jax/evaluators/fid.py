"""``mode=fid``: FID, Inception Score, KID and precision/recall of a sample directory.

Samples (the ``sample`` mode's uint8 shards, or any directory of such shards:
``eval.sample_dir``) and the reference split (``eval.reference_split`` of ``data.name``) go
through the same feature network, sharded over every device of every process:

  - RGB data: Inception-v3 with the 2015-12-05 FID weights (``eval.inception_weights``), pool3
    features for FID/KID/precision/recall and its logits for the Inception Score;
  - the embedded digits: the project's digits classifier (``digits_classifier``), trained
    deterministically on the train split in seconds, so quality is measurable on any CPU; its
    features and logits take the place of Inception's, and the result also holds the
    classifier's test accuracy and the value real held-out digits get;
  - with ``eval.dinov2_weights``, besides: DINOv2 ViT-L/14 (``dinov2``), whose CLS features
    give FD-DINOv2 (``fd_dinov2``), the Fréchet distance EDM2 reports beside FID.

Feature statistics accumulate in float64 per process and are merged across processes. The
reference features are computed once and cached in ``eval.reference_dir`` under a name made of
the data set (``input_pipeline.data_set_id``: a folder's names its path and files), split, image
shape and feature network; the network's name holds a digest of its weights (any Inception or
DINOv2 file can be given), so features of other weights are never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import config_lib, generate, input_pipeline, metrics, sharding
from diffusion_jax.evaluators import common, samples

DEFAULT_REFERENCE_DIR = epath.Path("~/.cache/diffusion_jax/reference")
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
    """``fn(params, images uint8 [B, H, W, C]) -> {"features": [B, D], "logits": [B, K]}``;
    ``logits`` only for a classifier (the Inception Score, the digits' label agreement)."""

    name: str
    fn: Callable
    params: Any


def feature_network(ctx: common.Context) -> FeatureNetwork:
    """The digits classifier for the digits, Inception-v3 for everything else."""
    cfg = ctx.config
    if cfg.data.name == "digits":
        from diffusion_jax import digits_classifier

        def digits_fn(params, images):
            return digits_classifier.features(params, images)

        params = digits_classifier.load_or_train(cache_dir=reference_dir(ctx))
        name = f"digits-classifier-{digits_classifier.recipe_key()}"
        return FeatureNetwork(name, digits_fn, params)
    check_feature_network(cfg)
    from diffusion_jax import inception

    def inception_fn(params, images):
        out = inception.features(params, images)
        return {"features": out["pool3"], "logits": out["logits"]}

    params = inception.load_params(cfg.eval.inception_weights)
    return FeatureNetwork(f"inception-2015-12-05-{_digest(params)}", inception_fn, params)


def dinov2_network(ctx: common.Context) -> FeatureNetwork | None:
    """DINOv2 from ``eval.dinov2_weights`` (its CLS features, for FD-DINOv2); None when the key
    is empty."""
    path = ctx.config.eval.dinov2_weights
    if not path:
        return None
    from diffusion_jax import dinov2

    params, config = dinov2.load_params(path)

    def dinov2_fn(params, images):
        return {"features": dinov2.features(params, images, config)}

    return FeatureNetwork(f"dinov2-{_digest(params, config)}", dinov2_fn, params)


def _digest(params, config=None) -> str:
    """16 hex digits of SHA-256 over the network's sizes (``config``, if any) and weights
    (float32 bytes)."""
    h = hashlib.sha256(repr(config).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(leaf, np.float32).tobytes())
    return h.hexdigest()[:16]


def check_feature_network(config) -> None:
    """Raises ``ConfigError`` (one line) when ``config``'s images have no feature network:
    RGB images other than the digits need ``eval.inception_weights``."""
    if config.data.name == "digits":
        return
    if config.data.channels != 3:
        raise config_lib.ConfigError(
            f"mode=fid scores RGB images with Inception-v3; data.channels is {config.data.channels}"
        )
    if not config.eval.inception_weights:
        raise config_lib.ConfigError(
            "Config key 'eval.inception_weights' is empty: mode=fid needs the FID Inception "
            f"weights, e.g. {WEIGHTS_URL} (or an .npz made from it by "
            "`python -m diffusion_jax.inception convert IN.pth OUT.npz`)"
        )


def reference_dir(ctx: common.Context) -> epath.Path:
    return epath.Path(ctx.config.eval.reference_dir or DEFAULT_REFERENCE_DIR).expanduser()


def _local_rows(ctx: common.Context, batch: np.ndarray) -> np.ndarray:
    """This process's rows of a global batch (the split ``sharding.global_batch`` expects)."""
    rows = len(batch) // jax.process_count()
    return batch[jax.process_index() * rows : (jax.process_index() + 1) * rows]


def features_fn(ctx: common.Context, net: FeatureNetwork) -> Callable:
    """``fn(images) -> net.fn's outputs`` of global uint8 batches sharded over ``ctx.mesh``,
    ``net``'s parameters replicated: one compiled program for every batch of the same size."""
    replicated = sharding.replicated(ctx.mesh)
    batch_sharding = sharding.batch_sharding(ctx.mesh)
    params = jax.device_put(net.params, replicated)
    fn = jax.jit(net.fn, in_shardings=(replicated, batch_sharding), out_shardings=batch_sharding)
    return lambda images: fn(params, images)


def compute_features(ctx: common.Context, fn: Callable, batches: Iterator[dict]):
    """A feature network's outputs on host-local uint8 batches ``{"image": [L, ...], "mask":
    [L]}`` by ``fn`` (``features_fn``).

    Returns ``(outputs, stats)``: ``outputs`` holds each of the network's outputs
    (``"features"`` [N, D], ``"logits"`` [N, K] where given) with the rows of all processes
    whose mask is set, in global order, on every process; ``stats`` (float64 ``FeatureStats``
    of the features) were accumulated by each process over its own rows and merged across
    processes.
    """
    outputs, stats = {}, None
    for batch in batches:
        global_images = sharding.global_batch(ctx.mesh, batch["image"])
        out = generate.to_host(fn(global_images))
        mask = generate.to_host(sharding.global_batch(ctx.mesh, batch["mask"]))
        feats = out["features"]
        own = _local_rows(ctx, feats)[_local_rows(ctx, mask)]
        stats = metrics.FeatureStats.zeros(feats.shape[1]) if stats is None else stats
        stats = stats.update(own)
        for name, value in out.items():
            outputs.setdefault(name, []).append(value[mask])
    return {k: np.concatenate(v) for k, v in outputs.items()}, metrics.allgather_stats(stats)


def _array_batches(ctx: common.Context, images: np.ndarray) -> Iterator[dict]:
    """Host-local batches of ``eval.batch_size`` rows of ``images`` (the same on every
    process), the last padded with zeros and masked."""
    size = ctx.config.eval.batch_size
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        mask = np.arange(size) < len(chunk)
        padded = np.zeros((size,) + images.shape[1:], np.uint8)
        padded[: len(chunk)] = chunk
        yield {"image": _local_rows(ctx, padded), "mask": _local_rows(ctx, mask)}


def _split_batches(ctx: common.Context, split: str) -> Iterator[dict]:
    for batch in input_pipeline.eval_batches(
        ctx.config.data, split, global_batch_size=ctx.config.eval.batch_size
    ):
        yield {"image": generate.to_uint8(batch["image"]), "mask": batch["mask"]}


def reference_features(ctx: common.Context, net: FeatureNetwork, fn: Callable, split: str):
    """``(features, stats)`` of a data split by ``net`` (compiled as ``fn``), from the cache
    or computed and cached; ``stats`` are those of ``features`` either way (summed in one
    order: the reference's numbers are the same bit for bit, cached or not)."""
    data = ctx.config.data
    name = "-".join(
        [input_pipeline.data_set_id(data), split, "x".join(map(str, ctx.image_shape)), net.name]
    )
    path = reference_dir(ctx) / f"{name}.npz"
    if path.exists():
        features = common.read_npz(path)["features"]
        logging.info("Reference features of %s/%s from %s", data.name, split, path)
    else:
        logging.info("Computing reference features of %s/%s (in %s)", data.name, split, path)
        features = compute_features(ctx, fn, _split_batches(ctx, split))[0]["features"]
        if ctx.is_main:
            common.write_atomically(path, common.npz_bytes(features=features))
    return features, metrics.FeatureStats.zeros(features.shape[1]).update(features)


def _frechet(stats_a, stats_b) -> float:
    return metrics.frechet_distance(*stats_a.mean_and_cov(), *stats_b.mean_and_cov())


def _subset(features: np.ndarray, size: int, seed: int) -> np.ndarray:
    if len(features) <= size:
        return features
    return features[np.random.default_rng(seed).choice(len(features), size, replace=False)]


def make_scorer(ctx: common.Context) -> Callable[[np.ndarray, np.ndarray | None], dict]:
    """``score(images, labels) -> dict``: the numbers of mode=fid for samples, uint8 ``[N, H,
    W, C]`` with their int32 class labels ``[N]`` (None without), against
    ``eval.reference_split``. The feature network, its compiled program and the reference's
    features (for the digits also the test split's) are made here, once."""
    cfg = ctx.config
    net = feature_network(ctx)
    fn = features_fn(ctx, net)
    ref_split = cfg.eval.reference_split
    ref_features, ref_stats = reference_features(ctx, net, fn, ref_split)
    real_test = _digits_real_test(ctx, net, fn, ref_stats) if cfg.data.name == "digits" else None
    dinov2_net = dinov2_network(ctx)
    if dinov2_net is not None:
        dinov2_fn = features_fn(ctx, dinov2_net)
        dinov2_ref_stats = reference_features(ctx, dinov2_net, dinov2_fn, ref_split)[1]

    def score(images: np.ndarray, labels: np.ndarray | None) -> dict:
        outputs, stats = compute_features(ctx, fn, _array_batches(ctx, images))
        features, logits = outputs["features"], outputs["logits"]
        pr_size = cfg.eval.precision_recall_samples
        precision, recall = metrics.precision_recall(
            _subset(ref_features, pr_size, cfg.eval.seed),
            _subset(features, pr_size, cfg.eval.seed),
        )
        # The standard 10 splits (Salimans et al. 2016); fewer for fewer than 10 samples.
        is_mean, is_std = metrics.inception_score(logits, num_splits=min(10, len(logits)))
        kid_mean, kid_std = metrics.kernel_inception_distance(features, ref_features)
        result = {
            "fid": _frechet(stats, ref_stats),
            "inception_score": is_mean,
            "inception_score_std": is_std,
            "kid": kid_mean,
            "kid_std": kid_std,
            "precision": precision,
            "recall": recall,
            "num_samples": len(images),
            "feature_network": net.name,
            "reference": {"split": ref_split, "num_examples": len(ref_features)},
        }
        if dinov2_net is not None:
            dinov2_stats = compute_features(ctx, dinov2_fn, _array_batches(ctx, images))[1]
            result["fd_dinov2"] = _frechet(dinov2_stats, dinov2_ref_stats)
            result["fd_dinov2_network"] = dinov2_net.name
        if real_test is not None:
            # The distance is biased upwards at small N: the samples' at the test split's N.
            n = real_test["num_real_test"]
            same_n = metrics.FeatureStats.zeros(features.shape[1]).update(features[:n])
            result.update(real_test, fid_samples_at_real_test_n=_frechet(same_n, ref_stats))
            if labels is not None:
                result.update(_label_agreement(logits, labels))
        return result

    return score


def run(ctx: common.Context) -> dict:
    ctx = common.with_image_data(ctx)  # a model of latents is scored by its decoded images
    cfg = ctx.config
    directory = samples.sample_dir(ctx)
    images, labels = samples.load_samples(directory, limit=cfg.eval.num_samples, with_labels=True)
    if images.shape[1:] != ctx.image_shape:
        raise ValueError(
            f"Samples in {directory} are {'x'.join(map(str, images.shape[1:]))} images, but "
            f"data.image_size and data.channels of this run give "
            f"{'x'.join(map(str, ctx.image_shape))}"
        )
    if len(images) < cfg.eval.num_samples:
        logging.warning(
            "Only %d samples in %s (eval.num_samples=%d): scoring those",
            len(images),
            directory,
            cfg.eval.num_samples,
        )
    return {**make_scorer(ctx)(images, labels), "sample_dir": str(directory)}


def make_evaluate(ctx: common.Context) -> Callable[[common.Context], dict]:
    """``evaluate(ctx) -> dict`` for the training program: ``eval.num_samples`` samples of
    ``ctx.params`` generated in memory (the ``samples.Sampler`` of mode=sample: the same
    samples) and scored as ``run`` scores a sample directory. Compiles once, for every step."""
    sampler = samples.make_sampler(ctx)
    score = make_scorer(common.with_image_data(ctx))
    return lambda ctx: score(*sampler.all(ctx.params))


def _label_agreement(logits: np.ndarray, labels: np.ndarray) -> dict:
    """How often the digits classifier (trained apart from the generator, on the train split)
    names the label a sample was generated for: overall and per requested label."""
    agree = np.argmax(logits, axis=1) == labels
    return {
        "label_agreement": float(agree.mean()),
        "label_agreement_by_class": {
            int(c): float(agree[labels == c].mean()) for c in np.unique(labels)
        },
    }


def _digits_real_test(ctx, net, fn, ref_stats) -> dict:
    """What real held-out digits get, for scale: the classifier's accuracy on the test split
    and the Fréchet distance of the test split (``num_real_test`` images) to the reference."""
    from diffusion_jax import digits_classifier

    test_outputs, test_stats = compute_features(ctx, fn, _split_batches(ctx, "test"))
    return {
        "classifier_test_accuracy": digits_classifier.accuracy(net.params, "test"),
        "fid_real_test": _frechet(test_stats, ref_stats),
        "num_real_test": len(test_outputs["features"]),
    }


def summary(result: dict) -> str:
    text = (
        f"FID {result['fid']:.3f}, IS {result['inception_score']:.3f}, KID "
        f"{result['kid']:.5f}, precision {result['precision']:.3f}, recall "
        f"{result['recall']:.3f} ({result['num_samples']} samples, {result['feature_network']})"
    )
    if "fd_dinov2" in result:
        text += f", FD-DINOv2 {result['fd_dinov2']:.3f}"
    if "label_agreement" in result:
        text += f", label agreement {result['label_agreement']:.3f}"
    if "fid_real_test" in result:
        text += (
            f"; real test digits: FID {result['fid_real_test']:.3f} "
            f"(samples at the same N: {result['fid_samples_at_real_test_n']:.3f})"
        )
    return text
