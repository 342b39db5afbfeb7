"""Pure tests of pipeline.core (vectors, pooling, whitening, rerank) against straightforward numpy references."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline.core.pooling import combine_scales, pool_feature_map, rmac_regions
from pipeline.core.rerank import alpha_query_expansion, database_side_augmentation
from pipeline.core.vectors import l2_normalize
from pipeline.core.whitening import Whitening, fit_pca_whitening, power_normalise


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _ref_rmac(x: np.ndarray, levels: int = 3) -> np.ndarray:
    total = np.zeros((x.shape[0], x.shape[3]))
    for y, xx, h, w in rmac_regions(x.shape[1], x.shape[2], levels):
        total += _l2(x[:, y : y + h, xx : xx + w, :].max(axis=(1, 2)))
    return _l2(total)


def _feature_map(h: int, w: int, c: int = 8, batch: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # post-ReLU maps are sparse and non-negative; zeros exercise the GeM clamp
    return np.maximum(rng.normal(size=(batch, h, w, c)), 0.0).astype(np.float32)


@pytest.mark.parametrize("hw", [(7, 7), (5, 9), (15, 20), (1, 1), (2, 3)])
def test_pooling_matches_numpy(hw: tuple[int, int]) -> None:
    x = _feature_map(*hw)
    np.testing.assert_allclose(pool_feature_map(x, "avg").numpy(), x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool_feature_map(x, "max").numpy(), x.max(axis=(1, 2)), rtol=1e-6)
    gem = np.mean(np.maximum(x, 1e-6) ** 3.0, axis=(1, 2)) ** (1 / 3.0)
    np.testing.assert_allclose(pool_feature_map(x, "gem", gem_p=3.0).numpy(), gem, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(pool_feature_map(x, "rmac").numpy(), _ref_rmac(x), rtol=1e-4, atol=1e-6)


def test_gem_limits_and_normalisation() -> None:
    x = _feature_map(6, 4) + 0.1
    np.testing.assert_allclose(pool_feature_map(x, "gem", gem_p=1.0).numpy(), x.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(pool_feature_map(x, "gem", gem_p=200.0).numpy(), x.max(axis=(1, 2)), rtol=0.05)
    out = pool_feature_map(x, "avg", normalize=True).numpy()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_feature_map(x, "sum")


@pytest.mark.parametrize("method", ["avg", "max", "gem", "rmac"])
def test_pooling_with_dynamic_shape_matches_static(method: str) -> None:
    fn = tf.function(
        lambda t: pool_feature_map(t, method, normalize=True),
        input_signature=[tf.TensorSpec([None, None, None, 8], tf.float32)],
    )
    for hw in [(7, 7), (10, 15), (20, 15)]:
        x = _feature_map(*hw, seed=hw[0])
        expected = pool_feature_map(x, method, normalize=True).numpy()
        np.testing.assert_allclose(fn(tf.constant(x)).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("h", "w", "count"),
    # Counts of the original code: square maps give 1 + 4 + 9 regions, 4:3
    # maps one extra column per level (2 + 6 + 12).
    [(7, 7, 14), (15, 20, 20), (20, 15, 20), (30, 40, 20), (7, 10, 20)],
)
def test_rmac_region_count_and_coverage(h: int, w: int, count: int) -> None:
    regions = rmac_regions(h, w, levels=3)
    assert len(regions) == count
    covered = np.zeros((h, w), bool)
    for y, x, rh, rw in regions:
        assert rh == rw > 0
        assert 0 <= y and y + rh <= h and 0 <= x and x + rw <= w
        covered[y : y + rh, x : x + rw] = True
    assert covered.all()
    # the first level is one square of the short side
    assert regions[0][2] == min(h, w)


def test_rmac_regions_tiny_maps() -> None:
    assert rmac_regions(1, 1) == [(0, 0, 1, 1)]
    assert all(r[2] >= 1 for r in rmac_regions(2, 5))
    with pytest.raises(ValueError):
        rmac_regions(0, 4)


def test_combine_scales_is_sum_of_normalised() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 16)), 100 * rng.normal(size=(4, 16))
    np.testing.assert_allclose(combine_scales([a, b]), _l2(_l2(a) + _l2(b)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combine_scales([a]), _l2(a), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        combine_scales([a, b[:, :8]])


def test_power_normalise() -> None:
    x = np.array([[4.0, -9.0, 0.0], [0.0, 0.0, 0.0]])
    out = power_normalise(x, 0.5)
    np.testing.assert_allclose(out[0], np.array([2.0, -3.0, 0.0]) / np.sqrt(13.0), rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(power_normalise(x[:1], 1.0), _l2(x[:1]), rtol=1e-6)


def _training_set(n: int = 400, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.05, d)
    return l2_normalize(rng.normal(size=(n, d)) * scales + 0.3)


def test_whitened_training_data_has_identity_covariance() -> None:
    X = _training_set()
    w = fit_pca_whitening(X)
    assert w.dim == 32 and w.projection.shape == (32, 32)
    Z = (X - w.mean) @ w.projection.T  # before the final L2
    np.testing.assert_allclose(np.cov(Z, rowvar=False), np.eye(32), atol=1e-3)
    out = w.apply(X)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert np.all(np.diff(w.eigenvalues) <= 0)


def test_whitening_dim_defaults_to_rank_and_shrinkage() -> None:
    X = _training_set(n=20, d=32)
    assert fit_pca_whitening(X).dim == 19
    assert fit_pca_whitening(X, shrinkage=0.1).dim == 32
    assert fit_pca_whitening(X, dim=8).apply(X).shape == (20, 8)
    partial = fit_pca_whitening(_training_set(), power=0.25)
    Z = (_training_set() - partial.mean) @ partial.projection.T
    np.testing.assert_allclose(np.var(Z, axis=0, ddof=1), np.sqrt(partial.eigenvalues), rtol=1e-3)
    with pytest.raises(ValueError):
        fit_pca_whitening(X, dim=33)


def test_whitening_save_load_round_trip(tmp_path: Path) -> None:
    X = _training_set()
    w = fit_pca_whitening(X, dim=16, shrinkage=0.05)
    path = tmp_path / "white.npz"
    w.save(path)
    loaded = Whitening.load(path)
    assert loaded.version == w.version and loaded.dim == 16 and loaded.params == w.params
    np.testing.assert_array_equal(loaded.apply(X), w.apply(X))
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(np.load(zf.open("metadata.npy"), allow_pickle=False).item())
    assert meta["version"] == w.version
    # deterministic: refitting gives the same version
    assert fit_pca_whitening(X, dim=16, shrinkage=0.05).version == w.version
    assert fit_pca_whitening(X, dim=15, shrinkage=0.05).version != w.version


def test_whitening_load_rejects_tampered_file(tmp_path: Path) -> None:
    w = fit_pca_whitening(_training_set(), dim=8)
    path = tmp_path / "w.npz"
    np.savez(
        path,
        mean=w.mean + 1,
        projection=w.projection,
        eigenvalues=w.eigenvalues,
        metadata=np.array(json.dumps({"dim": 8, "version": w.version, "params": w.params})),
    )
    with pytest.raises(ValueError, match="hash"):
        Whitening.load(path)


def _database(n: int = 50, d: int = 16, seed: int = 3) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).normal(size=(n, d)))


def test_alpha_query_expansion() -> None:
    D = _database()
    Q = l2_normalize(D[:5] + 0.1 * np.random.default_rng(4).normal(size=(5, 16)))
    knn = np.argsort(-(Q @ D.T), axis=1)[:, :4]
    out = alpha_query_expansion(Q, D, knn, k=3, alpha=3.0)
    assert out.shape == Q.shape and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    sims = np.maximum(np.take_along_axis(Q @ D.T, knn[:, :3], axis=1), 0) ** 3
    ref = _l2(Q + np.einsum("qk,qkd->qd", sims, D[knn[:, :3]]))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        alpha_query_expansion(Q, D, knn, k=5)
    with pytest.raises(ValueError, match="outside"):
        alpha_query_expansion(Q, D, np.full_like(knn, -1), k=2)


def test_database_side_augmentation() -> None:
    D = _database()
    S = D @ D.T
    knn = np.argsort(-S, axis=1)[:, :5]
    sims = np.take_along_axis(S, knn, axis=1)
    assert np.all(knn[:, 0] == np.arange(len(D)))
    np.testing.assert_allclose(database_side_augmentation(D, knn, sims, k=1), D, rtol=1e-5, atol=1e-6)
    out = database_side_augmentation(D, knn, sims, k=3, alpha=3.0)
    assert out.shape == D.shape and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    ref = _l2(np.einsum("nk,nkd->nd", np.maximum(sims[:, :3], 0) ** 3, D[knn[:, :3]]))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
