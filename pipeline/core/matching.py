"""The similarity of an image to the archive as dedup scores it, in numpy (query and incremental dedup).

Dedup scores a pair from the vectors it searches with (see :mod:`pipeline.stages.search`):

* ``aug(x)``: the database-side augmentation (DBA) of x, the alpha-weighted sum of x's
  ``dba_k`` nearest raw neighbours, x itself included (:func:`pipeline.core.rerank.augment_with_neighbors`);
  the raw vector when DBA is off;
* the variants x searches with: ``aug(x)`` for 0 degrees, the raw embedding of x rotated by r
  for each other ``dedup.rotations`` angle r;
* ``dir(x -> y) = max over x's variants v of v . aug(y)`` (what x's kNN list holds for y);
* a pair's similarity ``S(x, y) = max(dir(x -> y), dir(y -> x))``, kept when >= ``dedup.threshold``.

These functions compute those quantities exactly, so that the incremental dedup and the
``query`` job agree with a full dedup. Everything is float32, rows L2-normalised.
"""
from __future__ import annotations

import numpy as np

from pipeline.core.rerank import augment_with_neighbors


def top_k(sims: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row the ``k`` largest similarities (descending) and their column ids (or ``ids[col]``)."""
    sims = np.asarray(sims, dtype=np.float32)
    k = min(k, sims.shape[1])
    if k == 0:
        return np.zeros((len(sims), 0), np.float32), np.zeros((len(sims), 0), np.int64)
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    cols = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    return vals, (cols if ids is None else np.asarray(ids)[cols])


def merge_lists(sims_a: np.ndarray, ids_a: np.ndarray, sims_b: np.ndarray, ids_b: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise union of two neighbour lists (ids may hold -1 padding), best ``k`` kept, descending."""
    sims = np.concatenate([np.asarray(sims_a, np.float32), np.asarray(sims_b, np.float32)], axis=1)
    ids = np.concatenate([np.asarray(ids_a), np.asarray(ids_b)], axis=1)
    sims = np.where(ids < 0, -np.inf, sims)
    vals, cols = top_k(sims, k)
    return vals, np.take_along_axis(ids, cols, axis=1)


def augment(neighbor_vectors: np.ndarray, neighbor_sims: np.ndarray, alpha: float) -> np.ndarray:
    """DBA of each row from its gathered list ``(n, k, d)`` / ``(n, k)``: dedup's own kernel."""
    sims = np.where(np.isfinite(neighbor_sims), neighbor_sims, 0.0).astype(np.float32)
    return augment_with_neighbors(neighbor_vectors, sims, alpha)


def directed_scores(variants: np.ndarray, database: np.ndarray) -> np.ndarray:
    """``dir(x -> y)`` for every x (rows of ``variants``, shape ``(n, v, d)``) and y (``database`` rows)."""
    variants = np.asarray(variants, dtype=np.float32)
    n, v, d = variants.shape
    sims = variants.reshape(n * v, d) @ np.asarray(database, dtype=np.float32).T
    return sims.reshape(n, v, -1).max(axis=1)


def pair_scores(x_variants: np.ndarray, x_aug: np.ndarray, y_variants: np.ndarray, y_aug: np.ndarray) -> np.ndarray:
    """``S(x, y) = max(dir(x -> y), dir(y -> x))`` for every x (rows) and y (columns)."""
    return np.maximum(directed_scores(x_variants, y_aug), directed_scores(y_variants, x_aug).T)


def best_matches(scores: np.ndarray, k: int, threshold: float) -> list[list[tuple[int, float]]]:
    """Per row: up to ``k`` (column, score) pairs with score >= ``threshold``, best first (ties: lower column)."""
    out = []
    for row in np.asarray(scores, dtype=np.float32):
        cols = np.flatnonzero(row >= threshold)
        order = np.lexsort((cols, -row[cols]))[:k]
        out.append([(int(cols[i]), float(row[cols[i]])) for i in order])
    return out


def augment_query(vector: np.ndarray, sims, neighbors, dba_k: int, alpha: float) -> np.ndarray:
    """DBA of a new image as if it were in the archive: the best ``dba_k`` of itself and its archive neighbours.

    ``sims`` / ``neighbors``: its nearest archive images' raw similarities and raw vectors.
    """
    vector = np.asarray(vector, np.float32)
    cands = [(float(np.dot(vector, vector)), 0, vector)]
    cands += [(float(s), 1 + j, np.asarray(v, np.float32)) for j, (s, v) in enumerate(zip(sims, neighbors))]
    best = sorted(cands, key=lambda c: (-c[0], c[1]))[:dba_k]
    return augment(np.stack([c[2] for c in best])[None], np.asarray([c[0] for c in best], np.float32)[None], alpha)[0]


# ---------------------------------------------------------------- kNN lists (calibrated dedup)
# A stored kNN list of image z: ids and dir(z -> .) values, best first, and a bound: every image
# NOT in the list has dir(z -> y) <= bound. A full dedup's list is the exact top-k (bound: the k-th
# value); NO_BOUND: the list holds every other image (a collection of k + 1 images or fewer).
NO_BOUND = -2.0


def merge_list(ids, sims, bound: float, rescored: set, new_ids, new_sims, k: int) -> tuple[list, list, float]:
    """z's list after the images in ``rescored`` changed: their old entries dropped, their new
    values (``new_ids`` / ``new_sims``, the best k + 1 of them suffice) merged in, top ``k`` kept;
    what falls off raises the bound. Ties: lower id first."""
    entries = [(float(s), i) for i, s in zip(ids, sims) if i not in rescored]
    entries += [(float(s), i) for i, s in zip(new_ids, new_sims)]
    entries.sort(key=lambda e: (-e[0], e[1]))
    if len(entries) > k:
        bound = max(bound, entries[k][0])
    top = entries[:k]
    return [i for _, i in top], [s for s, _ in top], bound


def list_level(sims, bound: float, rank: int) -> float | None:
    """The similarity to the ``rank``-th other image (fewer listed and nothing outside: the last; none: -1),
    or None when the list cannot tell (an unlisted image, <= bound, could rank above it)."""
    sims = list(sims)
    if bound <= NO_BOUND:
        return float(sims[min(rank, len(sims)) - 1]) if sims else -1.0
    if len(sims) < rank or sims[rank - 1] < bound:
        return None
    return float(sims[rank - 1])


def outside_bound(sims, bound: float, k: int) -> float | None:
    """An upper bound of dir(z -> y) for every y outside z's exact top-``k`` (None: none is outside)."""
    if bound <= NO_BOUND:
        return None
    return max(bound, float(sims[k - 1])) if len(sims) >= k else bound
