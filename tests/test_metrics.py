"""Sample-quality metrics against independent computations written plainly here.

The references follow the papers' definitions directly (``scipy.linalg.sqrtm`` for FID, loops for
IS, full kernel matrices for KID, all-pairs distances for precision/recall), not the library's
formulas. FeatureStats are checked against ``np.mean``/``np.cov`` and, with features whose sums
are exact in float64 (few significant bits), bit for bit across shardings and across 2 real
``jax.distributed`` processes.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import portpicker
import pytest
import scipy.linalg
import threadpoolctl

from diffusion_jax import metrics
from diffusion_jax.metrics import FeatureStats

REPO = pathlib.Path(__file__).resolve().parents[1]


def _random_spd(rng, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _exact_features(rng, n: int, d: int) -> np.ndarray:
    """float32 features on a 2^-12 grid in [-4, 4): every float64 sum of them and of their
    products over a few thousand rows is exact, so it does not depend on the order of addition
    (but the products' sums need more than float32's 24 bits)."""
    return (rng.integers(-(2**14), 2**14, size=(n, d)) / 2**12).astype(np.float32)


# FID


def _scipy_fid(mu1, sigma1, mu2, sigma2) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean))


def test_fid_matches_scipy_sqrtm_on_random_spd():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    sigma1, sigma2 = _random_spd(rng, d), _random_spd(rng, d)
    expected = _scipy_fid(mu1, sigma1, mu2, sigma2)
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)


def test_fid_matches_scipy_sqrtm_on_feature_sets():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
    y = 0.8 * rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) + 0.3
    stats = [(np.mean(f, 0), np.cov(f, rowvar=False)) for f in (x, y)]
    expected = _scipy_fid(*stats[0], *stats[1])
    assert metrics.frechet_distance(*stats[0], *stats[1]) == pytest.approx(expected, rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(2)
    # 100 samples in 128 dimensions: a singular covariance, where sqrtm needs an eps offset.
    x = np.maximum(rng.normal(size=(100, 128)), 0)
    mu, sigma = np.mean(x, 0), np.cov(x, rowvar=False)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fid_of_a_translation_is_the_squared_shift():
    rng = np.random.default_rng(3)
    d = 64
    mu, sigma, v = rng.normal(size=d), _random_spd(rng, d), rng.normal(size=d)
    fid = metrics.frechet_distance(mu, sigma, mu + v, sigma)
    assert fid == pytest.approx(v @ v, abs=1e-9 * np.trace(sigma))


def test_fid_in_2048_dimensions_is_finite():
    rng = np.random.default_rng(4)
    # One BLAS thread: on a shared CPU, OpenBLAS's spinning threads make eigh/svd 10x slower.
    limit = threadpoolctl.threadpool_limits(1, user_api="blas")
    d = 2048
    x = np.maximum(rng.normal(size=(2500, d)), 0).astype(np.float32)  # pool3-like: ReLU'd
    mu1, sigma1 = np.mean(x[:1500], 0, np.float64), np.cov(x[:1500], rowvar=False)
    mu2, sigma2 = np.mean(x[1500:], 0, np.float64), np.cov(x[1500:], rowvar=False)
    with limit:
        fid = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    # Same distribution, finite samples: the bias is positive and at most the total variance.
    assert np.isfinite(fid) and 0 < fid < np.trace(sigma1)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="frechet_distance"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# Inception Score


def _loop_inception_score(logits, num_splits):
    n, num_classes = logits.shape
    scores = []
    for i in range(num_splits):
        part = logits[i * n // num_splits : (i + 1) * n // num_splits]
        probs = []
        for row in part:
            e = np.exp(row - row.max())
            probs.append(e / e.sum())
        p_y = sum(probs) / len(probs)
        kls = []
        for p in probs:
            kls.append(sum(p[c] * (np.log(p[c]) - np.log(p_y[c])) for c in range(num_classes)))
        scores.append(np.exp(sum(kls) / len(kls)))
    mean = sum(scores) / num_splits
    return mean, np.sqrt(sum((s - mean) ** 2 for s in scores) / num_splits)


@pytest.mark.parametrize("num_splits", [1, 3, 10])
def test_inception_score_matches_loop(num_splits):
    logits = 3 * np.random.default_rng(5).normal(size=(103, 7))
    mean, std = metrics.inception_score(logits, num_splits)
    expected_mean, expected_std = _loop_inception_score(logits, num_splits)
    assert mean == pytest.approx(expected_mean, rel=1e-12)
    assert std == pytest.approx(expected_std, rel=1e-9, abs=1e-12)


def test_inception_score_of_uniform_predictions_is_one():
    assert metrics.inception_score(np.zeros((50, 10)), 5) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_inception_score_of_confident_even_predictions_is_the_class_count():
    num_classes, num_splits = 7, 4
    labels = np.arange(num_classes * num_splits * 3) % num_classes  # every split: each class 3x
    logits = 60.0 * np.eye(num_classes)[labels]
    mean, std = metrics.inception_score(logits, num_splits)
    assert mean == pytest.approx(num_classes, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-9)


# KID


def _einsum_mmd2(x, y):
    m, d = x.shape
    k_xx = (np.einsum("id,jd->ij", x, x) / d + 1) ** 3
    k_yy = (np.einsum("id,jd->ij", y, y) / d + 1) ** 3
    k_xy = (np.einsum("id,jd->ij", x, y) / d + 1) ** 3
    off_diagonal = ~np.eye(m, dtype=bool)
    return k_xx[off_diagonal].mean() + k_yy[off_diagonal].mean() - 2 * k_xy.mean()


def test_kid_matches_einsum_estimator():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(60, 5)), rng.normal(size=(50, 5)) + 0.2
    num_subsets, seed = 4, 11
    draws = np.random.default_rng(seed)
    mmds = []
    for _ in range(num_subsets):
        # m = min(subset_size=1000, 60, 50) = 50: all of y, a subset of x.
        xs, ys = x[draws.choice(60, 50, replace=False)], y[draws.choice(50, 50, replace=False)]
        mmds.append(_einsum_mmd2(xs, ys))
    mean, std = metrics.kernel_inception_distance(x, y, num_subsets=num_subsets, seed=seed)
    assert mean == pytest.approx(np.mean(mmds), rel=1e-12)
    assert std == pytest.approx(np.std(mmds), rel=1e-9)


def test_kid_is_deterministic_given_the_seed():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(80, 4)), rng.normal(size=(70, 4))
    kid = lambda seed: metrics.kernel_inception_distance(x, y, subset_size=30, seed=seed)
    assert kid(0) == kid(0)
    assert kid(0) != kid(1)


def test_kid_is_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    kwargs = dict(num_subsets=20, subset_size=200)
    same_mean, same_std = metrics.kernel_inception_distance(x, y, **kwargs)
    shift_mean, shift_std = metrics.kernel_inception_distance(x, y + 0.5, **kwargs)
    assert abs(same_mean) < 3 * same_std
    assert shift_mean > 10 * shift_std and shift_mean > 50 * abs(same_mean)


# Precision and recall


def _brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)  # a point is not its own neighbour
        return np.sort(d, axis=1)[:, k - 1]

    real_radius, fake_radius = radii(real), radii(fake)
    precision = np.mean(
        [
            any(np.linalg.norm(f - r) <= rr for r, rr in zip(real, real_radius, strict=True))
            for f in fake
        ]
    )
    recall = np.mean(
        [
            any(np.linalg.norm(r - f) <= fr for f, fr in zip(fake, fake_radius, strict=True))
            for r in real
        ]
    )
    return precision, recall


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(9)
    real = rng.normal(size=(150, 2))
    fake = rng.normal(size=(120, 2)) + [1.5, 0.0]
    expected = _brute_force_precision_recall(real, fake, k)
    assert 0.5 < expected[0] < 0.99 and 0.5 < expected[1] < 0.99  # not a trivial case
    # batch_size=32 divides neither set: padded last blocks.
    assert metrics.precision_recall(real, fake, k=k, batch_size=32) == expected


def test_precision_recall_hand_made_sets():
    # Two real clusters of 3 points 1 apart (k=1 radii: 1), mean at the origin. Small integers
    # (and 2.5): the distances are exact even in float32, so the boundary cases are exact.
    real = np.array([[-10, -1], [-10, 0], [-10, 1], [10, -1], [10, 0], [10, 1]], np.float32)
    fake = np.array(
        [
            [0, 0],  # between the clusters: outside (and where padded blocks would sit)
            [-10, 2],  # on the boundary of the ball of (-10, 1): inside
            [10, -2.5],  # 1.5 from (10, -1): outside
            [11, 0],  # on the boundary of the ball of (10, 0): inside
        ],
        np.float32,
    )
    # Fake k=1 radii: sqrt(104) for the first two, sqrt(7.25) for the others; the ball of the
    # origin covers all real points (the farthest is sqrt(101) away).
    assert metrics.precision_recall(real, fake, k=1, batch_size=4) == (0.5, 1.0)


def test_precision_recall_of_identical_and_of_disjoint_sets():
    real = np.random.default_rng(10).normal(size=(100, 2))
    assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)


# FeatureStats


def _shards(x, sizes):
    return np.split(x, np.cumsum(sizes)[:-1])


def test_feature_stats_sharded_equals_unsharded_bit_exact():
    rng = np.random.default_rng(11)
    x = _exact_features(rng, 600, 8)
    whole = FeatureStats.zeros(8).update(x)
    shards = [FeatureStats.zeros(8).update(s) for s in _shards(x, [1, 250, 99, 250])]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        merged = shards[order[0]].merge(*[shards[i] for i in order[1:]])
        assert merged.count == whole.count == 600
        np.testing.assert_array_equal(merged.sum, whole.sum)
        np.testing.assert_array_equal(merged.outer, whole.outer)
    sequential = FeatureStats.zeros(8)
    for shard in reversed(_shards(x, [300, 1, 299])):
        sequential = sequential.update(shard)
    np.testing.assert_array_equal(sequential.outer, whole.outer)
    np.testing.assert_array_equal(sum(shards, FeatureStats.zeros(8)).outer, whole.outer)


def test_feature_stats_moments_match_numpy():
    rng = np.random.default_rng(12)
    x = (rng.normal(size=(1000, 16)) @ rng.normal(size=(16, 16)) + 3.0).astype(np.float32)
    shards = [FeatureStats.zeros(16).update(s) for s in np.array_split(x[::-1], 7)]
    stats = shards[0].merge(*shards[1:])
    whole = FeatureStats.zeros(16).update(x)
    np.testing.assert_allclose(stats.outer, whole.outer, rtol=1e-12)
    mu, sigma = stats.mean_and_cov()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, np.mean(x64, 0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-12)


def test_feature_stats_take_bfloat16_and_reject_a_wrong_dim():
    import jax.numpy as jnp

    x = jnp.asarray([[1.5, -2.0], [0.25, 4.0]], jnp.bfloat16)
    stats = FeatureStats.zeros(2).update(x)
    np.testing.assert_array_equal(stats.sum, [1.75, 2.0])
    with pytest.raises(ValueError, match="dim 2"):
        stats.update(np.zeros((3, 5)))


def test_feature_stats_save_load_round_trip(tmp_path):
    stats = FeatureStats.zeros(5).update(np.random.default_rng(13).normal(size=(9, 5)))
    path = tmp_path / "stats"  # no .npz suffix: the name is kept as given
    stats.save(path)
    loaded = FeatureStats.load(path)
    assert loaded.count == 9
    np.testing.assert_array_equal(loaded.sum, stats.sum)
    np.testing.assert_array_equal(loaded.outer, stats.outer)


def test_feature_stats_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.npz"
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        FeatureStats.load(missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="garbage.npz") as e:
        FeatureStats.load(garbage)
    assert "\n" not in str(e.value)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, count=3, sum=np.zeros(4), outer=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="wrong.npz"):
        FeatureStats.load(wrong)


def test_allgather_is_the_identity_with_one_process():
    stats = FeatureStats.zeros(3).update(np.ones((2, 3)))
    assert metrics.allgather_stats(stats) is stats


# Each of 2 processes accumulates its half of the features (as in a sharded evaluation), gathers
# with x64 off and small chunks (3 gathers for D=16, the last partial), and saves the result.
_GATHER_WORKER = textwrap.dedent(
    """\
    import sys

    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, process_id, inputs, out = sys.argv[1:]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id)
    )
    assert jax.process_count() == 2 and not jax.config.jax_enable_x64

    from diffusion_jax import metrics

    metrics._GATHER_CHUNK = 100
    with np.load(inputs) as data:
        for name in ("exact", "general"):
            half = np.array_split(data[name], 2)[int(process_id)]
            stats = metrics.FeatureStats.zeros(half.shape[1]).update(half)
            metrics.allgather_stats(stats).save(f"{out}_{name}.npz")
    """
)


def test_allgather_stats_across_two_processes(tmp_path):
    rng = np.random.default_rng(14)
    exact = _exact_features(rng, 301, 16)
    general = rng.normal(size=(301, 16)).astype(np.float32) + 1.0
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, exact=exact, general=general)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    port = str(portpicker.pick_unused_port())
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _GATHER_WORKER,
                port,
                str(i),
                str(inputs),
                str(tmp_path / f"p{i}"),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, log in zip(workers, logs, strict=True):
        assert w.returncode == 0, log[-4000:]

    halves = lambda x: [FeatureStats.zeros(16).update(h) for h in np.array_split(x, 2)]
    unsharded = FeatureStats.zeros(16).update(exact)
    general_0, general_1 = halves(general)
    expected = {"exact": unsharded, "general": general_0.merge(general_1)}
    for process in range(2):
        for name, want in expected.items():
            got = FeatureStats.load(tmp_path / f"p{process}_{name}.npz")
            assert got.count == want.count == 301
            np.testing.assert_array_equal(got.sum, want.sum, err_msg=f"{name} {process}")
            np.testing.assert_array_equal(got.outer, want.outer, err_msg=f"{name} {process}")
