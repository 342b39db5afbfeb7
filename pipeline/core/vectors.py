"""The one L2 normalisation (numpy and TensorFlow) and the signed power law.

Every descriptor the pipeline stores is L2-normalised by :func:`l2_normalize` (numpy) or,
inside a model graph, :func:`l2_normalize_tf`; both floor the squared norm at
:data:`NORM_EPSILON`, so the numpy and TF paths agree and an all-zero row stays zero.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# Floor on the squared norm. Tiny rather than 1e-12 so that random-weight (timing-only)
# networks, whose activations are ~1e-10, still give unit vectors; all-zero rows stay zero.
NORM_EPSILON = 1e-30


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
    norm = np.sqrt(np.maximum(np.sum(x * x, axis=axis, keepdims=True), NORM_EPSILON))
    return (x / norm).astype(np.float32)


def l2_normalize_tf(x: Any, axis: int = -1) -> Any:
    """:func:`l2_normalize` for a TensorFlow tensor (inside a model graph)."""
    import tensorflow as tf

    return tf.math.l2_normalize(x, axis=axis, epsilon=NORM_EPSILON)


def signed_power(x: np.ndarray, alpha: float) -> np.ndarray:
    """Power-law normalisation ``sign(x) * |x| ** alpha`` (alpha 0.5 = signed square root).

    Parameters
    ----------
    x : np.ndarray
        Input.
    alpha : float
        Exponent; 1 leaves ``x`` unchanged.

    Returns
    -------
    np.ndarray
        float32 array of the same shape (not normalised).
    """
    x = np.asarray(x, dtype=np.float32)
    if alpha == 1:
        return x
    return (np.sign(x) * np.abs(x) ** alpha).astype(np.float32)
