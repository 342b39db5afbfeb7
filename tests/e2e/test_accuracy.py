"""Accuracy on the real benchmark subsets in ../shared, through the evaluate job.

Reference (plain Keras, 224x224 squashed, average pooling, exact cosine kNN): MobileNet
N-S 3.944 on ukbench-dev and mAP 0.845 on holidays-dev. Random weights give about 2.2 N-S.
"""
from __future__ import annotations

import json

import mlflow
import pytest

from pipeline import api
from tests.helpers import ROOT, make_config, shared_path

KEYS = {"dataset", "method", "images", "queries", "embed_seconds", "images_per_second", "mlflow_run_id"}


# The reference study's plain descriptor, still reachable by config.
PLAIN = {"embed__input": "squash", "embed__trim_borders": False, "dedup__dba_k": 0, "dedup__rotations": [0]}


def _evaluate(tmp_path, dataset: str, folder: str, train_on: str | None = None, **overrides):
    data = shared_path("data", folder)
    out = tmp_path / "results.json"
    if train_on:  # the post-processing is learned on the OTHER dataset, never the evaluated one
        overrides["evaluate__train_input"] = str(shared_path("data", train_on))
    config = make_config(tmp_path / "work", evaluate__dataset=dataset, evaluate__input=str(data),
                         evaluate__backbones=["mobilenet"], evaluate__json_out=str(out), **overrides)
    returned = api.evaluate(config=config).results
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    assert len(written) == 1 and KEYS <= set(written[0])
    return config, written[0]


def _crossfit(space: str, dataset: str) -> str:
    """The calibration fitted on the OTHER dataset only (`make calibrate`): scores are cross-fitted."""
    return str(ROOT / "bench" / "results" / "calibration" / f"crossfit-{space}-for-{dataset}.npz")


def _check_pairs(client, result, precision: float, recall: float) -> None:
    """Issue 11: the pairs at the default threshold, their curve (a real PNG, in MLflow) and operating point."""
    assert result["score"] == "calibrated" and result["threshold"] == 0.9
    assert result["pair_precision"] >= precision and result["pair_recall"] >= recall, result["operating_point"]
    op = result["operating_point"]  # from the scored candidates; must agree with the pairs table
    assert op["precision"] == pytest.approx(result["pair_precision"]) and op["recall"] == pytest.approx(result["pair_recall"])
    curve = result["pair_curve"]["curve"]
    assert len(curve) > 20 and curve[0]["recall"] < result["pair_recall"] < curve[-1]["recall"]
    with open(result["pr_curve_png"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(result["pr_curve_png"]).shape[:2] == (480, 640)
    assert "pr_curve.png" in {a.path for a in client.list_artifacts(result["mlflow_run_id"])}


def test_ukbench_plain_baseline(spark, tmp_path):
    _, result = _evaluate(tmp_path, "ukbench", "ukbench-dev", **PLAIN)
    assert result["ns_score"] >= 3.93, result


def test_ukbench_ns_score(spark, tmp_path):
    config, result = _evaluate(tmp_path, "ukbench", "ukbench-dev", train_on="holidays-dev",
                               dedup__calibration=_crossfit("centred", "ukbench-dev"))
    assert result["images"] == 500 and result["queries"] == 500
    assert result["ns_score"] >= 3.97, result

    client = mlflow.tracking.MlflowClient(config.tracking_uri())
    _check_pairs(client, result, precision=0.95, recall=0.95)
    child = client.get_run(result["mlflow_run_id"])
    assert child.info.status == "FINISHED"
    assert child.data.metrics["ns_score"] == pytest.approx(result["ns_score"])
    assert child.data.params["backbone"] == "mobilenet" and child.data.params["index_type"] == "auto"
    assert child.data.params["input"] == "aspect" and child.data.params["dba_k"] == "3"
    assert child.data.params["train_input"].endswith("holidays-dev")
    assert child.data.params["postprocess_version"] != "none"
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "comparison.txt", "config.yaml"} <= artifacts


def test_holidays_map_and_pairs_at_the_default_settings(spark, tmp_path):
    """Holiday photos at the default settings (no centring; measured 2026-11-30 with OpenVINO bf16:
    mAP 0.931, pairs 0.965 / 0.613), with the raw-space calibration fitted on ukbench-dev only.
    Issue 11's operating point where it is hardest: precision >= 0.95 with recall >= 0.6."""
    config, result = _evaluate(tmp_path, "holidays", "holidays-dev", dedup__calibration=_crossfit("raw", "holidays-dev"))
    assert result["images"] == 398 and result["queries"] == 150
    assert result["map"] >= 0.90, result
    _check_pairs(mlflow.tracking.MlflowClient(config.tracking_uri()), result, precision=0.95, recall=0.6)


def test_mixed_collection_pairs(spark, tmp_path):
    """Both datasets searched as ONE collection, default settings (no centring, the shipped
    calibration), ground truth merged: the default threshold keeps its precision."""
    config, result = _evaluate(tmp_path, "mixed", "ukbench-dev",
                               evaluate__mixed_with=[str(shared_path("data", "holidays-dev"))],
                               dedup__rotations=[0])  # one embedding pass keeps the test short
    assert result["images"] == 898 and "ns_score" not in result and "map" not in result
    _check_pairs(mlflow.tracking.MlflowClient(config.tracking_uri()), result, precision=0.95, recall=0.8)


def test_the_fast_profile_keeps_retrieval_and_pairs_on_holidays(spark, tmp_path):
    """conf/fast.yaml (MobileNetV2 0.35 at 352 px, GeM, no rotated views) on the set where the
    earlier fast profile lost most (MobileNet at 256 px: mAP 0.890), the centring learned on
    ukbench-dev as for the issue's targets. Its pairs are scored by the calibration fitted for
    its network on ukbench-dev only (`make calibrate` with its settings). Measured 2026-12-02
    (AMD EPYC Zen 4): mAP 0.909, pairs 0.944 / 0.568; the defaults on the same check 0.904,
    0.949 / 0.582; the earlier profile 0.890, 0.961 / 0.550."""
    from pipeline.config import Config

    out = tmp_path / "results.json"
    config = Config.load(ROOT / "conf" / "fast.yaml", [f"workdir={tmp_path / 'work'}"]).with_overrides(
        evaluate__dataset="holidays", evaluate__input=str(shared_path("data", "holidays-dev")),
        evaluate__backbones=["mobilenetv2-0.35"], evaluate__json_out=str(out),
        evaluate__train_input=str(shared_path("data", "ukbench-dev")),
        dedup__calibration=str(ROOT / "bench" / "results" / "calibration" / "mobilenetv2-0.35"
                               / "crossfit-centred-for-holidays-dev.npz"))
    (result,) = api.evaluate(config=config).results
    assert result["method"] == "mobilenetv2-0.35" and result["images"] == 398
    assert result["map"] >= 0.90, result
    _check_pairs(mlflow.tracking.MlflowClient(config.tracking_uri()), result, precision=0.93, recall=0.55)
