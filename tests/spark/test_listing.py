"""Listing in executors gives exactly the rows of the old single driver-side walk.

The reference below is the driver walk that ingest used before listing moved to executors
(one depth-first walk, entries in name order, each real folder walked once). The tree has
what makes parallel listing hard: links between subtrees that different tasks list, two links
(in two tasks) to one outside folder, loops between outside folders, a folder big enough to be
split into parts, hidden files and names that are not UTF-8.
"""
from __future__ import annotations

import datetime as dt
import errno
import os
import stat

import pytest
from pyspark.sql import functions as F

from pipeline.stages import ingest as ing
from pipeline.core import listing as L
from pipeline import schemas as S


# ------------------------------------------------------------- the old driver walk
def old_listing(roots: list[str], follow_symlinks: bool) -> dict[str, tuple]:
    real_roots = [os.path.realpath(r) for r in roots]
    seen: set[tuple[int, int]] = set()
    out: dict[str, tuple] = {}
    stack = [r for r in reversed(roots) if os.path.isdir(r)]
    for r in roots:
        if not os.path.isdir(r):
            out[r] = _old_file(r, True)
    while stack:
        folder = stack.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        subfolders = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_symlink():
                if not follow_symlinks:
                    out[entry.path] = (0, None, "symbolic link (not followed: ingest.follow_symlinks=false)", "skipped")
                    continue
                try:
                    target = os.stat(entry.path)
                except OSError as exc:
                    reason = "symbolic link loop" if exc.errno == errno.ELOOP else "broken symbolic link"
                    out[entry.path] = (0, None, reason, "error")
                    continue
                is_dir = stat.S_ISDIR(target.st_mode)
                if L.inside(os.path.realpath(entry.path), real_roots):
                    what = "folder" if is_dir else "file"
                    out[entry.path] = (0, None, f"symbolic link to a {what} already in the input", "skipped")
                elif is_dir:
                    subfolders.append(entry.path)
                else:
                    out[entry.path] = _old_file(entry.path, True)
            elif entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.path)
            else:
                out[entry.path] = _old_file(entry.path, False)
        stack.extend(reversed(subfolders))
    return out


def _old_file(path: str, follow: bool) -> tuple:
    st = os.stat(path, follow_symlinks=follow)
    if not stat.S_ISREG(st.st_mode):
        return (0, None, "not a regular file (named pipe)", "error")
    return (st.st_size, dt.datetime.fromtimestamp(st.st_mtime, tz=dt.timezone.utc).replace(tzinfo=None), None, "error")


# ------------------------------------------------------------------- the tree
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("listing")
    root = tmp / "in"
    for a in range(3):
        for b in range(3):
            d = root / f"top{a}" / f"mid{b}" / "leaf"
            d.mkdir(parents=True)
            for i in range(4):
                (d / f"f{i}.jpg").write_bytes(b"x" * (10 + i))
            (d.parent / f"m{b}.png").write_bytes(b"y" * 7)
    flat = root / "flat"
    flat.mkdir()
    for i in range(120):
        (flat / f"many{i:03d}.jpg").write_bytes(b"z" * i)
    (root / "top0" / ".hidden.jpg").write_bytes(b"h")
    (root / "top0" / "_DSC0001.JPG").write_bytes(b"h")
    with open(os.path.join(os.fsencode(root / "top2"), b"caf\xe9.jpg"), "wb") as fh:
        fh.write(b"latin")
    os.mkfifo(root / "top2" / "pipe.jpg")
    # Links between subtrees listed by different tasks, and loops.
    os.symlink(root / "top1" / "mid0", root / "top0" / "to_other_subtree")
    os.symlink(root / "top2" / "mid1" / "m1.png", root / "top0" / "to_file_elsewhere.png")
    os.symlink("..", root / "top2" / "cycle")
    os.symlink("nothing.jpg", root / "top2" / "broken.jpg")
    os.symlink("self.jpg", root / "top2" / "self.jpg")
    # Outside: one folder reached by two links in two subtrees, and two outside folders
    # linking to each other (a loop no link into the input breaks) and back into the input.
    out = tmp / "out"
    (out / "shared" / "deeper").mkdir(parents=True)
    (out / "shared" / "a.jpg").write_bytes(b"o" * 5)
    (out / "shared" / "deeper" / "b.jpg").write_bytes(b"o" * 6)
    (out / "other").mkdir()
    (out / "other" / "c.jpg").write_bytes(b"o" * 7)
    os.symlink(out / "other", out / "shared" / "to_other")
    os.symlink(out / "shared", out / "other" / "to_shared")
    os.symlink(root, out / "other" / "back_in")
    os.symlink(out / "shared", root / "top2" / "link_b")
    os.symlink(out / "shared", root / "top0" / "link_a")
    os.symlink(out / "shared" / "deeper", root / "top1" / "deeper_directly")
    os.symlink(out / "other" / "c.jpg", root / "top1" / "outside_file.jpg")
    return root


