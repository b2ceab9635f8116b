"""A TFDS data set on a fresh machine: prepared by the first run, or a one-line error.

Nothing here uses the network. The subprocesses get a proxy on a closed port, so any download
fails at once (also on a machine with network). Preparing from files: the test writes a
CIFAR-10 tarball in the real binary format, with a few records, into TFDS's download cache of
``data_dir``, under the name TFDS gives the real download; the real ``cifar10`` builder then
extracts and converts it, as after a download. That needs TensorFlow (TFDS runs it to extract
and encode), a declared dependency; without it those tests skip.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import tarfile
import time

import ml_collections
import numpy as np
import pytest

from diffusion_jax import config_defaults, datasets
from tests import prepare_worker

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "launch" / "local.sh"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
CIFAR10_LABELS = "airplane automobile bird cat deer dog frog horse ship truck".split()
TINY_CIFAR10_RUN = (
    "--config=configs/cifar10.py",
    "--config.model.unet.ch=32",
    "--config.model.unet.ch_mult=(1,)",
    "--config.model.unet.num_res_blocks=1",
    "--config.model.unet.attn_resolutions=()",
    "--config.training.batch_size=4",
    "--config.training.num_steps=2",
    "--config.training.log_every=1",
    "--config.training.sample_every=0",
)
# Halves XLA:CPU compile time, which dominates these few-step runs.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
PREPARED_LOG = "Preparing data set 'cifar10'"  # logged by diffusion_jax.datasets
GENERATING_LOG = "Generating dataset cifar10"  # logged by TFDS when it converts the files

needs_tensorflow = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None
    or importlib.util.find_spec("importlib_resources") is None,
    reason="tensorflow and importlib_resources (declared dependencies: pip install -e .) are "
    "needed to prepare a TFDS data set",
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_env(**extra) -> dict[str, str]:
    """The environment of a subprocess whose downloads fail at once: no network."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.pop("TFDS_DATA_DIR", None)
    proxy = f"http://127.0.0.1:{_closed_port()}"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = proxy
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"  # jax.distributed's gRPC
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def write_cifar10_download(data_dir: pathlib.Path, per_file: int = 2) -> dict[str, np.ndarray]:
    """Puts a CIFAR-10 binary tarball (``per_file`` random records in each of its six files)
    into TFDS's download cache of ``data_dir``, as if TFDS had downloaded it.

    Returns {TFDS example id ("train_00000", "test_00001", ...): uint8 image [32, 32, 3]}.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import resource

    rng = np.random.default_rng(0)
    expected, counts = {}, {"train": 0, "test": 0}
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:gz") as tar:

        def add(name: str, data: bytes):
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for name in CIFAR10_FILES:
            split = "test" if name.startswith("test") else "train"
            labels = rng.integers(0, 10, (per_file, 1), dtype=np.uint8)
            planes = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)
            add(name, np.concatenate([labels, planes], axis=1).tobytes())
            for image in planes.reshape(per_file, 3, 32, 32).transpose(0, 2, 3, 1):
                expected[f"{split}_{counts[split]:05d}"] = image
                counts[split] += 1
        add("batches.meta.txt", ("\n".join(CIFAR10_LABELS) + "\n").encode())
    url_info = tfds.builder("cifar10", data_dir=data_dir).url_infos[CIFAR10_URL]
    path = (
        data_dir / "downloads" / "cifar10" / resource.get_dl_fname(CIFAR10_URL, url_info.checksum)
    )
    path.parent.mkdir(parents=True)
    path.write_bytes(tar_bytes.getvalue())
    info = {"urls": [CIFAR10_URL], "original_fname": "cifar-10-binary.tar.gz"}
    resource.get_info_path(path).write_text(json.dumps(info))
    return expected


def _assert_prepared_intact(data_dir: pathlib.Path, expected: dict[str, np.ndarray]):
    import tensorflow_datasets as tfds

    seen = {}
    for split in ("train", "test"):
        source = tfds.data_source("cifar10", split=split, data_dir=data_dir, download=False)
        for i in range(len(source)):
            record = source[i]
            key = record["id"].decode() if isinstance(record["id"], bytes) else record["id"]
            seen[key] = record["image"]
    assert sorted(seen) == sorted(expected)
    for key, image in expected.items():
        np.testing.assert_array_equal(seen[key], image, err_msg=key)
    leftovers = [p for p in (data_dir / "cifar10").rglob("*") if "incomplete" in p.name]
    assert not leftovers


def _run(command: list[str], env: dict[str, str], timeout: int = 300):
    start = time.monotonic()
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - start


def _train_command(workdir, data_dir, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "diffusion_jax.train",
        "--config=configs/cifar10.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *extra,
    ]


def test_cifar10_command_without_the_data_set_fails_in_one_line(tmp_path):
    """The headline command, no network, nothing prepared: one line names the data set, the
    directory and the command that prepares it; the workdir is never created."""
    workdir, data_dir = tmp_path / "workdir", tmp_path / "tfds"
    result, seconds = _run(_train_command(workdir, data_dir), _offline_env(), timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: Data set 'cifar10' is not prepared in {data_dir} and could not be prepared here ("
    ), result.stderr[-3000:]
    assert f"`python -m diffusion_jax.datasets cifar10 --data_dir={data_dir}`" in last
    assert "Traceback" not in result.stderr
    assert not workdir.exists()
    assert seconds < 60  # no minutes of download retries


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
@needs_tensorflow
def test_two_processes_prepare_once(tmp_path):
    """Two processes open the training data of a data_dir holding only the downloaded tarball:
    process 0 prepares (TFDS converts the files once), process 1 waits; both then read their
    rows of the first batch, and the prepared data set holds exactly the tarball's records."""
    data_dir, logs = tmp_path / "tfds", tmp_path / "logs"
    expected = write_cifar10_download(data_dir)
    command = [str(LOCAL_SH), "2", "1", "--", f"--data_dir={data_dir}"]
    env = _offline_env(LOG_DIR=str(logs), KILL_AFTER="20", MODULE="tests.prepare_worker")
    result, _ = _run(command, env, timeout=120)
    log = [(logs / f"process_{i}.log").read_text() for i in range(2)]
    assert result.returncode == 0, "\n".join(text[-3000:] for text in log)
    for needle in (PREPARED_LOG, GENERATING_LOG):
        assert [text.count(needle) for text in log] == [1, 0], needle
    assert "waiting for process 0" in log[1]
    _assert_prepared_intact(data_dir, expected)
    first = _first_global_batch(data_dir)
    for i, text in enumerate(log):
        rows = first[i * 2 : (i + 1) * 2]
        assert f"first batch {prepare_worker.digest(rows)}" in text


