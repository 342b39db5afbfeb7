"""Global pooling of CNN feature maps (in TensorFlow) and multi-scale merging.

* :func:`pool_feature_map` turns a conv feature map ``(batch, H, W, C)`` into a
  global descriptor ``(batch, C)`` inside TensorFlow (average, MAC, GeM, R-MAC),
  so pooling runs in the model graph next to the backbone.
* :func:`rmac_regions` is the region grid of R-MAC (Tolias et al., ICLR 2016).
* :func:`combine_scales` merges descriptors of one image taken at several scales.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from pipeline.core.vectors import l2_normalize, l2_normalize_tf

POOLING_METHODS = ("avg", "max", "gem", "rmac")

# GeM clamps activations away from 0 before the power so that 0**(1/p) and its
# gradient stay finite; same value as Radenovic et al.'s cirtorch.
_GEM_EPS = 1e-6
# The overlap R-MAC aims for between neighbouring regions (Tolias et al.).
_RMAC_OVERLAP = 0.4
# Candidate numbers of regions along the long side at the coarsest level.
_RMAC_STEPS = (2, 3, 4, 5, 6, 7)


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
    normalize: bool = False,
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
    normalize : bool
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
    if normalize:
        out = l2_normalize_tf(out)
    return out


def _rmac_tf(x: Any, levels: int) -> Any:
    import tensorflow as tf

    height, width = x.shape[1], x.shape[2]
    if height is not None and width is not None:
        total = None
        for y0, x0, h, w in rmac_regions(int(height), int(width), levels):
            v = tf.reduce_max(x[:, y0 : y0 + h, x0 : x0 + w, :], axis=[1, 2])
            v = l2_normalize_tf(v)
            total = v if total is None else total + v
        return l2_normalize_tf(total)

    shape = tf.shape(x)
    boxes = tf.numpy_function(
        lambda h, w: _rmac_regions_array(h, w, levels), [shape[1], shape[2]], tf.int32, stateful=False
    )
    boxes = tf.reshape(boxes, [-1, 4])

    def region_vector(box: Any) -> Any:
        v = tf.reduce_max(x[:, box[0] : box[0] + box[2], box[1] : box[1] + box[3], :], axis=[1, 2])
        return l2_normalize_tf(v)

    vectors = tf.map_fn(
        region_vector, boxes, fn_output_signature=tf.TensorSpec(shape=[None, x.shape[-1]], dtype=x.dtype)
    )
    return l2_normalize_tf(tf.reduce_sum(vectors, axis=0))


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
