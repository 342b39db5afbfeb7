"""Accuracy on the real benchmark subsets in ../shared, through the evaluate job.

Reference (plain Keras, 224x224 squashed, average pooling, exact cosine kNN): MobileNet
N-S 3.944 on ukbench-dev and mAP 0.845 on holidays-dev. Random weights give about 2.2 N-S.
"""
from __future__ import annotations

import json

import mlflow
import pytest

from pipeline import api
from tests.helpers import make_config, shared_path

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


def test_ukbench_plain_baseline(spark, tmp_path):
    _, result = _evaluate(tmp_path, "ukbench", "ukbench-dev", **PLAIN)
    assert result["ns_score"] >= 3.93, result


def test_ukbench_ns_score(spark, tmp_path):
    config, result = _evaluate(tmp_path, "ukbench", "ukbench-dev", train_on="holidays-dev")
    assert result["images"] == 500 and result["queries"] == 500
    assert result["ns_score"] >= 3.97, result
    assert result["pair_precision"] >= 0.9, result

    client = mlflow.tracking.MlflowClient(config.tracking_uri())
    child = client.get_run(result["mlflow_run_id"])
    assert child.info.status == "FINISHED"
    assert child.data.metrics["ns_score"] == pytest.approx(result["ns_score"])
    assert child.data.params["backbone"] == "mobilenet" and child.data.params["index_type"] == "flat"
    assert child.data.params["input"] == "aspect" and child.data.params["dba_k"] == "3"
    assert child.data.params["train_input"].endswith("holidays-dev")
    assert child.data.params["postprocess_version"] != "none"
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "comparison.txt", "config.yaml"} <= artifacts


def test_holidays_map(spark, tmp_path):
    _, result = _evaluate(tmp_path, "holidays", "holidays-dev", train_on="ukbench-dev")
    assert result["images"] == 398 and result["queries"] == 150
    assert result["map"] >= 0.90, result