def _first_global_batch(data_dir) -> np.ndarray:
    """The images the input pipeline serves first, without shuffling: records 0..3."""
    import tensorflow_datasets as tfds

    source = tfds.data_source("cifar10", split="train", data_dir=data_dir, download=False)
    images = np.stack([source[i]["image"] for i in range(prepare_worker.GLOBAL_BATCH)])
    return images.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


@pytest.mark.slow  # long end to end: runs in CI's slow pass
@needs_tensorflow
def test_cifar10_command_prepares_from_local_files_and_trains(tmp_path, monkeypatch, capsys):
    """The headline command (a smaller network), offline, on a data_dir holding the downloaded
    tarball: it prepares the data set from it and trains; later runs find it prepared."""
    workdir, data_dir = tmp_path / "workdir", tmp_path / "tfds"
    expected = write_cifar10_download(data_dir)
    command = _train_command(workdir, data_dir) + list(TINY_CIFAR10_RUN[1:])
    result, _ = _run(command, _offline_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(GENERATING_LOG) == 1
    assert "step 2/2" in result.stderr and (workdir / "checkpoints" / "2").is_dir()
    _assert_prepared_intact(data_dir, expected)
    monkeypatch.setattr(datasets, "download_and_prepare", _must_not_prepare)
    datasets.ensure_prepared(_data_config(tmp_path), process_index=0, process_count=1)
    datasets.main(["cifar10", f"--data_dir={data_dir}"])
    assert "cifar10: already prepared in" in capsys.readouterr().out


@pytest.mark.slow
@needs_tensorflow
def test_two_processes_prepare_once_then_train(tmp_path):
    """Two processes start on a data_dir holding only the downloaded tarball: process 0
    prepares (once: TFDS converts the files once), process 1 waits, both train on the data,
    and the prepared data set holds exactly the records the tarball holds."""
    workdir, data_dir, logs = tmp_path / "workdir", tmp_path / "tfds", tmp_path / "logs"
    expected = write_cifar10_download(data_dir)
    command = [str(LOCAL_SH), "2", "1", "--", *_train_command(workdir, data_dir)[3:]]
    command += TINY_CIFAR10_RUN[1:]
    result, _ = _run(command, _offline_env(LOG_DIR=str(logs), KILL_AFTER="20"))
    log = [(logs / f"process_{i}.log").read_text() for i in range(2)]
    assert result.returncode == 0, "\n".join(text[-3000:] for text in log)
    for needle in (PREPARED_LOG, GENERATING_LOG):
        assert [text.count(needle) for text in log] == [1, 0], needle
    assert "waiting for process 0" in log[1]
    assert "step 2/2" in log[0]  # process 0 reports for the run
    assert (workdir / "checkpoints" / "2").is_dir()
    _assert_prepared_intact(data_dir, expected)


@pytest.mark.slow
def test_two_processes_without_the_data_set_both_fail_in_one_line(tmp_path):
    """Process 0 cannot prepare; process 1, waiting for it, stops with the same line instead
    of waiting for ever (the launcher would kill it only after KILL_AFTER seconds)."""
    workdir, data_dir, logs = tmp_path / "workdir", tmp_path / "tfds", tmp_path / "logs"
    command = [str(LOCAL_SH), "2", "1", "--", *_train_command(workdir, data_dir)[3:]]
    result, seconds = _run(command, _offline_env(LOG_DIR=str(logs), KILL_AFTER="300"))
    assert result.returncode == 1
    lines = [(logs / f"process_{i}.log").read_text().strip().splitlines()[-1] for i in range(2)]
    assert lines[0] == lines[1]
    assert lines[0].startswith("error: Data set 'cifar10' is not prepared in ")
    assert seconds < 200
    assert not workdir.exists()


# In-process checks of the coordination, with a stand-in for jax.distributed's key-value store.


def _data_config(tmp_path, **overrides) -> ml_collections.ConfigDict:
    config = config_defaults.get_config().data
    config.data_dir = str(tmp_path / "tfds")
    config.update(overrides)
    return config


class _FakeClient:
    def __init__(self, outcome=None, timeouts=0):
        self.published, self._outcome, self._timeouts = {}, outcome, timeouts

    def key_value_set(self, key, value):
        assert key not in self.published
        self.published[key] = value

    def blocking_key_value_get(self, key, timeout_ms):
        if self._timeouts:
            self._timeouts -= 1
            raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
        return self._outcome


def _must_not_prepare(*args, **kwargs):
    raise AssertionError("prepared")


@pytest.fixture
def fake_client(monkeypatch):
    def install(**kwargs):
        client = _FakeClient(**kwargs)
        monkeypatch.setattr(datasets, "_client", lambda: client)
        monkeypatch.setattr(datasets, "_settled", set())
        return client

    return install


def test_download_false_does_not_prepare(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "download_and_prepare", _must_not_prepare)
    config = _data_config(tmp_path, download=False)
    with pytest.raises(datasets.DataSetUnavailableError) as error:
        datasets.ensure_prepared(config, process_index=0, process_count=1)
    message = str(error.value)
    assert "\n" not in message and "(data.download is False)" in message
    assert f"python -m diffusion_jax.datasets cifar10 --data_dir={config.data_dir}" in message
    assert not (tmp_path / "tfds").exists()


def test_process_0_publishes_its_failure(tmp_path, monkeypatch, fake_client):
    client = fake_client()

    def fail(builder, name, **kwargs):
        raise datasets.DataSetUnavailableError(f"{name}: no network")

    monkeypatch.setattr(datasets, "download_and_prepare", fail)
    with pytest.raises(datasets.DataSetUnavailableError, match="cifar10: no network"):
        datasets.ensure_prepared(_data_config(tmp_path), process_index=0, process_count=2)
    assert list(client.published.values()) == ["cifar10: no network"]


def test_waiting_process_fails_with_process_0s_message(tmp_path, monkeypatch, fake_client):
    fake_client(outcome="Data set 'cifar10' is not prepared in X", timeouts=2)
    monkeypatch.setattr(datasets, "download_and_prepare", _must_not_prepare)
    with pytest.raises(datasets.DataSetUnavailableError) as error:
        datasets.ensure_prepared(_data_config(tmp_path), process_index=1, process_count=2)
    assert str(error.value) == "Data set 'cifar10' is not prepared in X"


def test_waiting_process_that_does_not_see_the_data_says_so(tmp_path, monkeypatch, fake_client):
    fake_client(outcome="ok")
    monkeypatch.setattr(datasets, "download_and_prepare", _must_not_prepare)
    with pytest.raises(datasets.DataSetUnavailableError, match="all processes read"):
        datasets.ensure_prepared(_data_config(tmp_path), process_index=1, process_count=2)


def test_short_reason_names_a_missing_package():
    try:
        try:
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
        except ImportError as e:
            raise RuntimeError("extraction failed") from e
    except RuntimeError as e:
        reason = datasets._short_reason(e)
    assert reason == "the Python package 'tensorflow' is not installed"
