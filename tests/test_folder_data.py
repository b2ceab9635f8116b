"""Training on a folder of the user's own images (``data.name = "folder"``).

One folder serves every test: 33 PNG and JPEG files of mixed sizes and modes in three labelled
subdirectories, plus a corrupt file and a truncated JPEG. Each class has its own constant colour
(apart from one noise image), so an image's gray level tells its class independently of the
file listing.
"""

from __future__ import annotations

import logging
import pathlib

import chex
import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import config_lib, input_pipeline, train
from tests.test_train import (  # noqa: F401 (cache_dir: a fixture)
    _copy_checkpoints,
    _read_checkpoint,
    _steps,
    _tiny,
    cache_dir,
)

# Class -> RGB colour; the sorted names give the labels blue 0, green 1, red 2.
_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}
_CLASSES = sorted(_COLOURS)
_SIZES = [(10, 12), (40, 30), (64, 64), (30, 40), (12, 10)]  # (height, width)
_MODES = ["L", "RGB", "RGBA", "P"]
_PER_CLASS = 10
_NOISE = "blue/noise.png"  # 40 x 30 RGB noise: the crop and resize are checked on it
_TRUNCATED = "red/05_truncated.jpg"  # a sound header, its data cut short
_CORRUPT = "green/broken.png"  # random bytes


def _luma(rgb) -> float:
    """PIL's conversion of RGB to L (ITU-R 601-2)."""
    return float(np.dot(rgb, [0.299, 0.587, 0.114]))


def _constant_images() -> dict[str, tuple]:
    """File -> ((height, width), mode, uint8 RGB it must give) of the constant images."""
    images = {}
    for name, colour in _COLOURS.items():
        gray = round(_luma(colour))
        for i in range(_PER_CLASS):
            size, mode = _SIZES[i % len(_SIZES)], _MODES[i % len(_MODES)]
            ext = "jpg" if mode in ("L", "RGB") and i % 3 == 0 else "png"
            images[f"{name}/{i:02d}_{mode}.{ext}"] = (
                size,
                mode,
                (gray,) * 3 if mode == "L" else colour,
            )
    # Deeper levels belong to the class of their first-level directory.
    images["green/more/10_RGB.png"] = ((20, 20), "RGB", _COLOURS["green"])
    return images


_CONSTANT = _constant_images()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("images")
    for file in _CONSTANT:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
    for file, ((height, width), mode, rgb) in _CONSTANT.items():
        image = Image.fromarray(np.full((height, width, 3), rgb, np.uint8))
        if mode == "P":
            image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        image.convert(mode).save(root / file)  # RGBA: opaque
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / _NOISE)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / _TRUNCATED)
    data = (root / _TRUNCATED).read_bytes()
    (root / _TRUNCATED).write_bytes(data[: len(data) * 3 // 5])
    (root / _CORRUPT).write_bytes(rng.bytes(300))
    (root / ".hidden.png").write_bytes(b"not even looked at")
    (root / "red" / "notes.txt").write_text("not an image")
    return root


def _config(path, **overrides) -> ml_collections.ConfigDict:
    config = dict(
        name="folder",
        path=str(path),
        split="train",
        image_size=16,
        channels=3,
        random_flip=False,
        shuffle=False,
        num_workers=0,
        prefetch=0,
        data_dir=None,
    )
    return ml_collections.ConfigDict({**config, **overrides})


def _all(config) -> dict[str, np.ndarray]:
    """Every record in source order as one batch: images as uint8 again."""
    size = input_pipeline.split_size(config, "train")
    [batch] = input_pipeline.eval_batches(config, "train", global_batch_size=size)
    return dict(batch, image=np.round((batch["image"] + 1) * 127.5).astype(np.uint8))


def test_listing_labels_and_unreadable_files(folder, caplog):
    with caplog.at_level(logging.WARNING):
        source = input_pipeline.FolderSource(str(folder), "train", 3)
    assert source.classes == _CLASSES
    assert source.files == sorted([*_CONSTANT, _NOISE, _TRUNCATED])
    assert f"skipped 1 unreadable files (first: {_CORRUPT}: cannot identify" in caplog.text
    assert input_pipeline.dataset_spec(_config(folder)) == ((16, 16, 3), 3)
    # A folder with an image at its top level has no classes.
    assert input_pipeline.dataset_spec(_config(folder / "red")) == ((16, 16, 3), 0)


@pytest.mark.parametrize("channels", [1, 3])
def test_images_labels_and_crop_resize(folder, channels):
    config = _config(folder, channels=channels)
    source = input_pipeline.FolderSource(str(folder), "train", channels)
    batch = _all(config)
    assert batch["image"].shape == (len(source), 16, 16, channels)
    assert batch["label"].tolist() == [_CLASSES.index(f.split("/")[0]) for f in source.files]

    class_lumas = np.array([_luma(_COLOURS[name]) for name in _CLASSES])
    for i, file in enumerate(source.files):
        if file not in _CONSTANT:
            continue
        image, rgb = batch["image"][i].astype(np.float64), _CONSTANT[file][2]
        want = rgb if channels == 3 else [round(_luma(rgb))]
        # JPEG is lossy; PNG, resized from a constant colour, is exact.
        np.testing.assert_allclose(image, np.broadcast_to(want, image.shape), atol=4, err_msg=file)
        # The image's content alone tells its class: the label must be that class.
        luma = _luma(image.mean((0, 1))) if channels == 3 else image.mean()
        assert batch["label"][i] == np.argmin(np.abs(class_lumas - luma)), file

    # The truncated JPEG passes the scan and is served as the next file.
    t = source.files.index(_TRUNCATED)
    np.testing.assert_array_equal(batch["image"][t], batch["image"][t + 1])
    assert batch["label"][t] == batch["label"][t + 1] == _CLASSES.index("red")

    # 40 x 30 -> the middle 30 x 30 -> 16 x 16, computed with PIL alone.
    with Image.open(folder / _NOISE) as image:
        mode = "L" if channels == 1 else "RGB"
        want = image.convert(mode).crop((0, 5, 30, 35)).resize((16, 16), Image.Resampling.BICUBIC)
    want = np.asarray(want).reshape(16, 16, channels)
    np.testing.assert_array_equal(batch["image"][source.files.index(_NOISE)], want)


def test_train_iterator_batches(folder):
    config = _config(folder, random_flip=True, shuffle=True)
    iterator = input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0)
    batches = [next(iterator) for _ in range(5)]  # 33 // 8 = 4 batches an epoch
    for batch in batches:
        assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
        assert -1 <= batch["image"].min() and batch["image"].max() <= 1
        assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2}
    assert not np.array_equal(batches[0]["label"], batches[4]["label"])  # reshuffled


