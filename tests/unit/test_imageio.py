"""Tests of pipeline.core.imageio on a generated hostile archive and on real photos from ../shared."""

from __future__ import annotations

import io
import math
import os
import pathlib
import struct
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from tests.hostile_corpus import (
    BOMB_PNG_SIZE,
    EXIF_ROTATED,
    LARGE_JPEG,
    LARGE_JPEG_SIZE,
    PALETTE_TRANSPARENT_PNG,
    RGBA_PNG,
    TRANSPARENT_COLUMNS,
    TRANSPARENT_SQUARE,
    HostileCase,
    make_hostile_corpus,
    reference_rgb,
)
from pipeline.core.imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageDecodeError, Probe, decode_rgb, probe

# Same override as conftest.py, so CI can point at a relocated shared/.
SHARED = pathlib.Path(os.environ.get("NEARDUP_SHARED", pathlib.Path(__file__).resolve().parents[2].parent / "shared"))
HOLIDAYS_FULLRES = SHARED / "data" / "holidays-fullres"

# Generous wall-clock bounds: the point is "no full-size allocation", which is
# orders of magnitude slower, not micro-benchmarking a loaded 2-core CI box.
BOMB_SECONDS = 0.5
LARGE_JPEG_SECONDS = 1.5


class Corpus:
    def __init__(self, root: pathlib.Path, cases: list[HostileCase]) -> None:
        self.root = root
        self.cases = cases
        self.by_path = {c.relpath: c for c in cases}

    def read(self, relpath: str) -> bytes:
        return (self.root / relpath).read_bytes()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("hostile")
    return Corpus(root, make_hostile_corpus(root))


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _compare_to_source(im: Image.Image, source: str) -> float:
    ref = reference_rgb(source)
    size = (ref.shape[1], ref.shape[0])
    if im.size != size:
        im = im.resize(size, Image.Resampling.BILINEAR)
    return _mean_abs_diff(np.asarray(im), ref)


