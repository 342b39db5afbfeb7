"""Each distinct image is embedded once (issue 10): exact copies share one embedding and are
grouped; the rotated views for ``dedup.rotations`` come from the same pass, and find a sideways copy."""
from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from pipeline import api
from pipeline import schemas as S
from pipeline.core import storage
from pipeline.stages import embed as em
from pipeline.stages import tables
from tests.helpers import make_config, shared_path


def test_exact_copies_share_one_embedding_and_one_group(spark, tmp_path):
    data = shared_path("data", "ukbench-dev")
    corpus = tmp_path / "corpus"
    (corpus / "copies").mkdir(parents=True)
    for name in ("ukbench00000.jpg", "ukbench00016.jpg", "ukbench00008.jpg"):
        shutil.copy(data / name, corpus / name)
    for i in range(3):  # three byte-identical copies of one photo, under other names
        shutil.copy(data / "ukbench00000.jpg", corpus / "copies" / f"copy{i}.jpg")
    with Image.open(data / "ukbench00008.jpg") as photo:  # a copy stored sideways
        photo.transpose(Image.Transpose.ROTATE_270).save(corpus / "copies" / "sideways.jpg", quality=90)
    config = make_config(tmp_path / "work", ingest__input=[str(corpus)])
    assert config.dedup.rotations == [0, 90, 270]
    metrics = api.run(config=config).metrics
    assert metrics["embed_exact_copies"] == 3 and metrics["embeddings_ok"] == 7
    # The rotated tables were written by the embed stage's one pass, and the search found them fresh.
    images_table = tables.read_table(spark, storage.Workdir.of(config.workdir).images, "images")
    for rotation in (90, 270):
        _, target = em.rotated_table(config, rotation)
        assert storage.read_metadata(target) == em.rotated_meta(config, rotation, images_table)
        assert tables.read_table(spark, target, "rotated").count() == 7

    wd = storage.Workdir.of(config.workdir)
    images = {r[S.IMAGE_ID]: r[S.PATH] for r in tables.read_table(spark, wd.images, "images").collect()}
    rows = tables.read_table(spark, wd.embeddings("mobilenet"), "embeddings").collect()
    vectors = {images[r[S.IMAGE_ID]].split("/corpus/")[1]: np.asarray(r[S.EMBEDDING]) for r in rows}
    original = vectors["ukbench00000.jpg"]
    for i in range(3):
        assert np.array_equal(vectors[f"copies/copy{i}.jpg"], original)
    assert not np.array_equal(vectors["ukbench00016.jpg"], original)

    pairs = tables.read_table(spark, wd.pairs("mobilenet"), "pairs").collect()
    copy_ids = {i for i, p in images.items() if "/copy" in p or p.endswith("ukbench00000.jpg")}
    between = [p for p in pairs if {p[S.IMAGE_ID_A], p[S.IMAGE_ID_B]} <= copy_ids]
    assert len(between) >= 3 and all(p[S.SIMILARITY] >= 0.9999 for p in between)
    groups = tables.read_table(spark, wd.groups("mobilenet"), "groups").collect()
    group_of = {r[S.IMAGE_ID]: r[S.GROUP_ID] for r in groups}
    assert len({group_of[i] for i in copy_ids}) == 1
    by_path = {p.split("/corpus/")[1]: i for i, p in images.items()}
    assert group_of.get(by_path["copies/sideways.jpg"]) == group_of.get(by_path["ukbench00008.jpg"]) is not None


def test_concurrent_digests_of_one_image_table_run_its_job_once(spark, tmp_path):
    """The rotated tables are written from concurrent threads, each asking for the image
    table's digest: one Spark job computes it, the others wait for it instead of racing."""
    from concurrent.futures import ThreadPoolExecutor

    path = str(tmp_path / "images")
    spark.createDataFrame([(f"id{i}", f"{i:064x}", S.STATUS_OK) for i in range(40)],
                          f"{S.IMAGE_ID} string, {S.CONTENT_SHA256} string, {S.STATUS} string").write.parquet(path)
    images = spark.read.parquet(path)
    tracker = spark.sparkContext.statusTracker()

    def digests(group: str, threads: int) -> list:
        em._DIGESTS.clear()

        def one(_):
            spark.sparkContext.setJobGroup(group, "digest")
            return em._ok_digest(images)

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, range(threads)))

    alone = digests("digest-alone", 1)
    together = digests("digest-together", 4)
    assert together == alone * 4 and alone[0][0] == 40
    jobs_alone = len(tracker.getJobIdsForGroup("digest-alone"))
    assert jobs_alone >= 1 and len(tracker.getJobIdsForGroup("digest-together")) == jobs_alone


def test_image_counts_give_the_digest_without_another_job(spark, tmp_path):
    """The embed stage counts the image table once; the rotated tables' digest comes from that job."""
    path = str(tmp_path / "images")
    rows = [(f"id{i}", f"{i % 7:064x}", S.STATUS_OK) for i in range(30)]  # 7 distinct contents
    rows += [(f"bad{i}", None, S.STATUS_ERROR) for i in range(4)]
    spark.createDataFrame(rows, f"{S.IMAGE_ID} string, {S.CONTENT_SHA256} string, {S.STATUS} string").write.parquet(path)
    images = spark.read.parquet(path)
    tracker = spark.sparkContext.statusTracker()
    em._DIGESTS.clear()
    assert em.image_counts(images) == em.ImageCounts(rows=34, ok=30, distinct_ok=7)
    spark.sparkContext.setJobGroup("digest-after-counts", "digest")
    seeded = em._ok_digest(images)
    assert tracker.getJobIdsForGroup("digest-after-counts") == []
    em._DIGESTS.clear()
    spark.sparkContext.setJobGroup("digest-alone", "digest")
    assert em._ok_digest(images) == seeded and seeded[0] == 30
    assert tracker.getJobIdsForGroup("digest-alone")
