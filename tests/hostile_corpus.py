"""Generator of a hostile image archive for tests (no binaries are committed).

``make_hostile_corpus(root)`` writes 39 files under ``root`` and returns one
:class:`HostileCase` per file with the status and reason that
``pipeline.core.imageio.probe`` must report. Pixel sources are the photographs that
ship with scikit-image (astronaut, chelsea, coffee), so decoders see realistic
content rather than flat colour. Generation takes ~2-3 s and < 10 MB on disk;
the 48 MP JPEG (~2 MB, ~0.5 s) dominates both.

Symlinks are deliberately absent: following them is the ingest stage's policy.
"""

from __future__ import annotations

import functools
import io
import logging
import pathlib
import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, features
from skimage import data as skdata

logger = logging.getLogger(__name__)

__all__ = [
    "BOMB_PNG",
    "BOMB_PNG_SIZE",
    "EXIF_ROTATED",
    "HostileCase",
    "LARGE_JPEG",
    "LARGE_JPEG_SIZE",
    "PALETTE_TRANSPARENT_PNG",
    "RGBA_PNG",
    "TRANSPARENT_COLUMNS",
    "TRANSPARENT_SQUARE",
    "make_hostile_corpus",
    "reference_rgb",
]

# Relpaths that tests address individually.
EXIF_ROTATED = "odd/exif_rotated_orientation6.jpg"
LARGE_JPEG = "odd/large_8000x6000.jpg"
RGBA_PNG = "odd/rgba_half_transparent.png"
PALETTE_TRANSPARENT_PNG = "odd/palette_transparent.png"
BOMB_PNG = "bombs/bomb_100000x100000.png"

BOMB_PNG_SIZE = (100_000, 100_000)
LARGE_JPEG_SIZE = (8000, 6000)
# In the RGBA sample, columns < TRANSPARENT_COLUMNS have alpha 0.
TRANSPARENT_COLUMNS = 100
# In the palette sample, this top-left square uses the transparent index.
TRANSPARENT_SQUARE = 40

# Median cut (Pillow's default) takes ~0.5 s per photo; octree is 10x faster and
# still leaves realistic dithering-free palette error.
_FAST = Image.Quantize.FASTOCTREE

_LONG_NAME = ("very long file name of a holiday photo " * 5)[:196].rstrip() + ".jpg"


@dataclass(frozen=True)
class HostileCase:
    relpath: str
    expected_status: str  # "ok" | "error" | "skipped"
    reason_contains: str | None
    description: str
    # Pillow format name probe must report for "ok" cases.
    expected_format: str | None = None
    # Displayed (width, height) for "ok" cases.
    expected_size: tuple[int, int] | None = None
    # scikit-image source the displayed pixels must match ("<name>" or
    # "<name>-gray"), within pixel_tolerance mean absolute difference on 0..255.
    source: str | None = None
    pixel_tolerance: float | None = None


@functools.lru_cache(maxsize=None)
def _source(name: str) -> np.ndarray:
    return {"astronaut": skdata.astronaut, "chelsea": skdata.chelsea, "coffee": skdata.coffee}[
        name
    ]()


def reference_rgb(source: str) -> np.ndarray:
    """HxWx3 uint8 pixels a case's decode should resemble (see HostileCase.source)."""
    name, _, variant = source.partition("-")
    rgb = _source(name)
    if variant == "gray":
        gray = np.asarray(Image.fromarray(rgb).convert("L"))
        return np.repeat(gray[..., None], 3, axis=2)
    return rgb


def _size_of(name: str) -> tuple[int, int]:
    h, w = _source(name).shape[:2]
    return (w, h)