def _jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Splice an EXIF APP1 carrying ``orientation`` right after SOI, losslessly.

    Readers take the first EXIF APP1, so this overrides any tag the file had.
    """
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()  # starts with b"Exif\\0\\0"
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


# --------------------------------------------------------------------------- corpus


def test_corpus_is_modest_and_covers_every_status(corpus: Corpus) -> None:
    total = sum((corpus.root / c.relpath).stat().st_size for c in corpus.cases)
    assert total < 20_000_000
    assert len(corpus.by_path) == len(corpus.cases), "duplicate relpaths"
    assert {c.expected_status for c in corpus.cases} == {"ok", "error", "skipped"}
    for case in corpus.cases:
        if case.expected_status == "ok":
            assert case.expected_format and case.expected_size, case.relpath
        else:
            assert case.reason_contains, case.relpath


def test_probe_reports_expected_status_and_reason_for_every_case(corpus: Corpus) -> None:
    failures = []
    for case in corpus.cases:
        path = corpus.root / case.relpath
        result = probe(path.read_bytes(), str(path))
        if result.status != case.expected_status:
            failures.append(
                f"{case.relpath}: status {result.status!r} ({result.error}), want {case.expected_status!r}"
            )
            continue
        if case.expected_status == "ok":
            if result.error is not None:
                failures.append(f"{case.relpath}: ok with error {result.error!r}")
            if result.format != case.expected_format:
                failures.append(f"{case.relpath}: format {result.format}, want {case.expected_format}")
            if (result.width, result.height) != case.expected_size:
                got = (result.width, result.height)
                failures.append(f"{case.relpath}: size {got}, want {case.expected_size}")
        else:
            assert case.reason_contains is not None
            if result.error is None or case.reason_contains not in result.error:
                failures.append(f"{case.relpath}: reason {result.error!r}, want {case.reason_contains!r}")
            if (result.width, result.height) != (None, None):
                failures.append(f"{case.relpath}: non-ok probe carries a size")
    assert not failures, "\n".join(failures)


def test_decode_rgb_gives_displayed_rgb_for_every_ok_case(corpus: Corpus) -> None:
    failures = []
    for case in corpus.cases:
        if case.expected_status != "ok":
            continue
        min_size = (224, 224) if case.relpath == LARGE_JPEG else None
        im = decode_rgb(corpus.read(case.relpath), min_size=min_size)
        if im.mode != "RGB":
            failures.append(f"{case.relpath}: mode {im.mode}")
        if min_size is None and im.size != case.expected_size:
            failures.append(f"{case.relpath}: size {im.size}, want {case.expected_size}")
        if case.source is not None:
            assert case.pixel_tolerance is not None
            diff = _compare_to_source(im, case.source)
            if diff > case.pixel_tolerance:
                failures.append(f"{case.relpath}: mean abs diff {diff:.2f} > {case.pixel_tolerance}")
    assert not failures, "\n".join(failures)


def test_decode_rgb_raises_the_probe_reason_for_every_error_case(corpus: Corpus) -> None:
    for case in corpus.cases:
        if case.expected_status != "error":
            continue
        content = corpus.read(case.relpath)
        with pytest.raises(ImageDecodeError) as info:
            decode_rgb(content, min_size=(224, 224))
        assert isinstance(info.value, ValueError)
        assert info.value.reason == probe(content, case.relpath).error, case.relpath


# --------------------------------------------------------------------------- orientation


def test_exif_rotated_jpeg_displays_as_the_original(corpus: Corpus) -> None:
    content = corpus.read(EXIF_ROTATED)
    stored = Image.open(io.BytesIO(content))
    assert stored.size == (400, 600) and stored.getexif()[0x0112] == 6, "corpus no longer stores it rotated"

    assert probe(content, EXIF_ROTATED) == Probe("ok", None, "JPEG", 600, 400)
    im = decode_rgb(content)
    assert im.size == (600, 400)
    original = reference_rgb("coffee")
    assert _mean_abs_diff(np.asarray(im), original) < 4.0
    # Guard against a vacuous pass: the other 90-degree turn must look different.
    wrong = np.asarray(im.transpose(Image.Transpose.ROTATE_180))
    assert _mean_abs_diff(wrong, original) > 20.0


def test_draft_size_accounts_for_rotation(corpus: Corpus) -> None:
    content = corpus.read(EXIF_ROTATED)  # stored 400x600, displayed 600x400
    # Tall request: drafting the stored raster with unswapped (50, 300) would pick
    # 1/2 scale and return a 300x200 image, too short for a 300-pixel height.
    tall = decode_rgb(content, min_size=(50, 300))
    assert tall.width >= 50 and tall.height >= 300
    # Wide request: the swap lets the decode shrink to 1/2 while staying wide enough.
    wide = decode_rgb(content, min_size=(300, 50))
    assert wide.size == (300, 200)


# --------------------------------------------------------------------------- modes


def test_rgba_is_composited_on_white(corpus: Corpus) -> None:
    im = np.asarray(decode_rgb(corpus.read(RGBA_PNG)))
    original = reference_rgb("chelsea")
    assert (im[:, :TRANSPARENT_COLUMNS] == 255).all()
    assert np.array_equal(im[:, 2 * TRANSPARENT_COLUMNS :], original[:, 2 * TRANSPARENT_COLUMNS :])
    ramp = np.linspace(0, 255, TRANSPARENT_COLUMNS).astype(np.uint8).astype(np.float64) / 255.0
    expected = ramp[None, :, None] * original[:, TRANSPARENT_COLUMNS : 2 * TRANSPARENT_COLUMNS] + (
        1.0 - ramp[None, :, None]
    ) * 255.0
    assert np.abs(im[:, TRANSPARENT_COLUMNS : 2 * TRANSPARENT_COLUMNS] - expected).max() <= 2.0


def test_palette_transparency_is_composited_on_white(corpus: Corpus) -> None:
    raw = Image.open(io.BytesIO(corpus.read(PALETTE_TRANSPARENT_PNG)))
    assert raw.mode == "P" and "transparency" in raw.info
    im = np.asarray(decode_rgb(corpus.read(PALETTE_TRANSPARENT_PNG)))
    assert (im[:TRANSPARENT_SQUARE, :TRANSPARENT_SQUARE] == 255).all()
    assert _mean_abs_diff(im[TRANSPARENT_SQUARE:], reference_rgb("chelsea")[TRANSPARENT_SQUARE:]) < 6.0


@pytest.mark.parametrize("relpath", ["odd/cmyk.jpg", "odd/ycck.jpg"])
def test_cmyk_and_ycck_convert_to_plausible_colours(corpus: Corpus, relpath: str) -> None:
    content = corpus.read(relpath)
    raw = Image.open(io.BytesIO(content))
    assert raw.mode == "CMYK"
    assert raw.info.get("adobe_transform") == (2 if "ycck" in relpath else 0)
    im = np.asarray(decode_rgb(content)).astype(np.float64)
    original = reference_rgb("astronaut").astype(np.float64)
    for channel in range(3):
        assert abs(im[..., channel].mean() - original[..., channel].mean()) < 3.0
        assert np.corrcoef(im[..., channel].ravel(), original[..., channel].ravel())[0, 1] > 0.98


def test_sixteen_bit_grey_is_scaled_not_clipped(corpus: Corpus) -> None:
    content = corpus.read("odd/gray16.png")
    assert Image.open(io.BytesIO(content)).mode.startswith("I")
    im = np.asarray(decode_rgb(content))
    gray = reference_rgb("astronaut-gray")
    # Pillow's plain convert("RGB") clips 16-bit values at 255: mean ~227 here.
    assert abs(im.mean() - gray.mean()) < 1.0


def test_animated_images_yield_their_first_frame(corpus: Corpus) -> None:
    gif = np.asarray(decode_rgb(corpus.read("odd/animated.gif")))
    chelsea = reference_rgb("chelsea")
    assert _mean_abs_diff(gif, chelsea) < 6.0
    assert _mean_abs_diff(gif, chelsea[:, ::-1]) > 3 * _mean_abs_diff(gif, chelsea)
    webp = np.asarray(decode_rgb(corpus.read("odd/animated.webp")))
    coffee = reference_rgb("coffee")
    assert _mean_abs_diff(webp, coffee) < 6.0
    assert _mean_abs_diff(webp, coffee[:, ::-1]) > 3 * _mean_abs_diff(webp, coffee)


def test_plain_rgb_jpeg_skips_convert_and_transpose() -> None:
    # Hot path: no convert()/transpose() copy means the decoder's own image object
    # comes back, already loaded.
    im = decode_rgb(_jpeg_bytes(reference_rgb("chelsea")), min_size=(224, 224))
    assert type(im).__name__ == "JpegImageFile"
    assert im.mode == "RGB" and im.size == (451, 300)


# --------------------------------------------------------------------------- limits


def test_bomb_is_rejected_from_the_header(corpus: Corpus) -> None:
    content = corpus.read("bombs/bomb_100000x100000.png")
    assert len(content) < 1000
    want = f"exceeds max_pixels {DEFAULT_MAX_PIXELS} ({BOMB_PNG_SIZE[0]}x{BOMB_PNG_SIZE[1]})"
    start = time.perf_counter()
    result = probe(content, "bomb.png")
    with pytest.raises(ImageDecodeError, match=r"exceeds max_pixels"):
        decode_rgb(content)
    elapsed = time.perf_counter() - start
    assert result.status == "error" and result.error == want and result.format == "PNG"
    # Allocating the declared 10 GB raster would take seconds or die with MemoryError.
    assert elapsed < BOMB_SECONDS


def test_max_pixels_is_a_per_call_limit() -> None:
    content = _jpeg_bytes(reference_rgb("astronaut"))
    assert probe(content, "a.jpg", max_pixels=512 * 512).status == "ok"
    small = probe(content, "a.jpg", max_pixels=512 * 512 - 1)
    assert small.status == "error" and small.error == "exceeds max_pixels 262143 (512x512)"
    with pytest.raises(ImageDecodeError, match=r"^exceeds max_pixels 262143 \(512x512\)$"):
        decode_rgb(content, max_pixels=512 * 512 - 1)


def test_pillow_globals_are_honoured_without_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    jpeg = _jpeg_bytes(reference_rgb("astronaut"))
    png = _png_bytes(reference_rgb("astronaut"))
    # 512x512 = 262144 px lies in Pillow's warning band (MAX, 2*MAX]: Image.open
    # would emit DecompressionBombWarning; this module must not.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for content, name in ((jpeg, "a.jpg"), (png, "a.png")):
            assert probe(content, name).status == "ok"
            assert decode_rgb(content).size == (512, 512)
    # An application that lowered Pillow's limit still gets it enforced.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    assert probe(png, "a.png").error == "exceeds max_pixels 200000 (512x512)"


def test_pillow_globals_are_left_untouched(corpus: Corpus) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for case in corpus.cases:
        probe(corpus.read(case.relpath), case.relpath)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_large_jpeg_decodes_reduced_and_fast(corpus: Corpus) -> None:
    content = corpus.read(LARGE_JPEG)
    start = time.perf_counter()
    result = probe(content, LARGE_JPEG)
    im = decode_rgb(content, min_size=(224, 224))
    elapsed = time.perf_counter() - start
    assert result == Probe("ok", None, "JPEG", *LARGE_JPEG_SIZE)
    assert im.mode == "RGB" and min(im.size) >= 224
    # 1/8 DCT scaling: 1000x750 instead of 8000x6000 (a 64x smaller raster).
    assert im.width <= LARGE_JPEG_SIZE[0] // 4 and im.height <= LARGE_JPEG_SIZE[1] // 4
    assert im.size == (1000, 750)
    assert elapsed < LARGE_JPEG_SECONDS


# --------------------------------------------------------------------------- robustness


def test_probe_policy_edges() -> None:
    png = _png_bytes(reference_rgb("chelsea"))
    assert probe(None, "lost.jpg") == Probe("error", "unreadable file", None, None, None)
    assert probe(b"", "empty.txt").status == "skipped"
    assert probe(b"hello", "README").error == "not an image file (no extension)"
    assert probe(png, "export.DAT") == Probe("ok", None, "PNG", 451, 300)
    assert probe(b"BMW 320d service log\n2019-06-01 oil change\n", "car.txt").status == "skipped"
    assert probe(b"BMW 320d service log\n2019-06-01 oil change\n", "car.bmp").error == (
        "not an image: looks like HTML/text"
    )
    assert probe(png[:5], "cut.png").error.startswith("corrupt or truncated PNG header")
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"
    assert probe(heic, "IMG_0001.HEIC").error == "unsupported image format (HEIF)"
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_rgb(b"")


# Pillow warns (UserWarning) about the damaged TIFF/EXIF tags this test creates on
# purpose; what matters here is that probe returns instead of raising.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")
def test_probe_never_raises_on_cut_or_damaged_files(corpus: Corpus) -> None:
    rng = np.random.default_rng(7)
    samples = ("odd/progressive.jpg", "odd/photo.webp", "odd/animated.gif", "odd/photo.tif", "odd/cmyk.jpg")
    for relpath in samples:
        content = corpus.read(relpath)
        for cut in np.linspace(1, len(content) - 1, 9).astype(int):
            result = probe(content[:cut], relpath)
            assert result.status in ("ok", "error"), (relpath, cut)
        for _ in range(5):
            damaged = np.frombuffer(content, np.uint8).copy()
            damaged[rng.integers(0, len(damaged), size=20)] = rng.integers(0, 256, size=20)
            result = probe(damaged.tobytes(), relpath)
            assert result.status in ("ok", "error"), relpath
    # Truncation must be *detected* for the formats the spec names.
    for relpath in ("odd/progressive.jpg", "odd/cmyk.jpg", "odd/gray16.png"):
        content = corpus.read(relpath)
        fmt = "JPEG" if relpath.endswith(".jpg") else "PNG"
        assert probe(content[: len(content) * 3 // 4], relpath).error == f"truncated {fmt}", relpath


def test_decode_is_thread_safe(corpus: Corpus) -> None:
    names = [c.relpath for c in corpus.cases if c.expected_status == "ok" and c.relpath != LARGE_JPEG]
    contents = [corpus.read(n) for n in names]
    serial = [np.asarray(decode_rgb(c, min_size=(64, 64))) for c in contents]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda c: np.asarray(decode_rgb(c, min_size=(64, 64))), contents))
    for name, a, b in zip(names, serial, threaded):
        assert np.array_equal(a, b), name


def test_image_extensions_are_normalised() -> None:
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    assert {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"} <= IMAGE_EXTENSIONS
    assert ".txt" not in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- real photos


def _holidays_photos() -> list[pathlib.Path]:
    if not HOLIDAYS_FULLRES.is_dir():
        pytest.skip("../shared/data/holidays-fullres is absent")
    photos = sorted(HOLIDAYS_FULLRES.glob("*.jpg"))
    assert photos, "holidays-fullres holds no JPEGs"
    return photos


def _displayed_size_per_pillow(path: pathlib.Path) -> tuple[tuple[int, int], int]:
    with Image.open(path) as im:
        orientation = int(im.getexif().get(0x0112, 1) or 1)
        w, h = im.size
    return ((h, w) if orientation in (5, 6, 7, 8) else (w, h)), orientation


def test_real_photos_probe_and_decode_in_displayed_orientation() -> None:
    """Holidays originals: several are portrait, rotated in the pixel data. As
    shipped none carries an EXIF orientation other than 1 (checked with Pillow),
    so the tag path is exercised on the same photos by the injection test below."""
    for path in _holidays_photos():
        content = path.read_bytes()
        displayed, _ = _displayed_size_per_pillow(path)
        result = probe(content, str(path))
        assert result.status == "ok", (path.name, result.error)
        assert (result.width, result.height) == displayed, path.name

        im = decode_rgb(content, min_size=(224, 224))
        assert im.mode == "RGB" and min(im.size) >= 224, path.name
        # A 2**k DCT reduction of the displayed size; multi-megapixel photos must shrink.
        reduced = {(math.ceil(displayed[0] / s), math.ceil(displayed[1] / s)) for s in (2, 4, 8)}
        assert im.size in reduced, (path.name, im.size, displayed)

        # Same pixels as Pillow's own reduced decode + exif_transpose.
        with Image.open(path) as ref:
            ref.draft("RGB", (224, 224))
            ref_rgb = ImageOps.exif_transpose(ref).convert("RGB")
        assert np.array_equal(np.asarray(im), np.asarray(ref_rgb)), path.name


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_real_photo_with_injected_orientation(orientation: int) -> None:
    path = min(_holidays_photos(), key=lambda p: p.stat().st_size)
    plain = path.read_bytes()
    tagged = _with_orientation(plain, orientation)
    with Image.open(io.BytesIO(tagged)) as check:
        assert check.getexif().get(0x0112) == orientation, "splice did not take effect"

    stored = probe(plain, path.name)
    rotated = probe(tagged, path.name)
    swap = orientation in (6, 8)
    assert (rotated.width, rotated.height) == (
        (stored.height, stored.width) if swap else (stored.width, stored.height)
    )
    turn = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}
    reference = decode_rgb(plain, min_size=(224, 224)).transpose(turn[orientation])
    im = decode_rgb(tagged, min_size=(224, 224))
    assert im.size == reference.size
    assert np.array_equal(np.asarray(im), np.asarray(reference))


def test_a_file_not_stored_is_read_from_its_path_and_checked_against_its_hash(tmp_path) -> None:
    import hashlib

    from pipeline.core.image_source import StoredFile, sources

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG")
    path = tmp_path / "a.jpg"
    path.write_bytes(buf.getvalue())
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    stored, from_path, unread = sources([b"xx", None, None], ["x.jpg", str(path), None], ["h", sha, None])
    assert stored == b"xx" and from_path == StoredFile(str(path), sha) and unread is None
    assert decode_rgb(from_path).size == (40, 30)
    # Replaced after ingest: an error with the reason, not a different image under the old hash.
    Image.new("RGB", (41, 30), (0, 0, 200)).save(path, "JPEG")
    with pytest.raises(ImageDecodeError, match="changed since ingest"):
        decode_rgb(from_path)
    path.unlink()
    with pytest.raises(ImageDecodeError, match="unreadable file: No such file"):
        decode_rgb(from_path)


def test_a_complete_jpeg_is_probed_from_its_header_and_a_cut_one_still_decoded(corpus: Corpus) -> None:
    from pipeline.core.imageio import _jpeg_is_complete

    content = corpus.read("odd/progressive.jpg")
    assert _jpeg_is_complete(content) and _jpeg_is_complete(content + b"\x00" * 10)
    assert not _jpeg_is_complete(content[:-10])
    header = probe(content, "p.jpg")
    assert header.status == "ok" and (header.width, header.height) == decode_rgb(content).size
    # Cut, it no longer ends with EOI: the entropy-coded data is decoded and the cut reported.
    assert probe(content[: len(content) - 10], "p.jpg").error == "truncated JPEG"
