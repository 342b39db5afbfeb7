"""Robust image decoding for hostile archives.

Two entry points, both fed with the raw bytes of one archive member:

* :func:`probe` (ingest stage) classifies a file as ``ok`` / ``error`` / ``skipped``
  and never raises for bad data, so a single poisoned file cannot fail a Spark task.
* :func:`decode_rgb` (embed stage, hot path) returns an RGB image in displayed
  orientation, decoding JPEGs at reduced scale when the caller only needs a
  thumbnail, and raises :class:`ImageDecodeError` with the same reasons as probe.

Pixel limits. Pillow's own bomb guard runs inside ``Image.open`` and warns (``DecompressionBombWarning``)
between ``MAX_IMAGE_PIXELS`` and twice that, and raises above. Silencing that warning needs
``warnings.catch_warnings``, which mutates process-global state and is not thread-safe (embed workers
decode in threads), and the error carries no dimensions. So files are identified here through Pillow's
plugin registry (the same ``Image.ID``/``Image.OPEN`` tables that ``Image.open`` walks) without that
check, and the pixel limit is enforced here, from the header, before any pixel buffer is allocated.
Pillow's globals are never modified: the effective limit is ``min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)``
so an application that lowered Pillow's limit is still honoured, and Pillow's own in-decoder checks
(TIFF tiles, GIF frames, MPO frames) remain as a second line and are reported the same way.
"""

from __future__ import annotations

import io
import math
import logging
import os
import re
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import Image, ImageFile

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageDecodeError", "Probe", "decode_rgb", "probe"]

# Extensions that make a file "an image" for policy purposes: a file with one of
# these that cannot be decoded is an *error* (reported), anything else that does
# not sniff as an image is *skipped* (silently). HEIC/HEIF is listed although this
# Pillow build cannot decode it, so iPhone archives surface as explicit errors
# ("unsupported image format") instead of vanishing from the index.
IMAGE_EXTENSIONS: Final[frozenset[str]] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo",
        ".png", ".apng",
        ".gif",
        ".bmp",
        ".tif", ".tiff",
        ".webp",
        ".avif",
        ".heic", ".heif",
        ".jp2", ".j2k", ".jpf", ".jpx",
        ".ppm", ".pgm", ".pbm", ".pnm",
    }
)  # fmt: skip

# Twice Pillow's default Image.MAX_IMAGE_PIXELS (89_478_485, i.e. ~0.25 GiB of RGBA):
# exactly the size at which Pillow itself raises DecompressionBombError, so with
# default settings this module and Pillow agree on what is a bomb. ~179 MP covers
# every camera sensor and most stitched panoramas; an RGB decode at this size is
# ~0.5 GiB, which is what an executor must be able to afford per concurrent decode.
DEFAULT_MAX_PIXELS: Final[int] = 178_956_970

# Raster formats we decode, most common first so identification usually succeeds
# on the first factory. Deliberately narrower than Pillow's ~45 plugins: formats
# with weak or absent magic (TGA, SPIDER, DIB, ...) would let random bytes or text
# be "identified" as an image and turn garbage into a decode attempt.
_DECODABLE_FORMATS: Final[tuple[str, ...]] = (
    "JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF", "PPM", "JPEG2000",
)  # fmt: skip

# Formats for which Image.draft() gives a reduced-scale (DCT scaled) decode.
_DRAFT_FORMATS: Final[frozenset[str]] = frozenset({"JPEG", "MPO"})

_EXIF_ORIENTATION: Final[int] = 0x0112
# Same mapping as PIL.ImageOps.exif_transpose; kept local because exif_transpose
# copies the image even when there is nothing to do, and the hot path must not.
_TRANSPOSE_FOR_ORIENTATION: Final[dict[int, Image.Transpose]] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES: Final[frozenset[int]] = frozenset({5, 6, 7, 8})

