"""A workdir on ``gs://``: both programs on a local GCS emulator, through the clients they use on
Google Cloud (etils.epath over gcsfs; orbax's TensorStore GCS driver and google-cloud-storage).

Skipped unless gcsfs, google-cloud-storage and gcp-storage-emulator are installed (the ``test``
extras). The test runs in an empty current directory: a file written past epath would land
there (as ``gs:/bucket/...``) instead of in the bucket.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from http import HTTPStatus

import jax
import portpicker
import pytest
from etils import epath
from jax.experimental.compilation_cache import compilation_cache
from PIL import Image

from diffusion_jax import checkpointing, config_lib, evaluators, train
from diffusion_jax.evaluators import samples
from tests.test_evaluate import tiny_config

CLIENTS = ("gcsfs", "google.cloud.storage", "gcp_storage_emulator")


@pytest.fixture(scope="module")
def bucket():
    missing = [name for name in CLIENTS if importlib.util.find_spec(name.split(".")[0]) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install -e '.[test]')")
    port = portpicker.pick_unused_port()
    url = f"http://localhost:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs (read at its import), google-cloud-storage
        env.setenv("TENSORSTORE_GCS_HTTP_URL", url)
        env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore's credentials
        env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # no gRPC bucket-type lookup
        env.setenv("EPATH_USE_TF", "false")  # epath through fsspec even where TensorFlow is
        # ... which etils reads once per process (cached), maybe before this fixture ran.
        from etils.epath import gpath

        gpath._is_tf_installed.cache_clear()
        import fsspec
        import gcsfs
        from gcp_storage_emulator import server as emulator
        from gcp_storage_emulator.handlers import objects

        env.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
        env.setattr(objects, "download", _with_generation_header(objects.download))
        env.setattr(emulator, "HANDLERS", ((_MOVE_ROUTE, {"POST": _move}), *emulator.HANDLERS))
        server = emulator.create_server("localhost", port, in_memory=True, default_bucket="bucket")
        server.start()
        try:
            yield epath.Path("gs://bucket")
        finally:
            server.stop()
            gcsfs.GCSFileSystem.clear_instance_cache()
            gpath._is_tf_installed.cache_clear()  # the environment is restored after this


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache: the resumed run reuses the first run's train step."""
    previous = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    compilation_cache.reset_cache()


_MOVE_ROUTE = (
    r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
    r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
)


def _move(request, response, storage, *args, **kwargs):
    """GCS's objects.move (gcsfs renames with it), which the emulator lacks: a copy, then a
    delete of the source."""
    from gcp_storage_emulator.handlers import objects

    params = request.params
    params["dest_bucket_name"] = params["bucket_name"]
    objects.copy(request, response, storage)
    if response.status == HTTPStatus.OK:
        storage.delete_file(params["bucket_name"], params["object_id"])


def _with_generation_header(download):
    """The emulator's download handler, plus the ``x-goog-generation`` header that GCS sends
    and TensorStore needs for its conditional writes (OCDBT's manifest)."""

    def handler(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            params = request.params
            obj = storage.get_file_obj(params["bucket_name"], params["object_id"])
            response["x-goog-generation"] = obj["generation"]

    return handler


def _snapshot(directory: epath.Path) -> dict[str, str]:
    """Every file under ``directory`` with a hash of its contents."""
    files = {}
    for path in directory.iterdir():
        if path.is_dir():
            files.update(_snapshot(path))
        else:
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_train_resume_and_evaluate_on_gcs(bucket, compile_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = bucket / "run"
    config = tiny_config()
    train.train_and_evaluate(config, str(workdir))

    assert sorted(p.name for p in workdir.iterdir()) == [
        "checkpoints",
        "config.json",
        "tensorboard",
    ]
    (events,) = (workdir / "tensorboard").iterdir()
    assert b"train/loss" in events.read_bytes()

    first = (workdir / "config.json").read_bytes()
    before = _snapshot(workdir)
    with pytest.raises(config_lib.ConfigError, match=r"training.batch_size 16 -> 8\."):
        train.train_and_evaluate(tiny_config(**{"training.batch_size": 8}), str(workdir))
    assert _snapshot(workdir) == before

    config.training.num_steps = 3
    train.train_and_evaluate(config, str(workdir))
    checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
    assert checkpointer.step_to_evaluate(None) == 3
    checkpointer.close()
    assert (workdir / "config.json").read_bytes() == first
    assert len(list(workdir.glob("config_step2_*.json"))) == 1

    overrides = {"eval.num_samples": 4, "eval.batch_size": 4}
    result = evaluators.evaluate(str(workdir), "sample", overrides=overrides)
    assert result["sample_dir"] == f"{workdir}/eval/samples_step3"
    assert samples.load_samples(result["sample_dir"]).shape == (4, 8, 8, 1)
    record = json.loads((workdir / "eval" / "sample_step3.json").read_text())
    assert record["config"]["training"]["num_steps"] == 3  # checkpoint 3's config
    grid = Image.open(io.BytesIO((workdir / "eval" / "samples_step3.png").read_bytes()))
    assert grid.size == (272, 272)  # 2 x 2 samples of 8 x 8, scaled by 16
    assert not list(tmp_path.iterdir())
