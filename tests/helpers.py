"""Helpers shared by the tests (import these; never import from conftest)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata

from pipeline import schemas as S
from pipeline.core import storage
from pipeline.stages import tables

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NEARDUP_SHARED", ROOT.parent / "shared"))
SHARED_WEIGHTS = SHARED / "weights" / "keras-cache" / "models"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (tests that need ../shared skip without it)")
    return path


def make_config(workdir: Path, **overrides):
    """A test config: defaults plus ``section__key=value`` overrides."""
    from pipeline.config import Config

    base = Config.load(None, [f"workdir={workdir}"])
    return base.with_overrides(**overrides) if overrides else base


# A small real-photo corpus with near-duplicates (fault and incremental tests).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def _jpeg(image: Image.Image, quality: int = 88) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_small_corpus(root: Path) -> dict[str, str]:
    """15 images: 5 photos, each with a resized and a cropped near-duplicate. Returns relpath -> photo."""
    truth = {}
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skdata, name)())
        w, h = photo.size
        variants = {
            f"{name}/original.jpg": photo,
            f"{name}/half_size.jpg": photo.resize((w // 2, h // 2), Image.BILINEAR),
            f"{name}/cropped.jpg": photo.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
        }
        for rel, image in variants.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(_jpeg(image))
            truth[rel] = name
    return truth


def snapshot(spark, config) -> dict[str, list]:
    """Every output of the pipeline as sorted, comparable rows (image bytes as their hash)."""
    wd = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    images = tables.read_table(spark, wd.images, "images").drop(S.CONTENT)
    emb = tables.read_table(spark, wd.embeddings(method), "embeddings")
    out = {
        "images": sorted(tuple(r) for r in images.collect()),
        "embeddings": sorted((r[S.IMAGE_ID], r[S.CONTENT_SHA256], r[S.STATUS], tuple(r[S.EMBEDDING]))
                             for r in emb.collect()),
        "pairs": sorted((r[S.IMAGE_ID_A], r[S.IMAGE_ID_B], round(r[S.SIMILARITY], 4))
                        for r in tables.read_table(spark, wd.pairs(method), "pairs").collect()),
        "groups": sorted(tuple(r) for r in tables.read_table(spark, wd.groups(method), "groups").collect()),
        "idmap": sorted(tuple(r) for r in spark.read.parquet(wd.index_dir(method) + "/idmap").collect()),
    }
    return out