def test_decode_modes_transparency_16_bit_and_orientation(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0] = (10, 20, 30, 255)  # opaque; the bottom row is transparent black
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    want = np.array([[(10, 20, 30)] * 3, [(255, 255, 255)] * 3])
    np.testing.assert_array_equal(input_pipeline._decode(tmp_path / "rgba.png", 3), want)

    gray16 = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    decoded = input_pipeline._decode(tmp_path / "gray16.png", 1)
    np.testing.assert_array_equal(decoded[..., 0], [[0, 100, 255]])

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.new("RGB", (20, 10)).save(tmp_path / "photo.jpg", exif=exif)  # 20 wide, 10 high
    assert input_pipeline._decode(tmp_path / "photo.jpg", 3).shape == (20, 10, 3)


def _folder_run(path, **overrides):
    return _tiny(**{"data.name": "folder", "data.path": str(path), **overrides})


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
@pytest.mark.usefixtures("cache_dir")
def test_training_and_exact_resume(folder, tmp_path):
    """A class-conditional RGB run with flips: straight to 4 steps, and restarted from the
    checkpoint at 2 of that run; same state and data position at 4."""
    config = _folder_run(
        folder,
        **{
            "data.channels": 3,
            "data.random_flip": True,
            "model.class_conditional": True,
            "training.num_steps": 4,
            "training.checkpoint_every": 2,
        },
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    metrics = train.train_and_evaluate(config, straight)
    assert np.isfinite(metrics["loss"])
    _copy_checkpoints(straight, resumed, [2])
    train.train_and_evaluate(config, resumed)
    assert _steps(resumed) == [2, 4]
    expected_state, expected_data = _read_checkpoint(straight, 4)
    state, data = _read_checkpoint(resumed, 4)
    chex.assert_trees_all_equal(expected_state, state, strict=True)
    assert data == expected_data
    assert state["params"]["label_emb"]["embedding"].shape[0] == 3 + 1  # 3 classes + null


def _empty(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    return tmp_path / "empty"


def _unreadable(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"\0" * 100)
    return tmp_path / "bad"


@pytest.mark.parametrize(
    "make_path, overrides, error, message",
    [
        (lambda tmp: tmp / "missing", {}, ValueError, "data.path '{path}' does not exist"),
        (_empty, {}, ValueError, "data.path '{path}' holds no image files (.png, .jpg"),
        (_unreadable, {}, ValueError, "data.path '{path}': none of its 1 image files is readable"),
        (
            lambda tmp: "",
            {},
            config_lib.ConfigError,
            "Config key 'data.path' must name a directory of images for data.name 'folder'",
        ),
        (
            lambda tmp: tmp,
            {"data.split": "test"},
            config_lib.ConfigError,
            "Config key 'data.split' is 'test'; valid: train",
        ),
        (
            lambda tmp: tmp,
            {"data.channels": 4},
            config_lib.ConfigError,
            "Config key 'data.channels' is 4; valid: 1, 3",
        ),
        (
            lambda tmp: tmp,
            {"data.name": "digits"},
            config_lib.ConfigError,
            "Config key 'data.path' ('{path}') is only read when 'data.name' is 'folder' or "
            "'latents', not",
        ),
    ],
    ids=["missing", "empty", "unreadable", "unset", "split", "channels", "not_folder"],
)
def test_bad_folder_fails_in_one_line_before_writing(
    make_path, overrides, error, message, tmp_path
):
    path = make_path(tmp_path)
    workdir = tmp_path / "run"
    with pytest.raises(error) as raised:
        train.train_and_evaluate(_folder_run(path, **overrides), workdir)
    assert message.format(path=path) in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not workdir.exists()


def test_a_folder_has_one_split(folder):
    with pytest.raises(ValueError, match="no split 'test'; valid: train .* eval.split") as raised:
        input_pipeline.split_size(_config(folder), "test")
    assert "\n" not in str(raised.value)


def test_reference_cache_name_tells_folders_apart(folder, tmp_path):
    def name(path):
        return input_pipeline.data_set_id(_config(path))

    assert input_pipeline.data_set_id(_config(folder, name="digits")) == "digits"
    assert name(folder) != name(folder / "red")
    (tmp_path / "a.png").write_bytes((folder / _NOISE).read_bytes())
    before = name(tmp_path)
    (tmp_path / "b.png").write_bytes((folder / _NOISE).read_bytes())
    assert name(tmp_path) != before and name(tmp_path).startswith("folder-")
