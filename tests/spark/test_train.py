"""The train job: image table read through petastorm -> whitening artifact -> MLflow -> embed."""
from __future__ import annotations

import mlflow
import numpy as np

from pipeline.core import whitening
from pipeline.encoders import cnn
from pipeline import api
from tests.helpers import make_config, shared_path


def test_train_job_learns_an_artifact_usable_by_path_and_run_id(spark, tmp_path, demo_corpus):
    root, _ = demo_corpus
    config = make_config(tmp_path / "work", train__input=[str(root)], train__name="demo",
                         embed__backbone="mobilenet-0.25", embed__max_side=128, train__dim=32, train__power=0.5)
    result = api.train(config=config)
    assert result["images"] >= 90 and result["dim"] == 32
    w = whitening.Whitening.load(result["artifact"])
    assert w.version == result["version"] and w.params["descriptor"]["backbone"] == "mobilenet-0.25"

    client = mlflow.tracking.MlflowClient(config.tracking_uri())
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["job"] == "train"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "postprocess")] == [
        "postprocess/" + result["artifact"].rsplit("/", 1)[-1]]

    by_path = cnn.model_key(config.with_overrides(embed__postprocess=result["artifact"]))
    by_run = cnn.model_key(config.with_overrides(embed__postprocess=result["mlflow_run_id"]))
    assert by_path.postprocess_version == by_run.postprocess_version == w.version
    from pipeline.encoders import backbones as B

    model = B.load_embedding_model(by_run)
    assert model.dim == 32
    assert np.allclose(np.linalg.norm(model.postprocess(np.eye(1, model.features_dim, dtype=np.float32)), axis=1), 1)


def test_projection_head_learns_round_trips_and_changes_the_version(tmp_path):
    """Issue 3: a linear head trained with InfoNCE on augmented views, stored in the artifact."""
    from pipeline.encoders import backbones as B
    from pipeline.train import cnn as T

    files = sorted(shared_path("data", "ukbench-dev").glob("*.jpg"))[:20]
    contents = [f.read_bytes() for f in files]
    config = make_config(tmp_path / "work", embed__backbone="mobilenet-0.25", embed__max_side=128,
                         train__dim=32, train__head_dim=8, train__head_epochs=15, train__head_augmentations=2)
    model = B.load_embedding_model(cnn.model_key(config))
    out, errors = cnn.embed_contents(model, contents, config.embed.batch_size, config.ingest.max_pixels)
    assert not any(errors)
    X = np.stack(out)
    views, good = T.embed_views(model, contents, 2, np.random.default_rng(0), config)
    assert all(good) and np.stack(views).shape == (20, 2, X.shape[1])
    assert not np.allclose(np.stack(views)[:, 0], X)  # the views differ from the originals

    plain = T.fit(config, X)
    w, metrics = T.attach_head(config, plain, X, np.stack(views))
    assert metrics["head_final_loss"] < metrics["head_initial_loss"]
    assert w.head.shape == (8, plain.dim) and w.dim == 8 and w.version != plain.version

    plain.save(tmp_path / "plain.npz")
    w.save(tmp_path / "head.npz")
    assert whitening.Whitening.load(tmp_path / "plain.npz").head is None  # artifacts without a head still load
    assert whitening.Whitening.load(tmp_path / "plain.npz").version == plain.version
    back = whitening.Whitening.load(tmp_path / "head.npz")
    assert back.version == w.version and np.array_equal(back.head, w.head)
    with np.load(tmp_path / "head.npz", allow_pickle=False) as arrays:
        assert "head" in arrays.files

    headed = B.load_embedding_model(cnn.model_key(config.with_overrides(embed__postprocess=str(tmp_path / "head.npz"))))
    assert headed.dim == 8
    Y = headed.postprocess(X)
    assert Y.shape == (20, 8) and np.allclose(np.linalg.norm(Y, axis=1), 1, atol=1e-5)
