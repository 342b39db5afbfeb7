"""Learned post-processing of descriptors: PCA whitening (Jegou & Chum 2012; Radenovic et
al. 2018), stored without pickle, and the signed power normalisation.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.vectors import l2_normalize, signed_power


def power_normalise(X: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Signed power normalisation ``sign(x) * |x| ** alpha``, then L2.

    Damps dimensions that a few bursty activations dominate; ``alpha = 0.5`` is
    the signed square root.

    Parameters
    ----------
    X : np.ndarray
        ``(n, d)`` descriptors.
    alpha : float
        Exponent in ``(0, 1]``; 1 is plain L2 normalisation.

    Returns
    -------
    np.ndarray
        ``(n, d)`` float32, L2-normalised.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return l2_normalize(signed_power(X, alpha))


@dataclass(frozen=True)
class Whitening:
    """A learned PCA whitening: ``l2(((x - mean) @ projection.T))``.

    Attributes
    ----------
    mean : np.ndarray
        ``(d,)`` training mean.
    projection : np.ndarray
        ``(dim, d)`` eigenvectors (rows, by decreasing eigenvalue) divided by
        ``(eigenvalue + eps) ** power``.
    eigenvalues : np.ndarray
        ``(dim,)`` eigenvalues of the (shrunk) training covariance kept.
    dim : int
        Output dimension.
    version : str
        Content hash of mean, projection and parameters: identifies the
        whitening an index was built with.
    params : dict
        Fit parameters and training-set size, for provenance.
    head : np.ndarray, optional
        ``(dim, projection_rows)`` learned projection head (``train.head_dim``), applied
        after the whitening and followed by L2; ``dim`` is then its output dimension.
    """

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    dim: int
    version: str
    params: dict[str, Any] = field(default_factory=dict)
    head: np.ndarray | None = None

    @property
    def input_dim(self) -> int:
        """Dimension of the descriptors this whitening accepts."""
        return int(self.mean.shape[0])

    def apply(self, X: np.ndarray) -> np.ndarray:
        """Whiten and L2-normalise descriptors.

        Parameters
        ----------
        X : np.ndarray
            ``(n, d)`` descriptors, pre-processed the same way as the training
            set (L2-normalised).

        Returns
        -------
        np.ndarray
            ``(n, dim)`` float32, L2-normalised.
        """
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.input_dim:
            raise ValueError(f"expected (n, {self.input_dim}) descriptors, got {X.shape}")
        Y = l2_normalize((X - self.mean) @ self.projection.T)
        return Y if self.head is None else l2_normalize(Y @ self.head.T)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to ``path`` (an ``.npz``) atomically; metadata is JSON inside it.

        Parameters
        ----------
        path : str or PathLike
            Destination file.
        """
        path = os.fspath(path)
        meta = json.dumps({"dim": self.dim, "version": self.version, "params": self.params}, sort_keys=True)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    mean=self.mean,
                    projection=self.projection,
                    eigenvalues=self.eigenvalues,
                    metadata=np.array(meta),
                    **({} if self.head is None else {"head": np.asarray(self.head, dtype=np.float32)}),
                )
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Whitening":
        """Read a whitening written by :meth:`save`, refusing pickled content.

        Parameters
        ----------
        path : str or PathLike
            ``.npz`` file.

        Returns
        -------
        Whitening

        Raises
        ------
        ValueError
            If the arrays do not match the stored version hash.
        """
        with open(os.fspath(path), "rb") as fh:
            return whitening_from_bytes(fh.read(), os.fspath(path))


