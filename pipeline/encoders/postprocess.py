"""Where the learned post-processing artifact of ``embed.postprocess`` comes from.

``embed.postprocess`` is a ``.npz`` path (local or any URI the workdir store reads), an
MLflow run id of a ``train`` run, or ``runs:/<run id>/...``. The artifact is a
:class:`pipeline.core.whitening.Whitening` (no pickle); its content hash is part of the
embedding table's fingerprint, so a new artifact re-embeds.
"""
from __future__ import annotations

import glob
import os
import re

from pipeline.core import whitening
from pipeline.core import storage
from pipeline.config import Config, ConfigError

ARTIFACT_DIR = "postprocess"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_RESOLVED: dict[tuple[str, str], tuple[str, str]] = {}


def resolve(config: Config) -> tuple[str, str]:
    """``embed.postprocess`` -> (URI readable by every executor, content version)."""
    spec = config.embed.postprocess
    if not spec:
        raise ConfigError("embed.postprocess is not set")
    cache_key = (spec, config.workdir) + whitening._file_identity(spec)[1:]
    if cache_key not in _RESOLVED:
        uri = _locate(spec, config)
        try:
            version = whitening.load_whitening_uri(uri).version
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"embed.postprocess: cannot read {uri}: {exc}") from exc
        _RESOLVED[cache_key] = (uri, version)
    return _RESOLVED[cache_key]


def _locate(spec: str, config: Config) -> str:
    run_id = None
    if spec.startswith("runs:/"):
        run_id = spec[len("runs:/"):].split("/", 1)[0]
    elif _RUN_ID.match(spec) and not os.path.exists(spec):
        run_id = spec
    if run_id is None:
        if "://" in spec and not spec.startswith("file:"):
            return spec
        path = spec[len("file://"):] if spec.startswith("file://") else spec
        if not os.path.isfile(path):
            raise ConfigError(f"embed.postprocess: no such file {spec!r} (a .npz path, an MLflow run id or none)")
        return os.path.abspath(path)
    import mlflow

    mlflow.set_tracking_uri(config.tracking_uri())
    local = storage.local_path_of(f"{storage.Workdir.of(config.workdir).postprocess}/{run_id}")
    if local is None:
        import tempfile

        local = tempfile.mkdtemp(prefix="neardup-postprocess-")
    os.makedirs(local, exist_ok=True)
    try:
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACT_DIR, dst_path=local)
    except Exception as exc:
        raise ConfigError(f"embed.postprocess: MLflow run {run_id} has no {ARTIFACT_DIR}/ artifact ({exc})") from exc
    found = sorted(glob.glob(os.path.join(local, "**", "*.npz"), recursive=True))
    if not found:
        raise ConfigError(f"embed.postprocess: MLflow run {run_id} has no .npz in its {ARTIFACT_DIR}/ artifacts")
    return found[0]