_ALPHA_MODES: Final[frozenset[str]] = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_HIGH_DEPTH_MODES: Final[frozenset[str]] = frozenset(
    {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
)
_WHITE: Final[tuple[int, int, int]] = (255, 255, 255)

# Exceptions with which Pillow's factories say "not my format": Image.open moves on
# to the next plugin on exactly these, so identification here does the same.
_NOT_THIS_FORMAT: Final[tuple[type[BaseException], ...]] = (
    SyntaxError,
    IndexError,
    TypeError,
    struct.error,
)

_BOMB_PIXELS_RE: Final[re.Pattern[str]] = re.compile(r"\((\d+) pixels\)")

# Bytes that occur in text files: printable ASCII, common whitespace, and
# everything >= 0x80 so UTF-8 / Latin-1 text counts as text.
_TEXT_BYTES: Final[bytes] = bytes([7, 8, 9, 10, 12, 13, 27]) + bytes(range(0x20, 0x100))

_DIB_SIZES: Final[frozenset[int]] = frozenset({12, 16, 40, 52, 56, 64, 108, 124})

# AppleDouble / AppleSingle: the "._name.jpg" resource-fork files macOS puts next to
# every file in zips and on non-HFS volumes. They carry an image extension but are
# metadata, and there are as many of them as real photos.
_APPLE_DOUBLE_MAGICS: Final[tuple[bytes, ...]] = (b"\x00\x05\x16\x07", b"\x00\x05\x16\x00")
_APPLE_DOUBLE_REASON: Final[str] = "macOS AppleDouble metadata"

_SHORT_SIGNATURES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF89a", "GIF"),
    (b"GIF87a", "GIF"),
)