def _encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _jpeg(name: str, quality: int = 85, **params: object) -> bytes:
    return _encode(Image.fromarray(_source(name)), "JPEG", quality=quality, **params)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def _png_bomb(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose IHDR declares width x height 8-bit grey
    pixels but whose IDAT holds only a few rows: harmless unless a decoder
    allocates the declared raster before reading data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_with_declared_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF0 frame size of a real JPEG: same tiny entropy data, huge header."""
    sof = jpeg.find(b"\xff\xc0")
    if sof < 0:
        raise ValueError("expected a baseline (SOF0) JPEG")
    # FFC0, length(2), precision(1), height(2), width(2)
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


def _cmyk_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Full grey-component replacement (K = 255 - max(R, G, B)), the separation
    a prepress tool produces. Inverts Pillow's CMYK->RGB formula exactly, so the
    only error left after a JPEG round trip is compression loss."""
    rgbf = rgb.astype(np.float64)
    peak = rgbf.max(axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cmy = np.where(peak > 0, 255.0 * (1.0 - rgbf / peak), 0.0)
    k = 255.0 - peak
    return np.concatenate([cmy, k], axis=2).round().clip(0, 255).astype(np.uint8)


def _cmyk_jpeg(rgb: np.ndarray) -> bytes:
    h, w = rgb.shape[:2]
    im = Image.frombytes("CMYK", (w, h), _cmyk_from_rgb(rgb).tobytes())
    return _encode(im, "JPEG", quality=92)


def _ycck_jpeg(rgb: np.ndarray) -> bytes:
    """YCCK JPEG, as Photoshop writes for CMYK.

    Neither Pillow nor OpenCV exposes libjpeg's YCCK output colour space, so the
    file is built by hand: store YCbCr(C, M, Y) and K through Pillow's CMYK writer
    (which writes Adobe-inverted samples and an APP14 "Adobe" marker with
    transform 0), then flip the marker's transform byte to 2 (YCCK). Decoders
    then run the YCC->RGB step and inversion that real YCCK files need, giving
    back the intended CMYK.
    """
    cmyk = _cmyk_from_rgb(rgb).astype(np.float64)
    c, m, y, k = (cmyk[..., i] for i in range(4))
    luma = 0.299 * c + 0.587 * m + 0.114 * y
    cb = -0.168736 * c - 0.331264 * m + 0.5 * y + 128.0
    cr = 0.5 * c - 0.418688 * m - 0.081312 * y + 128.0
    stored = np.stack([luma, cb, cr], axis=2).round().clip(0, 255)
    # Pillow writes 255 - sample for CMYK (Adobe convention), so pre-invert the
    # colour planes; decoded K is 255 - stored K, which makes the K plane pass as is.
    samples = np.concatenate([255.0 - stored, k[..., None]], axis=2).astype(np.uint8)
    h, w = rgb.shape[:2]
    jpeg = bytearray(_encode(Image.frombytes("CMYK", (w, h), samples.tobytes()), "JPEG", quality=92))
    adobe = jpeg.find(b"\xff\xee")
    if adobe < 0 or jpeg[adobe + 4 : adobe + 9] != b"Adobe":
        raise RuntimeError("Pillow did not write an Adobe APP14 marker for CMYK")
    # APP14: FFEE, length(2), "Adobe", version(2), flags0(2), flags1(2), transform(1)
    jpeg[adobe + 4 + 11] = 2
    return bytes(jpeg)


def _large_jpeg(width: int, height: int) -> bytes:
    # OpenCV encodes straight from one uint8 array (~144 MB at 48 MP); Pillow would
    # need that array plus its own 4-byte-per-pixel copy.
    # Swap to BGR on the small source: a strided view of the big array makes
    # imencode fall back to a slow element-wise copy.
    bgr = np.ascontiguousarray(_source("coffee")[..., ::-1])
    big = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_LINEAR)
    ok, encoded = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 75])
    if not ok:
        raise RuntimeError("cv2.imencode failed for the large JPEG")
    return encoded.tobytes()


def _exif_rotated_jpeg() -> bytes:
    # Orientation 6 = "rotate 90 degrees clockwise to display": the camera stored
    # the raster turned 90 degrees counter-clockwise relative to the scene.
    stored = Image.fromarray(_source("coffee")).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(stored, "JPEG", quality=92, exif=exif.tobytes())


