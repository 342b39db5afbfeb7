"""The classical-method interface (:class:`ClassicalMethod`) and its trained state (:class:`Artifact`)."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np


logger = logging.getLogger(__name__)

#: Bumped whenever an encoding changes in a way that invalidates stored
#: vectors or artifacts, so that stale indexes are detected by the version hash.
ENCODING_VERSION = 1

_ARTIFACT_META_KEY = "__meta_json__"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class Artifact:
    """Trained state of a classical method: arrays plus JSON-able metadata.

    Attributes
    ----------
    method : str
        Registry name of the method that produced it.
    params : dict
        Method parameters it was trained with.
    arrays : dict of str to ndarray
        Numeric state (centroids, idf, GMM, PCA ...).
    training : dict
        Description of the training collection (names, counts, timing).
    version : str
        Hash of method, params, encoding version and array bytes; two
        artifacts with the same version produce identical vectors.
    """

    method: str
    params: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    def __post_init__(self) -> None:
        self.params = _jsonable(self.params)
        self.training = _jsonable(self.training)
        if not self.version:
            self.version = self.compute_version()

    def compute_version(self) -> str:
        """Return a short content hash of the artifact.

        Returns
        -------
        str
            16 hex digits of a SHA-256 over method, params and arrays.
        """
        h = hashlib.sha256()
        h.update(json.dumps([self.method, self.params, ENCODING_VERSION], sort_keys=True).encode())
        for key in sorted(self.arrays):
            arr = np.ascontiguousarray(self.arrays[key])
            h.update(key.encode())
            h.update(str(arr.dtype).encode())
            h.update(str(arr.shape).encode())
            h.update(arr.tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str) -> str:
        """Write the artifact as one ``.npz`` (metadata as a JSON string entry).

        Parameters
        ----------
        path : str
            Destination; ``.npz`` is appended by numpy if missing.

        Returns
        -------
        str
            The path actually written.
        """
        meta = {
            "method": self.method,
            "params": self.params,
            "training": self.training,
            "version": self.version,
            "encoding_version": ENCODING_VERSION,
            "arrays": sorted(self.arrays),
        }
        if _ARTIFACT_META_KEY in self.arrays:
            raise ValueError(f"array name {_ARTIFACT_META_KEY} is reserved")
        path = str(path)
        if not path.endswith(".npz"):
            path += ".npz"
        # A unicode scalar array loads with allow_pickle=False, unlike an object array.
        np.savez(path, **{_ARTIFACT_META_KEY: np.array(json.dumps(meta, sort_keys=True))}, **self.arrays)
        logger.info("saved %s artifact %s to %s", self.method, self.version, path)
        return path

    @classmethod
    def load(cls, path: str) -> "Artifact":
        """Read an artifact written by :meth:`save` (never unpickles).

        Parameters
        ----------
        path : str
            ``.npz`` file.

        Returns
        -------
        Artifact
            With its version checked against the stored arrays.
        """
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data[_ARTIFACT_META_KEY]))
            arrays = {k: data[k] for k in data.files if k != _ARTIFACT_META_KEY}
        if meta.get("encoding_version") != ENCODING_VERSION:
            raise ValueError(
                f"artifact {path} has encoding version {meta.get('encoding_version')}, "
                f"this code writes {ENCODING_VERSION}; retrain it"
            )
        art = cls(meta["method"], meta["params"], arrays, meta.get("training", {}), version="")
        if art.version != meta["version"]:
            raise ValueError(f"artifact {path} is corrupt: version {meta['version']} != content {art.version}")
        return art


class ClassicalMethod:
    """Uniform interface of a classical near-duplicate descriptor.

    Attributes
    ----------
    name : str
        Registry name.
    params : dict
        Effective options.
    is_binary : bool
        ``True`` for hashes: :meth:`encode` returns packed ``uint8`` bits for a
        FAISS ``IndexBinaryFlat``; ``False``: float32 unit rows for inner product.
    dim : int
        Float dimension, or number of bits for binary methods.
    needs_training : bool
        Whether :meth:`fit` (or an artifact) is required before :meth:`encode`.
    """

    is_binary: ClassVar[bool] = False
    needs_training: ClassVar[bool] = True

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        self.name = name
        self.params = dict(params)
        self.artifact: Artifact | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, params={self.params})"

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def is_trained(self) -> bool:
        """Whether :meth:`encode` can run."""
        return not self.needs_training or self.artifact is not None

    @property
    def version(self) -> str:
        """Hash identifying the vectors this method produces (artifact + params)."""
        art = self.artifact if self.artifact is not None else Artifact(self.name, self.params)
        h = hashlib.sha256(json.dumps([art.version, _jsonable(self.params)], sort_keys=True).encode())
        return h.hexdigest()[:16]

    def encode(self, images: Sequence[Any]) -> np.ndarray:
        """Encode RGB PIL images.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
            Decoded images (EXIF orientation already applied by the caller).

        Returns
        -------
        ndarray
            ``(n, dim)`` float32 unit rows, or ``(n, dim // 8)`` uint8 for hashes.
        """
        raise NotImplementedError

    def fit(self, images_iter: Iterable[Any], **train_options: Any) -> Artifact:
        """Train the method's model on a collection (not the evaluated one).

        Parameters
        ----------
        images_iter : iterable of PIL.Image.Image
            Training images, consumed once.
        **train_options
            Family specific (e.g. ``max_descriptors``, ``seed``, ``description``).

        Returns
        -------
        Artifact
            Also attached to the method, so :meth:`encode` works afterwards.
        """
        raise NotImplementedError

    def _set_artifact(self, artifact: Artifact) -> None:
        self.artifact = artifact

    def save(self, path: str) -> str:
        """Save the trained artifact (or, for hashes, just the parameters).

        Parameters
        ----------
        path : str
            Destination ``.npz``.

        Returns
        -------
        str
            The path written.
        """
        art = self.artifact if self.artifact is not None else Artifact(self.name, self.params)
        if self.needs_training and self.artifact is None:
            raise RuntimeError(f"{self.name}: nothing to save, call fit() first")
        return art.save(path)

    def _require_trained(self) -> Artifact:
        if self.artifact is None:
            raise RuntimeError(f"{self.name} needs a trained artifact: call fit() or pass artifact_path")
        return self.artifact
