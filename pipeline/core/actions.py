"""File actions on the keep decisions: plan, journaled execution and exact undo. Never deletes.

* ``move``: the duplicate goes to ``target/<its path relative to the archive root>``;
* ``hardlink`` / ``symlink``: the duplicate is moved to the same place under ``target`` (a
  backup: its bytes are never lost) and its path then holds a link to the kept file, put in
  place atomically (link to a temporary name, then ``os.replace``);
* ``report``: nothing is done; the plan is the output.

Every action is journaled as JSON lines, fsynced, *before* (intent) and *after* (done) it
happens, so an interrupted run can be undone as well: :func:`undo` reads the journal
backwards and puts every file back where it was, checking that what it moves back is what
it moved away. A file whose size or SHA-256 differs from the ingest's record is refused
(someone changed it since the decision was made), as is a kept file that changed.
"""
from __future__ import annotations

import csv
import datetime as dt
import errno
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

MODES = ("report", "move", "hardlink", "symlink")
PLAN_COLUMNS = ("path", "kept_path", "group", "similarity", "bytes", "action")


@dataclass(frozen=True)
class Action:
    path: str  # the duplicate (filesystem path)
    kept_path: str
    group: str
    similarity: float | None
    size_bytes: int
    sha256: str | None  # as recorded by the ingest
    kept_size_bytes: int
    kept_sha256: str | None