def _spark_rows(spark, roots, follow):
    listed = ing.first_walks_only(ing.listing_frame(spark, roots, follow).localCheckpoint(eager=True))
    rows = listed.collect()
    out = {}
    for r in rows:
        path = bytes(r["raw_path"]).decode("utf-8", "surrogateescape")
        assert r[S.PATH] == L.display_path(path) and r[S.IMAGE_ID] == L.image_id_for(path)
        out[path] = (r[S.SIZE_BYTES], r[S.MODIFICATION_TIME], r["listing_error"],
                     r["listing_status"] if r["listing_error"] else "error")
    assert len(out) == len(rows), "a path listed twice"
    return out


def test_the_tree_is_planned_as_many_tasks_and_the_big_folder_in_parts(tree, monkeypatch):
    monkeypatch.setattr(L, "ENTRIES_PER_TASK", 30)
    tasks = L.plan_tasks([str(tree)], parallelism=2)
    kinds = {t.kind for t in tasks}
    assert kinds == {"folder", "tree"} and len(tasks) >= 8
    flat = [t for t in tasks if t.path.endswith("flat")]
    # 121 entries / 30 per task: 4 parts, together covering every entry once.
    assert sorted(t.part for t in flat) == [0, 1, 2, 3] and {t.parts for t in flat} == {4}


@pytest.mark.parametrize("follow", [True, False])
def test_executor_listing_equals_the_old_driver_walk(spark, tree, follow, monkeypatch):
    monkeypatch.setattr(L, "ENTRIES_PER_TASK", 30)  # the driver plans; executors just list
    expected = old_listing([str(tree)], follow)
    assert _spark_rows(spark, [str(tree)], follow) == expected
    assert {f.path: (f.size_bytes, f.modification_time, f.listing_error,
                     f.listing_status if f.listing_error else "error")
            for f in ing.list_inputs([str(tree)], follow)} == expected


def test_the_outside_folder_is_listed_once_under_the_first_link_in_walk_order(spark, tree):
    paths = {os.path.relpath(p, tree) for p in _spark_rows(spark, [str(tree)], True)}
    assert "top0/link_a/a.jpg" in paths and not any(p.startswith("top2/link_b/") for p in paths)
    # "deeper" is reached first through top0/link_a/deeper, not through top1/deeper_directly.
    assert "top0/link_a/deeper/b.jpg" in paths and not any(p.startswith("top1/deeper_directly") for p in paths)
    assert "top0/link_a/to_other/c.jpg" in paths and "top0/link_a/to_other/back_in" in paths


def test_nested_and_repeated_inputs_are_listed_once(spark, tree):
    roots = [str(tree / "top1"), str(tree), str(tree / "top0" / "link_a"), str(tree / "top1" / "mid0" / "m0.png")]
    # An input inside another is dropped; a link given as an input is an input of its own
    # (its target counts as inside the input, so the link to it in the tree is skipped).
    assert L.input_roots(roots) == [str(tree), str(tree / "top0" / "link_a")]
    assert _spark_rows(spark, roots, True) == old_listing(roots, True)


def test_a_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        L.input_roots([str(tmp_path / "missing")])


def test_other_filesystems_list_through_pyarrow(tmp_path):
    # pyarrow's local filesystem stands in for s3:// or hdfs:// (object stores have no links).
    for b in range(3):
        (tmp_path / f"mid{b}" / "leaf").mkdir(parents=True)
        (tmp_path / f"mid{b}" / "leaf" / "f.jpg").write_bytes(b"x" * (10 + b))
    (tmp_path / ".hidden.jpg").write_bytes(b"h")
    uri = "file://" + str(tmp_path)
    rows = {f.path: f.size_bytes for f in L.list_remote(uri)}
    assert rows == {uri + f"/mid{b}/leaf/f.jpg": 10 + b for b in range(3)} | {uri + "/.hidden.jpg": 1}
    assert {f.path for f in L.list_remote(uri, files_only_of_top=True)} == {uri + "/.hidden.jpg"}
    assert L.remote_subfolders(uri) == [uri + f"/mid{b}" for b in range(3)]


