"""`neardup apply` on a real run's decisions: dry run, each mode then --undo, changed files refused."""
from __future__ import annotations

import csv
import hashlib
import os

import pytest

from pipeline import apply as ap
from pipeline.cli import main


def archive_state(root) -> dict[str, tuple]:
    """sha256 and symlink-ness of every file, and every folder, under ``root``."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), root)] = ("dir",)
        for name in files:
            p = os.path.join(folder, name)
            link = os.path.islink(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (hashlib.sha256(fh.read()).hexdigest(), link,
                                                 os.readlink(p) if link else None, os.lstat(p).st_nlink)
    return out


def test_demo_keeps_the_jpeg_original_over_its_png_reencode(spark, demo_run):
    from pipeline.stages import tables
    from pipeline.core import storage
    from pipeline import schemas as S

    archive, config, metrics = demo_run
    wd = storage.Workdir.of(config.workdir)
    groups = tables.read_table(spark, wd.groups(config.embed.backbone), "groups").where(S.KEEP)
    kept = {os.path.relpath(r[S.PATH], archive) for r in
            groups.join(tables.read_table(spark, wd.images, "images"), S.IMAGE_ID).collect()}
    assert {"astronaut/astronaut.jpg", "chelsea/chelsea.jpg", "coffee/coffee.jpg", "rocket/rocket.jpg"} <= kept
    assert not any(k.endswith("_png.png") for k in kept)


def test_dry_run_writes_the_plan_and_changes_nothing(demo_run, tmp_path, capsys):
    archive, config, metrics = demo_run
    before = archive_state(archive)
    assert main(["apply", "--workdir", config.workdir, "--mode", "move", "--target", str(tmp_path / "q")]) == 0
    printed = capsys.readouterr().out
    assert "dry run: nothing changed" in printed
    plans = list((tmp_path / "q").glob("plan-*.csv"))
    assert len(plans) == 1
    with open(plans[0], newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == metrics["images_to_remove"]
    assert {r["action"] for r in rows} == {"move"} and all(int(r["bytes"]) > 0 for r in rows)
    assert all(os.path.isfile(r["path"]) and os.path.isfile(r["kept_path"]) for r in rows)
    assert archive_state(archive) == before
    assert not list((tmp_path / "q").glob("journal-*"))


@pytest.mark.parametrize("mode", ["move", "hardlink", "symlink"])
def test_apply_then_undo_is_byte_identical(demo_run, tmp_path, mode):
    archive, config, metrics = demo_run
    before = archive_state(archive)
    cfg = config.with_overrides(apply__mode=mode, apply__target=str(tmp_path / "q"), apply__execute=True)
    result = ap.apply(cfg)
    assert result.done == metrics["images_to_remove"] and not result.refused
    changed = archive_state(archive)
    if mode == "move":
        assert len(changed) == len(before) - result.done  # moved out of the archive
    else:
        assert set(changed) == set(before) and changed != before  # same names, now links
    assert main(["apply", "--workdir", config.workdir, "--undo", result.journal]) == 0
    assert archive_state(archive) == before


def test_changed_file_is_refused_and_counted(demo_run, tmp_path):
    archive, config, metrics = demo_run
    todo, _, _ = ap.plan(config)
    victim = todo[0].path
    original = open(victim, "rb").read()
    stat = os.stat(victim)
    try:
        with open(victim, "ab") as fh:
            fh.write(b"edited after ingest")
        before = archive_state(archive)
        cfg = config.with_overrides(apply__mode="symlink", apply__target=str(tmp_path / "q"), apply__execute=True)
        result = ap.apply(cfg)
        assert result.refused == {"size changed since ingest": 1}
        assert result.done == metrics["images_to_remove"] - 1
        assert open(victim, "rb").read().endswith(b"edited after ingest")  # untouched
        ap.apply(cfg.with_overrides(apply__undo=result.journal))
        assert archive_state(archive) == before
    finally:
        with open(victim, "wb") as fh:
            fh.write(original)
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
