"""Latent diffusion end to end on the digits, with tiny networks: the autoencoder trained by the
training program, the latent data set (deterministic, resumable, one per autoencoder), training
on posterior samples, and generation decoded through the autoencoder."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import (
    config_defaults,
    config_lib,
    evaluators,
    generate,
    input_pipeline,
    latents,
    ode_sampling,
    sharding,
    train,
    train_step,
)
from diffusion_jax.evaluators import common, samples
from diffusion_jax.models import autoencoder
from tests.test_train import REPO, _config

TINY_AE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=2, norm_num_groups=4)


def autoencoder_config(**overrides):
    config = _config("digits_autoencoder", **{"training.num_steps": 20, "training.log_every": 10})
    config.model.autoencoder.update(TINY_AE)
    overrides = {"training.checkpoint_every": 20, "optim.warmup_steps": 0, **overrides}
    return config_lib.apply_overrides(config, overrides)


def latent_config(path, **overrides):
    config = _config("digits_latent")
    config.data.update(path=str(path), channels=2)
    config.model.dit.update(hidden_size=32, depth=1, num_heads=2)
    config.sampling.num_steps = 3
    overrides = {
        "training.num_steps": 4,
        "training.batch_size": 16,
        "training.checkpoint_every": 4,
        "training.sample_every": 0,
        "training.log_every": 2,
        **overrides,
    }
    return config_lib.apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A tiny autoencoder trained 20 steps and the train split encoded with it."""
    root = tmp_path_factory.mktemp("latents")
    metrics = train.train_and_evaluate(autoencoder_config(), root / "ae")
    autoencoder_ = latents.load_autoencoder(root / "ae", sharding.make_mesh())
    data = autoencoder_config().data
    meta = latents.encode_split(autoencoder_, data, root / "latents", chunk_size=512)
    return root, metrics, autoencoder_, meta


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted((directory / "train" / "chunks").iterdir())}


def _arrays(directory):
    return {p.name: np.load(p) for p in sorted((directory / "train" / "chunks").iterdir())}


@pytest.mark.slow  # the autoencoder and latent model are trained: CI's slow pass
def test_autoencoder_trains_and_reports_its_terms(encoded):
    _, metrics, _, _ = encoded
    assert {"loss", "reconstruction", "kl"} <= set(metrics)
    # The mean squared error of the digits ([-1, 1], variance ~0.6) falls well below it.
    assert metrics["reconstruction"] < 0.4
    assert metrics["loss"] == pytest.approx(metrics["reconstruction"] + 1e-6 * metrics["kl"])


@pytest.mark.slow  # the autoencoder and latent model are trained: CI's slow pass
def test_latent_data_set_holds_both_orientations_and_unit_variance_samples(encoded):
    root, _, autoencoder_, meta = encoded
    source = latents.LatentSource(root / "latents", "train")
    assert len(source) == meta["num_examples"] == 1500 and meta["num_classes"] == 10
    assert meta["latent_shape"] == [4, 4, 2] and meta["autoencoder_id"] == autoencoder_.id
    digits = input_pipeline.DigitsSource("train")
    x = np.stack([digits[i]["image"] for i in (0, 777)]).astype(np.float32) / 127.5 - 1
    model = autoencoder_.model
    params = {"params": jax.device_get(autoencoder_.params)}
    for mirrored, images in ((0, x), (1, x[:, :, ::-1])):
        mean, logvar = model.apply(params, jnp.asarray(images), method=model.encode)
        for row, i in enumerate((0, 777)):
            np.testing.assert_allclose(source[i]["mean"][mirrored], mean[row], atol=1e-5)
            np.testing.assert_allclose(
                source[i]["std"][mirrored], np.exp(0.5 * logvar[row]), rtol=1e-5
            )
    assert source[777]["label"] == digits[777]["label"]
    means, stds = source.arrays()
    z = means + stds * np.random.default_rng(0).standard_normal(means.shape)
    assert np.std(z * meta["scaling_factor"]) == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow  # the autoencoder and latent model are trained: CI's slow pass
def test_encoding_resumed_after_a_kill_gives_the_same_bytes(encoded, tmp_path):
    root, _, autoencoder_, _ = encoded
    copy = tmp_path / "latents"
    shutil.copytree(root / "latents", copy)
    chunks = copy / "train" / "chunks"
    # Killed while writing chunk 1: its std was written, its label (written last) was not, and
    # the metadata is not complete.
    (chunks / "label_00001.npy").unlink()
    (chunks / "label_00002.npy").unlink()
    (chunks / "std_00002.npy").write_bytes(b"partial")
    meta_path = copy / "train" / "latents.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "complete": False}))
    data = autoencoder_config().data
    latents.encode_split(autoencoder_, data, copy, chunk_size=512)
    assert _files(copy) == _files(root / "latents")
    assert json.loads(meta_path.read_text()) == json.loads(
        (root / "latents" / "train" / "latents.json").read_text()
    )


