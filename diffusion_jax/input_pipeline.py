"""Training input pipeline: TFDS, embedded or folder data served through grain.

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
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import PIL.Image
import PIL.ImageOps
from absl import logging

# Data sets whose images are center-cropped and resized to `image_size`: TFDS ones whose native
# sizes vary or exceed the trained resolution, and image folders. All other data sets must
# already have exactly the configured shape.
_RESIZABLE_DATASETS = ("celeb_a_hq", "lsun", "imagenet2012", "folder")
# Of those, the ones whose images may also be smaller than `image_size` and are upsampled: a
# folder of the user's own images holds whatever sizes it holds (the scan logs how many are
# upsampled). TFDS images must not be: upsampling a benchmark would invent detail unnoticed.
_UPSAMPLED_DATASETS = ("folder",)

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


# data.name "folder": files under data.path with these extensions (any case) are images.
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

# What PIL raises for a file it cannot identify or decode.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)


def _list_folder(path: str) -> tuple[list[str], list[str]]:
    """Returns (image files under `path`, class names): the files relative to `path`, sorted.

    Walks `path` recursively (following symbolic links, each directory once) for names ending
    in `FOLDER_EXTENSIONS`; names starting with "." (hidden files and directories) are skipped.
    The listing and so the record order are the same on every process. If every file lies in
    a subdirectory, the classes are the sorted names of the first-level subdirectories and a
    file's label is the index of its own; otherwise the folder is unlabeled (no classes).
    Reads directories only, no file. Raises a one-line ValueError naming `data.path` if it is
    unset, not a directory, or holds no image file.
    """
    if not path:
        raise ValueError("data.path is unset: data.name 'folder' reads the images under it")
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise ValueError(f"data.path {path!r} {what}")
    files, seen = [], set()
    for directory, subdirectories, names in os.walk(path, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:  # a link back to a directory already listed
            subdirectories.clear()
            continue
        seen.add(real)
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        relative = os.path.relpath(directory, path)
        files += [
            os.path.normpath(os.path.join(relative, name))
            for name in names
            if not name.startswith(".") and name.lower().endswith(FOLDER_EXTENSIONS)
        ]
    if not files:
        raise ValueError(
            f"data.path {path!r} holds no image files ({', '.join(FOLDER_EXTENSIONS)}; "
            "searched recursively)"
        )
    files.sort()
    labelled = all(os.sep in f for f in files)
    classes = sorted({f.split(os.sep)[0] for f in files}) if labelled else []
    return files, classes


def _decode(file: str, channels: int) -> np.ndarray:
    """Decodes an image file to uint8 [h, w, channels] (1: grayscale, 3: RGB), upright.

    The EXIF orientation is applied (as photo viewers do); 16- and 32-bit grayscale map
    0..65535 to 0..255 (PIL's own conversion would clip at 255); transparent pixels are
    composited over white (palette, gray and RGB images with alpha or a transparent colour).
    Raises one of `_DECODE_ERRORS` for a file PIL cannot read in full (e.g. truncated).
    """
    with PIL.Image.open(file) as image:
        image.load()
        PIL.ImageOps.exif_transpose(image, in_place=True)
    if image.mode.startswith("I"):
        values = np.round(np.asarray(image, np.float64) / 257)
        image = PIL.Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    image = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return image.reshape(*image.shape[:2], channels)


class FolderSource:
    """The images under a directory of the user's own (data.name "folder", data.path).

    A grain `RandomAccessDataSource` over the readable files of `_list_folder(path)`, in its
    sorted order: record `i` is `{"image": uint8 [h, w, channels] at the file's own size (see
    `_decode`), "label": int64 scalar}`, with label 0 for an unlabeled folder. Images are decoded
    when read; the pipeline then center-crops and resizes them to data.image_size.

    One split, "train": every image. Building the source opens every file once to read its
    header (a few KB each; about 30 us a file in the page cache): files PIL cannot identify are
    dropped with one warning "skipped N unreadable files (first: FILE: reason)", so they change
    neither the batch size nor the order of the others. A file whose header is sound but whose
    data is not (a truncated JPEG) is found only when decoded: record `i` is then served as the
    next decodable record `i + 1, i + 2, ...` (cyclically), with a warning the first time, so a
    damaged file costs one duplicate instead of a crash mid-epoch and batches stay the same on
    every process and run. Raises ValueError (one line, naming data.path or the split) for a
    missing or empty directory, a folder without a readable image, or a split other than
    "train". `image_size` only serves the log line, which counts the images it upsamples.
    """

    def __init__(
        self, path: str, split: str = "train", channels: int = 3, image_size: int | None = None
    ):
        if split != "train":
            raise ValueError(
                f"Data set 'folder' has no split {split!r}; valid: train (all images under "
                "data.path; set data.split, eval.split and eval.reference_split to train)"
            )
        files, self.classes = _list_folder(path)
        self.path, self.split, self.channels = path, split, channels
        self.files, unreadable, sizes = [], [], []
        for file in files:
            try:
                with PIL.Image.open(os.path.join(path, file)) as image:
                    sizes.append(image.size)
            except _DECODE_ERRORS as e:
                unreadable.append((file, e))
            else:
                self.files.append(file)
        if unreadable:
            file, error = unreadable[0]
            logging.warning(
                "data.path %s: skipped %d unreadable files (first: %s: %s)",
                path,
                len(unreadable),
                file,
                error,
            )
        if not self.files:
            raise ValueError(
                f"data.path {path!r}: none of its {len(files)} image files is readable"
            )
        index = {name: i for i, name in enumerate(self.classes)}
        self._labels = np.asarray(
            [index[f.split(os.sep)[0]] if index else 0 for f in self.files], np.int64
        )
        self._reported: set[int] = set()
        small = sum(min(size) < image_size for size in sizes) if image_size else 0
        logging.info(
            "data.path %s: %d images, %d classes%s%s",
            path,
            len(self.files),
            len(self.classes),
            f" ({', '.join(self.classes[:10])}{', ...' if len(self.classes) > 10 else ''})"
            if self.classes
            else "",
            f"; {small} smaller than {image_size}x{image_size} are upsampled" if small else "",
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                image = _decode(os.path.join(self.path, self.files[i]), self.channels)
            except _DECODE_ERRORS as e:
                if i not in self._reported:
                    self._reported.add(i)
                    logging.warning(
                        "data.path %s: cannot decode %s (%s); serving the next image in its place",
                        self.path,
                        self.files[i],
                        e,
                    )
                continue
            return {"image": image, "label": self._labels[i]}
        raise ValueError(f"data.path {self.path!r}: none of its image files can be decoded")

    def __repr__(self) -> str:
        return (
            f"FolderSource(path={self.path!r}, num_records={len(self)}, "
            f"num_classes={len(self.classes)})"
        )


def _is_resizable(name: str) -> bool:
    return name.split("/")[0] in _RESIZABLE_DATASETS


def _open_source(data_config: ml_collections.ConfigDict):
    """Returns a random-access source of {"image": uint8 [h, w, c], ...}.

    A TFDS data set missing from ``data_dir`` is prepared first (by process 0 of the run; see
    ``diffusion_jax.datasets``), so every process must call this.
    """
    if data_config.name == "digits":
        return DigitsSource(data_config.split)
    if data_config.name == "folder":
        return FolderSource(
            data_config.path, data_config.split, data_config.channels, data_config.image_size
        )
    if data_config.name == "latents":
        from diffusion_jax import latents

        return latents.LatentSource(data_config.path, data_config.split)
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
    name = data_config.name.split("/")[0]
    at_least = " or larger" if _is_resizable(name) and name not in _UPSAMPLED_DATASETS else ""
    return ValueError(
        f"Data set {data_config.name!r}: expected uint8 images of shape "
        f"{_expected_shape(data_config)}{at_least} (data.image_size, "
        f"data.image_size, data.channels), but the data set has "
        f"{np.dtype(actual_dtype)} images of shape {tuple(actual_shape)}."
    )


def _check_image(data_config, shape, dtype) -> None:
    """Raises ValueError if images of `shape`/`dtype` cannot be served.

    `shape` may contain None (TFDS features of variable size); those dimensions
    are accepted for resizable data sets and rejected otherwise. Resizable data
    sets may be larger than `image_size`, and smaller only if upsampled
    (`_UPSAMPLED_DATASETS`).
    """
    expected = _expected_shape(data_config)
    shape = tuple(shape)
    if np.dtype(dtype) != np.uint8 or len(shape) != 3:
        raise _shape_error(data_config, shape, dtype)
    if _is_resizable(data_config.name):
        upsampled = data_config.name.split("/")[0] in _UPSAMPLED_DATASETS
        spatial_ok = all(d is None or d >= expected[0] or upsampled for d in shape[:2])
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
    (reads only metadata; raises ValueError on a mismatch). For a folder, lists
    its directories (see `_list_folder`; raises ValueError if it is missing or
    holds no image file).
    """
    if data_config.name == "digits":
        _check_image(data_config, (8, 8, 1), np.uint8)
        return _expected_shape(data_config), 10
    if data_config.name == "folder":
        _, classes = _list_folder(data_config.path)
        return _expected_shape(data_config), len(classes)
    if data_config.name == "latents":
        from diffusion_jax import latents

        meta = latents.read_metadata(data_config.path, data_config.split)
        if tuple(meta["latent_shape"]) != _expected_shape(data_config):
            raise ValueError(
                f"The latent data set {data_config.path} holds latents of shape "
                f"{tuple(meta['latent_shape'])}, but (data.image_size, data.image_size, "
                f"data.channels) is {_expected_shape(data_config)}"
            )
        return _expected_shape(data_config), meta["num_classes"]
    import tensorflow_datasets as tfds

    features = tfds.builder(data_config.name, data_dir=data_config.get("data_dir")).info.features
    image = features["image"]
    _check_image(data_config, image.shape, image.np_dtype)
    num_classes = features["label"].num_classes if "label" in features else 0
    return _expected_shape(data_config), num_classes


def data_set_id(data_config: ml_collections.ConfigDict) -> str:
    """A name of the data set for cache files: the TFDS name with "/" as "_", "digits", or
    for a folder "folder-" and 12 hex digits of a hash of its absolute path and file listing
    (another folder, or files added or renamed, give another name; lists directories only)."""
    if data_config.name != "folder":
        return data_config.name.replace("/", "_")
    import hashlib

    files, _ = _list_folder(data_config.path)
    listing = "\n".join([os.path.abspath(data_config.path), *files])
    return f"folder-{hashlib.sha256(listing.encode()).hexdigest()[:12]}"


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crops uint8 [h, w, c] to a square, resizes to [size, size, c].

    Bicubic resampling in PIL, which filters over the whole source footprint
    when shrinking (anti-aliased); it also upsamples a side below `size`.
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
        meta = getattr(source, "meta", None)  # a latent data set's
        self._latent_factors = (
            None if meta is None else (meta["scaling_factor"], meta["shift_factor"])
        )

    def _flips(self, step: int, num: int) -> np.ndarray:
        """bool [L]: which of this process's rows are mirrored (one draw per row of the
        *global* batch, then this process's rows)."""
        if not self._random_flip:
            return np.zeros(num, bool)[self._rows]
        rng = np.random.default_rng([self._seed, step, _FLIP_STREAM])
        return (rng.random(num) < 0.5)[self._rows]

    def __call__(self, step: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = [self._source[int(i)] for i in indices[self._rows]]
        labels = np.asarray([r.get("label", 0) for r in records], np.int32)
        flip = self._flips(step, len(indices))
        if self._latent_factors is not None:
            # A latent data set stores each image's posterior and its mirror image's.
            scale, shift = self._latent_factors
            side = flip.astype(int)
            mean = np.stack([r["mean"][s] for r, s in zip(records, side, strict=True)])
            std = np.stack([r["std"][s] for r, s in zip(records, side, strict=True)])
            return {
                "image": ((mean - shift) * scale).astype(np.float32),
                "std": (std * scale).astype(np.float32),
                "label": labels,
            }
        images = [r["image"] for r in records]
        if self._resize:
            images = [_center_crop_resize(im, self._size) for im in images]
        images = np.stack(images)
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        images = images.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
        return {"image": images, "label": labels}


def _process_rows(global_batch_size: int, key: str, process_index, process_count) -> slice:
    """This process's rows ``[p L, (p + 1) L)`` of a global batch, ``L = global / count``
    (process index and count default to JAX's); ``key`` names the batch size in errors."""
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if global_batch_size % process_count:
        raise ValueError(
            f"{key}={global_batch_size} must be divisible by the number of processes "
            f"({process_count})."
        )
    local = global_batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


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
    rows = _process_rows(global_batch_size, "training.batch_size", process_index, process_count)
    source = _open_source(data_config)
    if data_config.name == "latents":
        dataset_spec(data_config)  # checks the latent shape
    else:
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
    rows = _process_rows(global_batch_size, "eval.batch_size", process_index, process_count)
    config = _with_split(data_config, split)
    source = _open_source(config)
    total = len(source) if num_examples is None else min(num_examples, len(source))
    if total < 1:
        raise ValueError(f"Split {split!r} of data set {data_config.name!r} has no examples")
    first = source[0]["image"]
    _check_image(config, first.shape, first.dtype)
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
