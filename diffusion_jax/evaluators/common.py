"""What every evaluation mode needs: the run's config, mesh, model and EMA parameters, and the
helpers they share (sharded calls over batches, files through ``etils.epath``, progress lines).

Files are read and written whole through ``epath.Path`` (local or ``gs://...``): NumPy, PIL and
matplotlib write into memory first, since an object store's files cannot seek.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import config_lib, generate, input_pipeline, pretrained, sharding


@dataclasses.dataclass(frozen=True)
class Context:
    """A restored checkpoint, ready to evaluate.

    ``model`` is the network, ``objective`` the objective it was trained with; ``params`` are
    the EMA parameters of checkpoint ``step``, laid out as ``param_sharding`` over ``mesh``
    (every device of every process). ``eval_dir`` is ``workdir/eval``; only the main process
    (``is_main``) writes there.
    """

    config: Any
    workdir: epath.Path
    step: int
    mesh: jax.sharding.Mesh
    model: Any
    objective: Any
    params: Any
    param_sharding: Any
    eval_dir: epath.Path

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        data = self.config.data
        return (data.image_size, data.image_size, data.channels)


def restore(config, workdir, step: int) -> Context:
    """Builds the model of ``config`` and restores only the EMA parameters of checkpoint
    ``step`` of ``workdir``."""
    mesh = sharding.make_mesh(config.training.fsdp)
    model, params, param_sharding = pretrained.restore_ema(config, workdir, step, mesh)
    workdir = epath.Path(workdir)
    return Context(
        config=config,
        workdir=workdir,
        step=step,
        mesh=mesh,
        model=model,
        objective=config_lib.make_objective(config),
        params=params,
        param_sharding=param_sharding,
        eval_dir=workdir / "eval",
    )


def with_image_data(ctx: Context) -> Context:
    """``ctx`` with ``config.data`` the images of a model of latents (``latents.image_data``);
    ``ctx`` itself for a model of images."""
    if ctx.config.data.name != "latents":
        return ctx
    from diffusion_jax import latents

    config = ml_collections.ConfigDict(ctx.config.to_dict())
    config.data = latents.image_data(ctx.config)
    return dataclasses.replace(ctx, config=config)


def num_examples(config) -> int:
    """How many examples of ``eval.split`` an evaluation covers: ``eval.num_examples`` (0: all),
    at most the split's size."""
    available = input_pipeline.split_size(config.data, config.eval.split)
    return min(config.eval.num_examples or available, available)


def keyed_batch(ctx: Context, local: dict) -> dict:
    """This process's rows of an evaluation batch (``input_pipeline.eval_batches``) as global
    arrays over ``ctx.mesh``: ``image``, ``label`` and ``keys``, each example's key by its split
    index and ``eval.seed``."""
    return sharding.global_batch(
        ctx.mesh,
        {
            "image": local["image"],
            "label": local["label"],
            "keys": np.asarray(example_keys(ctx.config.eval.seed, local["index"])),
        },
    )


def example_keys(seed: int, indices) -> jax.Array:
    """``uint32 [N, 2]`` keys ``fold_in(PRNGKey(seed), i)`` of global example indices ``i``."""
    return generate.sample_keys(jax.random.PRNGKey(seed), np.asarray(indices, np.uint32))


def check_same_settings(path, saved: dict, wanted: dict, remedy: str) -> None:
    """Raises ValueError naming every key whose value in ``saved`` (what ``path`` was made
    with) differs from ``wanted``, with both values and ``remedy``."""
    changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
    if changed:
        raise ValueError(
            f"{path} was made with "
            + ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
            + "; now "
            + ", ".join(f"{k}={wanted[k]!r}" for k in changed)
            + f". {remedy}"
        )


def write_atomically(path: epath.Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file, then renames it to ``path``: a reader (or a run
    killed half-way) never sees a partial file. (On an object store the rename is a copy and a
    delete; an object appears whole in any case.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_json(path: epath.Path, data: dict) -> None:
    write_atomically(path, (json.dumps(data, indent=2) + "\n").encode())


def npz_bytes(**arrays) -> bytes:
    """``np.savez(file, **arrays)`` as bytes."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_npz(path: epath.Path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file ``path`` (no pickles)."""
    with path.open("rb") as f, np.load(f) as data:
        return {key: data[key] for key in data.files}


def save_result(ctx: Context, mode: str, result: dict) -> epath.Path:
    """Writes ``eval/<mode>_step<N>.json``: the numbers, the mode, the step and the config
    (main process only); returns its path."""
    path = ctx.eval_dir / f"{mode}_step{ctx.step}.json"
    if ctx.is_main:
        record = dict(result, mode=mode, step=ctx.step, config=ctx.config.to_dict())
        write_json(path, record)
    return path


class Progress:
    """A log line per update with done/total, rate and ETA (main process only)."""

    def __init__(self, what: str, total: int, unit: str, done: int = 0):
        self.what, self.total, self.unit = what, total, unit
        self.start_done, self.start = done, time.perf_counter()

    def update(self, done: int, extra: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        rate = (done - self.start_done) / max(elapsed, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_text = str(datetime.timedelta(seconds=int(eta))) if np.isfinite(eta) else "?"
        if jax.process_index() == 0:
            logging.info(
                "%s: %d/%d %s | %.2f %s/s | ETA %s%s",
                self.what,
                done,
                self.total,
                self.unit,
                rate,
                self.unit,
                eta_text,
                f" | {extra}" if extra else "",
            )

    def rate(self, done: int) -> float:
        return (done - self.start_done) / max(time.perf_counter() - self.start, 1e-9)
