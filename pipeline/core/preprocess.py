"""Image preparation for a network, in PIL/numpy: decode, trim plain borders, rotate, resize."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.core import imageio


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
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    corners = np.stack([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]]).astype(np.float32)
    ref = np.median(corners, axis=0)

    def span(lines: np.ndarray) -> tuple[int, int]:
        n = len(lines)
        # Lines (rows, or columns of the transposed view) are tested from each edge inwards,
        # a block at a time: most photos have no border, so one block a side decides.
        def uniform(lo: int, hi: int) -> np.ndarray:
            return _close_to(lines[lo:hi], ref, tol).mean(axis=1) >= min_uniform

        lo = 0
        while lo < n:
            block = uniform(lo, min(n, lo + _EDGE_BLOCK))
            stop = np.flatnonzero(~block)
            if stop.size:
                lo += int(stop[0])
                break
            lo += len(block)
        hi = n
        while hi > lo:
            block = uniform(max(lo, hi - _EDGE_BLOCK), hi)[::-1]
            stop = np.flatnonzero(~block)
            if stop.size:
                hi -= int(stop[0])
                break
            hi -= len(block)
        if hi - lo < max(1, int(math.ceil(min_keep * n))):
            return 0, n
        return lo, hi

    top, bottom = span(a)
    left, right = span(a.transpose(1, 0, 2))
    return top, left, bottom, right


_EDGE_BLOCK = 8  # lines tested at once from each edge by content_box


def _close_to(a: np.ndarray, ref: np.ndarray, tol: float) -> np.ndarray:
    """``max over channels |a - ref| <= tol`` per pixel; uint8 images through a lookup table (fast)."""
    if a.dtype != np.uint8:
        return np.abs(a.astype(np.float32) - ref).max(axis=-1) <= tol
    values = np.arange(256, dtype=np.float32)
    close = None
    for c in range(a.shape[-1]):
        lut = np.abs(values - ref[c]) <= tol
        hit = lut[a[..., c]]
        close = hit if close is None else close & hit
    return close


def decode_for_model(content: bytes, side: int, max_pixels: int, *, mode: str = "squash",
                     trim: bool = False, rotation: int = 0, size_multiple: int = 16) -> np.ndarray:
    """Bytes -> uint8 pixels for the network.

    ``squash`` (the reference study's Keras loader): (side, side, 3). ``aspect``: the aspect
    ratio kept, the longest side ``side``, each side rounded to a multiple of
    ``size_multiple`` so that a collection yields a few distinct shapes to batch.
    ``trim`` crops plain-colour borders first; ``rotation`` rotates counter-clockwise.
    """
    image = decode_image(content, side, max_pixels, trim, rotation, mode)
    return resized(image, side, mode, size_multiple)


def decode_image(content: bytes, side: int, max_pixels: int, trim: bool, rotation: int, mode: str = "squash"):
    """Bytes -> RGB PIL image in displayed orientation, plain borders trimmed, rotated counter-clockwise.

    JPEGs are decoded DCT-scaled to the smallest size that still covers the network input:
    both sides >= ``side`` for ``squash``, the longest side >= ``side`` for ``aspect``.
    """
    from PIL import Image

    if mode == "aspect":
        image = imageio.decode_rgb(content, max_pixels=max_pixels, longest_side=side)
    else:
        image = imageio.decode_rgb(content, min_size=(side, side), max_pixels=max_pixels)
    if trim:
        image = trimmed(image)
    if rotation:
        image = image.transpose({90: Image.ROTATE_90, 180: Image.ROTATE_180, 270: Image.ROTATE_270}[rotation])
    return image


# The border box is found on at most this many pixels a side (an integer box-filter reduction
# above it). JPEGs arrive DCT-scaled below 2x the network side, so they are searched as
# decoded: a bicubic copy to 512 px cost 3.4 ms an image at 576x432 (Intel Xeon, 2026-12-01),
# more than decoding it, where the search on the image itself costs 0.5 ms.
TRIM_SEARCH_SIDE = 1024


def trimmed(image):
    """Crop plain-colour borders; the box is found on a copy reduced to <= TRIM_SEARCH_SIDE and scaled back."""
    w, h = image.size
    factor = math.ceil(max(w, h) / TRIM_SEARCH_SIDE)
    thumb = image.reduce(factor) if factor > 1 else image
    top, left, bottom, right = content_box(thumb)
    tw, th = thumb.size
    if (top, left, bottom, right) == (0, 0, th, tw):
        return image
    fx, fy = w / tw, h / th
    return image.crop((int(left * fx), int(top * fy), min(w, int(round(right * fx))), min(h, int(round(bottom * fy)))))


def resized(image, side: int, mode: str, size_multiple: int) -> np.ndarray:
    """PIL image -> uint8 pixels: ``squash`` to side x side, ``aspect`` longest side ``side`` (sides rounded)."""
    from PIL import Image

    if mode == "aspect":
        w, h = image.size
        s = side / max(w, h)
        m = max(1, size_multiple)
        size = (max(m, int(round(w * s / m)) * m), max(m, int(round(h * s / m)) * m))
    else:
        size = (side, side)
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