def _rgba_png() -> bytes:
    rgb = _source("chelsea")
    h, w = rgb.shape[:2]
    alpha = np.full((h, w), 255, np.uint8)
    alpha[:, :TRANSPARENT_COLUMNS] = 0
    ramp = np.linspace(0, 255, TRANSPARENT_COLUMNS).astype(np.uint8)
    alpha[:, TRANSPARENT_COLUMNS : 2 * TRANSPARENT_COLUMNS] = ramp
    # Colour under alpha 0 is arbitrary in real files; make it black so a decoder
    # that drops alpha instead of compositing is caught.
    rgb = rgb.copy()
    rgb[:, :TRANSPARENT_COLUMNS] = 0
    return _encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG")


def _palette_transparent_png() -> bytes:
    im = Image.fromarray(_source("chelsea")).quantize(colors=255, method=_FAST)
    idx = np.asarray(im).copy()
    idx[:TRANSPARENT_SQUARE, :TRANSPARENT_SQUARE] = 255
    out = Image.fromarray(idx)
    out.putpalette(im.getpalette()[: 255 * 3] + [0, 0, 0])
    return _encode(out, "PNG", transparency=255)


def _animated_gif() -> bytes:
    base = Image.fromarray(_source("chelsea"))
    frames = [
        base.quantize(colors=128, method=_FAST),
        base.transpose(Image.Transpose.FLIP_LEFT_RIGHT).quantize(colors=128, method=_FAST),
        base.transpose(Image.Transpose.FLIP_TOP_BOTTOM).quantize(colors=128, method=_FAST),
    ]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=[100, 200, 300], loop=0)
    return buf.getvalue()


def _animated_webp() -> bytes:
    base = Image.fromarray(_source("coffee"))
    buf = io.BytesIO()
    base.save(
        buf,
        "WEBP",
        save_all=True,
        append_images=[base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)],
        duration=150,
        quality=80,
    )
    return buf.getvalue()


