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
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import checkpointing, config_lib, generate, input_pipeline, sharding, train_step


@dataclasses.dataclass(frozen=True)
class Context:
    """A restored checkpoint, ready to evaluate.

    ``params`` are the EMA parameters of checkpoint ``step``, laid out as ``param_sharding``
    over ``mesh`` (every device of every process). ``eval_dir`` is ``workdir/eval``; only the
    main process (``is_main``) writes there.
    """

    config: Any
    workdir: epath.Path
    step: int
    mesh: jax.sharding.Mesh
    model: Any
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


def load_config(workdir, step: int | None, overrides: dict | None = None):
    """``(config, step)``: the config checkpoint ``step`` (None: the latest) of ``workdir`` was
    trained with, with ``overrides`` (dotted keys) set, and that step. For a checkpoint saved
    before checkpoints recorded their config: the workdir's ``config.json``."""
    checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
    try:
        step = checkpointer.step_to_evaluate(step)
        saved = checkpointer.saved_config(step)
    finally:
        checkpointer.close()
    if saved is None:
        return config_lib.load(workdir, overrides), step
    return config_lib.from_dict(saved, overrides, source=f"checkpoint {step}"), step


def restore(config, workdir, step: int) -> Context:
    """Builds the model of ``config`` and restores only the EMA parameters of checkpoint
    ``step`` of ``workdir``."""
    workdir = epath.Path(workdir)
    image_shape, num_classes = input_pipeline.dataset_spec(config.data)
    config_lib.check_classes(config, num_classes)
    mesh = sharding.make_mesh(config.training.fsdp)
    model = config_lib.make_model(config, num_classes)
    optimizer, _ = train_step.make_optimizer(config.optim)
    abstract, shardings = train_step.state_shardings(config, model, optimizer, image_shape, mesh)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract.ema_params,
        shardings.ema_params,
    )
    checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
    try:
        params = checkpointer.restore_ema_params(step, target)
    finally:
        checkpointer.close()
    return Context(
        config=config,
        workdir=workdir,
        step=step,
        mesh=mesh,
        model=model,
        params=params,
        param_sharding=shardings.ema_params,
        eval_dir=workdir / "eval",
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
