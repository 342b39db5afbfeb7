"""Building blocks of global CNN image descriptors.

Pure functions, testable without Spark:

* :func:`pool_feature_map` turns a conv feature map ``(batch, H, W, C)`` into a
  global descriptor ``(batch, C)`` inside TensorFlow (average, MAC, GeM, R-MAC),
  so pooling runs in the model graph next to the backbone.
* :func:`rmac_regions` is the region grid of R-MAC (Tolias et al., ICLR 2016).
* :func:`combine_scales` merges descriptors of one image taken at several scales.
* :func:`fit_pca_whitening` / :class:`Whitening` learn and apply PCA whitening
  (Jegou & Chum 2012; Radenovic et al. 2018) and store it without pickle.
* :func:`power_normalise` is the signed power ("square-root") normalisation.
* :func:`alpha_query_expansion` and :func:`database_side_augmentation` re-rank at
  search time from exact kNN lists (Radenovic et al., TPAMI 2018).

Every function returning descriptors returns L2-normalised float32 rows, except
:func:`pool_feature_map` for ``avg``/``max``/``gem`` with ``l2_normalize=False``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

POOLING_METHODS = ("avg", "max", "gem", "rmac")

# Guards divisions by a zero norm (an all-zero ReLU map); tf.math.l2_normalize
# uses the same floor on the squared norm, so numpy and TF paths agree.
_NORM_EPS = 1e-12
# GeM clamps activations away from 0 before the power so that 0**(1/p) and its
# gradient stay finite; same value as Radenovic et al.'s cirtorch.
_GEM_EPS = 1e-6
# The overlap R-MAC aims for between neighbouring regions (Tolias et al.).
_RMAC_OVERLAP = 0.4
# Candidate numbers of regions along the long side at the coarsest level.
_RMAC_STEPS = (2, 3, 4, 5, 6, 7)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """L2-normalise rows of ``x`` as float32.

    Parameters
    ----------
    x : np.ndarray
        Array of descriptors.
    axis : int
        Axis along which to normalise.

    Returns
    -------
    np.ndarray
        float32 array of the same shape; all-zero rows stay zero.
    """
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.maximum(np.sum(x * x, axis=axis, keepdims=True), _NORM_EPS))
    return (x / norm).astype(np.float32)


# --------------------------------------------------------------------------- pooling


def rmac_regions(height: int, width: int, levels: int = 3) -> list[tuple[int, int, int, int]]:
    """Square regions of R-MAC on a ``height`` x ``width`` feature map.

    Reimplements ``rmac_regions.m`` of Tolias et al. (and ``rmac`` of cirtorch):
    at level ``l`` square regions of side ``floor(2 * min(H, W) / (l + 1))`` are
    laid out uniformly, with the number of regions along the long side chosen so
    that neighbours overlap by about 40%.

    Parameters
    ----------
    height, width : int
        Feature-map size in cells.
    levels : int
        Number of scales ``L`` (3 in the paper).

    Returns
    -------
    list of (y, x, h, w)
        0-based top-left corner and size of each region, in the order of the
        original code (level by level, row-major). Regions of side 0 (feature
        maps smaller than ``levels + 1`` cells) are skipped; a 1x1 map still gets
        its single full region.
    """
    if height < 1 or width < 1:
        raise ValueError(f"feature map must be at least 1x1, got {height}x{width}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    short = min(height, width)
    long_ = max(height, width)
    # Pick how many extra regions the long side gets so that their overlap is
    # closest to 40%; ties go to the fewest regions, as argmin does in the original.
    extra = 0
    if height != width:
        best = math.inf
        for i, steps in enumerate(_RMAC_STEPS):
            b = (long_ - short) / (steps - 1)
            err = abs((short * short - short * b) / (short * short) - _RMAC_OVERLAP)
            if err < best:
                best, extra = err, i + 1
    extra_w = extra if height < width else 0
    extra_h = extra if height > width else 0

    regions: list[tuple[int, int, int, int]] = []
    for level in range(1, levels + 1):
        side = int(math.floor(2 * short / (level + 1)))
        if side == 0:
            continue
        half = int(math.floor(side / 2 - 1))
        n_w, n_h = level + extra_w, level + extra_h
        step_w = (width - side) / (n_w - 1) if n_w > 1 else 0.0
        step_h = (height - side) / (n_h - 1) if n_h > 1 else 0.0
        starts_w = [int(math.floor(half + k * step_w)) - half for k in range(n_w)]
        starts_h = [int(math.floor(half + k * step_h)) - half for k in range(n_h)]
        for y in starts_h:
            for x in starts_w:
                regions.append((y, x, side, side))
    if not regions:
        regions.append((0, 0, height, width))
    return regions


def _rmac_regions_array(height: Any, width: Any, levels: int) -> np.ndarray:
    return np.asarray(rmac_regions(int(height), int(width), levels), dtype=np.int32).reshape(-1, 4)


def pool_feature_map(
    x: Any,
    method: str,
    gem_p: float = 3.0,
    rmac_levels: int = 3,
    l2_normalize: bool = False,
) -> Any:
    """Pool a conv feature map into one global descriptor per image, in TF.

    Parameters
    ----------
    x : tf.Tensor
        Feature map of shape ``(batch, H, W, C)``, non-negative for ``gem``
        (post-ReLU activations; negatives are clamped).
    method : {"avg", "max", "gem", "rmac"}
        ``avg``: global average pooling. ``max``: MAC. ``gem``: generalised mean
        ``mean(clip(x, 1e-6) ** p) ** (1 / p)`` (Radenovic et al.). ``rmac``:
        regional MAC (Tolias et al.): each region of :func:`rmac_regions` is
        max-pooled and L2-normalised, the regions are summed and the sum is
        L2-normalised.
    gem_p : float
        GeM exponent; 1 is average pooling, large values approach MAC.
    rmac_levels : int
        Number of R-MAC scales.
    l2_normalize : bool
        L2-normalise the output. R-MAC output is always normalised.

    Returns
    -------
    tf.Tensor
        ``(batch, C)`` descriptors, same dtype as ``x``.

    Notes
    -----
    Works for any H and W. ``avg``/``max``/``gem`` are plain reductions and run
    with fully dynamic shapes (e.g. a ``tf.function`` with input signature
    ``(None, None, None, C)``). For ``rmac`` the region grid depends on H and W:
    when they are static (eager calls, or a ``tf.function`` traced per input
    size) the regions are unrolled in Python; when they are dynamic the grid is
    computed by ``tf.numpy_function`` and pooled with ``tf.map_fn``, which works
    in-process but cannot be serialised into a SavedModel.
    """
    import tensorflow as tf  # TF is heavy: import only when pooling is used.

    if method not in POOLING_METHODS:
        raise ValueError(f"unknown pooling method {method!r}; expected one of {POOLING_METHODS}")
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 4:
        raise ValueError(f"expected a (batch, H, W, C) feature map, got shape {x.shape}")

    if method == "avg":
        out = tf.reduce_mean(x, axis=[1, 2])
    elif method == "max":
        out = tf.reduce_max(x, axis=[1, 2])
    elif method == "gem":
        if gem_p <= 0:
            raise ValueError(f"gem_p must be > 0, got {gem_p}")
        p = tf.cast(gem_p, x.dtype)
        x = tf.maximum(x, _GEM_EPS)
        # Scaling by the per-channel max before the power is exact and keeps
        # x ** p from overflowing for large p (or float16 maps).
        peak = tf.reduce_max(x, axis=[1, 2], keepdims=True)
        out = tf.pow(tf.reduce_mean(tf.pow(x / peak, p), axis=[1, 2]), 1.0 / p) * peak[:, 0, 0, :]
    else:
        return _rmac_tf(x, rmac_levels)
    if l2_normalize:
        out = tf.math.l2_normalize(out, axis=-1, epsilon=_NORM_EPS)
    return out


def _rmac_tf(x: Any, levels: int) -> Any:
    import tensorflow as tf

    height, width = x.shape[1], x.shape[2]
    if height is not None and width is not None:
        total = None
        for y0, x0, h, w in rmac_regions(int(height), int(width), levels):
            v = tf.reduce_max(x[:, y0 : y0 + h, x0 : x0 + w, :], axis=[1, 2])
            v = tf.math.l2_normalize(v, axis=-1, epsilon=_NORM_EPS)
            total = v if total is None else total + v
        return tf.math.l2_normalize(total, axis=-1, epsilon=_NORM_EPS)

    shape = tf.shape(x)
    boxes = tf.numpy_function(
        lambda h, w: _rmac_regions_array(h, w, levels), [shape[1], shape[2]], tf.int32, stateful=False
    )
    boxes = tf.reshape(boxes, [-1, 4])

    def region_vector(box: Any) -> Any:
        v = tf.reduce_max(x[:, box[0] : box[0] + box[2], box[1] : box[1] + box[3], :], axis=[1, 2])
        return tf.math.l2_normalize(v, axis=-1, epsilon=_NORM_EPS)

    vectors = tf.map_fn(
        region_vector, boxes, fn_output_signature=tf.TensorSpec(shape=[None, x.shape[-1]], dtype=x.dtype)
    )
    return tf.math.l2_normalize(tf.reduce_sum(vectors, axis=0), axis=-1, epsilon=_NORM_EPS)


def combine_scales(descs: Sequence[np.ndarray]) -> np.ndarray:
    """Merge descriptors of the same images extracted at several input scales.

    Each scale is L2-normalised first so that no scale dominates by magnitude
    (activations grow with input size for MAC-like pooling), then summed.

    Parameters
    ----------
    descs : sequence of np.ndarray
        One ``(n, d)`` array per scale, rows aligned.

    Returns
    -------
    np.ndarray
        ``(n, d)`` float32, L2-normalised.
    """
    if len(descs) == 0:
        raise ValueError("combine_scales needs at least one array")
    shapes = {np.shape(d) for d in descs}
    if len(shapes) != 1:
        raise ValueError(f"all scales must have the same shape, got {sorted(shapes)}")
    total = np.zeros(np.shape(descs[0]), dtype=np.float64)
    for d in descs:
        total += l2_normalize(d)
    return l2_normalize(total)


# ----------------------------------------------------------------------- whitening


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
    X = np.asarray(X, dtype=np.float32)
    return l2_normalize(np.sign(X) * np.abs(X) ** alpha)


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


# ----------------------------------------------------------------------- re-ranking


def _check_knn(n: int, knn_idx: np.ndarray, k: int, n_db: int) -> np.ndarray:
    knn_idx = np.asarray(knn_idx)
    if knn_idx.ndim != 2 or knn_idx.shape[0] != n:
        raise ValueError(f"knn_idx must be ({n}, K), got {knn_idx.shape}")
    if not 1 <= k <= knn_idx.shape[1]:
        raise ValueError(f"k must be in [1, {knn_idx.shape[1]}], got {k}")
    idx = knn_idx[:, :k]
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= n_db:
        raise ValueError("knn_idx holds ids outside the database (faiss pads missing neighbours with -1)")
    return idx


def alpha_query_expansion(
    Q: np.ndarray, D: np.ndarray, knn_idx: np.ndarray, k: int, alpha: float = 3.0
) -> np.ndarray:
    """alpha-weighted query expansion (alpha-QE, Radenovic et al. TPAMI 2018).

    ``q' = l2(q + sum_{i < k} max(q . d_i, 0) ** alpha * d_i)`` over the first
    ``k`` neighbours of each query; a second search with ``q'`` is the re-ranking.
    Raising similarities to ``alpha`` makes weak (likely wrong) neighbours
    contribute little, so ``k`` matters less than in average QE.

    Parameters
    ----------
    Q : np.ndarray
        ``(n_q, d)`` L2-normalised queries.
    D : np.ndarray
        ``(n_db, d)`` L2-normalised database.
    knn_idx : np.ndarray
        ``(n_q, K)`` database ids by decreasing similarity, ``K >= k``. Drop
        the query's own id when the query is in the database, or it is simply
        counted twice.
    k : int
        Number of neighbours to expand with.
    alpha : float
        Similarity exponent; 0 gives average QE.

    Returns
    -------
    np.ndarray
        ``(n_q, d)`` float32, L2-normalised.
    """
    Q = np.asarray(Q, dtype=np.float32)
    D = np.asarray(D, dtype=np.float32)
    idx = _check_knn(Q.shape[0], knn_idx, k, D.shape[0])
    neighbours = D[idx]  # (n_q, k, d)
    sims = np.einsum("qd,qkd->qk", Q, neighbours)
    weights = np.maximum(sims, 0.0) ** alpha
    return l2_normalize(Q + np.einsum("qk,qkd->qd", weights, neighbours))


def database_side_augmentation(
    D: np.ndarray, knn_idx: np.ndarray, knn_sim: np.ndarray, k: int, alpha: float = 3.0
) -> np.ndarray:
    """Database-side augmentation (DBA), alpha-weighted as in Radenovic et al.

    ``d_i' = l2(sum_{j < k} max(s_ij, 0) ** alpha * d_{nn_ij})`` where the
    neighbour lists come from searching the database against itself, so rank
    0 is normally ``d_i`` itself with similarity 1. Done once offline; queries
    then search the augmented database (and, for all-pairs near-duplicate
    search, are themselves the augmented vectors).

    Parameters
    ----------
    D : np.ndarray
        ``(n_db, d)`` L2-normalised database.
    knn_idx : np.ndarray
        ``(n_db, K)`` self-search neighbour ids, ``K >= k``.
    knn_sim : np.ndarray
        ``(n_db, K)`` matching similarities.
    k : int
        Number of neighbours (including self) to average; 1 is a no-op.
    alpha : float
        Similarity exponent.

    Returns
    -------
    np.ndarray
        ``(n_db, d)`` float32, L2-normalised.
    """
    D = np.asarray(D, dtype=np.float32)
    idx = _check_knn(D.shape[0], knn_idx, k, D.shape[0])
    sims = np.asarray(knn_sim, dtype=np.float32)
    if sims.shape != np.shape(knn_idx):
        raise ValueError(f"knn_sim shape {sims.shape} differs from knn_idx shape {np.shape(knn_idx)}")
    weights = np.maximum(sims[:, :k], 0.0) ** alpha
    return l2_normalize(np.einsum("nk,nkd->nd", weights, D[idx]))


# ------------------------------------------------------------------ artifacts, trimming


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


def content_box(image: Any, tol: float = 24.0, min_uniform: float = 0.98,
                min_keep: float = 0.25) -> tuple[int, int, int, int]:
    """The box ``(top, left, bottom, right)`` left after trimming plain-colour borders.

    A border row (column) is one where at least ``min_uniform`` of the pixels are within
    ``tol`` (max over channels) of the median corner colour; leading and trailing border
    rows/columns are cut. A side that would keep less than ``min_keep`` of the image is
    left untrimmed (a plain-colour photo is not all border).

    Parameters
    ----------
    image : array-like or PIL image
        ``(H, W)`` or ``(H, W, C)`` pixels.

    Returns
    -------
    tuple of int
        ``top, left, bottom, right`` (bottom/right exclusive).
    """
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    h, w = a.shape[:2]
    corners = np.stack([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]])
    ref = np.median(corners, axis=0)
    close = np.abs(a - ref).max(axis=-1) <= tol
    rows = close.mean(axis=1) >= min_uniform
    cols = close.mean(axis=0) >= min_uniform

    def span(uniform: np.ndarray, n: int) -> tuple[int, int]:
        lo = 0
        while lo < n and uniform[lo]:
            lo += 1
        hi = n
        while hi > lo and uniform[hi - 1]:
            hi -= 1
        if hi - lo < max(1, int(math.ceil(min_keep * n))):
            return 0, n
        return lo, hi

    top, bottom = span(rows, h)
    left, right = span(cols, w)
    return top, left, bottom, right
