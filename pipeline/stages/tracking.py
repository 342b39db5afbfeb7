"""MLflow: one run per job, nested runs per backbone in ``evaluate``; driver-side only.

The embedded default is a sqlite store inside the workdir (MLflow's ``./mlruns`` file
store is in maintenance mode). A job that raises leaves its run FAILED: ``mlflow.start_run``
used as a context manager ends the run with that status on an exception.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import yaml

from pipeline.config import Config

log = logging.getLogger(__name__)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def config_params(config: Config) -> dict[str, str]:
    flat: dict[str, Any] = {}
    _flatten("", config.to_dict(), flat)
    # MLflow params are strings of bounded length.
    return {k: str(v)[:500] for k, v in flat.items()}


@contextmanager
def mlflow_run(config: Config, run_name: str, nested: bool = False,
               tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start a run (nested under the active one when ``nested``); yields the mlflow ActiveRun."""
    import mlflow

    if not nested:
        uri = config.tracking_uri()
        if uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(uri[len("sqlite:///"):]), exist_ok=True)
        mlflow.set_tracking_uri(uri)
        if not config.mlflow.tracking_uri and mlflow.get_experiment_by_name(config.mlflow.experiment) is None:
            # The embedded store keeps artifacts (configs, the report) inside the workdir too;
            # MLflow's default would be ./mlruns under whatever folder the job was started from.
            artifacts = os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
            try:
                mlflow.create_experiment(config.mlflow.experiment, artifact_location=Path(artifacts).as_uri())
            except mlflow.exceptions.MlflowException:
                pass  # another job created it meanwhile
        mlflow.set_experiment(config.mlflow.experiment)
    with mlflow.start_run(run_name=run_name, nested=nested, tags=dict(tags or {})) as run:
        if not nested:
            mlflow.log_params(config_params(config))
            log_dict_artifact(config.to_dict(), "config.yaml")
        yield run


def log_dict_artifact(obj: Any, name: str) -> None:
    """Log a dict as a YAML or JSON artifact (by the name's suffix)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "w", encoding="utf-8") as fh:
            if name.endswith((".yaml", ".yml")):
                yaml.safe_dump(obj, fh, sort_keys=False)
            else:
                json.dump(obj, fh, indent=2, default=str)
        mlflow.log_artifact(path)


def log_text_artifact(text: str, name: str) -> None:
    import mlflow

    mlflow.log_text(text, name)


def log_metrics(metrics: Mapping[str, float]) -> None:
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    if clean:
        mlflow.log_metrics(clean)
