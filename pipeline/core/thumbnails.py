"""Report thumbnails: small JPEGs from the robust decoder (EXIF orientation applied)."""
from __future__ import annotations

import io

from PIL import Image

from pipeline.core import imageio


def thumbnail_jpeg(content: bytes, max_side: int = 160, quality: int = 80,
                   max_pixels: int = imageio.DEFAULT_MAX_PIXELS) -> bytes:
    """A JPEG whose longest side is at most ``max_side``; raises ImageDecodeError for bad data.

    The decoder is asked for at least ``max_side`` pixels so big JPEGs are DCT-scaled while
    decoding (a 24-megapixel photo is never expanded in full for a 160-pixel thumbnail).
    """
    image = imageio.decode_rgb(content, min_size=(max_side, max_side), max_pixels=max_pixels)
    image.thumbnail((max_side, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()
