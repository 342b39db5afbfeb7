"""Descriptor options of the embed stage (issue 3): config, decoding, batching, post-processing."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.core import preprocess
from pipeline.core import whitening
from pipeline.encoders import cnn
from pipeline.config import Config, ConfigError


def _jpeg(w: int, h: int, border: int = 0, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    if border:
        a[:border] = 255
        a[-border:] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("key, value", [("embed.input", "crop"), ("embed.pooling", "sum"), ("embed.gem_p", 0),
                                        ("embed.power_norm", 2), ("dedup.rotations", [90]),
                                        ("dedup.dba_k", -1), ("embed.scales", [])])
def test_bad_descriptor_options_fail_validation(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        Config.load(None, [f"{key}={value}"]).validate()


def test_default_config_is_the_measured_best():
    c = Config.load(None).validate()
    assert (c.embed.input, c.embed.max_side, c.embed.pooling, c.embed.trim_borders) == ("aspect", 320, "avg", True)
    assert (c.dedup.dba_k, c.dedup.qe_k, c.dedup.rotations) == (3, 0, [0, 90, 270])
    assert c.train.power == 0.0


def test_aspect_decode_keeps_ratio_in_few_shapes():
    a = preprocess.decode_for_model(_jpeg(640, 480), 320, 10**8, mode="aspect")
    assert a.shape == (240, 320, 3)
    b = preprocess.decode_for_model(_jpeg(325, 243), 320, 10**8, mode="aspect")
    assert b.shape == (240, 320, 3)  # 239 rounded to a multiple of 16: one batch shape for both
    r = preprocess.decode_for_model(_jpeg(325, 243), 320, 10**8, mode="aspect", rotation=90)
    assert r.shape == (320, 240, 3)
    s = preprocess.decode_for_model(_jpeg(640, 480), 224, 10**8)
    assert s.shape == (224, 224, 3)


def test_trim_borders_crops_plain_borders():
    content = _jpeg(300, 300, border=60)
    trimmed = preprocess.decode_for_model(content, 320, 10**8, mode="aspect", trim=True, size_multiple=1)
    assert trimmed.shape == (192, 320, 3)  # 180 x 300 content, scaled to 320 wide
    assert preprocess.content_box(np.full((50, 50, 3), 7, np.uint8)) == (0, 0, 50, 50)  # all plain: untouched


def test_trim_finds_the_box_of_a_large_image_on_a_reduced_copy():
    # Not DCT-scaled (a PNG, say): above TRIM_SEARCH_SIDE the box is searched on a box-filtered
    # copy and scaled back, within a few pixels of the real one.
    from PIL import Image

    a = np.full((2000, 3000, 3), 250, np.uint8)
    a[300:1700, 450:2550] = np.random.default_rng(0).integers(0, 200, (1400, 2100, 3))
    image = Image.fromarray(a)
    assert max(image.size) > preprocess.TRIM_SEARCH_SIDE
    w, h = preprocess.trimmed(image).size
    assert abs(w - 2100) <= 3 and abs(h - 1400) <= 3
    small = Image.fromarray(a[::4, ::4])  # 750 x 500: searched as it is, exactly
    assert preprocess.trimmed(small).size == (525, 350)


def _content_box_every_line(a, tol=24.0, min_uniform=0.98, min_keep=0.25):
    """The definition, on every row and column at once (content_box tests only the edges)."""
    corners = np.stack([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]]).astype(np.float32)
    close = np.abs(a.astype(np.float32) - np.median(corners, axis=0)).max(axis=-1) <= tol

    def span(uniform):
        n, lo = len(uniform), 0
        while lo < n and uniform[lo]:
            lo += 1
        hi = n
        while hi > lo and uniform[hi - 1]:
            hi -= 1
        return (0, n) if hi - lo < max(1, int(np.ceil(min_keep * n))) else (lo, hi)

    (top, bottom), (left, right) = span(close.mean(axis=1) >= min_uniform), span(close.mean(axis=0) >= min_uniform)
    return top, left, bottom, right


def test_content_box_equals_its_definition_on_bordered_noisy_images():
    rng = np.random.default_rng(3)
    for _ in range(60):
        h, w = rng.integers(20, 90, 2)
        a = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        colour = rng.integers(0, 256, 3)
        t, b, l, r = (int(rng.integers(0, max(1, s // 2))) for s in (h, h, w, w))  # noqa: E741
        a[:t], a[h - b:], a[:, :l], a[:, w - r:] = colour, colour, colour, colour
        speckle = rng.random((h, w)) < rng.choice([0.0, 0.01, 0.05])  # borders a little noisy, or not
        a[speckle] = rng.integers(0, 256, (int(speckle.sum()), 3))
        assert preprocess.content_box(a) == _content_box_every_line(a)


def test_model_key_records_every_option():
    c = Config.load(None, ["embed.pooling=gem", "embed.gem_p=4", "embed.scales=[1.0, 0.707]"]).validate()
    key = cnn.model_key(c)
    assert (key.input_mode, key.max_side, key.pooling, key.gem_p, key.scales) == ("aspect", 320, "gem", 4.0, (1.0, 0.707))
    squash = cnn.model_key(c.with_overrides(embed__input="squash"))
    assert squash.input_mode == "squash" and squash.input_size == 224
    # a network that only takes its own size falls back to squash
    assert cnn.model_key(c.with_overrides(embed__backbone="nasnetmobile")).input_mode == "squash"


def test_embed_contents_buckets_sizes_scales_and_postprocess(tmp_path):
    pytest.importorskip("tensorflow")
    from pipeline.encoders import backbones as B

    c = Config.load(None, ["embed.backbone=mobilenet-0.25", "embed.weights=none", "embed.scales=[1.0, 0.5]",
                           "embed.max_side=128", "embed.pooling=gem"]).validate()
    model = B.load_embedding_model(cnn.model_key(c))
    contents = [_jpeg(160, 120, seed=i) for i in range(5)] + [_jpeg(120, 160, seed=9), b"not an image"]
    vectors, errors = cnn.embed_contents(model, contents, 4, 10**8)
    assert errors[-1].startswith("decode failed") and all(e is None for e in errors[:-1])
    X = np.stack(vectors[:-1])
    assert X.shape == (6, model.dim) and np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    # the same image alone gives the same descriptor as in a mixed batch
    alone, _ = cnn.embed_contents(model, contents[5:6], 4, 10**8)
    assert np.allclose(alone[0], X[5], atol=1e-4)
    # a learned centring artifact is applied by the embed stage and changes its fingerprint
    w = whitening.fit_pca_whitening(X + 0.01, dim=X.shape[1], power=0.0)
    path = tmp_path / "w.npz"
    w.save(path)
    cw = c.with_overrides(embed__postprocess=str(path))
    key = cnn.model_key(cw)
    assert key.postprocess == str(path) and key.postprocess_version == w.version
    white = B.load_embedding_model(key)
    Y, _ = cnn.embed_contents(white, contents[:6], 4, 10**8)
    assert np.allclose(np.stack(Y), w.apply(X), atol=1e-4)
    with pytest.raises(ConfigError, match="postprocess"):
        cnn.model_key(c.with_overrides(embed__postprocess=str(tmp_path / "missing.npz")))