def _whitening_hash(mean: np.ndarray, projection: np.ndarray, params: dict[str, Any],
                    head: np.ndarray | None = None) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(mean, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(projection, dtype=np.float32).tobytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    if head is not None:  # artifacts without a head keep their old version
        h.update(b"head")
        h.update(np.ascontiguousarray(head, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def fit_pca_whitening(
    X: np.ndarray,
    dim: int | None = None,
    eps: float = 1e-9,
    shrinkage: float = 0.0,
    power: float = 0.5,
) -> Whitening:
    """Learn PCA whitening on a training collection (not the one searched).

    Centre, eigendecompose the covariance, project on the top ``dim``
    eigenvectors and divide each by ``(eigenvalue + eps) ** power``
    (Jegou & Chum, ECCV 2012; the unsupervised variant of Radenovic et al.).

    Parameters
    ----------
    X : np.ndarray
        ``(n, d)`` training descriptors, L2-normalised like the descriptors the
        whitening will be applied to: whitening corrects the co-occurrence and
        over-counting of correlated dimensions of *those* vectors.
    dim : int, optional
        Output dimension. Default: ``d`` when ``shrinkage > 0``, otherwise the
        rank bound ``min(d, n - 1)`` because directions beyond the rank of the
        centred data have zero variance and would be amplified noise.
    eps : float
        Absolute floor added to eigenvalues, for numerical safety only.
    shrinkage : float
        In ``[0, 1]``: covariance ``(1 - s) * C + s * trace(C) / d * I``.
        With fewer training images than dimensions the small eigenvalues are
        badly under-estimated, and full whitening blows them up; shrinking
        towards the mean eigenvalue bounds that amplification.
    power : float
        Exponent on eigenvalues; 0.5 is full whitening, 0 is plain PCA
        rotation, values in between are partial whitening. Partial whitening
        generalises better when the training set differs from the target one.

    Returns
    -------
    Whitening
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"need an (n >= 2, d) training matrix, got shape {X.shape}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    n, d = X.shape
    max_dim = d if shrinkage > 0 else min(d, n - 1)
    if dim is None:
        dim = max_dim
    if not 1 <= dim <= d:
        raise ValueError(f"dim must be in [1, {d}], got {dim}")

    mean = X.mean(axis=0)
    Xc = X - mean
    cov = Xc.T @ Xc / (n - 1)
    if shrinkage > 0:
        cov = (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][:dim]
    eigval = np.maximum(eigval[order], 0.0)
    eigvec = eigvec[:, order]
    # eigh's eigenvector signs are arbitrary; fixing them makes the version hash
    # and the output reproducible across BLAS builds.
    signs = np.sign(eigvec[np.argmax(np.abs(eigvec), axis=0), np.arange(dim)])
    eigvec = eigvec * np.where(signs == 0, 1.0, signs)
    projection = (eigvec / (eigval + eps) ** power).T.astype(np.float32)
    mean32 = mean.astype(np.float32)
    params = {"eps": eps, "shrinkage": shrinkage, "power": power, "n_train": int(n), "input_dim": int(d)}
    return Whitening(mean32, projection, eigval, int(dim), _whitening_hash(mean32, projection, params), params)


def whitening_from_bytes(data: bytes, name: str = "<bytes>") -> Whitening:
    """Read a whitening written by :meth:`Whitening.save` from its bytes (no pickle)."""
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        mean = arrays["mean"].astype(np.float32)
        projection = arrays["projection"].astype(np.float32)
        eigenvalues = arrays["eigenvalues"].astype(np.float64)
        head = arrays["head"].astype(np.float32) if "head" in arrays.files else None
        meta = json.loads(str(arrays["metadata"]))
    version = _whitening_hash(mean, projection, meta["params"], head)
    if version != meta["version"]:
        raise ValueError(f"{name}: content hash {version} does not match stored version {meta['version']}")
    return Whitening(mean, projection, eigenvalues, int(meta["dim"]), version, meta["params"], head)


_WHITENING_CACHE: dict[tuple, Whitening] = {}


def _file_identity(uri: str) -> tuple:
    """A local file's path, size and modification time: a file rewritten in place is new."""
    import os

    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path:
        return (uri,)  # remote artifacts are written once under a versioned name
    try:
        st = os.stat(path)
    except OSError:
        return (uri,)
    return (uri, st.st_size, st.st_mtime_ns)


def load_whitening_uri(uri: str) -> Whitening:
    """Load a post-processing artifact from a local path or any URI the workdir store reads."""
    key = _file_identity(uri)
    w = _WHITENING_CACHE.get(key)
    if w is None:
        if "://" in uri and not uri.startswith("file:"):
            from pipeline.core import storage

            data = storage.read_bytes(uri)
        else:
            with open(uri[len("file://"):] if uri.startswith("file://") else uri, "rb") as fh:
                data = fh.read()
        w = _WHITENING_CACHE[key] = whitening_from_bytes(data, uri)
    return w
