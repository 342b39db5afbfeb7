"""The train job: image table read through petastorm -> whitening artifact -> MLflow -> embed."""
from __future__ import annotations

import mlflow
import numpy as np

from pipeline import descriptors as D
from pipeline import embed as em
from pipeline.cli import run_job
from tests.conftest import make_config


def test_train_job_learns_an_artifact_usable_by_path_and_run_id(spark, tmp_path, demo_corpus):
    root, _ = demo_corpus
    config = make_config(tmp_path / "work", train__input=[str(root)], train__name="demo",
                         embed__backbone="mobilenet-0.25", embed__max_side=128, train__dim=32, train__power=0.5)
    result = run_job("train", config)
    assert result["images"] >= 90 and result["dim"] == 32
    w = D.Whitening.load(result["artifact"])
    assert w.version == result["version"] and w.params["descriptor"]["backbone"] == "mobilenet-0.25"

    client = mlflow.tracking.MlflowClient(config.tracking_uri())
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["job"] == "train"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "postprocess")] == [
        "postprocess/" + result["artifact"].rsplit("/", 1)[-1]]

    by_path = em.model_key(config.with_overrides(embed__postprocess=result["artifact"]))
    by_run = em.model_key(config.with_overrides(embed__postprocess=result["mlflow_run_id"]))
    assert by_path.postprocess_version == by_run.postprocess_version == w.version
    from pipeline import backbones as B

    model = B.load_embedding_model(by_run)
    assert model.dim == 32
    assert np.allclose(np.linalg.norm(model.postprocess(np.eye(1, model.features_dim, dtype=np.float32)), axis=1), 1)