@pytest.mark.slow  # three encoding programs: CI's slow pass
def test_encoding_on_1_or_4_devices_or_2_processes_writes_the_same_latents(encoded, tmp_path):
    root = encoded[0]
    flags = [f"--autoencoder={root / 'ae'}", "--batch_per_device=16", "--chunk_size=512"]
    runs = {
        "1 device": (["-m", "diffusion_jax.encode"], 1),
        "4 devices": (["-m", "diffusion_jax.encode"], 4),
    }
    for name, (command, devices) in runs.items():
        env = dict(
            os.environ,
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JAX_PLATFORMS="cpu",
        )
        out = tmp_path / name.replace(" ", "_")
        run = subprocess.run(
            [sys.executable, *command, *flags, f"--out={out}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "2_processes"
    env = dict(os.environ, MODULE="diffusion_jax.encode", PYTHON=sys.executable)
    env["LOG_DIR"] = str(tmp_path / "logs")
    run = subprocess.run(
        ["bash", str(REPO / "launch" / "local.sh"), "2", "2", "--", *flags, f"--out={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert run.returncode == 0, logs[-3000:]
    one = _arrays(tmp_path / "1_device")
    assert len(one) == 9  # 3 chunks of 512 x (mean, std, label)
    for other in (_arrays(tmp_path / "4_devices"), _arrays(out)):
        assert other.keys() == one.keys()
        for name, array in one.items():
            assert other[name].dtype == array.dtype and other[name].shape == array.shape, name
            if name.startswith("label"):
                np.testing.assert_array_equal(other[name], array)
            else:
                # Equal to float32 round-off, not bit for bit: XLA:CPU's kernels can round the
                # last image of a device's batch differently by how many devices the process
                # has, with the same program and inputs (seen on a 2-core AVX2 host: 2 ulp).
                np.testing.assert_allclose(other[name], array, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.slow  # the autoencoder and latent model are trained: CI's slow pass
def test_another_autoencoder_is_refused(encoded, tmp_path):
    root, _, autoencoder_, _ = encoded
    params = jax.tree_util.tree_map(lambda p: p * 1.001, autoencoder_.params)
    other = latents.Autoencoder(
        autoencoder_.model, params, autoencoder_.param_sharding, {"workdir": "x"}, None
    )
    with pytest.raises(ValueError, match="refusing to mix them"):
        latents.encode_split(other, autoencoder_config().data, root / "latents", chunk_size=512)


@pytest.mark.slow  # the autoencoder and latent model are trained: CI's slow pass
def test_input_pipeline_serves_scaled_posteriors_and_mirrors(encoded):
    root, _, _, meta = encoded
    source = latents.LatentSource(root / "latents", "train")
    means, stds = source.arrays()
    scale = np.float32(meta["scaling_factor"])

    def first_batch(random_flip):
        config = latent_config(root / "latents", **{"data.random_flip": random_flip})
        assert config_lib.validate(config) is config
        iterator = input_pipeline.create_train_iterator(config.data, global_batch_size=16, seed=3)
        return next(iterator)

    plain, flipped = first_batch(False), first_batch(True)
    assert plain["image"].shape == plain["std"].shape == (16, 4, 4, 2)
    # The same examples (the order is the seed's); each row's mirrored side follows the image
    # pipeline's flip draw for that row of the global batch.
    mirrored = np.random.default_rng([3, 0, input_pipeline._FLIP_STREAM]).random(16) < 0.5
    assert 0 < mirrored.sum() < 16
    for row in range(16):
        [i] = np.flatnonzero(np.all(means[:, 0] * scale == plain["image"][row], axis=(1, 2, 3)))
        side = int(mirrored[row])
        np.testing.assert_array_equal(flipped["image"][row], means[i, side] * scale)
        np.testing.assert_array_equal(flipped["std"][row], stds[i, side] * scale)
        assert flipped["label"][row] == plain["label"][row] == source[i]["label"]


@pytest.mark.slow  # the autoencoder and latent model are trained: CI's slow pass
def test_latent_model_trains_on_posterior_samples_and_samples_decoded_images(encoded):
    root, _, autoencoder_, meta = encoded
    workdir = root / "latent_model"
    metrics = train.train_and_evaluate(latent_config(root / "latents"), workdir)
    assert 1.0 < metrics["loss"] < 3.0  # flow matching on unit-variance data starts near 2
    overrides = {"eval.num_samples": 4, "eval.batch_size": 4}
    sampled = evaluators.evaluate(workdir, "sample", None, overrides)
    stored = samples.load_samples(sampled["sample_dir"])
    assert stored.shape == (4, 8, 8, 1) and stored.dtype == np.uint8

    # The same samples, written out: the ODE sampler on the restored network, then the decoder
    # of the autoencoder on latents / scaling_factor.
    config = config_lib.apply_overrides(latent_config(root / "latents"), overrides)
    ctx = common.restore(config, workdir, None)

    def network(x, noise_input):
        return ctx.model.apply({"params": ctx.params}, x, noise_input, None, train=False)

    keys = generate.sample_keys(jax.random.split(jax.random.PRNGKey(0))[1], jnp.arange(4))
    objective = config_lib.make_objective(config)
    z = ode_sampling.sample(
        network, objective, (4, 4, 4, 2), keys, **config_lib.ode_sampler_options(config)
    )
    model = autoencoder_.model
    images = model.apply(
        {"params": autoencoder_.params}, z / meta["scaling_factor"], method=model.decode
    )
    expected = generate.to_uint8(np.clip(images, -1, 1))
    assert np.abs(stored.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.slow  # the autoencoder and latent model are trained: CI's slow pass
def test_latent_models_refuse_bpd_and_bad_configs(encoded):
    root, _, _, _ = encoded
    workdir = root / "latent_model"
    with pytest.raises(config_lib.ConfigError, match="mode=bpd of a model of latents"):
        evaluators.evaluate(workdir, "bpd", None, {})
    config = latent_config(root / "latents", **{"sampling.clip_denoised": True})
    with pytest.raises(config_lib.ConfigError, match="'sampling.clip_denoised' clips"):
        config_lib.validate(config)
    config = latent_config(root / "latents", **{"data.channels": 4})
    with pytest.raises(ValueError, match=r"holds latents of shape \(4, 4, 2\)"):
        input_pipeline.dataset_spec(config.data)
    with pytest.raises(ValueError, match="No latent data set"):
        input_pipeline.dataset_spec(latent_config(root / "nowhere").data)


def test_posterior_sample_draws_from_the_examples_own_key():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    mean, std = jnp.arange(3.0)[:, None], jnp.full((3, 1), 2.0)
    x = train_step.posterior_sample(keys, mean, std)
    for i in range(3):
        eps = jax.random.normal(jax.random.fold_in(keys[i], train_step._POSTERIOR_STREAM), (1,))
        np.testing.assert_allclose(x[i], mean[i] + 2.0 * eps, rtol=1e-6)
    # The autoencoder's KL is the closed form of two diagonal Gaussians.
    kl = autoencoder.kl_divergence(jnp.ones((1, 1, 1, 2)), jnp.zeros((1, 1, 1, 2)))
    assert float(kl[0]) == pytest.approx(1.0)
    assert config_defaults.get_config().model.autoencoder.kl_weight == 1e-6


def test_imported_weights_encode_with_their_own_scaling(tmp_path):
    """A diffusers weights file (a random tiny VAE here) encodes the digits, and the latents
    keep the scaling its config.json gives instead of one computed from the data."""
    from safetensors.numpy import save_file

    from diffusion_jax import autoencoder_weights

    model = autoencoder.AutoencoderKL(in_channels=1, out_channels=1, **TINY_AE)
    state = autoencoder_weights.random_state_dict(model, 0)
    weights = tmp_path / "vae.safetensors"
    save_file({k: np.asarray(v, np.float32) for k, v in state.items()}, weights)
    (tmp_path / "config.json").write_text(
        json.dumps({"norm_num_groups": 4, "scaling_factor": 0.5, "shift_factor": 0.1})
    )
    imported = latents.load_autoencoder(weights, sharding.make_mesh())
    data = autoencoder_config().data
    meta = latents.encode_split(imported, data, tmp_path / "latents", chunk_size=512)
    assert (meta["scaling_factor"], meta["shift_factor"]) == (0.5, 0.1)
    assert meta["autoencoder"] == {"weights": str(weights)}
    x = input_pipeline.DigitsSource("train")[0]["image"][None].astype(np.float32) / 127.5 - 1
    mean, _ = imported.model.apply(
        {"params": imported.params}, jnp.asarray(x), method=imported.model.encode
    )
    source = latents.LatentSource(tmp_path / "latents", "train")
    np.testing.assert_allclose(source[0]["mean"][0], mean[0], atol=1e-5)
