"""Tests of pipeline.core.classical on real UKBench images from ../shared (skipped when absent)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import classical
from pipeline.core.classical import CLASSICAL_METHODS, Artifact, get_method
from pipeline.core.classical import base as classical_base
from pipeline.core.vectors import l2_normalize, signed_power

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
UKBENCH = SHARED / "data" / "ukbench-dev"

# Small SIFT settings keep the whole module well under a minute on 2 cores.
FAST = {"max_side": 320, "nfeatures": 300}


def _open(name: str):
    from PIL import Image

    with Image.open(UKBENCH / name) as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def images():
    if not UKBENCH.is_dir():
        pytest.skip("../shared/data/ukbench-dev is not available")
    names = sorted(p.name for p in UKBENCH.glob("ukbench*.jpg"))[:12]
    return [_open(n) for n in names]


@pytest.fixture(scope="module")
def train_descs(images):
    method = get_method("vlad", k=8, **FAST)
    return method.extract(images[:10])


def test_sift_and_rootsift(images):
    method = get_method("vlad", k=8, **FAST)
    raw = get_method("vlad", k=8, rootsift=False, **FAST).extract(images[:3])
    rs = method.extract(images[:3])
    for d_raw, d_rs in zip(raw, rs):
        assert d_raw.shape[1] == 128 and 50 <= len(d_raw) <= FAST["nfeatures"]
        assert d_rs.shape == d_raw.shape and d_rs.dtype == np.float32
        assert (d_rs >= 0).all()
        np.testing.assert_allclose(np.linalg.norm(d_rs, axis=1), 1.0, atol=1e-5)


def test_vlad_shapes_and_options(images, train_descs):
    plain = get_method("vlad", k=8, **FAST)
    plain.fit_descriptors(train_descs, max_descriptors=5000)
    assert plain.dim == 8 * 128
    descs = train_descs[:3]
    v = plain.encode_descriptors(descs)
    assert v.shape == (3, 8 * 128) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)

    path_art = plain.artifact
    ssr = get_method("vlad", k=8, ssr=True, **FAST)
    ssr._set_artifact(path_art)
    vs = ssr.encode_descriptors(descs)
    # SSR is sign-preserving and monotone on |x|, so it can only rescale, not flip.
    assert np.array_equal(np.sign(vs), np.sign(v))
    assert not np.allclose(vs, v)
    np.testing.assert_allclose(vs, l2_normalize(signed_power(v, 0.5)), atol=1e-5)

    intra = get_method("vlad", k=8, intra=True, **FAST)
    intra._set_artifact(path_art)
    vi = intra.encode_descriptors(descs).reshape(3, 8, 128)
    for row in vi:
        block_norms = np.linalg.norm(row, axis=1)
        nonzero = block_norms[block_norms > 0]
        # Intra-normalisation gives every visited centroid the same weight.
        np.testing.assert_allclose(nonzero, nonzero[0], rtol=1e-4)

    # Encoding from images equals encoding from the extracted descriptors.
    np.testing.assert_allclose(plain.encode(images[:2]), plain.encode_descriptors(plain.extract(images[:2])), atol=1e-6)


def test_vlad_pca(train_descs):
    m = get_method("vlad-pca", k=4, pca_dim=6, **FAST)
    m.fit_descriptors(train_descs, max_descriptors=3000)
    x = m.encode_descriptors(train_descs[:4])
    assert m.dim == 6 and x.shape == (4, 6)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def _jpeg75(img):
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.mark.parametrize("name", ["phash", "dhash", "ahash", "whash"])
def test_hash_robust_to_jpeg(images, name):
    m = get_method(name)
    assert m.is_binary and m.dim == 64 and not m.needs_training
    codes = m.encode([images[0], _jpeg75(images[0]), images[8]])
    assert codes.shape == (3, 8) and codes.dtype == np.uint8
    bits = np.unpackbits(codes, axis=1)
    near = int((bits[0] != bits[1]).sum())
    far = int((bits[0] != bits[2]).sum())
    assert near <= 4, near
    assert far >= 12, far


def test_hash_search_with_faiss_binary(images):
    import faiss

    m = get_method("phash")
    codes = m.encode(images[:8])
    index = faiss.IndexBinaryFlat(m.dim)
    index.add(codes)
    dist, idx = index.search(m.encode([_jpeg75(images[5])]), 1)
    assert idx[0, 0] == 5 and dist[0, 0] <= 4


def test_bow_hard_and_soft(train_descs):
    hard = get_method("bow", k=16, **FAST)
    art = hard.fit_descriptors(train_descs, max_descriptors=5000, description="10 ukbench-dev images")
    assert art.arrays["df"].shape == (16,) and (hard.idf > 0).all()
    h = hard.encode_descriptors(train_descs[:3])
    assert h.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(h, axis=1), 1.0, atol=1e-5)
    assert (h >= 0).all()

    soft = get_method("bow-soft", k=16, **FAST)
    soft._set_artifact(art)
    s = soft.encode_descriptors(train_descs[:3])
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, atol=1e-5)
    # Soft assignment spreads mass, so more words are non-zero.
    assert (s > 0).sum() >= (h > 0).sum()
    assert not np.allclose(s, h)


def test_fisher_shape_and_norm(train_descs):
    m = get_method("fisher", k=4, desc_pca_dim=16, **FAST)
    m.fit_descriptors(train_descs, max_descriptors=3000)
    x = m.encode_descriptors(train_descs[:3])
    assert m.dim == 2 * 4 * 16 and x.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # An image is closer to itself than to the others.
    sims = x @ x.T
    assert (np.argmax(sims, axis=1) == np.arange(3)).all()


def test_empty_image_gives_zero_row(train_descs):
    m = get_method("vlad", k=4, **FAST)
    m.fit_descriptors(train_descs[:4], max_descriptors=2000)
    x = m.encode_descriptors([np.zeros((0, 128), np.float32), train_descs[0]])
    assert not x[0].any() and np.isclose(np.linalg.norm(x[1]), 1.0)


@pytest.mark.parametrize("name,opts", [("bow", {"k": 8}), ("vlad-pca", {"k": 4, "pca_dim": 5}), ("fisher", {"k": 2, "desc_pca_dim": 8})])
def test_artifact_round_trip(tmp_path, train_descs, name, opts):
    m = get_method(name, **opts, **FAST)
    m.fit_descriptors(train_descs, max_descriptors=3000, description="unit test")
    path = m.save(str(tmp_path / "art"))
    assert path.endswith(".npz")
    with np.load(path, allow_pickle=False) as data:
        assert classical_base._ARTIFACT_META_KEY in data.files
    loaded = classical.load_method_file(path)
    assert loaded.name == name and loaded.params == m.params
    assert loaded.artifact.version == m.artifact.version
    assert loaded.artifact.training["description"] == "unit test"
    np.testing.assert_array_equal(loaded.encode_descriptors(train_descs[:2]), m.encode_descriptors(train_descs[:2]))
    via_registry = get_method(name, artifact_path=path)
    assert via_registry.dim == m.dim
    # Trained parameters cannot be silently changed when loading.
    with pytest.raises(ValueError):
        get_method(name, artifact_path=path, k=opts["k"] + 1)


def test_artifact_tamper_detected(tmp_path):
    art = Artifact("bow", {"k": 2}, {"centroids": np.ones((2, 3), np.float32)})
    path = art.save(str(tmp_path / "a.npz"))
    with np.load(path, allow_pickle=False) as data:
        content = {k: data[k] for k in data.files}
    content["centroids"] = content["centroids"] * 2
    np.savez(path, **content)
    with pytest.raises(ValueError, match="corrupt"):
        Artifact.load(path)


def test_registry_and_unknown_name():
    expected = {"phash", "dhash", "ahash", "whash", "bow", "bow-soft", "vlad", "vlad-ssr", "fisher"}
    assert expected <= set(CLASSICAL_METHODS)
    with pytest.raises(ValueError) as err:
        get_method("sift-magic")
    for name in expected:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown option"):
        get_method("vlad", nonsense=1)


def test_untrained_method_refuses_to_encode(images):
    m = get_method("bow", k=8, **FAST)
    assert m.needs_training and not m.is_trained
    with pytest.raises(RuntimeError, match="fit"):
        m.encode(images[:1])


def test_fit_from_pil_images(images):
    m = get_method("bow", k=8, **FAST)
    art = m.fit(iter(images[:6]), max_descriptors=2000, description="6 ukbench-dev images")
    assert art.training["n_images"] == 6 and m.is_trained
    x = m.encode(images[6:8])
    assert x.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
