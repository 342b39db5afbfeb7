"""A small table's dedup runs on the driver (pipeline.core.pairs); a large one's in Spark.
Both must write the same tables: the same pairs and scores, lists, groups and keepers, the
incremental state made from them, the same metadata and counts. Checked on a real run
(rotated views and DBA on, as by default), with the person's decisions, and with raw cosines."""
from __future__ import annotations

import shutil

import pytest

from pipeline import api
from pipeline.core import storage
from pipeline.stages import dedup as dd
from pipeline.stages import tables
from tests.helpers import make_config, make_small_corpus


@pytest.fixture(scope="module")
def embedded(spark, tmp_path_factory):
    """A run's image table, embeddings and index: 15 photos and variants plus an exact copy,
    one sideways copy and a PNG re-encode (keep policy ties), under two folders."""
    from PIL import Image

    base = tmp_path_factory.mktemp("driver-dedup")
    corpus = base / "corpus"
    make_small_corpus(corpus / "a")
    shutil.copytree(corpus / "a" / "coffee", corpus / "b" / "coffee")
    Image.open(corpus / "a" / "rocket" / "original.jpg").rotate(90, expand=True).save(corpus / "b" / "rocket_side.jpg")
    Image.open(corpus / "a" / "chelsea" / "original.jpg").save(corpus / "b" / "chelsea.png")
    config = make_config(base / "work", ingest__input=[str(corpus)], progress="never")
    return api.run(config=config, spark=spark).config, corpus


def _tables(spark, config) -> dict:
    wd = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    out = {}
    for name, uri in (("pairs", wd.pairs(method)), ("groups", wd.groups(method)), ("lists", wd.neighbors(method)),
                      ("state", wd.incremental(method))):
        if not tables.is_committed(spark, uri):
            continue
        frame = tables.read_table(spark, uri, name)
        rows = sorted(tuple(r) for r in frame.collect())
        out[name] = (frame.schema, rows, storage.read_metadata(uri))
    return out


def _dedup_and_state(spark, config, driver_max_images: int) -> tuple[dict, dict]:
    """The dedup, then the incremental state written from it (as a run does)."""
    from pipeline.stages import incremental

    config = config.with_overrides(dedup__driver_max_images=driver_max_images)
    counts = dd.dedup(spark, config)
    threshold = storage.read_metadata(storage.Workdir.of(config.workdir).pairs(config.embed.backbone))["threshold"]
    incremental.write_state(spark, config, threshold)
    return counts, _tables(spark, config)


def _both_paths(spark, config) -> tuple[tuple, tuple]:
    return _dedup_and_state(spark, config, 0), _dedup_and_state(spark, config, 20_000)


def _assert_same(in_spark: dict, on_driver: dict) -> None:
    assert in_spark.keys() == on_driver.keys()
    for name in in_spark:
        (schema_s, rows_s, meta_s), (schema_d, rows_d, meta_d) = in_spark[name], on_driver[name]
        assert schema_d == schema_s, name
        assert meta_d == meta_s, name
        assert len(rows_d) == len(rows_s), name
        for rs, rd in zip(rows_s, rows_d):
            for vs, vd in zip(rs, rd):
                if isinstance(vs, float) or (isinstance(vs, list) and vs and isinstance(vs[0], float)):
                    assert vd == pytest.approx(vs, abs=1e-6), (name, rs[0], rd[0])
                else:
                    assert vd == vs, (name, rs[0], rd[0])


def test_calibrated_dedup_is_the_same_on_the_driver(spark, embedded):
    config, _ = embedded
    (spark_counts, in_spark), (driver_counts, on_driver) = _both_paths(spark, config)
    assert driver_counts == spark_counts
    assert {"pairs", "groups", "lists", "state"} <= on_driver.keys()
    _assert_same(in_spark, on_driver)
    pairs = on_driver["pairs"][1]
    assert pairs and all(r[3] is not None and r[3] >= config.dedup.threshold for r in pairs)
    # The sideways copy is found (the rotated views reach the driver path through the search).
    groups = on_driver["groups"][1]
    assert spark_counts["groups"] >= 5 and sum(1 for r in groups if r[3]) == spark_counts["groups"]


def test_decisions_and_keep_folders_are_the_same_on_the_driver(spark, embedded, tmp_path):
    config, corpus = embedded
    declared = tmp_path / "not_duplicates.csv"
    declared.write_text(f"path_a,path_b\n{corpus / 'a' / 'coffee' / 'original.jpg'},"
                        f"{corpus / 'b' / 'coffee' / 'original.jpg'}\n"
                        f"{corpus / 'a' / 'astronaut' / 'original.jpg'},{corpus / 'nowhere.jpg'}\n")
    for keep in ("pixels", "largest", "oldest", "newest"):
        decided = config.with_overrides(dedup__not_duplicates=str(declared), dedup__keep=keep,
                                        dedup__keep_folders=[str(corpus / "b")])
        (spark_counts, in_spark), (driver_counts, on_driver) = _both_paths(spark, decided)
        assert driver_counts == spark_counts, keep
        assert spark_counts["groups_split_by_not_duplicates"] == 1 and spark_counts["not_duplicates_unmatched"] == 1
        _assert_same(in_spark, on_driver)


def test_cosine_scores_are_the_same_on_the_driver(spark, embedded):
    config, _ = embedded
    cosine = config.with_overrides(dedup__score="cosine", dedup__threshold=0.85)
    (spark_counts, in_spark), (driver_counts, on_driver) = _both_paths(spark, cosine)
    assert driver_counts == spark_counts
    _assert_same(in_spark, on_driver)
    assert all(r[3] is None for r in on_driver["pairs"][1])