# ------------------------------------------------------------------- shards
def test_shards_are_size_bounded_path_ranges_one_per_task(spark):
    sizes = [(f"/p/{i:05d}.jpg", (i * 7919) % 1000 + 1) for i in range(3000)]
    rows = spark.createDataFrame([(L.image_id_for(p), p, p.encode(), s, None, None, "error") for p, s in sizes],
                                 ing.LISTING_SCHEMA).repartition(5)
    max_bytes = 20_000
    total = sum(s for _, s in sizes)
    # Force several ranges so the offsets between ranges are exercised.
    sharded, n_shards, persisted = ing.assign_shards(rows, max_bytes)
    placed = ing.one_shard_per_partition(sharded.withColumn("_shard", F.col("shard")), n_shards)
    got = placed.select(F.spark_partition_id().alias("part"), "_shard", S.PATH, S.SIZE_BYTES).collect()
    for df in persisted:
        df.unpersist()
    assert placed.rdd.getNumPartitions() == n_shards
    by_part: dict[int, set] = {}
    bytes_of: dict[int, int] = {}
    for r in got:
        by_part.setdefault(r["part"], set()).add(r["_shard"])
        bytes_of[r["_shard"]] = bytes_of.get(r["_shard"], 0) + r[S.SIZE_BYTES]
    assert all(len(s) == 1 for s in by_part.values()) and len(by_part) == n_shards == len(bytes_of)
    assert max(bytes_of.values()) <= max_bytes
    assert n_shards <= 2 * (total // max_bytes + 1)
    # Shards are contiguous ranges of the path order, numbered in that order.
    order = [r["_shard"] for r in sorted(got, key=lambda r: r[S.PATH])]
    assert order == sorted(order)


def test_a_small_metadata_table_still_gets_a_shard_per_core(spark):
    # 300 files of 256 B fit one 128 MiB shard; with min_shards=2 two tasks describe them.
    rows = spark.createDataFrame([(L.image_id_for(f"/q/{i:04d}.jpg"), f"/q/{i:04d}.jpg", None, 256, None, None, "error")
                                  for i in range(300)], ing.LISTING_SCHEMA)
    sharded, n_shards, persisted = ing.assign_shards(rows, 128 * 2 ** 20, min_shards=2)
    counts = sorted(r["count"] for r in sharded.groupBy("shard").count().collect())
    for df in persisted:
        df.unpersist()
    assert n_shards == 2 and counts == [150, 150]
    _, one, persisted = ing.assign_shards(rows, 128 * 2 ** 20)
    for df in persisted:
        df.unpersist()
    assert one == 1



def test_shards_of_equal_sized_rows_counted_without_spark_match_the_packing(spark):
    """A metadata table's rows all count METADATA_ROW_BYTES: given their number, the shards are
    counted by arithmetic (no Spark job) and must be the ones the packing pass makes."""
    for n, max_bytes, min_shards in ((300, 128 * 2 ** 20, 2), (301, 128 * 2 ** 20, 2), (301, 2560, 1),
                                     (7, 100, 1), (1, 128 * 2 ** 20, 4)):
        rows = spark.createDataFrame([(L.image_id_for(f"/m/{i:04d}.jpg"), f"/m/{i:04d}.jpg", None,
                                       ing.METADATA_ROW_BYTES, None, None, "error") for i in range(n)],
                                     ing.LISTING_SCHEMA).repartition(3)
        shards = {}
        for same_size in (None, (n, ing.METADATA_ROW_BYTES)):
            sharded, n_shards, persisted = ing.assign_shards(rows, max_bytes, min_shards, same_size=same_size)
            shards[same_size is None] = (n_shards, sorted((r[S.PATH], r["shard"]) for r in sharded.collect()))
            for df in persisted:
                df.unpersist()
        assert shards[True] == shards[False], (n, max_bytes, min_shards)
        assert shards[True][0] == len({s for _, s in shards[True][1]})

# --------------------------------------------------------------- incremental
def test_plan_compares_path_size_and_time(spark):
    t0 = dt.datetime(2024, 1, 1, 12, 0, 0, 123456)

    def listed(path, size, time, error=None):
        return (L.image_id_for(path), path, path.encode(), size, time, error, "error")

    listing = spark.createDataFrame([
        listed("/a/same.jpg", 10, t0), listed("/a/bigger.jpg", 11, t0),
        listed("/a/newer.jpg", 10, t0 + dt.timedelta(microseconds=1)), listed("/a/was_unreadable.jpg", 10, t0),
        listed("/a/new.jpg", 10, t0), listed("/a/now_a_broken_link.jpg", 0, None, "broken symbolic link")],
        ing.LISTING_SCHEMA)
    previous = spark.createDataFrame([
        ("/a/same.jpg", 10, t0, "h1"), ("/a/bigger.jpg", 10, t0, "h2"), ("/a/newer.jpg", 10, t0, "h3"),
        ("/a/was_unreadable.jpg", 10, t0, None), ("/a/now_a_broken_link.jpg", 10, t0, "h4"),
        ("/a/gone.jpg", 10, t0, "h5")],
        f"{S.PATH} string, {S.SIZE_BYTES} long, {S.MODIFICATION_TIME} timestamp, {S.CONTENT_SHA256} string")
    plan = ing.plan_changes(listing, previous)
    assert dict(plan.select(S.PATH, "change").collect()) == {
        "/a/same.jpg": "reused", "/a/bigger.jpg": "changed", "/a/newer.jpg": "changed",
        "/a/was_unreadable.jpg": "changed", "/a/new.jpg": "new", "/a/now_a_broken_link.jpg": "changed",
        "/a/gone.jpg": "deleted"}
    assert ing.count_changes(plan) == {"reused": 1, "new": 1, "changed": 4, "deleted": 1}
