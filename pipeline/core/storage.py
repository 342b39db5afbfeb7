"""The workdir layout and small files (index shards, JSON), without Spark.

Paths may be local or any Hadoop filesystem URI; small files go through ``pyarrow.fs`` so
executors can read and write them without the JVM. Spark tables and their commit protocol
are in :mod:`pipeline.stages.tables`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Part of this module's API; defined with the settings it interprets.
from pipeline.config import local_path_of  # noqa: F401

METADATA_FILE = "_neardup.json"


def absolute_uri(path: str) -> str:
    """Make a local path absolute so every executor (whatever its cwd) resolves it the same."""
    if "://" in path:
        return path.rstrip("/")
    return "file://" + str(Path(path).expanduser().resolve())


def tag_of(method: str) -> str:
    """A filesystem-safe folder name for a backbone or method.

    A .keras path becomes its stem plus a short hash of the path, so two model files with
    the same name (or one named like a registry backbone) never share tables.
    """
    if method.endswith(".keras"):
        digest = hashlib.sha1(method.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"{Path(method).stem}-{digest}"
    else:
        name = method
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@dataclass(frozen=True)
class Workdir:
    """Every folder and file the jobs write under a workdir (see docs/architecture.md)::

        images/                     image table (ingest)
        embeddings/<tag>/           embedding table per encoder (embed)
        index/<tag>/                sharded FAISS index (index)
        neighbors/<tag>/            kNN table, when kept
        pairs/<tag>/, groups/<tag>/ dedup output
        derived/<name>/             a nested workdir of derived tables (dba, rot90 ...)
        artifacts/<tag>/            trained classical vocabularies (+ by-key/ pointers)
        train_descriptors/<key>/    SIFT descriptors of a training collection
        train/<name>/               the image table of a post-processing training collection
        postprocess/                learned post-processing (.npz), and copies fetched from MLflow
        evaluation/<tag>/           figures of the evaluate job (pairs' precision-recall curve)
        mlflow.db                   the embedded MLflow store (when no tracking URI is set)
        tmp/<name>/                 scratch of a running job (component checkpoints), deleted at its end
        incremental/<tag>/          per-image state of the last dedup (incremental dedup, query)
        matches/<tag>/              the last `query` job's matches
        query/                      a nested workdir: the image and embedding tables of queried files
    """

    root: str  # absolute URI

    @classmethod
    def of(cls, path: str) -> "Workdir":
        return cls(absolute_uri(path))

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # One folder per table; per-method tables are keyed by the method's tag.
    @property
    def images(self) -> str:
        return self.join("images")

    def embeddings(self, method: str) -> str:
        return self.join("embeddings", tag_of(method))

    def index_dir(self, method: str) -> str:
        return self.join("index", tag_of(method))

    def pairs(self, method: str) -> str:
        return self.join("pairs", tag_of(method))

    def groups(self, method: str) -> str:
        return self.join("groups", tag_of(method))

    def neighbors(self, method: str) -> str:
        return self.join("neighbors", tag_of(method))

    def incremental(self, method: str) -> str:
        return self.join("incremental", tag_of(method))

    def matches(self, method: str) -> str:
        return self.join("matches", tag_of(method))

    @property
    def query_area(self) -> "Workdir":
        return Workdir(self.join("query"))

    # Everything else the jobs write.
    def evaluation_file(self, method: str, name: str) -> str:
        """Figures of the evaluate job (the pairs' precision-recall curve), shown by the report."""
        return self.join("evaluation", tag_of(method), name)

    def scratch(self, name: str) -> str:
        """A folder one running job owns (unique ``name``) and deletes when it ends."""
        return self.join("tmp", name)

    def derived(self, name: str) -> "Workdir":
        """A nested workdir for derived tables and their index (``dba``, ``rot90`` ...)."""
        return Workdir(self.join("derived", name))

    @property
    def dba_marker(self) -> str:
        """In a derived workdir: what its database-side augmentation was built from."""
        return self.join("dba.json")

    def artifacts(self, method: str) -> str:
        """Trained vocabularies of a classical method."""
        return self.join("artifacts", tag_of(method))

    def train_descriptors(self, key: str) -> str:
        return self.join("train_descriptors", key)

    def training(self, name: str) -> "Workdir":
        """A nested workdir for the image table of a training collection."""
        return Workdir(self.join("train", tag_of(name)))

    @property
    def postprocess(self) -> str:
        """Learned post-processing artifacts, and those fetched from MLflow runs."""
        return self.join("postprocess")

    def postprocess_file(self, name: str, version: str) -> str:
        return self.join("postprocess", f"{tag_of(name)}-{version}.npz")

    @property
    def fault_marker(self) -> str:
        """Test hook (embed.fail_once_on_image): the Python worker was killed once."""
        return self.join("_fault_injected")

    @property
    def mlflow_db(self) -> str:
        return self.join("mlflow.db")


def read_metadata(uri: str) -> dict[str, Any]:
    """The ``_neardup.json`` committed with a table, or {} when it has none."""
    target = f"{uri.rstrip('/')}/{METADATA_FILE}"
    return read_json(target) if file_exists(target) else {}


# ------------------------------------------------------------- small files
def _arrow_fs(uri: str):
    from pyarrow import fs as pafs

    local = local_path_of(uri)
    if local is not None:
        return pafs.LocalFileSystem(), os.path.abspath(local)
    return pafs.FileSystem.from_uri(uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small file atomically: temp name, then rename (faiss contrib big_batch_search)."""
    fs, path = _arrow_fs(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def read_file(path: str | bytes) -> bytes:
    """The bytes of one input file: a local path (str, or the raw bytes of a name that is not
    UTF-8) or a URI of any filesystem pyarrow reaches. Opened read-only: inputs are never modified."""
    if isinstance(path, str) and "://" in path and not path.startswith("file://"):
        return read_bytes(path)
    if isinstance(path, str):
        path = local_path_of(path) or path
    with open(path, "rb") as fh:
        return fh.read()


def read_bytes(uri: str) -> bytes:
    fs, path = _arrow_fs(uri)
    with fs.open_input_stream(path) as src:
        return src.read()


def file_exists(uri: str) -> bool:
    from pyarrow import fs as pafs

    fs, path = _arrow_fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))