_HTML = b"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>403 Forbidden</title></head>
<body><h1>Forbidden</h1><p>You don't have permission to access this resource.</p>
<hr><address>Apache/2.4.41 (Ubuntu) Server at images.example.org Port 443</address>
</body></html>
"""

_TEXT = (
    "This is not a picture. The scanner saved its log under a .png name.\n"
    "Scan date: 2019-06-01\nPages: 12\nDPI: 300\n"
    "Remarques : numérisation terminée sans erreur.\n"
).encode("utf-8")

_NOTES = "holiday 2008 - best shots are in the subfolders\nTODO: dedupe\n".encode()

# Apple Finder metadata: binary, starts with NULs and the "Bud1" buddy-allocator magic.
_DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(range(256)) * 8


# AppleDouble header (magic, version 2, "Mac OS X" filler, 2 entries) + Finder info.
_APPLE_DOUBLE = (
    b"\x00\x05\x16\x07\x00\x02\x00\x00"
    + b"Mac OS X        "
    + b"\x00\x02"
    + struct.pack(">III", 9, 50, 32)
    + struct.pack(">III", 2, 82, 0)
    + b"JPEGprvw" + b"\x00" * 24
)


def make_hostile_corpus(root: pathlib.Path) -> list[HostileCase]:
    """Write the corpus under ``root`` (created if needed) and describe it."""
    root = pathlib.Path(root)
    cases: list[HostileCase] = []

    def add(relpath: str, content: bytes, case: HostileCase) -> None:
        target = root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        cases.append(case)

    def bad(relpath: str, content: bytes, reason: str, description: str, status: str = "error") -> None:
        add(relpath, content, HostileCase(relpath, status, reason, description))

    astronaut_jpeg = _jpeg("astronaut", quality=90)
    chelsea_jpeg = _jpeg("chelsea")
    chelsea_png = _encode(Image.fromarray(_source("chelsea")), "PNG")
    astro, chelsea, coffee = _size_of("astronaut"), _size_of("chelsea"), _size_of("coffee")

    # ---- broken
    bad("broken/empty.jpg", b"", "empty file", "zero-byte file with an image extension")
    bad(
        "broken/truncated.jpg",
        astronaut_jpeg[: len(astronaut_jpeg) // 2],
        "truncated JPEG",
        "JPEG cut in the middle of its entropy-coded data (interrupted download)",
    )
    bad(
        "broken/truncated.png",
        chelsea_png[: len(chelsea_png) // 2],
        "truncated PNG",
        "PNG cut in the middle of its IDAT stream",
    )
    bad(
        "broken/header_only.png",
        chelsea_png[:20],
        "corrupt or truncated PNG header",
        "PNG cut inside its IHDR chunk",
    )
    bad(
        "broken/forbidden.jpg",
        _HTML,
        "not an image: looks like HTML/text",
        "HTML error page saved under a .jpg name by a scraper",
    )
    bad(
        "broken/scanner_log.png",
        _TEXT,
        "not an image: looks like HTML/text",
        "UTF-8 text with a .png extension",
    )
    garbage = np.random.default_rng(20240601).bytes(4096)
    bad(
        "broken/garbage.jpg",
        garbage,
        "unsupported or corrupt image header",
        "random bytes with a .jpg extension (no known magic)",
    )

    # ---- decompression bombs: headers only, a few hundred bytes each
    bad(
        BOMB_PNG,
        _png_bomb(*BOMB_PNG_SIZE),
        f"exceeds max_pixels 178956970 ({BOMB_PNG_SIZE[0]}x{BOMB_PNG_SIZE[1]})",
        "PNG whose IHDR declares 10 gigapixels over a few rows of data (valid CRCs)",
    )
    bad(
        "bombs/bomb_65500x65500.jpg",
        _jpeg_with_declared_size(chelsea_jpeg, 65500, 65500),
        "exceeds max_pixels 178956970 (65500x65500)",
        "real JPEG with its SOF0 frame size rewritten to 65500x65500",
    )

    # ---- odd but valid: (relpath, bytes, description, format, displayed size,
    #      pixel source, tolerance)
    photo = Image.fromarray
    gray16 = reference_rgb("astronaut-gray")[..., 0].astype(np.uint16) * 257
    rgb48 = _source("coffee")[..., ::-1].astype(np.uint16) * 257  # BGR for OpenCV
    tiff_params: dict[str, object] = {"compression": "tiff_lzw"} if features.check("libtiff") else {}
    valid: list[tuple[str, bytes, str, str, tuple[int, int], str | None, float | None]] = [
        ("odd/cmyk.jpg", _cmyk_jpeg(_source("astronaut")),
         "CMYK JPEG (Adobe, inverted samples) with a real K plane",
         "JPEG", astro, "astronaut", 6.0),
        ("odd/ycck.jpg", _ycck_jpeg(_source("astronaut")),
         "YCCK JPEG (Adobe transform 2), as Photoshop saves CMYK",
         "JPEG", astro, "astronaut", 6.0),
        ("odd/grayscale.jpg", _encode(photo(_source("astronaut")).convert("L"), "JPEG", quality=90),
         "single-channel JPEG", "JPEG", astro, "astronaut-gray", 5.0),
        ("odd/progressive.jpg", _jpeg("coffee", quality=85, progressive=True),
         "progressive JPEG", "JPEG", coffee, "coffee", 6.0),
        ("odd/gray16.png", _encode(photo(gray16), "PNG"),
         "16-bit greyscale PNG (Pillow mode I;16)", "PNG", astro, "astronaut-gray", 1.0),
        ("odd/rgb48.png", cv2.imencode(".png", rgb48)[1].tobytes(),
         "16-bit-per-channel RGB PNG written by OpenCV", "PNG", coffee, "coffee", 1.0),
        ("odd/gray.png", _encode(photo(_source("astronaut")).convert("L"), "PNG"),
         "8-bit greyscale PNG", "PNG", astro, "astronaut-gray", 1.0),
        ("odd/bilevel.png", _encode(photo(_source("astronaut")).convert("1"), "PNG"),
         "1-bit (mode '1') dithered PNG", "PNG", astro, None, None),
        ("odd/palette.gif", _encode(photo(_source("astronaut")).quantize(256, method=_FAST), "GIF"),
         "256-colour palette GIF", "GIF", astro, "astronaut", 6.0),
        ("odd/animated.gif", _animated_gif(),
         "3-frame animated GIF; the first frame is the unflipped photo",
         "GIF", chelsea, "chelsea", 6.0),
        (RGBA_PNG, _rgba_png(),
         "RGBA PNG: left 100 columns fully transparent, then an alpha ramp",
         "PNG", chelsea, None, None),
        (PALETTE_TRANSPARENT_PNG, _palette_transparent_png(),
         "palette PNG with a tRNS transparent index (top-left square)",
         "PNG", chelsea, None, None),
        ("odd/photo.webp", _encode(photo(_source("coffee")), "WEBP", quality=85),
         "lossy WebP", "WEBP", coffee, "coffee", 5.0),
        ("odd/animated.webp", _animated_webp(),
         "2-frame animated WebP; the first frame is the unflipped photo",
         "WEBP", coffee, "coffee", 6.0),
        ("odd/photo.tif", _encode(photo(_source("coffee")), "TIFF", **tiff_params),
         "LZW-compressed RGB TIFF", "TIFF", coffee, "coffee", 0.0),
        ("odd/photo.bmp", _encode(photo(_source("chelsea")), "BMP"),
         "24-bit BMP with an odd width (padded rows)", "BMP", chelsea, "chelsea", 0.0),
        ("odd/one_pixel.png", _encode(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG"),
         "1x1 PNG", "PNG", (1, 1), None, None),
        ("odd/png_named.jpg", chelsea_png,
         "PNG content behind a .jpg extension", "PNG", chelsea, "chelsea", 0.0),
        (EXIF_ROTATED, _exif_rotated_jpeg(),
         "JPEG stored 400x600 with EXIF orientation 6; displays as the 600x400 photo",
         "JPEG", coffee, "coffee", 4.0),
        (LARGE_JPEG, _large_jpeg(*LARGE_JPEG_SIZE),
         "8000x6000 (48 MP) JPEG", "JPEG", LARGE_JPEG_SIZE, "coffee", 6.0),
        # ---- names and trees
        ("names/with spaces in the name.jpg", chelsea_jpeg,
         "spaces in the file name", "JPEG", chelsea, "chelsea", 5.0),
        ("names/café ü 写真.jpg", chelsea_jpeg,
         "non-ASCII (accented Latin + CJK) file name", "JPEG", chelsea, "chelsea", 5.0),
        (f"names/{_LONG_NAME}", chelsea_jpeg,
         f"{len(_LONG_NAME)}-character file name", "JPEG", chelsea, "chelsea", 5.0),
        ("names/level1/level2/level3/deep.jpg", chelsea_jpeg,
         "file nested three folders deep", "JPEG", chelsea, "chelsea", 5.0),
        ("names/UPPER CASE.JPEG", chelsea_jpeg,
         "upper-case .JPEG extension", "JPEG", chelsea, "chelsea", 5.0),
        ("names/no_extension", chelsea_jpeg,
         "JPEG bytes with no extension: found by sniffing", "JPEG", chelsea, "chelsea", 5.0),
        ("names/level1/export.dat", chelsea_png,
         "PNG bytes under a non-image extension: found by sniffing", "PNG", chelsea, "chelsea", 0.0),
    ]  # fmt: skip
    for relpath, content, description, fmt, size, source, tolerance in valid:
        add(relpath, content, HostileCase(relpath, "ok", None, description, fmt, size, source, tolerance))

    bad("names/notes.txt", _NOTES, "not an image file (.txt)", "plain-text notes", status="skipped")
    bad("names/level1/.DS_Store", _DS_STORE, "not an image file", "macOS Finder metadata", status="skipped")
    bad(
        "names/__MACOSX/level1/._deep.jpg",
        _APPLE_DOUBLE,
        "not an image file (macOS AppleDouble metadata)",
        "AppleDouble resource fork that macOS zips add next to every photo",
        status="skipped",
    )

    total = sum((root / c.relpath).stat().st_size for c in cases)
    logger.debug("hostile corpus: %d files, %.1f MB under %s", len(cases), total / 1e6, root)
    return cases
