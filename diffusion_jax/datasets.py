"""TFDS data sets on disk: preparing one where the config points, once per run.

A TFDS data set is read from ``data.data_dir`` (TFDS's default, ``~/tensorflow_datasets`` or
``$TFDS_DATA_DIR``, when unset) as ArrayRecord files, the format grain reads at random. When it
is not there, ``ensure_prepared`` prepares it, as TFDS's ``download_and_prepare`` does: download
into ``<data_dir>/downloads``, convert in a temporary directory, rename into place.

In a run of several processes only process 0 prepares (several writers of one directory would
race); the others wait for its outcome on the ``jax.distributed`` key-value store and then open
the data. If process 0 fails, they fail with the same message instead of waiting; if it dies,
the coordination service ends them. After a success, a process that still does not see the data
stops with an error: ``data_dir`` must then be a directory every process reads (NFS, GCS), or be
prepared beforehand on every host.

When preparing is impossible here (no network, ``data.download`` False, a missing package, a
data set that needs files downloaded by hand), the error is one line: the data set, the directory
it was looked for in, why, and the command that prepares it elsewhere::

    python -m diffusion_jax.datasets cifar10 --data_dir=DIR
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import ml_collections
from absl import logging

# The file format of prepared data: grain reads records at random, which TFRecord cannot do.
FILE_FORMAT = "array_record"
# How long a waiting process sleeps between two log lines saying that it still waits.
_WAIT_LOG_INTERVAL_S = 60
# Retries of a failed download request, 0.2 s, 0.4 s and 0.8 s after the failure.
_DOWNLOAD_RETRIES = 3
_KEY_PREFIX = "diffusion_jax/datasets/prepared"
_OK = "ok"
# (name, data_dir) pairs whose preparation this process has already agreed on with the others.
_settled: set[tuple[str, str]] = set()


class DataSetUnavailableError(ValueError):
    """A TFDS data set is not prepared in its data_dir and could not be prepared here."""


def _builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)


def prepare_command(name: str, data_dir) -> str:
    """The shell command that prepares data set ``name`` in ``data_dir``."""
    return f"python -m diffusion_jax.datasets {name} --data_dir={data_dir}"


def _unavailable(builder, name: str, reason: str) -> DataSetUnavailableError:
    root = builder.data_dir_root
    return DataSetUnavailableError(
        f"Data set {name!r} is not prepared in {root} and could not be prepared here "
        f"({reason}). Prepare it on a machine with network access: "
        f"`{prepare_command(name, root)}`, then copy {root / builder.name} into {root} here, "
        "or point --config.data.data_dir at a copy."
    )


def _short_reason(error: BaseException) -> str:
    """One line on why preparing failed, from the exception and its causes."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        if isinstance(e, ModuleNotFoundError) and e.name:
            return f"the Python package {e.name.split('.')[0]!r} is not installed"
    for e in chain:
        request = getattr(e, "request", None)
        if type(e).__module__.startswith("requests") and request is not None:
            return f"downloading {request.url} failed with {type(e).__name__}: no network?"
    first = chain[0]
    lines = str(first).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{type(first).__name__}: {message}" if message else type(first).__name__


def _hide_gpus_from_tensorflow():
    """Keeps TensorFlow (which TFDS runs to extract and encode while preparing) off the GPUs,
    whose memory JAX holds; without TensorFlow, TFDS's own error says what is missing."""
    try:
        import tensorflow as tf
    except ImportError:
        return
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow had initialised its devices already
        pass


@contextlib.contextmanager
def _download_retries(retries: int):
    """Sets TFDS's download retries for the duration (a module constant of TFDS: 10, with
    exponential backoff, so that a machine without network waits 3.5 minutes for its error)."""
    from tensorflow_datasets.core.download import downloader

    saved = getattr(downloader, "MAX_RETRIES", None)
    if saved is None:  # another TFDS version: its own retries
        yield
        return
    downloader.MAX_RETRIES = retries
    try:
        yield
    finally:
        downloader.MAX_RETRIES = saved


def download_and_prepare(
    builder, name: str, *, manual_dir: str | None = None, hide_gpus: bool = False
) -> None:
    """Prepares ``builder``'s data set in its data_dir; raises ``DataSetUnavailableError``.

    ``hide_gpus``: keep TensorFlow off the GPUs (for a process whose JAX computes on them).
    Files already in the download cache (``<data_dir>/downloads``) or in ``manual_dir`` are
    used as they are; a download that fails is retried 3 times within 1.4 s (TFDS's own
    patience would keep a machine without network waiting for minutes).
    """
    import tensorflow_datasets as tfds

    logging.info("Preparing data set %r in %s ...", name, builder.data_dir_root)
    if hide_gpus:
        _hide_gpus_from_tensorflow()
    config = tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        try_download_gcs=False,  # prepared copies there are TFRecord, not ArrayRecord
    )
    try:
        with _download_retries(_DOWNLOAD_RETRIES):
            builder.download_and_prepare(download_config=config, file_format=FILE_FORMAT)
    except Exception as e:
        logging.debug("Preparing %r failed", name, exc_info=True)
        raise _unavailable(builder, name, _short_reason(e)) from e
    logging.info("Prepared data set %r in %s", name, builder.data_dir)


