"""The digits classifier: deterministic, accurate, cached by recipe, and its Fréchet distance
orders real digits, degraded digits and noise as a sample-quality metric should."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.ndimage

from diffusion_jax import digits_classifier, metrics


@pytest.fixture(scope="module")
def params():
    return digits_classifier.train(0)


def _fd(params, images_a, images_b) -> float:
    a = digits_classifier.feature_stats(params, images_a)
    b = digits_classifier.feature_stats(params, images_b)
    return metrics.frechet_distance(*a.mean_and_cov(), *b.mean_and_cov())


def _shift_right(images, pixels):
    out = np.zeros_like(images)
    out[:, :, pixels:] = images[:, :, :-pixels]
    return out


def _blur(images, sigma):
    blurred = scipy.ndimage.gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma, 0))
    return np.round(blurred).astype(np.uint8)


def test_training_is_deterministic(params):
    again = digits_classifier.train(0)
    for layer, layer_again in zip(params, again, strict=True):
        np.testing.assert_array_equal(layer["w"], layer_again["w"])
        np.testing.assert_array_equal(layer["b"], layer_again["b"])
    other_seed = digits_classifier.train(1)
    assert not np.array_equal(params[0]["w"], other_seed[0]["w"])


def test_test_split_accuracy(params):
    accuracy = digits_classifier.accuracy(params, "test")
    print(f"digits classifier test accuracy: {accuracy:.4f}")
    assert accuracy >= 0.9
    assert digits_classifier.accuracy(params, "train") > accuracy


def test_features_match_a_numpy_forward_pass(params):
    images, _ = digits_classifier.split_arrays("test")
    out = digits_classifier.features(params, images[:20])
    # The input pipeline's conversion of 8-bit pixels, then the MLP written out.
    x = (images[:20].astype(np.float32) * np.float32(2 / 255) - np.float32(1)).reshape(20, 64)
    h = np.maximum(x @ params[0]["w"] + params[0]["b"], 0)
    h = np.maximum(h @ params[1]["w"] + params[1]["b"], 0)
    assert out["features"].dtype == np.float32 and out["features"].shape == (20, 64)
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (20, 10)
    np.testing.assert_allclose(out["features"], h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["logits"], h @ params[2]["w"] + params[2]["b"], atol=1e-4)


def test_frechet_distance_orders_real_degraded_and_noise(params):
    train_images, _ = digits_classifier.split_arrays("train")
    test_images, _ = digits_classifier.split_arrays("test")
    noise = np.random.default_rng(0).integers(0, 256, test_images.shape, dtype=np.uint8)
    fd = {
        "real": _fd(params, train_images, test_images),
        "blur 0.7": _fd(params, test_images, _blur(test_images, 0.7)),
        "blur 1.2": _fd(params, test_images, _blur(test_images, 1.2)),
        "shift 1": _fd(params, test_images, _shift_right(test_images, 1)),
        "shift 2": _fd(params, test_images, _shift_right(test_images, 2)),
        "noise": _fd(params, test_images, noise),
    }
    print("digits FD vs test split:", {k: round(v, 1) for k, v in fd.items()})
    assert fd["noise"] > 20 * fd["real"]
    assert fd["real"] < fd["blur 0.7"] < fd["blur 1.2"] < fd["noise"]
    assert fd["real"] < fd["shift 1"] < fd["shift 2"]


def test_cache_round_trip_and_invalidation(params, tmp_path, monkeypatch):
    calls = []

    def fake_train(seed, *, recipe):
        calls.append((seed, recipe))
        return params

    monkeypatch.setattr(digits_classifier, "train", fake_train)
    first = digits_classifier.load_or_train(tmp_path)
    second = digits_classifier.load_or_train(tmp_path)
    assert len(calls) == 1  # the second call read the cache
    for a, b in zip(second, params, strict=True):
        np.testing.assert_array_equal(a["w"], b["w"])
        np.testing.assert_array_equal(a["b"], b["b"])
    assert first is params

    cached = digits_classifier.cache_path(tmp_path)
    assert cached.exists() and digits_classifier.recipe_key() in cached.name
    longer = dataclasses.replace(
        digits_classifier.RECIPE, num_steps=1 + digits_classifier.RECIPE.num_steps
    )
    digits_classifier.load_or_train(tmp_path, recipe=longer)
    assert len(calls) == 2 and calls[-1][1] == longer
    monkeypatch.setattr(digits_classifier, "RECIPE_VERSION", digits_classifier.RECIPE_VERSION + 1)
    digits_classifier.load_or_train(tmp_path)
    assert len(calls) == 3
    assert len(list(tmp_path.glob("digits_classifier_*.npz"))) == 3


def test_a_corrupt_cache_file_is_replaced(params, tmp_path, monkeypatch):
    monkeypatch.setattr(digits_classifier, "train", lambda seed, *, recipe: params)
    path = digits_classifier.cache_path(tmp_path)
    path.write_bytes(b"PK\x03\x04 truncated")
    loaded = digits_classifier.load_or_train(tmp_path)
    assert loaded is params
    np.testing.assert_array_equal(digits_classifier.load_or_train(tmp_path)[0]["w"], params[0]["w"])
