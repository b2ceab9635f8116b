"""Tests for diffusion_jax.input_pipeline (embedded digits and mocked TFDS)."""

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets

from diffusion_jax import input_pipeline

NUM_DIGITS = 1500  # the digits' train split


def _config(**overrides) -> ml_collections.ConfigDict:
    config = dict(
        name="digits",
        split="train",
        image_size=8,
        channels=1,
        random_flip=True,
        shuffle=True,
        num_workers=0,
        prefetch=2,
        data_dir=None,
    )
    config.update(overrides)
    return ml_collections.ConfigDict(config)


def _take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(n)]


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Inverts the [-1, 1] mapping exactly (float32 [..., H, W, C] -> uint8)."""
    return np.round((images + 1) * 127.5).astype(np.uint8)


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_digits_batch_shapes_dtypes_range():
    it = input_pipeline.create_train_iterator(_config(), global_batch_size=32, seed=0)
    batch = next(it)
    assert batch["image"].shape == (32, 8, 8, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,)
    assert batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(batch["label"]) <= set(range(10))
    assert input_pipeline.dataset_spec(_config()) == ((8, 8, 1), 10)


def test_digits_value_mapping():
    digits = datasets.load_digits()
    config = _config(random_flip=False, shuffle=False)
    batch = next(input_pipeline.create_train_iterator(config, global_batch_size=64, seed=0))
    expected_uint8 = np.round(digits.images[:64] * 255 / 16)
    np.testing.assert_allclose(batch["image"][..., 0], 2 * expected_uint8 / 255 - 1, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], digits.target[:64])
    zero, sixteen = digits.images[:64] == 0, digits.images[:64] == 16
    assert zero.any() and sixteen.any()
    assert np.all(batch["image"][..., 0][zero] == -1.0)
    assert np.all(batch["image"][..., 0][sixteen] == 1.0)


def test_digits_splits_are_disjoint_and_cover_the_data():
    digits = datasets.load_digits()
    train, test = input_pipeline.DigitsSource("train"), input_pipeline.DigitsSource("test")
    assert (len(train), len(test)) == (1500, 297)
    expected_uint8 = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(train[1499]["image"], expected_uint8[1499])
    np.testing.assert_array_equal(test[0]["image"], expected_uint8[1500])
    assert test[296]["label"] == digits.target[1796]
    with pytest.raises(ValueError, match="no split 'validation'; valid: train, test"):
        input_pipeline.DigitsSource("validation")


def test_flip_mirrors_about_half():
    kwargs = dict(global_batch_size=256, seed=3)
    plain = _take(input_pipeline.create_train_iterator(_config(random_flip=False), **kwargs), 4)
    flipped = _take(input_pipeline.create_train_iterator(_config(random_flip=True), **kwargs), 4)
    images = np.concatenate([b["image"] for b in plain])
    out = np.concatenate([b["image"] for b in flipped])
    same = np.all(out == images, axis=(1, 2, 3))
    mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    fraction = np.mean(mirrored & ~same)
    assert 0.4 < fraction < 0.6, fraction


def test_determinism_and_seed_dependence():
    def batches(seed):
        return _take(
            input_pipeline.create_train_iterator(_config(), global_batch_size=64, seed=seed), 3
        )

    _assert_same_batches(batches(7), batches(7))
    assert not np.array_equal(batches(7)[0]["image"], batches(8)[0]["image"])


def test_global_batch_independent_of_process_count():
    kwargs = dict(global_batch_size=600, seed=5)
    single = _take(
        input_pipeline.create_train_iterator(_config(), process_index=0, process_count=1, **kwargs),
        4,
    )
    halves = [
        _take(
            input_pipeline.create_train_iterator(
                _config(), process_index=p, process_count=2, **kwargs
            ),
            4,
        )
        for p in range(2)
    ]
    assert halves[0][0]["image"].shape == (300, 8, 8, 1)
    # 4 steps of 600 cross the epoch boundary (2 full batches per epoch).
    joined = [
        {k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*halves, strict=True)
    ]
    _assert_same_batches(single, joined)


def test_checkpoint_restore_resumes_at_next_batch(tmp_path):
    config, kwargs = _config(), dict(global_batch_size=128, seed=11)
    it = input_pipeline.create_train_iterator(config, **kwargs)
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(
            2,
            args=ocp.args.Composite(
                data=input_pipeline.iterator_checkpoint_args(it, restore=False)
            ),
        )
        manager.wait_until_finished()
    # 20 more batches crosses the epoch boundary (14 batches per epoch).
    expected = _take(it, 20)

    fresh = input_pipeline.create_train_iterator(config, **kwargs)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(
            2,
            args=ocp.args.Composite(
                data=input_pipeline.iterator_checkpoint_args(fresh, restore=True)
            ),
        )
    assert restored["data"] is fresh
    _assert_same_batches(expected, _take(fresh, 20))


def test_epochs_cover_data_once_and_reshuffle():
    # 1500 = 3 * 500: every epoch is exactly 3 batches covering each image once.
    it = input_pipeline.create_train_iterator(
        _config(random_flip=False), global_batch_size=500, seed=2
    )
    batches = _take(it, 7)
    source = input_pipeline.DigitsSource()
    all_images = np.stack([source[i]["image"] for i in range(len(source))])
    all_images = all_images.reshape(NUM_DIGITS, -1)

    def sorted_rows(x):
        return x[np.lexsort(x.T[::-1])]

    for epoch in range(2):
        images = np.concatenate([b["image"] for b in batches[3 * epoch : 3 * epoch + 3]])
        rows = _to_uint8(images).reshape(NUM_DIGITS, -1)
        np.testing.assert_array_equal(sorted_rows(rows), sorted_rows(all_images))
    assert not np.array_equal(batches[0]["image"], batches[3]["image"])
    assert batches[6]["image"].shape == (500, 8, 8, 1)


def test_drop_remainder_each_epoch():
    # 1500 // 1000 = 1 batch per epoch; the other 500 are dropped.
    it = input_pipeline.create_train_iterator(
        _config(shuffle=False, random_flip=False), global_batch_size=1000, seed=0
    )
    first, second = _take(it, 2)
    assert second["image"].shape == (1000, 8, 8, 1)
    # Without shuffling every epoch restarts at record 0.
    np.testing.assert_array_equal(first["image"], second["image"])


def test_mock_cifar10():
    config = _config(name="cifar10", image_size=32, channels=3)
    with tfds.testing.mock_data(num_examples=40):
        assert input_pipeline.dataset_spec(config) == ((32, 32, 3), 10)
        batch = next(input_pipeline.create_train_iterator(config, global_batch_size=16, seed=0))
    assert batch["image"].shape == (16, 32, 32, 3)
    assert batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32


@pytest.mark.parametrize(
    "overrides, expected, actual",
    [
        (dict(image_size=16), "(16, 16, 1)", "(8, 8, 1)"),
        (dict(channels=3), "(8, 8, 3)", "(8, 8, 1)"),
        (dict(name="cifar10", image_size=64, channels=3), "(64, 64, 3)", "(32, 32, 3)"),
    ],
)
def test_wrong_image_shape_raises(overrides, expected, actual):
    config = _config(**overrides)
    with tfds.testing.mock_data(num_examples=8):
        with pytest.raises(ValueError) as error:
            input_pipeline.create_train_iterator(config, global_batch_size=4, seed=0)
    message = str(error.value)
    assert expected in message and actual in message and config.name in message


def test_batch_not_divisible_by_process_count_raises():
    with pytest.raises(ValueError, match="training.batch_size"):
        input_pipeline.create_train_iterator(
            _config(), global_batch_size=10, seed=0, process_index=0, process_count=3
        )


def test_center_crop_resize():
    image = np.arange(12 * 20 * 3, dtype=np.uint8).reshape(12, 20, 3)
    np.testing.assert_array_equal(input_pipeline._center_crop_resize(image, 12), image[:, 4:16])
    assert input_pipeline._center_crop_resize(image, 6).shape == (6, 6, 3)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches():
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain workers read absl flags.
    kwargs = dict(global_batch_size=64, seed=4)
    expected = _take(input_pipeline.create_train_iterator(_config(num_workers=0), **kwargs), 5)
    it = input_pipeline.create_train_iterator(_config(num_workers=2), **kwargs)
    try:
        _assert_same_batches(expected, _take(it, 5))
    finally:
        it.close()
