"""Incremental dedup equals a full rebuild, and `query` (light and Spark paths) on real images.

One archive from the demo corpus (3 photos with their 10 variants each, 4 unrelated photos) is
deduped with the default re-ranking (DBA k=3, rotated queries 90/270); 9 new images are then
added (variants whose originals are already there, so old images' DBA lists change, a copy
stored sideways, unrelated photos) plus a corrupt file. Workdirs are shared by the tests.
"""
from __future__ import annotations

import shutil

import pytest
from PIL import Image

from pipeline import schemas as S
from pipeline.core import storage
from pipeline.stages import tables
from tests.helpers import make_config

KEPT = ("astronaut", "chelsea", "coffee")
NEW = ("astronaut/astronaut_crop.jpg", "astronaut/astronaut_half.jpg", "astronaut/astronaut_png.png",
       "chelsea/chelsea_mirror.jpg", "chelsea/chelsea_grey.jpg", "chelsea/chelsea_text.jpg",
       "unrelated/moon.jpg", "unrelated/coins.jpg")
SIDEWAYS = "coffee/coffee_sideways.jpg"  # made here: the original turned 90 degrees
DISTRACTORS = ("moon", "coins", "clock", "page", "brick", "gravel")


def _copy_corpus(src, dst, skip=()):
    for name in KEPT:
        (dst / name).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / name).iterdir()):
            if f"{name}/{f.name}" not in skip:
                shutil.copyfile(f, dst / name / f.name)
    (dst / "unrelated").mkdir(parents=True, exist_ok=True)
    for name in DISTRACTORS:
        if f"unrelated/{name}.jpg" not in skip:
            shutil.copyfile(src / "unrelated" / f"{name}.jpg", dst / "unrelated" / f"{name}.jpg")


def _add_new(src, dst):
    for rel in NEW:
        shutil.copyfile(src / rel, dst / rel)
    Image.open(src / "coffee" / "coffee.jpg").rotate(90, expand=True).save(dst / SIDEWAYS, "JPEG", quality=92)
    (dst / "unrelated" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


@pytest.fixture(scope="module")
def archives(spark, demo_corpus, tmp_path_factory):
    """(incremental result, full-rebuild config, incremental config, archive folder, new-files folder)."""
    from pipeline import api

    corpus, _ = demo_corpus
    base = tmp_path_factory.mktemp("incremental")
    archive = base / "archive"
    _copy_corpus(corpus, archive, skip=NEW)
    config = make_config(base / "work", ingest__input=[str(archive)], progress="never")
    first = api.run(config=config, spark=spark)
    assert first.metrics["dedup_incremental"] == 0
    _add_new(corpus, archive)
    second = api.run(config=config, spark=spark)
    full = make_config(base / "full", ingest__input=[str(archive)], progress="never", dedup__incremental="never")
    api.run(config=full, spark=spark)
    # The query inputs: the new files again, in a folder of their own, with one unreadable file.
    queries = base / "queries"
    queries.mkdir()
    for rel in NEW + (SIDEWAYS, "unrelated/broken.jpg"):
        shutil.copyfile(archive / rel, queries / rel.replace("/", "__"))
    return second, full, config, archive, queries


def _pairs(spark, config):
    wd = storage.Workdir.of(config.workdir)
    rows = tables.read_table(spark, wd.pairs(config.embed.backbone), "pairs").collect()
    return {(r[S.IMAGE_ID_A], r[S.IMAGE_ID_B]): r[S.SIMILARITY] for r in rows}


def _groups(spark, config):
    wd = storage.Workdir.of(config.workdir)
    return sorted(tuple(r) for r in tables.read_table(spark, wd.groups(config.embed.backbone), "groups").collect())


def test_incremental_run_equals_full_rebuild(spark, archives):
    second, full, config, _, _ = archives
    assert second.metrics["dedup_incremental"] == 1
    assert second.metrics["incremental_new_images"] == 9
    # Old images whose DBA lists took in a new image were re-scored too.
    assert second.metrics["incremental_rescored_images"] > 9
    inc, ref = _pairs(spark, config), _pairs(spark, full)
    assert set(inc) == set(ref)
    assert max(abs(inc[p] - ref[p]) for p in ref) < 1e-4
    assert _groups(spark, config) == _groups(spark, full)
    # The sideways copy was found through the rotated queries.
    ids = {r[S.PATH].rsplit("/", 1)[-1]: r[S.IMAGE_ID]
           for r in tables.read_table(spark, storage.Workdir.of(config.workdir).images, "images").collect()}
    assert any(ids["coffee_sideways.jpg"] in p for p in inc)
    # The index holds every embedded image once.
    idmap = spark.read.parquet(storage.Workdir.of(config.workdir).index_dir("mobilenet") + "/idmap")
    assert idmap.count() == idmap.select(S.IMAGE_ID).distinct().count() == second.metrics["embeddings_ok"]
