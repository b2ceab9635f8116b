"""A small digits classifier whose features give an offline FID for the 8x8 digits.

Inception features mean nothing on 8x8 gray digits, so samples of models trained on the embedded
"digits" data set are scored in the feature space of this MLP instead: the Fréchet distance
(``metrics.frechet_distance``) between the feature statistics of samples and of real digits.
The network is ``64 -> 128 -> 64 -> 10`` with ReLU; the features are the 64 ReLU activations
that feed the logits. It is trained on the "train" split only (first 1500 images), full batch
with AdamW for a fixed number of steps from a fixed seed, in a few seconds on a CPU (mostly
compilation), so every machine can rebuild the same classifier; ``load_or_train`` caches the
parameters.

Images go in as the data pipeline reads them from disk: uint8 ``[N, 8, 8, 1]``, mapped to
[-1, 1] as ``2v/255 - 1``; quantise samples first, ``uint8(clip(round(127.5 x + 127.5)))``
as ``mode=sample`` stores them (rounding, not truncation). Compare FD values only between the
same recipe (the cache file name carries its key) and the same number of samples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import uuid
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from diffusion_jax import input_pipeline, metrics

# Bump when the training code changes in a way the Recipe fields do not capture (preprocessing,
# initialisation, loss): it renames the cache files, so stale parameters are never reused.
RECIPE_VERSION = 1
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the classifier is trained. ``hidden[-1]`` is the feature dimension."""

    hidden: tuple[int, ...] = (128, 64)
    learning_rate: float = 3e-3
    weight_decay: float = 1e-3
    num_steps: int = 300


RECIPE = Recipe()

# {"w": [in, out], "b": [out]} float32 per layer, input layer first, logits layer last.
Params = list[dict[str, np.ndarray]]


def recipe_key(recipe: Recipe = RECIPE, seed: int = 0) -> str:
    """``v<RECIPE_VERSION>-<12 hex digits>``: names the cache file of (recipe, seed)."""
    spec = json.dumps([RECIPE_VERSION, seed, dataclasses.asdict(recipe)], sort_keys=True)
    return f"v{RECIPE_VERSION}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def _preprocess(images) -> jax.Array:
    """uint8 ``[N, 8, 8, 1]`` -> float32 ``[N, 64]`` in [-1, 1], as the input pipeline does."""
    x = jnp.asarray(images).astype(jnp.float32) * jnp.float32(2 / 255) - jnp.float32(1)
    return x.reshape(x.shape[0], -1)


def _forward(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x, x @ params[-1]["w"] + params[-1]["b"]


@jax.jit
def features(params: Params, images) -> dict[str, jax.Array]:
    """Features and logits of uint8 images ``[N, 8, 8, 1]`` (pure; jitted).

    Returns:
      ``{"features": float32 [N, hidden[-1]] (penultimate ReLU activations),
      "logits": float32 [N, 10]}``.
    """
    feats, logits = _forward(params, _preprocess(images))
    return {"features": feats, "logits": logits}


@functools.cache
def split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images ``[N, 8, 8, 1]``, int labels ``[N]``) of a digits split."""
    source = input_pipeline.DigitsSource(split)
    records = [source[i] for i in range(len(source))]
    images = np.stack([r["image"] for r in records])
    labels = np.asarray([r["label"] for r in records])
    return images, labels


def _init(key: jax.Array, sizes: tuple[int, ...]) -> Params:
    """He-normal weights (ReLU layers; plain 1/fan_in variance for the logits), zero biases."""
    keys = jax.random.split(key, len(sizes) - 1)
    params = []
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        gain = 1.0 if i == len(sizes) - 2 else 2.0
        w = jax.random.normal(k, (fan_in, fan_out), jnp.float32) * np.sqrt(gain / fan_in)
        params.append({"w": w, "b": jnp.zeros(fan_out, jnp.float32)})
    return params


@functools.partial(jax.jit, static_argnames="recipe")
def _train(key, images, labels, *, recipe: Recipe) -> Params:
    params = _init(key, (64, *recipe.hidden, NUM_CLASSES))
    x = _preprocess(images)
    optimizer = optax.adamw(recipe.learning_rate, weight_decay=recipe.weight_decay)

    def loss_fn(params):
        _, logits = _forward(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(
        step, (params, optimizer.init(params)), None, length=recipe.num_steps
    )
    return params


def train(seed: int = 0, *, recipe: Recipe = RECIPE) -> Params:
    """Trains the classifier on the "train" split: deterministic given (seed, recipe)."""
    images, labels = split_arrays("train")
    params = _train(jax.random.key(seed), images, labels, recipe=recipe)
    return jax.tree_util.tree_map(np.asarray, params)


def _save(params: Params, path: epath.Path) -> None:
    arrays = {f"{i}_{name}": v for i, layer in enumerate(params) for name, v in layer.items()}
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    # Write then rename: concurrent evaluations never read a half-written file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(npz.getvalue())
    tmp.replace(path)


def _load(path: epath.Path) -> Params:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
        num_layers = len(data.files) // 2
        params = [{"w": data[f"{i}_w"], "b": data[f"{i}_b"]} for i in range(num_layers)]
    if num_layers < 2 or len(data.files) != 2 * num_layers:
        raise ValueError(f"{path}: not a digits classifier ({sorted(data.files)})")
    return params


def cache_path(cache_dir, *, seed: int = 0, recipe: Recipe = RECIPE) -> epath.Path:
    """Where ``load_or_train`` keeps the parameters of (seed, recipe) under ``cache_dir``."""
    return epath.Path(cache_dir) / f"digits_classifier_{recipe_key(recipe, seed)}.npz"


def load_or_train(cache_dir=None, *, seed: int = 0, recipe: Recipe = RECIPE) -> Params:
    """The classifier of (seed, recipe): read from ``cache_dir`` if it holds it, else trained
    (and written there when ``cache_dir`` is given; an unreadable cache file is replaced)."""
    if cache_dir is None:
        return train(seed, recipe=recipe)
    path = cache_path(cache_dir, seed=seed, recipe=recipe)
    if path.exists():
        try:
            return _load(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # e.g. a file truncated by a full disk: train again and replace it
    params = train(seed, recipe=recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(params, path)
    return params


def accuracy(params: Params, split: str = "test") -> float:
    """Fraction of a digits split classified correctly."""
    images, labels = split_arrays(split)
    predicted = np.argmax(features(params, images)["logits"], axis=-1)
    return float(np.mean(predicted == labels))


def feature_stats(params: Params, images, *, batch_size: int = 4096) -> metrics.FeatureStats:
    """``metrics.FeatureStats`` of the classifier features of uint8 images ``[N, 8, 8, 1]``."""
    stats = metrics.FeatureStats.zeros(params[-1]["w"].shape[0])
    for start in range(0, len(images), batch_size):
        stats = stats.update(features(params, images[start : start + batch_size])["features"])
    return stats
