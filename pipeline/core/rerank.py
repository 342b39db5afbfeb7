"""Re-ranking from kNN lists, in numpy (Radenovic et al., TPAMI 2018).

:func:`alpha_query_expansion` and :func:`database_side_augmentation` are what the Spark
stage :mod:`pipeline.stages.rerank` runs, per query group, inside ``applyInPandas``.
"""
from __future__ import annotations

import numpy as np

from pipeline.core.vectors import l2_normalize


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
    return expand_with_neighbors(Q, D[idx], alpha)


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
    return augment_with_neighbors(D[idx], sims[:, :k], alpha)


# The kernels on gathered neighbours: the Spark stage calls these per query group, the
# functions above after gathering from a whole database.
def expand_with_neighbors(Q: np.ndarray, neighbors: np.ndarray, alpha: float) -> np.ndarray:
    """alpha-QE from gathered neighbours: ``l2(q + sum_i max(q . n_i, 0) ** alpha * n_i)``.

    Parameters
    ----------
    Q : np.ndarray
        ``(n, d)`` L2-normalised queries.
    neighbors : np.ndarray
        ``(n, k, d)`` the neighbours of each query to expand with (``k`` may be 0).
    alpha : float
        Similarity exponent.

    Returns
    -------
    np.ndarray
        ``(n, d)`` float32, L2-normalised.
    """
    Q = np.asarray(Q, dtype=np.float32)
    neighbors = np.asarray(neighbors, dtype=np.float32)
    sims = np.einsum("qd,qkd->qk", Q, neighbors)
    weights = np.maximum(sims, 0.0) ** alpha
    return l2_normalize(Q + np.einsum("qk,qkd->qd", weights, neighbors))


def augment_with_neighbors(neighbors: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """DBA from gathered neighbours: ``l2(sum_j max(s_j, 0) ** alpha * n_j)``.

    Parameters
    ----------
    neighbors : np.ndarray
        ``(n, k, d)`` each vector's neighbours (itself normally first, similarity 1).
    sims : np.ndarray
        ``(n, k)`` their similarities.
    alpha : float
        Similarity exponent.

    Returns
    -------
    np.ndarray
        ``(n, d)`` float32, L2-normalised.
    """
    weights = np.maximum(np.asarray(sims, dtype=np.float32), 0.0) ** alpha
    return l2_normalize(np.einsum("nk,nkd->nd", weights, np.asarray(neighbors, dtype=np.float32)))
