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

METADATA_FILE = "_neardup.json"


def absolute_uri(path: str) -> str:
    """Make a local path absolute so every executor (whatever its cwd) resolves it the same."""
    if "://" in path:
        return path.rstrip("/")
    return "file://" + str(Path(path).expanduser().resolve())


def local_path_of(uri: str) -> str | None:
    """The local filesystem path of ``uri`` (plain path, file:// or Hadoop's file:/), else None."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if uri.startswith("file:"):
        return uri[len("file:"):]
    if "://" in uri:
        return None
    return uri


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
