"""Config: YAML + --set overrides into one typed object, validated before Spark starts."""
import pytest

from pipeline import api
from pipeline.config import Config, ConfigError


def test_defaults_and_overrides():
    c = Config.load(None, ["dedup.threshold=0.9", "evaluate.backbones=a,b", "index.shards=3",
                           "spark.conf={spark.executor.memory: 4g}"])
    assert c.dedup.threshold == 0.9
    assert c.evaluate.backbones == ["a", "b"]
    assert c.index.shards == 3
    assert c.spark.conf == {"spark.executor.memory": "4g"}
    assert c.embed.backbone == "mobilenet"


@pytest.mark.parametrize("override, message", [
    ("embed.backbone=resnet5", "unknown backbone 'resnet5'"),
    ("dedup.threshold=1.5", "dedup.threshold"),
    ("index.type=ivf", "index.type must be one of"),
    ("index.nprobe=-1", "index.nprobe must be >= 0"),
    ("embed.weights=/no/such/file.h5", "embed.weights"),
    ("max_error_fraction=2", "max_error_fraction"),
    ("embed.backbone=/no/such/model.keras", "model file not found"),
])
def test_validation_names_the_bad_value(override, message):
    """Settings and the encoder's own checks, all before Spark starts (:func:`pipeline.api.validate`)."""
    with pytest.raises(ConfigError, match=message):
        api.validate(Config.load(None, [override]))


def test_settings_alone_do_not_need_the_encoders():
    # config is the bottom layer: an unknown backbone is the encoder registry's to refuse.
    assert Config.load(None, ["embed.backbone=resnet5"]).validate().embed.backbone == "resnet5"


def test_unknown_keys_and_bad_types_fail_at_load():
    with pytest.raises(ConfigError, match="unknown config key 'dedup.treshold'"):
        Config.load(None, ["dedup.treshold=0.5"])
    with pytest.raises(ConfigError, match="dedup.k must be an integer"):
        Config.load(None, ["dedup.k=many"])
    with pytest.raises(ConfigError, match="key=value"):
        Config.load(None, ["dedup.k"])


def test_yaml_file(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("workdir: /tmp/x\nindex:\n  type: hnsw\n")
    c = Config.load(conf, ["index.hnsw_m=16"])
    assert (c.workdir, c.index.type, c.index.hnsw_m) == ("/tmp/x", "hnsw", 16)
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "missing.yaml")


def test_the_fast_profile_changes_only_what_it_says():
    from pathlib import Path

    fast = Config.load(Path(__file__).resolve().parents[2] / "conf" / "fast.yaml")
    api.validate(fast)
    default = Config.load(None)
    changed = (fast.embed.backbone, fast.embed.max_side, fast.embed.pooling, fast.dedup.rotations)
    assert changed == ("mobilenetv2-0.35", 352, "gem", [0])
    assert (default.embed.backbone, default.embed.max_side, default.embed.pooling, default.dedup.rotations) == (
        "mobilenet", 320, "avg", [0, 90, 270])
    assert fast.dedup.threshold == default.dedup.threshold and fast.embed.precision == default.embed.precision
    # Its pair scores come from the calibration fitted for its network, not MobileNet's.
    from pipeline.stages import dedup

    assert dedup.load_calibration(fast).params["backbone"] == "mobilenetv2-0.35"
    assert dedup.load_calibration(default).params["backbone"] == "mobilenet"
