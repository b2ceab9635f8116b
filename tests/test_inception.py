"""Tests of the FID Inception: resize, loading and its errors, and (with torch) pytorch-fid parity.

The network compiles once (``_network`` is jitted apart from the size-dependent resize), so the
tests share that compilation; the peer tests need ``pip install .[peer]`` and skip without it.
"""

import sys

import jax
import numpy as np
import pytest

from diffusion_jax import inception


def _images(shape, seed=0):
    """uint8 images of 4x4 random colour blocks plus noise: different images, different pool3.

    (Pooled features of pure noise images barely differ through a deep random network.)
    """
    rng = np.random.default_rng(seed)
    n, h, w, c = shape
    blocks = rng.uniform(0, 255, (n, 4, 4, c))
    x = blocks[:, np.arange(h) * 4 // h][:, :, np.arange(w) * 4 // w]
    return np.clip(np.round(x + rng.normal(0, 20, shape)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def random_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random.npz"
    np.savez(path, **inception.random_state_dict(seed=0))
    return path


# --- Resize ---


def _reference_resize(x, out_h, out_w):
    """Bilinear resize with align_corners=False from the definition, in float64 NumPy."""

    def taps(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    x = np.asarray(x, np.float64)
    h0, h1, fh = taps(x.shape[1], out_h)
    w0, w1, fw = taps(x.shape[2], out_w)
    x = x[:, h0] * (1 - fh)[None, :, None, None] + x[:, h1] * fh[None, :, None, None]
    return x[:, :, w0] * (1 - fw)[None, None, :, None] + x[:, :, w1] * fw[None, None, :, None]


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [((5, 7), (13, 17)), ((37, 23), (11, 6)), ((32, 32), (299, 299)), ((9, 8), (9, 8))],
    ids=["up", "down", "32-to-299", "same"],
)
def test_resize_matches_definition(in_hw, out_hw):
    x = np.random.default_rng(1).uniform(0, 1, (2, *in_hw, 3)).astype(np.float32)
    got = np.asarray(inception.resize_bilinear(x, out_hw))
    assert got.shape == (2, *out_hw, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_resize(x, *out_hw), rtol=0, atol=2e-6)


def test_resize_does_not_antialias():
    # Stripes of period 3 shrunk 3x: torch's bilinear samples the stripes, antialiasing averages.
    x = np.zeros((1, 9, 9, 1), np.float32)
    x[:, :, 1::3] = 1.0
    got = np.asarray(inception.resize_bilinear(x, (3, 3)))
    np.testing.assert_allclose(got, 1.0)
    np.testing.assert_allclose(got, _reference_resize(x, 3, 3), atol=1e-7)
    assert np.all(np.asarray(jax.image.resize(x, (1, 3, 3, 1), "bilinear")) < 0.5)


# --- Features on random weights ---


def test_features_shapes_dtypes_for_two_sizes(random_npz):
    params = inception.load_params(random_npz)
    shapes = [(2, 32, 32, 3), (1, 45, 300, 3)]
    outs = [inception.features(params, _images(s)) for s in shapes]  # one network compilation
    for out, (n, *_) in zip(outs, shapes, strict=True):
        assert out["pool3"].shape == (n, 2048) and out["logits"].shape == (n, 1008)
        for v in out.values():
            assert v.dtype == np.float32 and np.all(np.isfinite(v))
    traced = jax.eval_shape(inception.features, params, _images(shapes[1]))  # what jit sees
    assert jax.tree.map(lambda a: (a.shape, a.dtype), traced) == {
        k: (v.shape, v.dtype) for k, v in outs[1].items()
    }
    pool3 = np.asarray(outs[0]["pool3"])
    assert np.ptp(pool3, axis=0).max() > 0.02 * np.abs(pool3).max()  # depends on the image


def test_features_rejects_non_uint8_and_non_rgb(random_npz):
    params = inception.load_params(random_npz)
    with pytest.raises(ValueError, match="uint8"):
        inception.features(params, np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        inception.features(params, np.zeros((1, 8, 8, 1), np.uint8))


# --- Loading errors ---


def test_missing_file_says_where_to_get_weights(tmp_path):
    with pytest.raises(inception.WeightsNotFoundError) as e:
        inception.load_params(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    msg = str(e.value)
    assert inception.FID_WEIGHTS_URL in msg and "convert" in msg and "\n" not in msg
    assert isinstance(e.value, FileNotFoundError)


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_text("not weights")
    with pytest.raises(inception.CheckpointError, match="not a readable .npz"):
        inception.load_params(path)


def test_pth_without_torch_says_to_install_or_convert(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match="pip install torch.*convert .*npz"):
        inception.load_params(path)


def test_missing_key_is_named(tmp_path):
    state = inception.random_state_dict()
    del state["Mixed_6e.branch7x7dbl_3.bn.running_var"]
    np.savez(tmp_path / "w.npz", **state)
    with pytest.raises(inception.CheckpointError, match=r"missing key 'Mixed_6e\.branch7x7dbl_3"):
        inception.load_params(tmp_path / "w.npz")


def test_wrong_shape_is_named(tmp_path):
    state = inception.random_state_dict()
    state["fc.weight"] = np.zeros((1000, 2048), np.float32)  # ImageNet's 1000 classes
    np.savez(tmp_path / "w.npz", **state)
    with pytest.raises(inception.CheckpointError) as e:
        inception.load_params(tmp_path / "w.npz")
    assert "'fc.weight' has shape (1000, 2048), expected (1008, 2048)" in str(e.value)


def test_convert_cli_writes_only_checked_arrays(tmp_path, random_npz, capsys):
    inception.main(["convert", str(random_npz), str(tmp_path / "out.npz")])
    assert "wrote" in capsys.readouterr().out
    with np.load(tmp_path / "out.npz") as f:
        assert set(f.files) == set(inception.state_dict_shapes())
    with pytest.raises(SystemExit):
        inception.main(["convert", str(tmp_path / "absent.pth"), str(tmp_path / "x.npz")])
    assert inception.FID_WEIGHTS_URL in capsys.readouterr().err


# --- Peer: pytorch-fid on the same (random) weights ---


@pytest.fixture(scope="module")
def torch_fid(tmp_path_factory):
    """pytorch-fid's InceptionV3 on random weights, and those weights saved as a .pth."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_fid")
    import torchvision
    from pytorch_fid import inception as pfi

    def fresh_weights(*args, **kwargs):
        return torchvision.models.inception_v3(
            num_classes=1008, aux_logits=False, weights=None, init_weights=False
        ).state_dict()

    # fid_inception_v3() ends by downloading the release weights: hand it other weights instead.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", fresh_weights)
        net = pfi.fid_inception_v3()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):  # He init: activations keep their scale
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):  # nothing BN does may cancel out
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 2048**-0.5, generator=g)
                m.bias.normal_(0.0, 1.0, generator=g)  # must not appear in the logits
    state = net.state_dict()
    path = tmp_path_factory.mktemp("torch") / "pt_inception-random.pth"
    torch.save(state, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state)
        model = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()

    def reference(images):  # pytorch-fid's pipeline: ToTensor's /255, then the model
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            pool3 = model(x)[0][:, :, 0, 0]
        return pool3.numpy(), (pool3 @ state["fc.weight"].T).numpy()

    return reference, state, path


def _max_rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def test_state_dict_names_and_shapes_match_pytorch_fid(torch_fid):
    _, state, _ = torch_fid
    used = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    used.pop("fc.bias")
    assert used == inception.state_dict_shapes()


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 331, 307, 3)], ids=["up", "down"])
def test_features_match_pytorch_fid(torch_fid, shape):
    reference, _, path = torch_fid
    images = _images(shape, seed=shape[1])
    want_pool3, want_logits = reference(images)
    got = inception.features(inception.load_params(path), images)
    err_pool3 = _max_rel_err(got["pool3"], want_pool3)
    err_logits = _max_rel_err(got["logits"], want_logits)
    print(f"{shape}: max |error| / max |value|: pool3 {err_pool3:.2e}, logits {err_logits:.2e}")
    # The features must depend on the image well above the tolerance (deep random networks
    # map all inputs to nearly the same features if the weights are not chosen with care).
    assert np.ptp(want_pool3, axis=0).max() > 0.02 * np.abs(want_pool3).max()
    assert err_pool3 < 1e-4 and err_logits < 1e-4


def test_npz_conversion_round_trip(torch_fid, tmp_path):
    _, _, path = torch_fid
    inception.main(["convert", str(path), str(tmp_path / "fid.npz")])
    from_pth, from_npz = inception.load_params(path), inception.load_params(tmp_path / "fid.npz")
    assert jax.tree.all(jax.tree.map(np.array_equal, from_pth, from_npz))
    images = _images((2, 32, 32, 3))
    a, b = inception.features(from_pth, images), inception.features(from_npz, images)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_pth_that_is_not_a_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(inception.CheckpointError, match="not a PyTorch checkpoint"):
        inception.load_params(tmp_path / "junk.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(inception.CheckpointError, match="holds a list, not a state dict"):
        inception.load_params(tmp_path / "list.pth")
