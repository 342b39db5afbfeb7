"""Incremental dedup equals a full rebuild, and `query` (light and Spark paths) on real images.

One archive from the demo corpus (2 photos with their 10 variants each, 2 unrelated photos) is
deduped with the default re-ranking (DBA k=3, rotated queries 90/270); 6 new images are then
added (variants whose originals are already there, so old images' DBA lists change, a copy
stored sideways, an unrelated photo) plus a corrupt file. The full rebuild it is compared with
reuses the image and embedding tables (same files, same paths): only index and dedup rerun.

Both pair scores are covered: the default (``dedup.score=calibrated``: kNN lists, levels and
scores kept exact) and ``dedup.score=cosine`` on a copy of the first run's workdir (its own
state, from one more dedup). The query tests use the cosine workdir: a query match's threshold
is a cosine.
"""
from __future__ import annotations

import shutil

import pytest
from PIL import Image

from pipeline import schemas as S
from pipeline.core import storage
from pipeline.stages import tables
from tests.helpers import make_config

KEPT = ("astronaut", "chelsea")
NEW = ("astronaut/astronaut_crop.jpg", "astronaut/astronaut_png.png", "chelsea/chelsea_mirror.jpg",
       "chelsea/chelsea_grey.jpg", "unrelated/moon.jpg")
