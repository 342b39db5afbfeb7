"""File actions: plan, journaled execution and exact undo on a real folder tree (no Spark)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from pipeline.core import actions as A


def tree_state(root) -> dict[str, tuple]:
    """Every entry under ``root``: (kind, sha256 of the bytes or link target, mode bits)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir",)
            else:
                with open(p, "rb") as fh:
                    out[rel] = ("file", hashlib.sha256(fh.read()).hexdigest(), st.st_mode, st.st_mtime_ns, st.st_nlink)
    return out


def make_archive(root) -> list[A.Action]:
    files = {"a/keep.jpg": b"K" * 300, "a/dup1.jpg": b"D1" * 100, "b/deep/dup2.jpg": b"D2" * 90,
             "c/keep2.png": b"P" * 50, "c/dup3.png": b"Q" * 40, "c/other.txt": b"not touched"}
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.symlink("keep.jpg", root / "a" / "alias.jpg")  # a symlink in the archive stays a symlink

    def act(dup, keep, group):
        d, k = files[dup], files[keep]
        return A.Action(str(root / dup), str(root / keep), group, 0.95, len(d), hashlib.sha256(d).hexdigest(),
                        len(k), hashlib.sha256(k).hexdigest())

    return [act("a/dup1.jpg", "a/keep.jpg", "g1"), act("b/deep/dup2.jpg", "a/keep.jpg", "g1"),
            act("c/dup3.png", "c/keep2.png", "g2")]


@pytest.mark.parametrize("mode", ["move", "hardlink", "symlink"])
def test_execute_then_undo_restores_the_archive_exactly(tmp_path, mode):
    archive, quarantine = tmp_path / "archive", tmp_path / "quarantine"
    todo = make_archive(archive)
    before = tree_state(archive)
    journal = A.Journal(str(tmp_path / "journal.jsonl"))
    out = A.execute(todo, mode, str(archive), str(quarantine), journal)
    journal.close()
    assert out.done == 3 and out.bytes == sum(a.size_bytes for a in todo) and not out.refused
    after = tree_state(archive)
    assert after != before
    dup1 = archive / "a" / "dup1.jpg"
    if mode == "move":
        assert not dup1.exists() and (quarantine / "a" / "dup1.jpg").read_bytes() == b"D1" * 100
        assert (quarantine / "b" / "deep" / "dup2.jpg").exists()  # relative paths kept
    elif mode == "hardlink":
        assert os.path.samefile(dup1, archive / "a" / "keep.jpg")
    else:
        assert os.path.islink(dup1) and dup1.read_bytes() == b"K" * 300
        assert os.readlink(archive / "b" / "deep" / "dup2.jpg") == os.path.join("..", "..", "a", "keep.jpg")
    if mode != "move":  # never deletes: the replaced file's bytes wait in the quarantine folder
        assert (quarantine / "a" / "dup1.jpg").read_bytes() == b"D1" * 100
    assert (archive / "c" / "other.txt").read_bytes() == b"not touched"

    undone = A.undo(str(tmp_path / "journal.jsonl"))
    assert undone.done == 3 and not undone.refused
    assert tree_state(archive) == before
    assert not any(p.is_file() for p in quarantine.rglob("*"))  # empty quarantine folders pruned
    # A second undo finds nothing left to do and changes nothing.
    assert A.undo(str(tmp_path / "journal.jsonl")).done == 0
    assert tree_state(archive) == before


def test_changed_files_are_refused_and_reported(tmp_path):
    archive, quarantine = tmp_path / "archive", tmp_path / "q"
    todo = make_archive(archive)
    (archive / "a" / "dup1.jpg").write_bytes(b"D1" * 99 + b"XX")  # same size, other bytes
    (archive / "b" / "deep" / "dup2.jpg").write_bytes(b"short")  # other size
    (archive / "c" / "keep2.png").write_bytes(b"P" * 49 + b"!")  # the kept file changed
    before = tree_state(archive)
    journal = A.Journal(str(tmp_path / "j.jsonl"))
    out = A.execute(todo, "hardlink", str(archive), str(quarantine), journal)
    journal.close()
    assert out.done == 0
    assert out.refused == {"content changed since ingest": 1, "size changed since ingest": 1,
                           "kept file: content changed since ingest": 1}
    assert tree_state(archive) == before
    refused = [e for e in A.read_journal(str(tmp_path / "j.jsonl")) if e["op"] == "refused"]
    assert len(refused) == 3
    # move does not depend on the kept file: only the duplicate itself is checked.
    journal = A.Journal(str(tmp_path / "j2.jsonl"))
    assert A.execute(todo, "move", str(archive), str(quarantine), journal).done == 1
    journal.close()


def test_undo_after_an_interrupted_run(tmp_path):
    """A crash between "moved away" and "link in place" (intent journaled, no done) is undone too."""
    archive, quarantine = tmp_path / "archive", tmp_path / "q"
    todo = make_archive(archive)
    before = tree_state(archive)
    j = A.Journal(str(tmp_path / "j.jsonl"))
    a = todo[0]
    j.write(op="begin", mode="symlink", root=str(archive), target=str(quarantine), time="t")
    dst = A.quarantine_path(a.path, str(archive), str(quarantine))
    j.write(op="intent", seq=0, mode="symlink", path=a.path, dst=dst, kept=a.kept_path)
    os.makedirs(os.path.dirname(dst))
    os.rename(a.path, dst)  # ... and the process dies here
    j._fh.write('{"op": "do')  # with a torn last line
    j.close()
    assert A.undo(str(tmp_path / "j.jsonl")).done == 1
    assert tree_state(archive) == before


def test_undo_leaves_a_file_someone_put_back(tmp_path):
    archive, quarantine = tmp_path / "archive", tmp_path / "q"
    todo = make_archive(archive)
    j = A.Journal(str(tmp_path / "j.jsonl"))
    A.execute(todo[:1], "move", str(archive), str(quarantine), j)
    j.close()
    (archive / "a" / "dup1.jpg").write_bytes(b"new file by the user")
    out = A.undo(str(tmp_path / "j.jsonl"))
    assert out.done == 0 and list(out.refused.values()) == [1]
    assert (archive / "a" / "dup1.jpg").read_bytes() == b"new file by the user"
    assert (quarantine / "a" / "dup1.jpg").read_bytes() == b"D1" * 100  # nothing lost


def test_plan_csv_and_journal_lines(tmp_path):
    todo = make_archive(tmp_path / "archive")
    A.write_plan(todo, "move", str(tmp_path / "plan.csv"))
    rows = list(A.iter_plan(str(tmp_path / "plan.csv")))
    assert [r["path"] for r in rows] == [a.path for a in todo]
    assert set(rows[0]) == set(A.PLAN_COLUMNS) and rows[0]["similarity"] == "0.9500" and rows[0]["bytes"] == "200"
    j = A.Journal(str(tmp_path / "j.jsonl"))
    j.write(op="x", path="caf\udce9.jpg")  # a name that is not UTF-8 survives the journal
    j.close()
    assert A.read_journal(str(tmp_path / "j.jsonl"))[0]["path"] == "caf\udce9.jpg"
    assert json.loads(open(tmp_path / "j.jsonl").read())["op"] == "x"
