"""Near-duplicate edits of a PIL image, the kinds seen in real archives: crop, rescale, JPEG
re-encode, brightness and colour shifts, small rotation, mirror, text overlay, greyscale.

The demo corpus applies them once per photo (:mod:`pipeline.demo`); the projection-head
training draws them at random as self-supervised views (:mod:`pipeline.train.cnn`).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps


def crop(im: Image.Image) -> Image.Image:
    w, h = im.size
    return im.crop((int(w * 0.1), int(h * 0.08), int(w * 0.92), int(h * 0.9)))


def rescale(im: Image.Image) -> Image.Image:
    return im.resize((im.width // 2, im.height // 2), Image.LANCZOS)


def jpeg(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=25)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def brighter(im: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(im).enhance(1.35)


def colour_shift(im: Image.Image) -> Image.Image:
    a = np.asarray(im).astype(np.int16)
    a = a + np.array([25, -10, -20], dtype=np.int16)
    return ImageEnhance.Color(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))).enhance(1.4)


def rotate(im: Image.Image) -> Image.Image:
    return im.rotate(7, resample=Image.BICUBIC, expand=False, fillcolor=(255, 255, 255))


def mirror(im: Image.Image) -> Image.Image:
    return ImageOps.mirror(im)


def text_overlay(im: Image.Image) -> Image.Image:
    out = im.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    draw.rectangle((0, int(h * 0.85), w, h), fill=(0, 0, 0))
    draw.text((10, int(h * 0.87)), "(c) neardup demo 2026 - sample watermark", fill=(255, 255, 255))
    return out


def greyscale(im: Image.Image) -> Image.Image:
    return ImageOps.grayscale(im).convert("RGB")