SIDEWAYS = "astronaut/astronaut_sideways.jpg"  # made here: the original turned 90 degrees
DISTRACTORS = ("moon", "coins", "clock")
COSINE = {"dedup__score": "cosine", "dedup__threshold": 0.88}


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
    Image.open(src / "astronaut" / "astronaut.jpg").rotate(90, expand=True).save(dst / SIDEWAYS, "JPEG", quality=92)
    (dst / "unrelated" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


@pytest.fixture(scope="module")
def archives(spark, demo_corpus, tmp_path_factory):
    """(cosine incremental result, full-rebuild tables per score, cosine config, archive folder,
    new-files folder, calibrated incremental result, calibrated config)."""
    from pipeline import api

    corpus, _ = demo_corpus
    base = tmp_path_factory.mktemp("incremental")
    archive = base / "archive"
    _copy_corpus(corpus, archive, skip=NEW)
    config = make_config(base / "work", ingest__input=[str(archive)], progress="never")
    first = api.run(config=config, spark=spark)
    assert first.metrics["dedup_incremental"] == 0
    # The cosine twin: the first run's tables, deduped once more with a cosine threshold.
    shutil.copytree(base / "work", base / "cosine")
    cosine = make_config(base / "cosine", ingest__input=[str(archive)], progress="never", **COSINE)
    assert api.dedup(config=cosine, spark=spark).metrics["dedup_incremental"] == 0
    _add_new(corpus, archive)
    second = api.run(config=config, spark=spark)
    # The cosine twin takes the new images' tables from there (ingest and embed tested above).
    for table in ("images", "embeddings"):
        shutil.rmtree(base / "cosine" / table)
        shutil.copytree(base / "work" / table, base / "cosine" / table)
    second_cosine = api.dedup(config=cosine, spark=spark)
    full = make_config(base / "full", ingest__input=[str(archive)], progress="never", dedup__incremental="never")
    for table in ("images", "embeddings"):
        shutil.copytree(base / "work" / table, base / "full" / table)
    api.index(config=full, spark=spark)
    api.dedup(config=full, spark=spark)
    reference = {"calibrated": (_pairs(spark, full), _groups(spark, full))}
    api.dedup(config=full.with_overrides(**COSINE), spark=spark)
    reference["cosine"] = (_pairs(spark, full), _groups(spark, full))
    # The query inputs: the new files again, in folders of their own, a corrupt file and a text file.
    queries = base / "queries"
    (queries / "more").mkdir(parents=True)
    for rel in NEW + (SIDEWAYS, "unrelated/broken.jpg"):
        shutil.copyfile(archive / rel, queries / ("more" if "chelsea" in rel else "") / rel.replace("/", "__"))
    (queries / "notes.txt").write_text("not an image")
    return second_cosine, reference, cosine, archive, queries, second, config


def _pairs(spark, config):
    wd = storage.Workdir.of(config.workdir)
    rows = tables.read_table(spark, wd.pairs(config.embed.backbone), "pairs").collect()
    return {(r[S.IMAGE_ID_A], r[S.IMAGE_ID_B]): (r[S.SIMILARITY], r["score"]) for r in rows}


def _groups(spark, config):
    wd = storage.Workdir.of(config.workdir)
    return sorted(tuple(r) for r in tables.read_table(spark, wd.groups(config.embed.backbone), "groups").collect())


@pytest.mark.parametrize("score", ["calibrated", "cosine"])
def test_incremental_run_equals_full_rebuild(spark, archives, score):
    second_cosine, reference, cosine, _, _, second_calibrated, calibrated = archives
    second, config = (second_calibrated, calibrated) if score == "calibrated" else (second_cosine, cosine)
    assert second.metrics["dedup_incremental"] == 1
    assert second.metrics["incremental_new_images"] == len(NEW) + 1
    # Old images whose DBA lists took in a new image were re-scored too.
    assert second.metrics["incremental_rescored_images"] > len(NEW) + 1
    if score == "calibrated":
        # Old images' kNN lists took in re-scored images and their levels moved: those images
        # were re-scored too (the lists merged, none recomputed from scratch here).
        assert second.metrics["incremental_lists_changed"] > 0 and second.metrics["incremental_levels_changed"] > 0
    inc, (ref, ref_groups) = _pairs(spark, config), reference[score]
    assert set(inc) == set(ref) and len(ref) > 10
    assert max(abs(inc[p][0] - ref[p][0]) for p in ref) < 1e-4
    if score == "calibrated":
        assert min(ref[p][1] for p in ref) >= 0.9
        assert max(abs(inc[p][1] - ref[p][1]) for p in ref) < 1e-4
    else:
        assert all(ref[p][1] is None and inc[p][1] is None for p in ref)
    assert _groups(spark, config) == ref_groups
    # The sideways copy was found through the rotated queries.
    ids = {r[S.PATH].rsplit("/", 1)[-1]: r[S.IMAGE_ID]
           for r in tables.read_table(spark, storage.Workdir.of(config.workdir).images, "images").collect()}
    assert any(ids["astronaut_sideways.jpg"] in p for p in inc)
    # The index holds every embedded image once.
    idmap = spark.read.parquet(storage.Workdir.of(config.workdir).index_dir("mobilenet") + "/idmap")
    assert idmap.count() == idmap.select(S.IMAGE_ID).distinct().count() == second_calibrated.metrics["embeddings_ok"]


def _query(archives, spark, path, score="cosine"):
    from pipeline import api

    _, _, cosine, _, queries, _, calibrated = archives
    config = calibrated if score == "calibrated" else cosine
    return api.query(input=str(queries), config=config, spark=spark if path == "spark" else None,
                     query__force_path=path)


@pytest.mark.parametrize("score", ["cosine", "calibrated"])
def test_query_light_and_spark_paths_agree(spark, archives, score):
    light = _query(archives, spark, "light", score)
    heavy = _query(archives, spark, "spark", score)
    assert (light.path, heavy.path) == ("light", "spark")
    key = [(r["query_path"], r["query_status"], r["query_error"], r["image_id"], r["path"], r["rank"]) for r in light.rows]
    assert key == [(r["query_path"], r["query_status"], r["query_error"], r["image_id"], r["path"], r["rank"])
                   for r in heavy.rows]
    sims = [(a["similarity"], b["similarity"]) for a, b in zip(light.rows, heavy.rows) if a["similarity"] is not None]
    assert sims and max(abs(a - b) for a, b in sims) < 1e-5
    scores = [(a["score"], b["score"]) for a, b in zip(light.rows, heavy.rows) if a["similarity"] is not None]
    if score == "calibrated":
        # The threshold applies to the calibrated score; a crop finds its own copy, now in the archive.
        assert min(a for a, _ in scores) >= 0.9 and max(abs(a - b) for a, b in scores) < 1e-5
        crop = [r["path"] for r in light.rows if r["query_path"].endswith("astronaut__astronaut_crop.jpg")]
        assert any(p.endswith("/astronaut_crop.jpg") for p in crop)
        return
    assert all(a is None and b is None for a, b in scores)
    # Every input file is accounted for: 7 images, the corrupt one, the text file.
    by_file = {}
    for r in light.rows:
        by_file.setdefault(r["query_path"].rsplit("/", 1)[-1], []).append(r)
    assert len(by_file) == len(NEW) + 3 and light.metrics["query_files"] == len(NEW) + 3
    assert by_file["unrelated__broken.jpg"][0]["query_status"] == "error"
    assert by_file["notes.txt"][0]["query_status"] == "skipped"
    # A crop matches its original (and its own copy, now in the archive), at or above the threshold.
    crop = {r["path"].rsplit("/", 1)[-1]: r["similarity"] for r in by_file["astronaut__astronaut_crop.jpg"]}
    assert crop["astronaut.jpg"] >= 0.88 and crop["astronaut_crop.jpg"] > 0.99
    assert all(r["image_id"] is None for r in by_file["unrelated__broken.jpg"])
    # The table the job wrote is what it returned.
    written = tables.read_table(spark, light.tables["matches"], "matches").count()
    assert written == len(light.rows)


def test_query_cli_light_path_imports_no_spark(archives, tmp_path):
    """`neardup query` on a few files: no PySpark nor TensorFlow in the process, exit 0, the matches printed."""
    import subprocess
    import sys

    _, _, config, _, queries, _, _ = archives
    code = ("import sys; from pipeline import cli; rc = cli.main(['query', '--workdir', sys.argv[1], '--input', "
            "sys.argv[2], '--set', 'progress=never', '--set', 'dedup.score=cosine', '--set', 'dedup.threshold=0.88']); "
            "print('PYSPARK' if any(m.startswith('pyspark') for m in sys.modules) else 'NO-PYSPARK'); "
            "print('TENSORFLOW' if 'tensorflow' in sys.modules else 'NO-TENSORFLOW'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, config.workdir, str(queries / "more")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NO-PYSPARK" in proc.stdout
    # The archive's embed job converted the model for OpenVINO (embed.runtime auto): the light
    # path reads that IR and never pays for importing TensorFlow (seconds of a 15 s budget).
    assert "NO-TENSORFLOW" in proc.stdout
    assert "chelsea.jpg" in proc.stdout and "light path" in proc.stdout