@dataclass
class Outcome:
    done: int = 0
    bytes: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # reason -> count
    refused_paths: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), first 1000

    def refuse(self, path: str, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if len(self.refused_paths) < 1000:
            self.refused_paths.append((path, reason))


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def unchanged(path: str, size_bytes: int, sha256: str | None) -> str | None:
    """None when ``path`` still has the recorded size and hash, else why not."""
    try:
        if os.stat(path).st_size != size_bytes:
            return "size changed since ingest"
        if sha256 is not None and sha256_of(path) != sha256:
            return "content changed since ingest"
    except FileNotFoundError:
        return "file no longer exists"
    except OSError as exc:
        return f"cannot read ({exc.strerror})"
    return None


def quarantine_path(path: str, root: str, target: str) -> str:
    """Where ``path`` goes under ``target``: its path relative to the archive ``root``."""
    rel = os.path.relpath(path, root)
    if rel.startswith(os.pardir):
        rel = path.lstrip(os.sep)
    return os.path.join(target, rel)


def write_plan(actions: Sequence[Action], mode: str, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.writer(fh)
        w.writerow(PLAN_COLUMNS)
        for a in actions:
            w.writerow([a.path, a.kept_path, a.group, "" if a.similarity is None else f"{a.similarity:.4f}",
                        a.size_bytes, mode])
    os.replace(tmp, path)


class Journal:
    """Append-only JSON lines, each flushed and fsynced before the caller goes on."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, **entry) -> None:
        # surrogateescape round trip: non-UTF-8 names are journaled as \udcXX escapes and restored.
        self._fh.write(json.dumps(entry, ensure_ascii=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def read_journal(path: str) -> list[dict]:
    entries = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: everything before it is valid
    return entries


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move(src: str, dst: str) -> None:
    """Rename, or copy + fsync + rename + unlink across filesystems; never overwrites ``dst``."""
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "destination exists", dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copy2(src, tmp, follow_symlinks=False)
        if not os.path.islink(tmp):
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dst)
        os.unlink(src)  # the bytes are safe at dst: this is the second half of a move
    _fsync_dir(os.path.dirname(dst))


def _link(kept: str, path: str, mode: str) -> str:
    """Put a link to ``kept`` at ``path`` atomically; returns what the link records."""
    tmp = os.path.join(os.path.dirname(path), f".neardup-link-{uuid.uuid4().hex[:12]}")
    if mode == "hardlink":
        os.link(kept, tmp)
        recorded = kept
    else:
        recorded = os.path.relpath(kept, os.path.dirname(path))
        os.symlink(recorded, tmp)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))
    return recorded


def execute(actions: Iterable[Action], mode: str, root: str, target: str, journal: Journal) -> Outcome:
    """Carry out ``actions`` (mode move / hardlink / symlink), journaling each one."""
    if mode not in MODES[1:]:
        raise ValueError(f"execute needs mode move, hardlink or symlink, got {mode!r}")
    out = Outcome()
    kept_ok: dict[str, str | None] = {}
    journal.write(op="begin", mode=mode, root=root, target=target,
                  time=dt.datetime.now(dt.timezone.utc).isoformat())
    for seq, a in enumerate(actions):
        reason = unchanged(a.path, a.size_bytes, a.sha256)
        if reason is None and mode != "move":
            if a.kept_path not in kept_ok:
                kept_ok[a.kept_path] = unchanged(a.kept_path, a.kept_size_bytes, a.kept_sha256)
            if kept_ok[a.kept_path] is not None:
                reason = f"kept file: {kept_ok[a.kept_path]}"
        dst = quarantine_path(a.path, root, target)
        if reason is None and os.path.lexists(dst):
            reason = "quarantine destination already exists"
        if reason is not None:
            out.refuse(a.path, reason)
            journal.write(op="refused", seq=seq, path=a.path, reason=reason)
            continue
        journal.write(op="intent", seq=seq, mode=mode, path=a.path, dst=dst, kept=a.kept_path)
        _move(a.path, dst)
        link = _link(a.kept_path, a.path, mode) if mode != "move" else None
        journal.write(op="done", seq=seq, link=link)
        out.done += 1
        out.bytes += a.size_bytes
    journal.write(op="end", done=out.done, refused=out.refused)
    return out


def _undo_one(entry: dict) -> str | None:
    """Put one journaled file back; returns a reason when it cannot be done safely."""
    path, dst, mode = entry["path"], entry["dst"], entry["mode"]
    if not os.path.lexists(dst):
        # Interrupted before the move: the archive still has the file.
        return None if os.path.lexists(path) else "neither the file nor its quarantined copy exists"
    if mode == "move" or not os.path.lexists(path):
        if os.path.lexists(path):
            return "a file is back at the original path; quarantined copy left in place"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.rename(dst, path)
    else:
        # Only replace what we put there: our symlink, or a hard link to the kept file.
        if mode == "symlink":
            ours = os.path.islink(path) and os.readlink(path) == os.path.relpath(entry["kept"], os.path.dirname(path))
        else:
            ours = (not os.path.islink(path) and os.path.exists(entry["kept"])
                    and os.path.samefile(path, entry["kept"]))
        if not ours:
            return "the link at the original path was changed; quarantined copy left in place"
        os.replace(dst, path)
    _fsync_dir(os.path.dirname(path))
    return None


def undo(journal_path: str) -> Outcome:
    """Restore every file the journal's runs moved or replaced, newest first; appends ``undone``."""
    entries = read_journal(journal_path)
    undone = {(e["run"], e["seq"]) for e in entries if e.get("op") == "undone"}
    runs, run = [], -1
    for e in entries:
        if e.get("op") == "begin":
            run += 1
        e["run"] = run
        runs.append(e)
    target_of = {e["run"]: e["target"] for e in runs if e.get("op") == "begin"}
    out = Outcome()
    journal = Journal(journal_path)
    try:
        for e in reversed(runs):
            if e.get("op") != "intent" or (e["run"], e["seq"]) in undone:
                continue
            reason = _undo_one(e)
            if reason:
                out.refuse(e["path"], reason)
                continue
            _prune_empty(os.path.dirname(e["dst"]), target_of[e["run"]])
            journal.write(op="undone", run=e["run"], seq=e["seq"], path=e["path"])
            out.done += 1
    finally:
        journal.close()
    return out


def _prune_empty(folder: str, target: str) -> None:
    """Remove quarantine folders below ``target`` left empty by an undo (empty folders only)."""
    target = os.path.abspath(target)
    folder = os.path.abspath(folder)
    while folder.startswith(target + os.sep):
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = os.path.dirname(folder)


def iter_plan(path: str) -> Iterator[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        yield from csv.DictReader(fh)