def ensure_prepared(
    data_config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> None:
    """Makes sure TFDS data set ``data_config.name`` is prepared in ``data_config.data_dir``.

    Every process of a run must call it (before opening the data): process 0 prepares the data
    set if it is missing, the others wait for it. Without ``data_config.download``, nothing is
    prepared. Raises ``DataSetUnavailableError`` (one line) when the data set cannot be had.
    """
    import jax

    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    name, data_dir = data_config.name, data_config.get("data_dir")
    builder = _builder(name, data_dir)
    if process_count == 1:
        if not builder.is_prepared():
            _prepare_here(builder, data_config)
        return
    settled = (name, os.fspath(builder.data_dir_root))
    if settled in _settled:
        return
    key = f"{_KEY_PREFIX}/{name}@{settled[1]}"
    if process_index == 0:
        outcome = "process 0 stopped while preparing it"
        try:
            if not builder.is_prepared():
                _prepare_here(builder, data_config)
            outcome = _OK
        except DataSetUnavailableError as e:
            outcome = str(e)
            raise
        finally:
            _publish(key, outcome)
    else:
        outcome = _await(key, name, process_index)
        if outcome != _OK:
            raise DataSetUnavailableError(outcome)
        if not _builder(name, data_dir).is_prepared():
            raise DataSetUnavailableError(
                f"Data set {name!r} was prepared by process 0 in {builder.data_dir_root}, but "
                f"process {process_index} does not find it there: data.data_dir must be a "
                "directory all processes read (NFS, GCS), or the data set must be prepared on "
                f"every host beforehand: `{prepare_command(name, builder.data_dir_root)}`."
            )
    _settled.add(settled)


def _prepare_here(builder, data_config) -> None:
    if not data_config.get("download", True):
        raise _unavailable(builder, data_config.name, "data.download is False")
    import jax

    download_and_prepare(builder, data_config.name, hide_gpus=jax.default_backend() == "gpu")


def _client():
    from jax._src import distributed  # the client orbax uses for its barriers, too

    return distributed.global_state.client


def _publish(key: str, outcome: str) -> None:
    client = _client()
    if client is None:  # several processes without jax.distributed: a collective barrier
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(key)
        return
    client.key_value_set(key, outcome)


def _await(key: str, name: str, process_index: int) -> str:
    """Process 0's outcome for ``key``; logs every minute while it is not there yet."""
    client = _client()
    if client is None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(key)
        return _OK
    logging.info("Process %d: waiting for process 0 to check or prepare %r", process_index, name)
    while True:
        try:
            return client.blocking_key_value_get(key, _WAIT_LOG_INTERVAL_S * 1000)
        except Exception as e:  # jax.errors.JaxRuntimeError
            if "DEADLINE_EXCEEDED" not in str(e):
                raise DataSetUnavailableError(
                    f"Process {process_index} lost process 0 while it checked or prepared data "
                    f"set {name!r} ({_short_reason(e)}); see process 0's log."
                ) from e
            logging.info(
                "Process %d: still waiting for process 0 to prepare %r", process_index, name
            )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_jax.datasets",
        description="Download and prepare TFDS data sets as the training and evaluation "
        "programs read them (ArrayRecord files in DATA_DIR).",
    )
    parser.add_argument("names", nargs="+", help="TFDS names, e.g. cifar10 celeb_a_hq/256")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="where to prepare them (default: $TFDS_DATA_DIR or ~/tensorflow_datasets); the "
        "programs' --config.data.data_dir",
    )
    parser.add_argument(
        "--manual_dir",
        default=None,
        help="files downloaded by hand, for data sets that need them (default: "
        "DATA_DIR/downloads/manual)",
    )
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    for name in args.names:
        try:
            builder = _builder(name, args.data_dir)
            if builder.is_prepared():
                print(f"{name}: already prepared in {builder.data_dir}")
                continue
            download_and_prepare(builder, name, manual_dir=args.manual_dir)
        except ValueError as e:  # DataSetUnavailableError, an unknown name
            parser.exit(1, f"error: {e}\n")
        print(f"{name}: prepared in {builder.data_dir}")


if __name__ == "__main__":
    sys.exit(main())
