"""Synthetic embedding tables with the similarity statistics of real image embeddings.

Measured on MobileNet embeddings of the shared collections (issue 9): unrelated images have a
mean cosine of about 0.43, and near-copies 0.90-0.97. Vectors here are a shared direction plus
isotropic noise (the mean cosine fixes the ratio), and a fraction of the rows are near-copies of
another row at a cosine drawn uniformly from ``copy_cosine``. Used by the index tests and the
scale benchmarks (no Spark here).
"""
from __future__ import annotations

import numpy as np


def near_copy_table(n: int, dim: int = 1024, copy_fraction: float = 0.1, mean_cosine: float = 0.43,
                    copy_cosine: tuple[float, float] = (0.90, 0.97), seed: int = 0,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors, pairs)``: ``n`` unit float32 vectors and the planted (source, copy) row pairs."""
    rng = np.random.default_rng(seed)
    # cos(a*m + z1, a*m + z2) -> a^2 / (a^2 + 1) for unit m and z ~ N(0, I/dim).
    a = np.sqrt(mean_cosine / (1.0 - mean_cosine))
    m = rng.standard_normal(dim).astype(np.float32)
    m /= np.linalg.norm(m)
    x = rng.standard_normal((n, dim), dtype=np.float32) / np.float32(np.sqrt(dim)) + np.float32(a) * m
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n_copies = int(n * copy_fraction)
    if n_copies == 0:
        return x, np.zeros((0, 2), dtype=np.int64)
    sources = rng.choice(n - n_copies, n_copies, replace=False)
    copies = np.arange(n - n_copies, n)
    cos = rng.uniform(*copy_cosine, n_copies).astype(np.float32)[:, None]
    u = rng.standard_normal((n_copies, dim), dtype=np.float32)
    u -= (u * x[sources]).sum(axis=1, keepdims=True) * x[sources]  # orthogonal to the source
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x[copies] = cos * x[sources] + np.sqrt(1.0 - cos ** 2) * u
    x[copies] /= np.linalg.norm(x[copies], axis=1, keepdims=True)
    return x, np.stack([sources, copies], axis=1).astype(np.int64)


def exact_pairs(vectors: np.ndarray, threshold: float, block: int = 4096) -> dict[tuple[int, int], float]:
    """Every row pair (i < j) with cosine >= ``threshold``, by blocked brute force (the oracle)."""
    out: dict[tuple[int, int], float] = {}
    for start in range(0, len(vectors), block):
        sims = vectors[start:start + block] @ vectors.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if i < c:
                out[(i, c)] = float(sims[r, c])
    return out
