"""The ``train`` job for a classical method: fit its vocabulary / GMM (:mod:`pipeline.stages.vocabulary`)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pipeline.config import Config
from pipeline.core import storage
from pipeline.stages import tracking, vocabulary


# -------------------------------------------------------------------- job
def train_job(spark, config: Config) -> dict[str, Any]:
    """``neardup train --method M --input DIR``: one MLflow run holding the artifact."""
    name = config.embed.backbone
    with tracking.mlflow_run(config, f"train-{storage.tag_of(name)}", tags={"job": "train", "method": name}) as run:
        result = vocabulary.train(spark, config, name)
        out = {**asdict(result), "mlflow_run_id": run.info.run_id}
    out["report"] = (f"{name}: artifact {result.uri} (version {result.version}, "
                     f"{'reused' if result.reused else f'trained on {result.n_images} images in {result.seconds:.1f} s'})")
    return out
