"""What a run shows: a progress line, TensorBoard scalars and image grids as PNG.

Only process 0 writes; the other processes get no-op writers, so callers need no branches.
Files go through ``etils.epath``, so the workdir may be local or ``gs://...``.
"""

from __future__ import annotations

import datetime
import io
import os
import time

import numpy as np
from absl import logging
from etils import epath
from PIL import Image


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tiles ``[N, H, W, C]`` images in [-1, 1] into one uint8 ``[rows*H, cols*W, C]`` grid
    (row by row; as square as N allows unless ``cols`` is given), separated by 1-pixel
    mid-grey lines."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    pixels = np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), 128, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = pixels[i]
    return grid


def rows_by_class(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """``(cells, cols)``: ``images [N, H, W, C]`` regrouped for ``image_grid(cells, cols)`` as
    one row per class in increasing label order, each row's images in their order in
    ``images``, short rows filled with mid-grey (0) cells."""
    classes = np.unique(labels)
    groups = [images[labels == c] for c in classes]
    cols = max(len(g) for g in groups)
    cells = np.zeros((len(classes) * cols,) + images.shape[1:], np.float32)
    for row, group in enumerate(groups):
        cells[row * cols : row * cols + len(group)] = group
    return cells, cols


def save_sample_grid(path, images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Writes samples ``[N, H, W, C]`` in [-1, 1] as a PNG grid to ``path``: as square as N
    allows, or one row per class when ``labels [N]`` are given; upscaled to about 256 pixels
    along its longer side. Returns the grid (uint8, not upscaled)."""
    cols = None
    if labels is not None:
        images, cols = rows_by_class(images, labels)
    grid = image_grid(images, cols)
    size = images.shape[1]
    cells = (max(grid.shape[:2]) + 1) // (size + 1)  # images along the longer side
    _write_png(path, grid, max(1, 256 // (size * cells)))
    return grid


def save_png(path, images: np.ndarray, *, scale: int = 1, cols: int | None = None):
    """Writes an image grid of ``images`` to ``path`` (nearest-neighbour upscaled by scale);
    returns the path."""
    return _write_png(path, image_grid(images, cols), scale)


def _write_png(path, grid: np.ndarray, scale: int):
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    png = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(png, format="PNG")
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png.getvalue())
    return path


class _EventFile:
    """A TensorBoard event file at a URI (``gs://...``), written through ``etils.epath``. An
    object cannot be appended to, so every flush rewrites it with all events so far: TensorBoard
    shows the run while it trains. (tensorboardX's own ``gs://`` and ``s3://`` writers do the
    same, through google-cloud-storage and boto3.)"""

    def __init__(self, path):
        self._path = epath.Path(path)
        self._events = io.BytesIO()

    def write(self, data: bytes):
        self._events.write(data)

    def flush(self):
        self._path.write_bytes(self._events.getvalue())

    def close(self):
        self.flush()


class _EventFiles:
    """tensorboardX's writer factory for a URI scheme: event files through ``etils.epath``."""

    def open(self, path):
        return _EventFile(path)

    def directory_check(self, path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


class Reporter:
    """Progress lines, TensorBoard scalars and sample grids of one run (process 0 only)."""

    def __init__(self, workdir, *, total_steps: int, batch_size: int, active: bool):
        self.workdir = epath.Path(workdir)
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.active = active
        self._writer = None
        if active:
            from tensorboardX import SummaryWriter, record_writer

            logdir = os.fspath(self.workdir / "tensorboard")
            if "://" in logdir:
                scheme = logdir.split("://")[0]
                record_writer.register_writer_factory(scheme, _EventFiles())
            self._writer = SummaryWriter(logdir)
        self._last_time = None
        self._last_step = None

    def start(self, step: int):
        self._last_time, self._last_step = time.perf_counter(), step

    def log_train(self, step: int, metrics: dict[str, float]):
        """Logs averaged metrics at ``step``, with throughput since the last call and ETA."""
        now = time.perf_counter()
        steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        if not self.active:
            return
        eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
        eta_text = str(datetime.timedelta(seconds=int(eta))) if np.isfinite(eta) else "?"
        # A classifier's accuracy (train_step.REPORTED_TERMS) joins the line.
        accuracy = f" | accuracy {metrics['accuracy']:.3f}" if "accuracy" in metrics else ""
        logging.info(
            "step %d/%d | loss %.4f%s | grad_norm %.3f | %.2f steps/s | %.1f img/s | ETA %s",
            step,
            self.total_steps,
            metrics["loss"],
            accuracy,
            metrics["grad_norm"],
            steps_per_s,
            steps_per_s * self.batch_size,
            eta_text,
        )
        scalars = dict(
            metrics, steps_per_sec=steps_per_s, images_per_sec=steps_per_s * self.batch_size
        )
        for name, value in scalars.items():
            self._writer.add_scalar(f"train/{name}", value, step)
        self._writer.flush()

    def save_samples(
        self, step: int, images: np.ndarray, labels: np.ndarray | None = None
    ) -> epath.Path | None:
        """Writes ``samples/step_<N>.png`` and a TensorBoard image: ``images [N, H, W, C]`` in
        [-1, 1], one row per class when ``labels [N]`` are given."""
        if not self.active:
            return None
        path = self.workdir / "samples" / f"step_{step:08d}.png"
        grid = save_sample_grid(path, images, labels)
        self._writer.add_image("samples", grid, step, dataformats="HWC")
        self._writer.flush()
        logging.info("step %d | wrote %s", step, path)
        return path

    def log_eval(self, step: int, mode: str, result: dict, seconds: float, summary: str):
        """Logs an evaluation of ``step`` during training: its one-line ``summary``, and its
        numbers (those of ``result`` that are ints or floats, and the ``seconds`` it took) as
        TensorBoard scalars ``eval/<mode>/<key>``."""
        if not self.active:
            return
        logging.info("step %d | eval %s (%.1f s): %s", step, mode, seconds, summary)
        scalars = dict(result, seconds=seconds)
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"eval/{mode}/{name}", value, step)
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
