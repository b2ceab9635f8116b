"""Training input pipeline: TFDS or embedded data served through grain.

Every process builds the same deterministic stream of *global* batches and
reads only its own rows of each one:

  record indices:  range(N) -> shuffle(seed, reseeded every epoch)
                   -> batch(global_batch_size, drop_remainder) -> repeat()
  global step s:   record indices of global batch s, shape [global_batch_size]
  process p:       rows [p * L, (p + 1) * L) of it, L = global_batch_size // P

The slicing happens on indices, before any image is read, so a process never
loads another process's examples. The random flip of an example is drawn from
(seed, step, row in the global batch). Hence the global batch (the host-local
batches concatenated in process order) does not depend on the number of
processes, and an epoch never mixes with the next: each epoch serves
N // global_batch_size full batches and drops the rest.

Images are served as float32 NHWC in [-1, 1] (8-bit value v -> 2v/255 - 1).
The iterator is a grain `DatasetIterator`; `iterator_checkpoint_args` gives the
orbax args to save and restore its position.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import PIL.Image

# TFDS data sets whose images may be center-cropped and resized to
# `image_size` (their native sizes vary or exceed the trained resolution).
# All other data sets must already have exactly the configured shape.
_RESIZABLE_DATASETS = ("celeb_a_hq", "lsun")

# Distinguishes the flip random stream from other users of the same seed.
_FLIP_STREAM = 0x666C6970

# Threads per process that build batches ahead of the consumer; they overlap
# file reads (TFDS ArrayRecord) with the training step.
_READ_THREADS = 2


# The embedded digits' splits, in scikit-learn's order: the first 1500 images train, the last
# 297 are held out for likelihood and sample-quality evaluation.
DIGITS_SPLITS = {"train": slice(0, 1500), "test": slice(1500, 1797)}


class DigitsSource:
    """A split of the 8x8 handwritten digits shipped with scikit-learn (1797 images in all).

    A grain `RandomAccessDataSource` over an in-memory array: record `i` is
    `{"image": uint8 [8, 8, 1], "label": int64 scalar in [0, 10)}`. The 17 gray
    levels 0..16 map to uint8 as round(v * 255 / 16), so 0 -> 0 and 16 -> 255.
    Splits (`DIGITS_SPLITS`): "train" (1500 images) and "test" (297).
    """

    def __init__(self, split: str = "train"):
        if split not in DIGITS_SPLITS:
            raise ValueError(
                f"Data set 'digits' has no split {split!r}; valid: {', '.join(DIGITS_SPLITS)}"
            )
        images, labels = _digits_arrays()
        self.split = split
        self._images = images[DIGITS_SPLITS[split]]
        self._labels = labels[DIGITS_SPLITS[split]]

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self._images[index], "label": self._labels[index]}

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, num_records={len(self)})"


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Returns all (uint8 [1797, 8, 8, 1], int64 [1797]) from scikit-learn's file."""
    from sklearn import datasets

    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images.setflags(write=False)
    labels = digits.target.astype(np.int64)
    labels.setflags(write=False)
    return images[..., None], labels


def _is_resizable(name: str) -> bool:
    return name.split("/")[0] in _RESIZABLE_DATASETS


def _open_source(data_config: ml_collections.ConfigDict):
    """Returns a random-access source of {"image": uint8 [h, w, c], ...}.

    A TFDS data set missing from ``data_dir`` is prepared first (by process 0 of the run; see
    ``diffusion_jax.datasets``), so every process must call this.
    """
    if data_config.name == "digits":
        return DigitsSource(data_config.split)
    import tensorflow_datasets as tfds

    from diffusion_jax import datasets

    datasets.ensure_prepared(data_config)
    return tfds.data_source(
        data_config.name,
        split=data_config.split,
        data_dir=data_config.get("data_dir"),
        download=False,
    )


def _expected_shape(data_config) -> tuple[int, int, int]:
    size = data_config.image_size
    return (size, size, data_config.channels)


def _shape_error(data_config, actual_shape, actual_dtype) -> ValueError:
    at_least = " or larger" if _is_resizable(data_config.name) else ""
    return ValueError(
        f"Data set {data_config.name!r}: expected uint8 images of shape "
        f"{_expected_shape(data_config)}{at_least} (data.image_size, "
        f"data.image_size, data.channels), but the data set has "
        f"{np.dtype(actual_dtype)} images of shape {tuple(actual_shape)}."
    )


