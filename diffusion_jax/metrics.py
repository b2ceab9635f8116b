"""Sample-quality metrics on feature vectors: FID, Inception Score, KID, precision/recall.

The functions take features (or logits) already computed by some network (Inception-v3 for the
published numbers; the digits classifier of ``digits_classifier`` offline) and compute in
float64 with NumPy, except the pairwise distances of ``precision_recall``, which are blocked
matrix products in JAX (float32) so that they run on the accelerator. ``FeatureStats``
accumulates the first two moments of features over shards and processes, so that FID needs no
pass holding all features at once.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

# float64 values per process_allgather call in allgather_stats (8 MiB per process).
_GATHER_CHUNK = 1 << 20


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID on Inception features).

    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})`` (Dowson & Landau 1982;
    Heusel et al. 2017, eq. 6). The trace of the square root is computed without forming it:
    with ``A = sigma1^{1/2} sigma2^{1/2}``, ``sigma1 sigma2`` is similar to ``A A^T`` (PSD), so
    ``Tr((sigma1 sigma2)^{1/2})`` is the sum of the singular values of ``A``, which are those of
    ``L1^{1/2} V1^T V2 L2^{1/2}`` for the eigendecompositions ``sigma_i = V_i L_i V_i^T``. Unlike
    ``scipy.linalg.sqrtm(sigma1 @ sigma2)`` this needs no eps offset for singular covariances
    (fewer samples than dimensions) and stays real; singular values are accurate to round-off
    relative to the largest, so a set against itself gives ~0.

    Args:
      mu1, mu2: means ``[D]``.
      sigma1, sigma2: covariances ``[D, D]``, symmetric positive semi-definite.
    Returns:
      The squared distance, in squared feature units, as a Python float (float64 throughout).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            "frechet_distance needs means [D] and covariances [D, D] of one D, got "
            f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    eigvals1, eigvecs1 = np.linalg.eigh(sigma1)
    eigvals2, eigvecs2 = np.linalg.eigh(sigma2)
    # Round-off can make eigenvalues of a singular covariance slightly negative.
    root1, root2 = np.sqrt(np.maximum(eigvals1, 0.0)), np.sqrt(np.maximum(eigvals2, 0.0))
    a = root1[:, None] * (eigvecs1.T @ eigvecs2) * root2[None, :]
    root_trace = np.linalg.svd(a, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * root_trace)


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` (Salimans et al. 2016), mean and std.

    As the original code (and torch-fidelity without shuffling): ``p(y|x)`` is the softmax of the
    logits; the N examples are cut in order into ``num_splits`` consecutive parts (part i holds
    rows ``[i N // num_splits, (i + 1) N // num_splits)``), ``p(y)`` is the mean of ``p(y|x)``
    over the part, and the score of each part is reported as the mean and population std (ddof 0)
    over parts.

    Args:
      logits: ``[N, K]`` unnormalised log-probabilities (e.g. Inception's 1008-way logits).
      num_splits: number of parts, ``1 <= num_splits <= N``.
    Returns:
      ``(mean, std)``; 1 <= IS <= K.
    """
    logits = np.asarray(logits, np.float64)
    n = logits.shape[0]
    if logits.ndim != 2 or not 1 <= num_splits <= n:
        raise ValueError(
            f"inception_score needs logits [N, K] with N >= num_splits={num_splits}, "
            f"got shape {logits.shape}"
        )
    log_p = scipy.special.log_softmax(logits, axis=1)
    scores = []
    for i in range(num_splits):
        part = log_p[i * n // num_splits : (i + 1) * n // num_splits]
        # log p(y) = log mean_x p(y|x), without underflow for classes no example likes.
        log_py = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
        kl = np.sum(np.exp(part) * (part - log_py), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples with the kernel ``(x.y / d + 1)^3``."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    # The unbiased estimator leaves out the i == j terms of the within-set sums.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    feats1, feats2, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018), mean and std over random subsets.

    Each of ``num_subsets`` rounds draws ``m = min(subset_size, n1, n2)`` rows without replacement
    from each set (``numpy.random.default_rng(seed)``; the subset of ``feats1``, then that of
    ``feats2``) and computes the unbiased MMD^2 with the cubic polynomial kernel
    ``k(x, y) = (x.y / d + 1)^3``:
    ``sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2``.
    As torch-fidelity, the std is the population std (ddof 0) over rounds. The estimate can be
    negative when the distributions are equal.

    Args:
      feats1, feats2: ``[n1, D]``, ``[n2, D]`` features, ``n1, n2 >= 2``.
    Returns:
      ``(mean, std)`` of MMD^2, in the kernel's units (dimensionless).
    """
    x, y = np.asarray(feats1), np.asarray(feats2)  # float64 subsets only: no full copies
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(
            f"kernel_inception_distance needs features [n1, D] and [n2, D] with n >= 2, "
            f"got {x.shape} and {y.shape}"
        )
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    mmds = []
    for _ in range(num_subsets):
        xs = x[rng.choice(len(x), m, replace=False)].astype(np.float64)
        ys = y[rng.choice(len(y), m, replace=False)].astype(np.float64)
        mmds.append(_polynomial_mmd2(xs, ys))
    return float(np.mean(mmds)), float(np.std(mmds))


@jax.jit
def _squared_distances(a, b):
    """``[A, D], [B, D] -> [A, B]`` squared Euclidean distances (``|a|^2 + |b|^2 - 2 a.b``)."""
    sq = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(sq, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_radius2(block, feats, *, k):
    """Squared distance from each row of ``block`` to its k-th nearest neighbour in ``feats``,
    the row itself (distance 0) being the first: the (k+1)-th smallest distance."""
    neg_smallest, _ = jax.lax.top_k(-_squared_distances(block, feats), k + 1)
    return -neg_smallest[:, k]


@jax.jit
def _manifold_hits(real_block, valid, fake, real_radius2_block, fake_radius2):
    """For a block of real rows: which lie in some fake ball ``[A]``, and which fake rows lie in
    some (valid) real ball of the block ``[B]``."""
    d2 = _squared_distances(real_block, fake)
    real_in_fake = jnp.any(d2 <= fake_radius2[None, :], axis=1)
    fake_in_real = jnp.any((d2 <= real_radius2_block[:, None]) & valid[:, None], axis=0)
    return real_in_fake, fake_in_real


def _row_blocks(x: np.ndarray, size: int):
    """Yields ``(block [size, D], valid [size] bool, n_valid)``; the last block zero-padded so
    that every block has one shape (one compilation)."""
    for start in range(0, len(x), size):
        block = x[start : start + size]
        n = len(block)
        valid = np.arange(size) < n
        yield np.pad(block, ((0, size - n), (0, 0))), valid, n


def precision_recall(real_feats, fake_feats, *, k: int = 3, batch_size: int = 1024):
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    The manifold of a set is the union of balls centred on its points, each with the radius of the
    distance to that point's k-th nearest neighbour within the set (itself excluded). Precision
    is the fraction of fake samples inside the real manifold, recall the fraction of real samples
    inside the fake manifold; a point on a ball's boundary is inside, as in the original code.

    Distances are computed in float32 on JAX's default device, ``batch_size`` rows at a time
    against a whole set, so memory is ``O(batch_size * max(n_real, n_fake))`` rather than
    quadratic. Both sets are first shifted by the real mean (distances do not change) to limit
    cancellation in ``|a|^2 + |b|^2 - 2 a.b``.

    Args:
      real_feats: ``[n_real, D]``, ``n_real > k``.
      fake_feats: ``[n_fake, D]``, ``n_fake > k``.
      k: neighbour whose distance is the ball radius (3 in the paper).
      batch_size: rows per distance block.
    Returns:
      ``(precision, recall)`` in [0, 1].
    """
    real, fake = np.asarray(real_feats), np.asarray(fake_feats)
    if real.ndim != 2 or fake.shape[1:] != real.shape[1:] or min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision_recall needs features [n_real, D] and [n_fake, D] with n > k={k}, "
            f"got {real.shape} and {fake.shape}"
        )
    center = real.mean(axis=0, dtype=np.float64).astype(np.float32)
    real = real.astype(np.float32) - center
    fake = fake.astype(np.float32) - center
    real_dev, fake_dev = jnp.asarray(real), jnp.asarray(fake)

    def radii2(x, x_dev):
        parts = [
            np.asarray(_kth_neighbour_radius2(block, x_dev, k=k))[:n]
            for block, _, n in _row_blocks(x, batch_size)
        ]
        return np.concatenate(parts)

    real_radius2 = radii2(real, real_dev)
    fake_radius2 = jnp.asarray(radii2(fake, fake_dev))
    real_in_fake = []
    fake_in_real = np.zeros(len(fake), bool)
    for i, (block, valid, n) in enumerate(_row_blocks(real, batch_size)):
        radius2 = np.pad(real_radius2[i * batch_size : i * batch_size + n], (0, batch_size - n))
        hits, fake_hits = _manifold_hits(block, valid, fake_dev, radius2, fake_radius2)
        real_in_fake.append(np.asarray(hits)[:n])
        fake_in_real |= np.asarray(fake_hits)
    recall = float(np.mean(np.concatenate(real_in_fake)))
    precision = float(np.mean(fake_in_real))
    return precision, recall


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Running first and second moments of D-dimensional features, in float64.

    Attributes:
      count: number of feature vectors seen.
      sum: ``[D]`` float64, sum of the vectors.
      outer: ``[D, D]`` float64, sum of their outer products ``x x^T``.

    Immutable: ``update`` and ``merge`` return new statistics. Sums are plain float64 sums, so
    statistics merged in a different order agree to round-off (exactly when every partial sum is
    representable, e.g. for features with few significant bits).
    """

    count: int
    sum: np.ndarray
    outer: np.ndarray

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    @classmethod
    def zeros(cls, dim: int) -> FeatureStats:
        """Statistics of no features of dimension ``dim``."""
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    def update(self, feats) -> FeatureStats:
        """Adds ``feats`` ``[N, D]`` (any float dtype, converted to float64 first)."""
        x = np.asarray(feats, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"FeatureStats of dim {self.dim} cannot take features {x.shape}")
        return FeatureStats(self.count + len(x), self.sum + x.sum(axis=0), self.outer + x.T @ x)

    def merge(self, *others: FeatureStats) -> FeatureStats:
        """Statistics of the union: ``self`` plus each of ``others`` in order."""
        count, total, outer = self.count, self.sum, self.outer
        for other in others:
            if other.dim != self.dim:
                raise ValueError(f"Cannot merge FeatureStats of dims {self.dim} and {other.dim}")
            count, total, outer = count + other.count, total + other.sum, outer + other.outer
        return FeatureStats(count, total, outer)

    __add__ = merge

    def mean_and_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(mu [D], sigma [D, D])``: the mean and the unbiased (N - 1) covariance, as
        ``np.mean(x, 0)`` and ``np.cov(x, rowvar=False)`` of all features seen (needs N >= 2).

        From the raw sums, ``(outer - N mu mu^T) / (N - 1)``: in float64 this loses about
        ``log10(mean^2 / variance)`` digits to cancellation, harmless for network features.
        """
        if self.count < 2:
            raise ValueError(f"A covariance needs at least 2 features, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2

    def save(self, path) -> None:
        """Writes the statistics to ``path`` as an ``.npz`` file (the name is used as given)."""
        with open(path, "wb") as f:
            np.savez(f, count=np.int64(self.count), sum=self.sum, outer=self.outer)

    @classmethod
    def load(cls, path) -> FeatureStats:
        """Reads statistics written by ``save``; one-line FileNotFoundError/ValueError naming
        ``path`` if it is missing or is not such a file."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"Feature statistics file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                count, total, outer = int(data["count"]), data["sum"], data["outer"]
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path} is not a FeatureStats .npz file: {reason}") from None
        d = total.shape[0] if total.ndim == 1 else -1
        ok_dtypes = total.dtype == np.float64 and outer.dtype == np.float64
        if d < 0 or outer.shape != (d, d) or not ok_dtypes or count < 0:
            raise ValueError(
                f"{path} is not a FeatureStats .npz file: count={count}, sum {total.dtype} "
                f"{total.shape}, outer {outer.dtype} {outer.shape}"
            )
        return cls(count, total, outer)


def allgather_stats(stats: FeatureStats) -> FeatureStats:
    """Sums ``stats`` over all JAX processes; every process gets the same (bit-identical) result.

    A collective: every process must call it, with statistics of the same dimension. The result
    is ``stats_0.merge(stats_1, ..., stats_{P-1})`` in process order. The float64 sums travel as
    their bytes (uint32 views), so they survive whether or not JAX's x64 mode is on; they are
    gathered in chunks of ``_GATHER_CHUNK`` values, so a process holds ``P`` chunks at a time
    rather than ``P`` copies of the ``[D, D]`` sums. Identity with one process.
    """
    if jax.process_count() == 1:
        return stats
    from jax.experimental import multihost_utils

    d = stats.dim
    # The count as a float64 is exact below 2**53.
    packed = np.concatenate([[float(stats.count)], stats.sum, stats.outer.ravel()])
    total = np.empty_like(packed)
    for start in range(0, packed.size, _GATHER_CHUNK):
        chunk = np.ascontiguousarray(packed[start : start + _GATHER_CHUNK])
        gathered = np.ascontiguousarray(multihost_utils.process_allgather(chunk.view(np.uint32)))
        per_process = gathered.view(np.float64)  # [P, chunk]
        acc = per_process[0].copy()
        for row in per_process[1:]:
            acc += row
        total[start : start + chunk.size] = acc
    return FeatureStats(int(total[0]), total[1 : 1 + d], total[1 + d :].reshape(d, d))
