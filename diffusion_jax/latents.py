"""Latent data sets: a split of images encoded once by an autoencoder, for latent diffusion.

    python -m diffusion_jax.encode --autoencoder=AE --out=DIR [--split=train]
        [--config=FILE] [--batch_per_device=64] [--chunk_size=1024]

``AE`` is a training workdir of ``model.kind`` "autoencoder" (its latest EMA parameters, and by
default its data) or an imported weights file (diffusers' AutoencoderKL ``.safetensors``, e.g.
the Stable Diffusion VAE, with ``--config`` naming the images). ``DIR/<split>/`` then holds:

  - ``latents.json``: the autoencoder it came from (workdir and step, or weights file) and a
    hash of its parameters (``autoencoder_id``), the image data (``source_data``: the data
    config group), the split, ``num_examples``, ``num_classes``, ``latent_shape`` [h, w, c],
    ``flips`` and the latents' ``scaling_factor`` and ``shift_factor``;
  - ``chunks/{mean,std,label}_<k>.npy``: examples ``k * chunk_size ...`` in split order:
    the posterior's mean and standard deviation, float32 ``[n, 2, h, w, c]`` (index 0 the
    image, 1 its mirror image: horizontal flips are encoded, not approximated, so a flipped
    example's latent is the autoencoder's own), and the labels, int32 ``[n]``.

Diffusion trains on ``x0 = (z - shift_factor) * scaling_factor`` with ``z`` drawn from the
stored posterior at every step from the example's own key (``train_step``); ``data.name``
"latents" with ``data.path`` DIR reads them (``LatentSource``). For an autoencoder trained here
the scaling factor is ``1 / std`` of the posterior samples over the split (``std^2 =
Var[mean] + E[std^2]`` over every element: unit variance, as the Stable Diffusion VAE's 0.18215
was chosen) and the shift 0; for imported weights, theirs.

Encoding is deterministic and resumable: every chunk is written atomically once, and a restart
skips the chunks present (a killed run's rerun gives byte-identical files). Each device encodes
``batch_per_device`` images per call whatever the device or process count, so the latents agree
across device and process counts to float32 round-off (not bit for bit: XLA:CPU's kernels can
round differently by the number of devices a process has). A directory written with another
autoencoder, data or split is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import config_lib, generate, input_pipeline, pretrained, sharding
from diffusion_jax.evaluators import common
from diffusion_jax.models.autoencoder import AutoencoderKL

FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Autoencoder:
    """An autoencoder restored for encoding or decoding: ``model`` with ``params`` laid out as
    ``param_sharding``; ``reference`` says where it came from (``{"workdir", "step"}`` or
    ``{"weights"}``) and ``source_data`` the data config it was trained on (None for imported
    weights)."""

    model: AutoencoderKL
    params: Any
    param_sharding: Any
    reference: dict
    source_data: dict | None

    @property
    def id(self) -> str:
        """16 hex digits of a SHA-256 of the parameters (names, shapes and values)."""
        digest = hashlib.sha256()
        flat = jax.tree_util.tree_leaves_with_path(jax.device_get(self.params))
        for path, leaf in flat:
            leaf = np.asarray(leaf)
            digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
            digest.update(leaf.tobytes())
        return digest.hexdigest()[:16]


def load_autoencoder(path: str, mesh) -> Autoencoder:
    """A workdir of ``model.kind`` "autoencoder" (latest EMA parameters) or a diffusers weights
    file, replicated over ``mesh`` (the autoencoder of latent diffusion is small)."""
    path = os.fspath(path)
    if epath.Path(path).is_dir():
        config, step = pretrained.load_config(path, None)
        if config.model.kind != "autoencoder":
            raise config_lib.ConfigError(
                f"{path} trained model.kind {config.model.kind!r}, not an autoencoder"
            )
        model, params, param_sharding = pretrained.restore_ema(config, path, step, mesh)
        reference = {"workdir": str(epath.Path(path).absolute()), "step": step}
        return Autoencoder(model, params, param_sharding, reference, config.data.to_dict())
    from diffusion_jax import autoencoder_weights

    variables, kwargs = autoencoder_weights.load_params(path)  # {"params": ...}
    params = variables["params"]
    replicated = sharding.replicated(mesh)
    params = jax.device_put(params, replicated)
    param_sharding = jax.tree_util.tree_map(lambda _: replicated, params)
    reference = {"weights": str(epath.Path(path).absolute())}
    return Autoencoder(AutoencoderKL(**kwargs), params, param_sharding, reference, None)


def split_dir(path, split: str) -> epath.Path:
    return epath.Path(path) / split


def read_metadata(path, split: str) -> dict:
    """``latents.json`` of ``split`` under ``path``; raises ValueError naming what is missing."""
    file = split_dir(path, split) / "latents.json"
    if not file.exists():
        raise ValueError(
            f"No latent data set at {file}: write one with python -m diffusion_jax.encode "
            "--autoencoder=... --out=..."
        )
    meta = json.loads(file.read_text())
    if not meta.get("complete"):
        raise ValueError(f"The latent data set {file.parent} is incomplete: rerun its encode")
    return meta


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _chunk_path(directory: epath.Path, name: str, k: int) -> epath.Path:
    return directory / "chunks" / f"{name}_{k:05d}.npy"


def make_encode_fn(autoencoder: Autoencoder, mesh):
    """Jitted ``images [B, H, W, C] -> (mean, std) [B, 2, h, w, c]``: the posterior of each
    image and of its mirror image (sharded over the batch axes)."""
    model = autoencoder.model
    spread = sharding.batch_sharding(mesh)

    def encode(params, images):
        both = jnp.stack([images, images[:, :, ::-1]], axis=1)
        flat = both.reshape((-1, *images.shape[1:]))
        mean, logvar = model.apply({"params": params}, flat, method=model.encode)
        std = jnp.exp(0.5 * logvar)
        unflat = lambda a: a.reshape((images.shape[0], 2, *a.shape[1:]))
        return unflat(mean), unflat(std)

    return jax.jit(encode, in_shardings=(autoencoder.param_sharding, spread), out_shardings=spread)


def encode_split(
    autoencoder: Autoencoder,
    data: ml_collections.ConfigDict,
    out,
    *,
    split: str = "train",
    batch_per_device: int = 64,
    chunk_size: int = 1024,
    mesh=None,
) -> dict:
    """Encodes ``split`` of the image data ``data`` into ``out/<split>`` (module docstring);
    returns its metadata. Resumes a killed run; refuses a directory of other settings."""
    mesh = sharding.make_mesh() if mesh is None else mesh
    global_batch = batch_per_device * mesh.size
    if chunk_size % global_batch:
        raise ValueError(
            f"chunk_size ({chunk_size}) must be a multiple of batch_per_device x devices "
            f"({global_batch})"
        )
    directory = split_dir(out, split)
    image_shape, num_classes = input_pipeline.dataset_spec(data)
    num_examples = input_pipeline.split_size(data, split)
    settings = {
        "format": FORMAT,
        "autoencoder": autoencoder.reference,
        "autoencoder_id": autoencoder.id,
        "source_data": json.loads(data.to_json_best_effort()),
        "split": split,
        "num_examples": num_examples,
        "num_classes": num_classes,
        "image_shape": list(image_shape),
        "chunk_size": chunk_size,
        "flips": True,
    }
    meta_path = directory / "latents.json"
    if meta_path.exists():
        recorded = json.loads(meta_path.read_text())
        changed = [k for k in settings if k != "autoencoder" and recorded.get(k) != settings[k]]
        if changed:
            raise ValueError(
                f"{directory} holds latents of other settings ({', '.join(changed)} differ: "
                f"e.g. autoencoder {recorded.get('autoencoder')}); refusing to mix them. Use "
                "another --out, or delete it to start over."
            )
    is_main = jax.process_index() == 0
    if is_main and not meta_path.exists():
        common.write_json(meta_path, {**settings, "complete": False})
    encode_fn = make_encode_fn(autoencoder, mesh)
    num_chunks = -(-num_examples // chunk_size)
    for k in range(num_chunks):
        if _chunk_path(directory, "label", k).exists():
            continue  # written whole by an earlier run (the label file is written last)
        count = min(chunk_size, num_examples - k * chunk_size)
        means, stds, labels = [], [], []
        batches = input_pipeline.eval_batches(
            data,
            split,
            global_batch_size=global_batch,
            num_examples=k * chunk_size + count,
            start_batch=k * chunk_size // global_batch,
        )
        for _, local in zip(range(-(-count // global_batch)), batches, strict=False):
            images = sharding.global_batch(mesh, local["image"])
            mean, std = encode_fn(autoencoder.params, images)
            means.append(np.asarray(generate.to_host(mean)))
            stds.append(np.asarray(generate.to_host(std)))
            labels.append(np.asarray(generate.to_host(sharding.global_batch(mesh, local["label"]))))
        if is_main:
            for name, parts in (("mean", means), ("std", stds), ("label", labels)):
                common.write_atomically(
                    _chunk_path(directory, name, k), _npy_bytes(np.concatenate(parts)[:count])
                )
    if is_main:
        _finish(directory, settings, autoencoder)
    multihost_utils.sync_global_devices("latents: encoded")
    return read_metadata(out, split)


def _finish(directory: epath.Path, settings: dict, autoencoder: Autoencoder) -> None:
    """Adds the latent statistics to the metadata and marks it complete; imported weights
    keep their own scaling (the module's attributes, read from their ``config.json``)."""
    source = LatentSource.from_directory(directory, settings)
    means, stds = (np.asarray(a, np.float64) for a in source.arrays())
    latent_shape = list(means.shape[2:])
    # Unit variance of the posterior samples diffusion trains on, Var[mean] + E[std^2] over
    # every element (Rombach et al. scaled the SD VAE's latents so, by 0.18215).
    std = float(np.sqrt(np.var(means) + np.mean(np.square(stds))))
    meta = {
        **settings,
        "latent_shape": latent_shape,
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        "shift_factor": 0.0,
        "complete": True,
    }
    if "weights" in autoencoder.reference:
        model = autoencoder.model
        meta["scaling_factor"], meta["shift_factor"] = model.scaling_factor, model.shift_factor
    common.write_json(directory / "latents.json", meta)


class LatentSource:
    """A split of a latent data set as a grain random-access source: record ``i`` is
    ``{"mean", "std": float32 [2, h, w, c] (image, mirror image), "label": int}``."""

    def __init__(self, path, split: str):
        self._open(split_dir(path, split), read_metadata(path, split))

    @classmethod
    def from_directory(cls, directory: epath.Path, meta: dict) -> LatentSource:
        """The chunks of ``directory`` described by ``meta`` (complete or not)."""
        source = cls.__new__(cls)
        source._open(directory, meta)
        return source

    def _open(self, directory: epath.Path, meta: dict):
        self.meta, self.split = meta, meta["split"]
        self._chunk = meta["chunk_size"]
        num_chunks = -(-meta["num_examples"] // self._chunk)
        self._arrays = {
            name: [
                np.load(_chunk_path(directory, name, k), mmap_mode="r") for k in range(num_chunks)
            ]
            for name in ("mean", "std", "label")
        }

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every example's ``(mean, std)``, ``[N, 2, h, w, c]`` each."""
        return tuple(np.concatenate(self._arrays[name]) for name in ("mean", "std"))

    def __len__(self) -> int:
        return self.meta["num_examples"]

    def __getitem__(self, index: int) -> dict:
        k, i = divmod(int(index), self._chunk)
        return {name: np.asarray(arrays[k][i]) for name, arrays in self._arrays.items()}

    def __repr__(self) -> str:
        return f"LatentSource(split={self.split!r}, num_records={len(self)})"


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Diffusion latents back to images: ``autoencoder`` decodes ``latents / scaling_factor +
    shift_factor``; ``source_data`` is the data config of the images it encoded."""

    autoencoder: Autoencoder
    scaling_factor: float
    shift_factor: float
    source_data: dict

    def decode(self, params, latents):
        """Images ``[B, H, W, C]`` (about [-1, 1]) of latents ``[B, h, w, c]``; jittable."""
        model = self.autoencoder.model
        z = latents / self.scaling_factor + self.shift_factor
        return model.apply({"params": params}, z, method=model.decode)


def load_decoder(config, mesh) -> Decoder | None:
    """The decoder that turns ``config``'s generated latents into images (the autoencoder its
    latent data set records, checked by its parameters), or None for a model of pixels."""
    if config.data.name != "latents":
        return None
    meta = read_metadata(config.data.path, config.data.split)
    reference = meta["autoencoder"]
    autoencoder = load_autoencoder(reference.get("workdir") or reference["weights"], mesh)
    if autoencoder.id != meta["autoencoder_id"]:
        raise ValueError(
            f"The autoencoder at {reference} is not the one that encoded {config.data.path} "
            f"(parameters {autoencoder.id} vs {meta['autoencoder_id']})"
        )
    return Decoder(autoencoder, meta["scaling_factor"], meta["shift_factor"], meta["source_data"])


def image_data(config) -> ml_collections.ConfigDict:
    """The data config of ``config``'s images: ``config.data``, or for a model of latents the
    images its latent data set encoded (for the reference statistics of ``mode=fid``)."""
    if config.data.name != "latents":
        return config.data
    return ml_collections.ConfigDict(
        read_metadata(config.data.path, config.data.split)["source_data"]
    )
