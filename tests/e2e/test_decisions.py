"""Decisions that stick, on a real run: "not duplicates" pairs and keep policies in `dedup`."""
from __future__ import annotations

import os

from pipeline import api
from pipeline import schemas as S
from pipeline.core import storage
from pipeline.stages import tables


def _groups(spark, config, archive) -> dict[str, tuple[str, bool]]:
    wd = storage.Workdir.of(config.workdir)
    rows = (tables.read_table(spark, wd.groups(config.embed.backbone), "groups")
            .join(tables.read_table(spark, wd.images, "images"), S.IMAGE_ID).collect())
    return {os.path.relpath(r[S.PATH], archive): (r[S.GROUP_ID], r[S.KEEP]) for r in rows}


def test_not_duplicates_and_keep_policy_in_dedup(spark, demo_run, tmp_path):
    archive, config, _ = demo_run
    before = _groups(spark, config, archive)
    a, b = "astronaut/astronaut.jpg", "astronaut/astronaut_png.png"
    assert before[a][0] == before[b][0]  # the model puts them in one group
    decisions = archive.parent / "decisions.csv"
    # A header, a comment, a pair by relative path, one naming an image that does not exist.
    decisions.write_text(f"path_a,path_b\n# reviewed 2026-11-30\narchive/{a},archive/{b}\n"
                         f"archive/{a},archive/no-such.jpg\n", encoding="utf-8")
    try:
        result = api.dedup(config=config, spark=spark, dedup__not_duplicates=str(decisions), dedup__keep="largest")
        assert result["not_duplicates_pairs"] == 1 and result["not_duplicates_unmatched"] == 1
        # Every other variant joins them through a chain: their group is split, not just the edge dropped.
        assert result["groups_split_by_not_duplicates"] == 1
        after = _groups(spark, config, archive)
        assert after.get(a, ("a",))[0] != after.get(b, ("b",))[0]
        # keep=largest: the biggest file wins, here the lossless PNG copy of the chelsea photo.
        assert after["chelsea/chelsea_png.png"][1] and not after["chelsea/chelsea.jpg"][1]
        assert storage.read_metadata(storage.Workdir.of(config.workdir).groups(config.embed.backbone))["keep"] == "largest"
    finally:
        restored = api.dedup(config=config, spark=spark)
    assert _groups(spark, config, archive) == before and "not_duplicates_pairs" not in restored.metrics