def _check_image(data_config, shape, dtype) -> None:
    """Raises ValueError if images of `shape`/`dtype` cannot be served.

    `shape` may contain None (TFDS features of variable size); those dimensions
    are accepted for resizable data sets and rejected otherwise.
    """
    expected = _expected_shape(data_config)
    shape = tuple(shape)
    if np.dtype(dtype) != np.uint8 or len(shape) != 3:
        raise _shape_error(data_config, shape, dtype)
    if _is_resizable(data_config.name):
        # Resizing may only shrink: upsampling would invent detail.
        spatial_ok = all(d is None or d >= expected[0] for d in shape[:2])
        if shape[2] != expected[2] or not spatial_ok:
            raise _shape_error(data_config, shape, dtype)
    elif shape != expected:
        raise _shape_error(data_config, shape, dtype)


def dataset_spec(
    data_config: ml_collections.ConfigDict,
) -> tuple[tuple[int, int, int], int]:
    """Returns ((H, W, C), num_classes) of the served batches without reading data.

    `num_classes` is 0 for unlabeled data sets (their labels are all 0). For
    TFDS, the builder's declared image feature is checked against the config
    (reads only metadata; raises ValueError on a mismatch).
    """
    if data_config.name == "digits":
        _check_image(data_config, (8, 8, 1), np.uint8)
        return _expected_shape(data_config), 10
    import tensorflow_datasets as tfds

    features = tfds.builder(data_config.name, data_dir=data_config.get("data_dir")).info.features
    image = features["image"]
    _check_image(data_config, image.shape, image.np_dtype)
    num_classes = features["label"].num_classes if "label" in features else 0
    return _expected_shape(data_config), num_classes


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crops uint8 [h, w, c] to a square, resizes to [size, size, c].

    Bicubic resampling in PIL, which filters over the whole source footprint
    when shrinking (anti-aliased).
    """
    h, w, c = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top : top + side, left : left + side]
    if side == size:
        return image
    pil = PIL.Image.fromarray(image[..., 0] if c == 1 else image)
    resized = np.asarray(pil.resize((size, size), PIL.Image.Resampling.BICUBIC))
    return resized.reshape(size, size, c)


class _LoadLocalBatch:
    """Turns the record indices of global batch `step` into this process's batch.

    Picklable (it is shipped to grain worker processes). Called as
    `(step, indices: int [global_batch_size]) -> {"image": float32
    [L, H, W, C] in [-1, 1], "label": int32 [L]}`.
    """

    def __init__(self, source, data_config, *, seed: int, rows: slice):
        self._source = source
        self._seed = seed
        self._rows = rows
        self._size = data_config.image_size
        self._resize = _is_resizable(data_config.name)
        self._random_flip = data_config.random_flip

    def __call__(self, step: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = [self._source[int(i)] for i in indices[self._rows]]
        images = [r["image"] for r in records]
        if self._resize:
            images = [_center_crop_resize(im, self._size) for im in images]
        images = np.stack(images)
        if self._random_flip:
            # One draw per row of the *global* batch, then this process's rows.
            rng = np.random.default_rng([self._seed, step, _FLIP_STREAM])
            flip = rng.random(len(indices)) < 0.5
            flip = flip[self._rows, None, None, None]
            images = np.where(flip, images[:, :, ::-1], images)
        labels = np.asarray([r.get("label", 0) for r in records], np.int32)
        images = images.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
        return {"image": images, "label": labels}


def create_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Returns an infinite, checkpointable iterator of host-local batches.

    Each batch is `{"image": float32 [global_batch_size // process_count, H, W,
    C] in [-1, 1], "label": int32 [global_batch_size // process_count]}`.
    Process `p` gets rows [p*L, (p+1)*L) of every global batch; the global batch
    depends only on (data set, seed, global_batch_size), not on process_count
    or num_workers. Epochs are reshuffled deterministically from `seed` (an
    integer in [0, 2**32)) and the last partial batch of each epoch is dropped.

    Args:
      data_config: ConfigDict with name, split, image_size, channels,
        random_flip, shuffle, num_workers (0 = in-process), prefetch (batches
        buffered per process), data_dir (optional), download (optional: whether a TFDS
        data set missing from data_dir may be prepared).
      global_batch_size: batch size summed over all processes.
      seed: data seed (shuffle order and flips).
      process_index: this process; defaults to `jax.process_index()`.
      process_count: number of processes; defaults to `jax.process_count()`.

    Raises:
      ValueError: the batch size is not divisible by process_count or exceeds
        the data set, or the data set's images do not match the config.
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if global_batch_size % process_count:
        raise ValueError(
            f"training.batch_size={global_batch_size} must be divisible by the "
            f"number of processes ({process_count})."
        )
    local_batch_size = global_batch_size // process_count

    source = _open_source(data_config)
    first = source[0]["image"]
    _check_image(data_config, first.shape, first.dtype)
    if len(source) < global_batch_size:
        raise ValueError(
            f"training.batch_size={global_batch_size} exceeds the "
            f"{len(source)} examples of data set {data_config.name!r}."
        )

    indices = grain.MapDataset.range(len(source))
    if data_config.shuffle:
        indices = indices.shuffle(seed=seed)
    rows = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)
    batches = (
        indices.batch(global_batch_size, drop_remainder=True)
        .repeat()
        .map_with_index(_LoadLocalBatch(source, data_config, seed=seed, rows=rows))
    )
    prefetch = data_config.prefetch
    dataset = batches.to_iter_dataset(
        grain.ReadOptions(
            num_threads=_READ_THREADS if prefetch else 0,
            prefetch_buffer_size=prefetch,
        )
    )
    if data_config.num_workers:
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=data_config.num_workers)
        )
    return iter(dataset)


def split_size(data_config: ml_collections.ConfigDict, split: str) -> int:
    """Number of examples in ``split`` of the data set (opens it; reads no image)."""
    return len(_open_source(_with_split(data_config, split)))


def _with_split(data_config, split: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(data_config.to_dict())
    config.split = split
    config.random_flip = False
    return config


def eval_batches(
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    global_batch_size: int,
    num_examples: int | None = None,
    start_batch: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """One pass over the first ``num_examples`` (None: all) examples of ``split``, in order.

    Yields host-local batches ``{"image": float32 [L, H, W, C] in [-1, 1], "label": int32 [L],
    "index": int32 [L], "mask": bool [L]}``, ``L = global_batch_size // process_count``, rows
    ``[p L, (p + 1) L)`` of each global batch for process p. The last global batch is padded
    by repeating example 0 with ``mask`` False, so each example counts exactly once. No
    shuffling or flipping; images are center-cropped/resized like the training data.
    ``start_batch`` skips that many global batches (to resume a long evaluation).
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if global_batch_size % process_count:
        raise ValueError(
            f"eval.batch_size={global_batch_size} must be divisible by the number of "
            f"processes ({process_count})."
        )
    config = _with_split(data_config, split)
    source = _open_source(config)
    total = len(source) if num_examples is None else min(num_examples, len(source))
    if total < 1:
        raise ValueError(f"Split {split!r} of data set {data_config.name!r} has no examples")
    first = source[0]["image"]
    _check_image(config, first.shape, first.dtype)
    local = global_batch_size // process_count
    rows = slice(process_index * local, (process_index + 1) * local)
    load = _LoadLocalBatch(source, config, seed=0, rows=rows)
    for step in range(start_batch, -(-total // global_batch_size)):
        indices = np.arange(step * global_batch_size, (step + 1) * global_batch_size)
        mask = indices < total
        batch = load(step, np.where(mask, indices, 0))
        yield dict(batch, index=indices[rows].astype(np.int32), mask=mask[rows])


def iterator_checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool) -> Any:
    """Returns the orbax args that save (or restore into) `iterator`'s position.

    Use as one item of `ocp.args.Composite` with an `ocp.CheckpointManager`;
    every process must call save/restore (each writes its own
    `process_<i>-of-<n>.json`). Restoring mutates `iterator` in place, so it
    must come from `create_train_iterator` with the same config, batch size,
    seed and num_workers.
    """
    if restore:
        return grain.checkpoint.CheckpointRestore(iterator)
    return grain.checkpoint.CheckpointSave(iterator)