class ImageDecodeError(ValueError):
    """Bad image data; ``reason`` is the same human-readable text probe reports."""

    def __init__(self, reason: str, *, format: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        # Container format when it was recognised (e.g. "JPEG" for a truncated JPEG).
        self.format = format


@dataclass(frozen=True)
class Probe:
    """Outcome of :func:`probe` for one file.

    ``width``/``height`` are the displayed size (EXIF orientation applied) and are
    only set when ``status == "ok"``; ``format`` is also set for errors whenever the
    container was recognised.
    """

    status: str  # "ok" | "error" | "skipped"
    error: str | None
    format: str | None
    width: int | None
    height: int | None


def probe(content: bytes | None, path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Probe:
    """Classify one archive member; never raises for bad data.

    ``path`` is only used for its extension (and logging). A JPEG that ends with its EOI
    marker is probed from its header alone (ingest at disk speed; the embed stage decodes it);
    any other image really is decoded so truncation is caught (JPEGs at 1/8 scale, luma only).
    ``MemoryError`` is deliberately not swallowed: it says the executor is
    under-provisioned, not that this file is bad.
    """
    if content is None:
        return Probe("error", "unreadable file", None, None, None)

    if content.startswith(_APPLE_DOUBLE_MAGICS):
        return Probe("skipped", f"not an image file ({_APPLE_DOUBLE_REASON})", None, None, None)
    ext = _extension(path)
    if ext not in IMAGE_EXTENSIONS and _sniff_format(content) is None:
        what = ext if ext else "no extension"
        return Probe("skipped", f"not an image file ({what})", None, None, None)

    im: ImageFile.ImageFile | None = None
    try:
        im = _open_checked(content, max_pixels)
        fmt = im.format
        width, height = im.size
        orientation: int | None = None
        if fmt in _DRAFT_FORMATS:
            orientation = _orientation(im)
            if _jpeg_is_complete(content):
                # Header probe: a JPEG still ending with its EOI marker was not cut short; embed decodes it
                # (a failure there is an embedding-table error row), and ingest keeps disk speed.
                return Probe("ok", None, fmt, *((height, width) if orientation in _SWAPS_AXES else (width, height)))
            # "L" skips chroma upsampling and colour conversion; libjpeg still
            # entropy-decodes every component, which is what detects truncation.
            im.draft("L", (1, 1))
        _load(im, _effective_limit(max_pixels))
        if orientation is None:
            # PNG's eXIf chunk may follow IDAT, so it is only known after load().
            orientation = _orientation(im)
        if orientation in _SWAPS_AXES:
            width, height = height, width
        return Probe("ok", None, fmt, width, height)
    except ImageDecodeError as exc:
        logger.debug("probe %s: %s", path, exc.reason)
        return Probe("error", exc.reason, exc.format, None, None)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - probe must survive any decoder bug
        logger.warning("probe %s: unexpected %s: %s", path, type(exc).__name__, exc)
        reason = f"unexpected decoder failure ({type(exc).__name__}: {exc})"
        return Probe("error", reason, im.format if im is not None else None, None, None)
    finally:
        if im is not None:
            im.close()


def _jpeg_is_complete(content: bytes) -> bool:
    """Whether a JPEG ends with its end-of-image marker (padding after it allowed)."""
    return content[-64:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def decode_rgb(
    content: bytes,
    min_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    longest_side: int | None = None,
) -> Image.Image:
    """Decode to an RGB image in displayed orientation.

    ``min_size`` is the displayed (width, height) the caller will resize to; JPEGs
    are then DCT-scaled by 1/2, 1/4 or 1/8 as long as both sides stay >= min_size,
    which bounds memory and time on tens-of-megapixel photos. ``longest_side`` instead
    keeps only the longer side >= it (the caller keeps the aspect ratio). Transparent images
    are composited on white; animated images yield their first frame.
    Raises :class:`ImageDecodeError` for bad data.
    """
    if min_size is not None and (min_size[0] < 1 or min_size[1] < 1):
        raise ValueError(f"min_size must be positive, got {min_size!r}")
    if hasattr(content, "read"):  # an image the table did not copy (pipeline.core.image_source)
        content = content.read()
    if content is None:
        raise ImageDecodeError("unreadable file")

    im = _open_checked(content, max_pixels)
    try:
        orientation: int | None = None
        if im.format in _DRAFT_FORMATS:
            orientation = _orientation(im)
            if longest_side is not None:
                # The same scale on both sides: the orientation does not matter here.
                scale = longest_side / max(im.size)
                im.draft("RGB", (math.ceil(im.size[0] * scale), math.ceil(im.size[1] * scale)))
            elif min_size is not None:
                want_w, want_h = min_size
                # draft() works on the stored raster; a 90-degree orientation means
                # the displayed width is the stored height.
                if orientation in _SWAPS_AXES:
                    want_w, want_h = want_h, want_w
                im.draft("RGB", (want_w, want_h))
        _load(im, _effective_limit(max_pixels))
        if orientation is None:
            orientation = _orientation(im)
        rgb = _to_rgb(im)
        if rgb is not im:
            im.close()
    except (ImageDecodeError, MemoryError):
        im.close()
        raise
    except Exception as exc:
        im.close()
        raise ImageDecodeError(
            f"unexpected decoder failure ({type(exc).__name__}: {exc})", format=im.format
        ) from exc

    method = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    if method is not None:
        rgb = rgb.transpose(method)
    return rgb


# --------------------------------------------------------------------------- helpers


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _effective_limit(max_pixels: int) -> int:
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is None:
        return max_pixels
    return min(max_pixels, 2 * pillow_limit)


def _sniff_format(content: bytes) -> str | None:
    """Format name from magic bytes, for policy and error messages only.

    Decoding never trusts this; Pillow's factories validate the header.
    """
    head = content[:32]
    if len(head) < 8:
        # A file cut inside its signature is still recognisably that format.
        for signature, name in _SHORT_SIGNATURES:
            if len(head) >= 2 and signature.startswith(head):
                return name
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    # "BM" alone is common in text ("BMW ..."), so also require a known DIB header size.
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack_from("<I", head, 14)[0] in _DIB_SIZES:
        return "BMP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    if head.startswith(b"8BPS"):
        return "PSD"
    return None


def _looks_like_text(content: bytes) -> bool:
    head = content[:4096]
    if head.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        return True
    if not head or b"\x00" in head:
        return False
    non_text = len(head.translate(None, _TEXT_BYTES))
    return non_text / len(head) < 0.02


def _registered_formats() -> tuple[str, ...]:
    if not all(fmt in Image.OPEN for fmt in ("JPEG", "PNG", "TIFF", "WEBP")):
        # Image.open does the same lazily; WEBP/TIFF/AVIF are not in preinit().
        Image.init()
    return tuple(fmt for fmt in _DECODABLE_FORMATS if fmt in Image.OPEN)


def _identify(buf: io.BytesIO, prefix: bytes) -> ImageFile.ImageFile | None:
    """Header-only identification, like Image.open minus its global bomb check."""
    for fmt in _registered_formats():
        factory, accept = Image.OPEN[fmt]
        verdict = accept(prefix) if accept is not None else True
        # A str verdict is Pillow saying "recognised but unsupported".
        if not verdict or isinstance(verdict, str):
            continue
        buf.seek(0)
        try:
            return factory(buf, "")
        except _NOT_THIS_FORMAT:
            continue
    return None


def _bomb_reason(limit: int, exc: BaseException) -> str:
    match = _BOMB_PIXELS_RE.search(str(exc))
    detail = f"{match.group(1)} pixels" if match else "Pillow decompression-bomb check"
    return f"exceeds max_pixels {limit} ({detail})"


def _open_checked(content: bytes, max_pixels: int) -> ImageFile.ImageFile:
    """Identify the image and enforce the pixel limit; no pixel data is decoded."""
    if not content:
        raise ImageDecodeError("empty file")
    limit = _effective_limit(max_pixels)
    magic = _sniff_format(content)
    buf = io.BytesIO(content)  # shares the bytes buffer, no copy
    try:
        im = _identify(buf, content[:16])
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(_bomb_reason(limit, exc), format=magic) from exc
    except MemoryError:
        raise
    except Exception as exc:
        # A plugin with a weak magic claimed the file and then choked on it (EOF
        # inside the header, impossible field values, ...).
        if magic is None and _looks_like_text(content):
            raise ImageDecodeError("not an image: looks like HTML/text") from exc
        what = magic or "image"
        raise ImageDecodeError(
            f"corrupt or truncated {what} header ({type(exc).__name__}: {exc})", format=magic
        ) from exc

    if im is None:
        if content.startswith(_APPLE_DOUBLE_MAGICS):
            raise ImageDecodeError(f"not an image: {_APPLE_DOUBLE_REASON}")
        if magic is None and _looks_like_text(content):
            raise ImageDecodeError("not an image: looks like HTML/text")
        if magic is None:
            raise ImageDecodeError("unsupported or corrupt image header")
        if magic not in _registered_formats():
            raise ImageDecodeError(f"unsupported image format ({magic})", format=magic)
        raise ImageDecodeError(f"corrupt or truncated {magic} header", format=magic)

    width, height = im.size
    if width < 1 or height < 1:
        im.close()
        raise ImageDecodeError(f"corrupt {im.format} header ({width}x{height})", format=im.format)
    if width * height > limit:
        im.close()
        raise ImageDecodeError(
            f"exceeds max_pixels {limit} ({width}x{height})", format=im.format
        )
    return im


_warned_load_truncated = False


def _load(im: ImageFile.ImageFile, limit: int) -> None:
    global _warned_load_truncated
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_load_truncated:
        _warned_load_truncated = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by this process: truncated "
            "files will decode as partially grey images instead of being reported"
        )
    fmt = im.format or "image"
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            _bomb_reason(limit, exc), format=im.format
        ) from exc
    except MemoryError:
        raise
    except EOFError as exc:
        raise ImageDecodeError(f"truncated {fmt}", format=im.format) from exc
    except Exception as exc:
        message = str(exc)
        if "truncated" in message.lower() or "premature end" in message.lower():
            raise ImageDecodeError(f"truncated {fmt}", format=im.format) from exc
        raise ImageDecodeError(
            f"corrupt {fmt} data ({type(exc).__name__}: {message})", format=im.format
        ) from exc


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # noqa: BLE001 - junk EXIF must not cost us the pixels
        logger.debug("ignoring unreadable EXIF: %s: %s", type(exc).__name__, exc)
        return 1
    # Some writers store the tag as a 1-tuple or a string.
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    try:
        orientation = int(value)
    except (TypeError, ValueError):
        return 1
    return orientation if orientation in _TRANSPOSE_FOR_ORIENTATION else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    has_transparency = mode in _ALPHA_MODES or "transparency" in im.info
    if mode == "RGB" and not has_transparency:
        return im
    if mode in _HIGH_DEPTH_MODES:
        # Pillow's I/I;16 -> RGB conversion clips at 255 instead of scaling, which
        # turns 16-bit scans almost white.
        return _high_depth_to_l(im).convert("RGB")
    if has_transparency:
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, (0, 0), rgba)
        return background
    # CMYK (including YCCK, which libjpeg already turned into CMYK), L, 1, P,
    # YCbCr, LAB, HSV. CMYK uses Pillow's naive formula; ICC profiles are ignored.
    return im.convert("RGB")


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = (arr >> 8).astype(np.uint8)
    elif im.mode == "I":
        # Pillow opens 16-bit grey PNG/TIFF as "I" in some versions; wider data
        # gets a max-based stretch since there is no nominal range.
        peak = int(arr.max()) if arr.size else 0
        if peak <= 255:
            out = np.clip(arr, 0, 255).astype(np.uint8)
        elif peak <= 65535:
            out = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        else:
            out = (np.clip(arr, 0, None) * (255.0 / peak)).astype(np.uint8)
    else:  # "F"
        finite = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(finite.max()) if finite.size else 0.0
        scale = 255.0 if peak <= 1.0 else (1.0 if peak <= 255.0 else 255.0 / peak)
        out = np.clip(finite * scale, 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # 2-D uint8 is mode "L"
