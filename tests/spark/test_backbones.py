"""Backbones: the registry, a user's own .keras file, missing weights, random weights."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.encoders import backbones as B
from pipeline import schemas as S
from pipeline.core import storage
from pipeline.stages import tables
from pipeline import api
from tests.helpers import make_config, shared_path

ROOT = Path(__file__).resolve().parents[2]


def test_registry_has_the_study_backbones_and_newer_ones():
    assert set(B.STUDY_BACKBONES) <= set(B.REGISTRY)
    assert {"mobilenetv2", "efficientnetv2b0", "convnexttiny"} <= set(B.REGISTRY)
    assert B.REGISTRY["inceptionresnetv2"].input_size == 299


@pytest.fixture(scope="module")
def tiny_corpus(demo_corpus, tmp_path_factory):
    corpus, _ = demo_corpus
    root = tmp_path_factory.mktemp("tiny") / "corpus"
    root.mkdir()
    for name in ("coffee", "rocket"):
        for variant in ("", "_half", "_jpeg25", "_text"):
            shutil.copy(corpus / name / f"{name}{variant}.jpg", root)
    for name in ("moon", "clock"):
        shutil.copy(corpus / "unrelated" / f"{name}.jpg", root)
    return root


def _similarities(spark, config):
    wd = storage.Workdir.of(config.workdir)
    names = {r[S.IMAGE_ID]: Path(r[S.PATH]).stem for r in tables.read_table(spark, wd.images, "i").collect()}
    rows = tables.read_table(spark, wd.embeddings(config.embed.backbone), "e").collect()
    vec = {names[r[S.IMAGE_ID]]: np.array(r[S.EMBEDDING]) for r in rows}
    return vec


def test_user_keras_file_is_a_backbone(spark, tiny_corpus, tmp_path):
    model_file = shared_path("weights", "models", "mobilenet_v2_1.0_224_imagenet_bn1e-5.keras")
    # torchvision weights: torch-style input scaling.
    config = make_config(tmp_path, ingest__input=[str(tiny_corpus)], embed__backbone=str(model_file),
                         embed__preprocess="torch")
    api.ingest(config=config)
    api.embed(config=config)
    vec = _similarities(spark, config)
    assert len(vec) == 10 and all(v.shape == (1280,) for v in vec.values())
    for name in ("coffee", "rocket"):
        for variant in ("_half", "_jpeg25", "_text"):
            dup = float(vec[name] @ vec[name + variant])
            unrelated = max(float(vec[name] @ vec[o]) for o in ("moon", "clock"))
            assert dup > 0.8 and dup > unrelated + 0.15, (name, variant, dup, unrelated)
    assert storage.tag_of(str(model_file)).startswith("mobilenet_v2_1.0_224_imagenet_bn1e-5-")
    assert storage.tag_of("/a/model.keras") != storage.tag_of("/b/model.keras")


def test_user_keras_file_at_a_named_layer():
    model_file = shared_path("weights", "models", "efficientnet_lite0_224_imagenet.keras")
    key = B.ModelKey(str(model_file), "imagenet", None, "lite", 224)
    model = B.EmbeddingModel(key)
    assert model.dim == 1280
    named = B.EmbeddingModel(B.ModelKey(str(model_file), "imagenet", "re_lu_98", "lite", 224))
    pixels = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    # The named last ReLU, pooled here, equals the file's own global average pooling.
    np.testing.assert_allclose(model(pixels), named(pixels), atol=1e-5)
    with pytest.raises(ValueError, match="layer 'no_such_layer' not found"):
        B.EmbeddingModel(B.ModelKey(str(model_file), "imagenet", "no_such_layer", "lite", 224))


def test_random_weights_for_timing_only():
    model = B.EmbeddingModel(B.ModelKey("mobilenetv2-0.35", "none", None, "tf", 224))
    out = model(np.random.default_rng(1).integers(0, 255, (3, 224, 224, 3), dtype=np.uint8))
    assert out.shape == (3, model.dim) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


def test_missing_imagenet_weights_fail_at_once_with_instructions(tmp_path):
    # A dead proxy: the download fails here even on a machine that has internet access.
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "empty-keras"), TF_CPP_MIN_LOG_LEVEL="2",
               https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "embed", "--backbone", "densenet121",
         "--workdir", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "ImageNet weights for backbone 'densenet121' are not in the Keras cache" in result.stderr
    assert "--weights" in result.stderr
    assert not (tmp_path / "work").exists()  # failed before any Spark work
