"""The encoder registry decides what a name means; the stages only ask the encoder."""
from __future__ import annotations

import pickle

import pytest

from pipeline import api
from pipeline.config import Config, ConfigError
from pipeline.encoders import registry
from pipeline.encoders.classical import BowEncoder, HashEncoder, VladEncoder
from pipeline.encoders.cnn import CnnEncoder, ModelFileEncoder
from tests.helpers import shared_path


def _encoder(backbone: str, *overrides: str):
    return registry.encoder_for(Config.load(None, [f"embed.backbone={backbone}", *overrides]))


def test_registry_picks_one_class_per_kind_of_name():
    assert type(_encoder("mobilenet")) is CnnEncoder
    assert type(_encoder("/models/mine.keras")) is ModelFileEncoder
    assert type(_encoder("phash")) is HashEncoder
    assert type(_encoder("bow-soft")) is BowEncoder
    assert type(_encoder("vlad-intra")) is VladEncoder


def test_capabilities_the_stages_ask_for():
    cnn, phash, vlad = _encoder("mobilenet"), _encoder("phash"), _encoder("vlad-ssr")
    assert not cnn.binary and cnn.reranking and cnn.learns == "postprocess"
    assert phash.binary and not phash.reranking and not phash.needs_training
    assert vlad.needs_training and vlad.learns == "vocabulary" and not vlad.binary
    # Classical baselines are searched as published: re-ranking off, the CNN's config untouched.
    d = phash.search_config().dedup
    assert (d.rotations, d.dba_k, d.qe_k) == ([0], 0, 0)
    assert cnn.search_config().dedup.dba_k == Config().dedup.dba_k


def test_thresholds_on_the_index_scale():
    phash = _encoder("phash", "dedup.hamming_bits=8", "dedup.threshold=0.5")
    assert phash.threshold("hamming") == pytest.approx(1 - 8 / 64)
    assert phash.threshold("inner_product") == 0.5
    assert _encoder("mobilenet", "dedup.threshold=0.7").threshold("inner_product") == 0.7


def test_embed_functions_ship_to_executors_and_embed():
    fn = _encoder("phash").embed_function()
    clone = pickle.loads(pickle.dumps(fn))
    image = (shared_path("data", "ukbench-dev") / "ukbench00000.jpg").read_bytes()
    vectors, errors = clone([image, b"not an image"])
    assert errors[0] is None and vectors[0].shape == (64,) and set(vectors[0].tolist()) <= {0.0, 1.0}
    assert vectors[1] is None and errors[1].startswith("decode failed")
    key = pickle.loads(pickle.dumps(_encoder("mobilenet").embed_function())).key
    assert key.backbone == "mobilenet"


def test_fingerprints_tell_encoders_apart():
    assert _encoder("mobilenet").fingerprint() != _encoder("mobilenet", "embed.pooling=gem").fingerprint()
    assert _encoder("vlad-ssr").fingerprint() != _encoder("vlad").fingerprint()


def test_a_vocabulary_is_required_before_spark_starts(tmp_path):
    with pytest.raises(ConfigError, match="needs a trained vocabulary"):
        api.preflight("embed", Config.load(None, [f"workdir={tmp_path}", "embed.backbone=bow"]))
    with pytest.raises(ConfigError, match="unknown backbone 'resnet5'"):
        api.validate(Config.load(None, ["embed.backbone=resnet5"]))


@pytest.mark.parametrize("flags", [["avx2"], ["avx2", "amx_bf16", "amx_int8"], []])
def test_fingerprints_tell_int8_vectors_apart_and_keep_the_others(monkeypatch, flags):
    # int8 vectors get their own fingerprint (not mixed with fp32 / bf16 ones in one table);
    # fp32 and bf16 keep the fingerprint of earlier versions (no re-embedding of an archive).
    from pipeline.encoders import runtimes

    monkeypatch.setattr(runtimes, "cpu_flags", lambda: flags)
    auto = _encoder("mobilenet").fingerprint()
    fp32 = _encoder("mobilenet", "embed.precision=fp32").fingerprint()
    int8 = _encoder("mobilenet", "embed.precision=int8").fingerprint()
    assert int8["quantization"] == runtimes.QUANTIZATION and "quantization" not in fp32
    assert ("quantization" in auto) == (runtimes.resolve_precision("auto") == "int8")
    assert _encoder("mobilenet", "embed.runtime=tensorflow", "embed.precision=auto").fingerprint().keys() == fp32.keys()
