"""Incremental ingest and embed with real Spark: only what changed is read and embedded.

One workdir sees the corpus, then the corpus changes (files added, changed, touched, deleted)
and the job runs again; its counts say what was reused, and its tables must equal those of
a from-scratch run on the final corpus.
"""
from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from pipeline.stages import ingest as ing
from pipeline import api
from tests.helpers import _jpeg, make_config, make_small_corpus, snapshot


@pytest.fixture(scope="module")
def runs(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("incremental")
    root = tmp / "corpus"
    truth = make_small_corpus(root)
    config = make_config(tmp / "work", ingest__input=[str(root)])
    first = api.run(config=config)

    # Added: a new photo and its near-duplicate.
    camera = Image.fromarray(skdata.camera())
    (root / "camera").mkdir()
    (root / "camera" / "original.jpg").write_bytes(_jpeg(camera))
    (root / "camera" / "half_size.jpg").write_bytes(_jpeg(camera.resize((256, 256), Image.BILINEAR)))
    # Changed: new bytes under an existing name.
    changed = root / "chelsea" / "cropped.jpg"
    changed.write_bytes(_jpeg(Image.fromarray(skdata.chelsea()).transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    # Touched: same bytes, newer modification time (a copy tool that does not keep times).
    touched = root / "astronaut" / "original.jpg"
    later = touched.stat().st_mtime + 3600
    os.utime(touched, (later, later))
    os.utime(changed, (later, later))
    # Deleted.
    (root / "rocket" / "half_size.jpg").unlink()

    second = api.run(config=config)
    scratch = make_config(tmp / "work-scratch", ingest__input=[str(root)])
    third = api.run(config=scratch)
    return config, scratch, first, second, third, len(truth)


def test_first_run_describes_and_embeds_everything(runs):
    _, _, first, _, _, n = runs
    assert (first["files_new"], first["files_reused"], first["files_changed"], first["files_deleted"]) == (n, 0, 0, 0)
    assert first["images_embedded"] == n and first["embeddings_reused"] == 0


def test_second_ingest_reads_only_new_and_changed_files(runs):
    _, _, _, second, _, n = runs
    # 15 files: 1 changed + 1 touched (both re-read), 1 deleted, 12 reused; 2 new.
    assert second["files_new"] == 2
    assert second["files_changed"] == 2
    assert second["files_deleted"] == 1
    assert second["files_reused"] == n - 3
    assert second["files_total"] == n + 1


def test_second_embed_runs_the_model_only_on_new_and_changed_images(runs):
    _, _, _, second, _, n = runs
    # The touched file was re-read but its bytes hash the same: its embedding is reused.
    assert second["embeddings_new"] == 2
    assert second["embeddings_changed"] == 1
    assert second["embeddings_deleted"] == 1
    assert second["embeddings_reused"] == n - 2
    assert second["images_embedded"] == 3
    assert second["embeddings_ok"] == n + 1


def test_incremental_result_equals_a_from_scratch_run(spark, runs):
    config, scratch, *_ = runs
    inc, fresh = snapshot(spark, config), snapshot(spark, scratch)
    assert inc["images"] == fresh["images"]
    assert [r[:3] for r in inc["embeddings"]] == [r[:3] for r in fresh["embeddings"]]
    np.testing.assert_allclose([r[3] for r in inc["embeddings"]], [r[3] for r in fresh["embeddings"]], atol=1e-5)
    assert {r[:2] for r in inc["pairs"]} == {r[:2] for r in fresh["pairs"]}
    assert inc["groups"] == fresh["groups"]
    assert inc["idmap"] == fresh["idmap"]


def test_changed_settings_describe_everything_again(spark, runs):
    config, *_ , n = runs
    metrics = api.ingest(config=config.with_overrides(ingest__max_pixels=10_000_000))
    assert metrics["files_reused"] == 0 and metrics["files_new"] == n + 1


def test_plan_compares_path_size_and_time():
    t0 = dt.datetime(2024, 1, 1, 12, 0, 0, 123456)
    files = [ing.ListedFile("/a/same.jpg", 10, t0), ing.ListedFile("/a/bigger.jpg", 11, t0),
             ing.ListedFile("/a/newer.jpg", 10, t0 + dt.timedelta(microseconds=1)),
             ing.ListedFile("/a/was_unreadable.jpg", 10, t0), ing.ListedFile("/a/new.jpg", 10, t0),
             ing.ListedFile("/a/now_a_broken_link.jpg", 0, None, "broken symbolic link")]
    previous = {"/a/same.jpg": (10, t0, "h1", "ok"), "/a/bigger.jpg": (10, t0, "h2", "ok"),
                "/a/newer.jpg": (10, t0, "h3", "error"), "/a/was_unreadable.jpg": (10, t0, None, "error"),
                "/a/now_a_broken_link.jpg": (10, t0, "h4", "ok"), "/a/gone.jpg": (10, t0, "h5", "ok")}
    plan = ing.plan_incremental(files, previous)
    assert [f.path for f in plan.describe] == ["/a/bigger.jpg", "/a/newer.jpg", "/a/was_unreadable.jpg",
                                               "/a/new.jpg", "/a/now_a_broken_link.jpg"]
    assert plan.drop_paths == sorted(set(previous) - {"/a/same.jpg"})
    assert plan.changes == {"reused": 1, "new": 1, "changed": 4, "deleted": 1}
