"""Listing an input tree in pieces, so executors list it in parallel and the driver holds no file.

The driver only plans: it walks the top of each local input breadth-first, keeping folder
names (never file names), until there are enough folders for every core to have work
(:func:`plan_tasks`). Each :class:`Task` then runs on an executor (:func:`list_task`): the
entries of one folder, or a whole subtree walked with ``os.scandir``. A folder with very many
entries is split into parts by a hash of the entry name, so one huge flat folder is still
listed (stat'ed) by several tasks.

Every decision about an entry is local to that entry, so it does not matter which task sees
it (the symlink policy is in docs/bad-files.md):

* a link whose target's real path lies under the real path of an input is skipped;
* a link to an outside folder is walked inside the task that found it, under the link's path;
  each row listed inside such a folder carries the folder's identity (device, inode) and the
  path it was walked under, so that when several links (in several tasks) reach the same
  outside folder, the caller keeps only the walk with the smallest path: the one the old
  single depth-first walk (entries in name order) reached first.

Nothing here imports Spark: rows are plain tuples (:data:`ROW_FIELDS`).
"""
from __future__ import annotations

import collections
import datetime as dt
import errno
import hashlib
import os
import stat
import zlib
from dataclasses import dataclass
from typing import Iterator

STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"

# Tasks per core: several, so a slow subtree does not leave the other cores idle.
TASKS_PER_CORE = 4
# The driver stops planning after scanning this many folders, or when a folder has more
# subfolders than MAX_SUBFOLDERS (it is then walked by executors, split by name hash): the
# planner's memory is bounded whatever the tree.
MAX_PLANNED_FOLDERS = 2000
MAX_SUBFOLDERS = 10_000
# A folder with more entries than this is listed by several tasks (one per ENTRIES_PER_TASK).
ENTRIES_PER_TASK = 20_000


@dataclass(frozen=True)
class ListedFile:
    path: str  # as the OS gave it: may hold surrogate escapes for names that are not UTF-8
    size_bytes: int
    modification_time: dt.datetime | None
    # Set when the listing itself decided the row (broken symlink, link cycle, not a file ...).
    listing_error: str | None = None
    listing_status: str = STATUS_ERROR
    # For entries of a folder reached through a link to outside every input: that folder's
    # (device, inode), and the sort key of the path it was walked under (see the module doc).
    walk_key: str | None = None
    walk_sort: bytes | None = None


@dataclass(frozen=True)
class Task:
    path: str
    kind: str  # "file": one file | "folder": its entries, not its subfolders | "tree": recursively
    part: int = 0
    parts: int = 1  # only entries whose name hashes to ``part`` (mod ``parts``) are this task's


def raw_path_of(path: str) -> bytes:
    """The exact bytes of a path (names that are not UTF-8 come back from the OS escaped)."""
    return path.encode("utf-8", "surrogateescape")


def display_path(path: str) -> str:
    """The path as stored in the image table: valid UTF-8, undecodable bytes shown as ``\\xNN``."""
    return raw_path_of(path).decode("utf-8", "backslashreplace")


def image_id_for(path: str) -> str:
    """Stable id derived from the path, so reruns and incremental ingests agree."""
    return hashlib.sha1(raw_path_of(path)).hexdigest()[:20]


def walk_order_key(path: str) -> bytes:
    """Sorts paths the way a depth-first walk with entries in name order meets them.

    Component by component: ``a/x`` before ``a b/x`` (plain string order puts the space, a
    byte below ``/``, first).
    """
    return raw_path_of(path).replace(b"/", b"\x00")


# ------------------------------------------------------------------ driver: planning
def input_roots(paths: list[str]) -> list[str]:
    """Absolute local inputs, each listed once: an input inside another input is dropped."""
    roots = []
    for path in paths:
        if not os.path.lexists(path):
            raise FileNotFoundError(f"input not found: {path}")
        roots.append(os.path.abspath(path))
    kept: list[str] = []
    reals: list[str] = []
    for root in roots:
        real = os.path.realpath(root)
        if any(real == r or (os.path.isdir(r) and inside(real, [r])) for r in reals):
            continue
        # An earlier, narrower input inside this one gives way to it.
        narrower = [i for i, r in enumerate(reals) if os.path.isdir(root) and inside(r, [real])]
        for i in reversed(narrower):
            del kept[i], reals[i]
        kept.append(root)
        reals.append(real)
    return kept


def inside(real: str, real_roots: list[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in real_roots)


def plan_tasks(roots: list[str], parallelism: int) -> list[Task]:
    """Breadth-first over the inputs' top folders until each core has several folders to list.

    Holds folder names only (at most MAX_PLANNED_FOLDERS scanned, MAX_SUBFOLDERS per folder).
    """
    target = max(1, TASKS_PER_CORE * parallelism)
    tasks: list[Task] = []
    frontier: collections.deque[str] = collections.deque()
    for root in roots:
        if os.path.isdir(root):
            frontier.append(root)
        else:
            tasks.append(Task(root, "file"))
    scanned = 0
    while frontier and len(frontier) < target and scanned < MAX_PLANNED_FOLDERS:
        folder = frontier.popleft()
        scanned += 1
        try:
            subfolders, n_entries = _scan_subfolders(folder, MAX_SUBFOLDERS)
        except OSError:
            tasks.append(Task(folder, "tree"))  # the executor turns it into an error row
            continue
        if subfolders is None:  # too many subfolders to hold here: executors walk it, in parts
            tasks.extend(Task(folder, "tree", j, target) for j in range(target))
            continue
        parts = max(1, min(target, n_entries // ENTRIES_PER_TASK))
        tasks.extend(Task(folder, "folder", j, parts) for j in range(parts))
        frontier.extend(subfolders)
    tasks.extend(Task(folder, "tree") for folder in frontier)
    return tasks


def _scan_subfolders(folder: str, limit: int) -> tuple[list[str] | None, int]:
    """The real subfolders of ``folder`` (None when over ``limit``) and its number of entries."""
    subfolders: list[str] | None = []
    n = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            n += 1
            if subfolders is not None and _is_real_folder(entry):
                subfolders.append(entry.path)
                if len(subfolders) > limit:
                    subfolders = None
    return (sorted(subfolders) if subfolders is not None else None), n


def _is_real_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


# --------------------------------------------------------------- executor: listing
def list_task(task: Task, real_roots: list[str], follow_symlinks: bool) -> Iterator[ListedFile]:
    """Every row of one task: each directory entry that is not a folder, links included."""
    if task.kind == "file":
        yield _listed(task.path, follow_symlinks=True)
        return
    yield from _walk(task, real_roots, follow_symlinks)


def _mine(name: str, task: Task) -> bool:
    return task.parts == 1 or zlib.crc32(raw_path_of(name)) % task.parts == task.part


def _walk(task: Task, real_roots: list[str], follow_symlinks: bool) -> Iterator[ListedFile]:
    # (folder, outside, top): outside = reached through a link to outside every input.
    stack: list[tuple[str, bool, bool]] = [(task.path, False, True)]
    seen: set[tuple[int, int]] = set()  # outside folders walked by this task (links can loop)
    while stack:
        folder, outside, top = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as exc:
            if top and task.part == 0:
                yield ListedFile(folder, 0, None, f"unreadable folder: {exc.strerror}")
            continue
        walk = None
        if outside:
            if (st.st_dev, st.st_ino) in seen:
                continue  # reached twice in this task (links between outside folders)
            seen.add((st.st_dev, st.st_ino))
            walk = (f"{st.st_dev}:{st.st_ino}", walk_order_key(folder))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            if not top or task.part == 0:
                yield _with_walk(ListedFile(folder, 0, None, f"unreadable folder: {exc.strerror}"), walk)
            continue
        subfolders: list[tuple[str, bool, bool]] = []
        for entry in entries:
            if top and not _mine(entry.name, task):
                continue
            path = entry.path
            if entry.is_symlink():
                listed = _symlink(path, follow_symlinks, real_roots)
                if listed is None:
                    subfolders.append((path, True, False))
                elif listed is _FOLLOW_FILE:
                    yield _with_walk(_listed(path, follow_symlinks=True), walk)
                else:
                    yield _with_walk(listed, walk)
            elif _is_real_folder(entry):
                if task.kind == "tree" or not top:
                    subfolders.append((path, outside, False))
            else:
                yield _with_walk(_listed(path, follow_symlinks=False), walk)
        # Reversed so folders pop in name order (depth-first, like the walk order key).
        stack.extend(reversed(subfolders))


def _with_walk(listed: ListedFile, walk: tuple[str, bytes] | None) -> ListedFile:
    if walk is None:
        return listed
    return ListedFile(listed.path, listed.size_bytes, listed.modification_time, listed.listing_error,
                      listed.listing_status, walk[0], walk[1])


_FOLLOW_FILE = ListedFile("", 0, None)  # sentinel: "list the link like a plain file"


def _symlink(path: str, follow_symlinks: bool, real_roots: list[str]) -> ListedFile | None:
    """Apply the symlink policy to one link: a finished row, _FOLLOW_FILE, or None (walk it)."""
    if not follow_symlinks:
        return ListedFile(path, 0, None, "symbolic link (not followed: ingest.follow_symlinks=false)",
                          STATUS_SKIPPED)
    try:
        st = os.stat(path)
    except OSError as exc:
        reason = "symbolic link loop" if exc.errno == errno.ELOOP else "broken symbolic link"
        return ListedFile(path, 0, None, reason)
    is_dir = stat.S_ISDIR(st.st_mode)
    if inside(os.path.realpath(path), real_roots):
        what = "folder" if is_dir else "file"
        return ListedFile(path, 0, None, f"symbolic link to a {what} already in the input", STATUS_SKIPPED)
    return None if is_dir else _FOLLOW_FILE


def _listed(path: str, follow_symlinks: bool) -> ListedFile:
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError as exc:
        return ListedFile(path, 0, None, f"unreadable file: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):
        return ListedFile(path, 0, None, f"not a regular file ({_file_kind(st.st_mode)})")
    return ListedFile(path, int(st.st_size), _utc(st.st_mtime))


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc).replace(tzinfo=None)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


# ------------------------------------------------------- other filesystems (pyarrow.fs)
def list_remote(uri: str, recursive: bool = True, files_only_of_top: bool = False) -> Iterator[ListedFile]:
    """Files under a non-local URI (s3://, gs://, hdfs:// ...) through ``pyarrow.fs``.

    ``files_only_of_top``: only the files directly in ``uri`` (its subfolders are other tasks).
    """
    from pyarrow import fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri)
    base = uri.rstrip("/")
    # What from_uri took off the front (scheme, host), to give rows full URIs back.
    prefix = base[: len(base) - len(path.rstrip("/"))] if base.endswith(path.rstrip("/")) else ""
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        yield _remote_row(prefix, info)
        return
    selector = pafs.FileSelector(path, recursive=recursive and not files_only_of_top)
    for info in filesystem.get_file_info(selector):
        if info.type == pafs.FileType.File:
            yield _remote_row(prefix, info)


def remote_subfolders(uri: str, limit: int = MAX_SUBFOLDERS) -> list[str] | None:
    """The immediate subfolders of a non-local folder URI (None when more than ``limit``)."""
    from pyarrow import fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri)
    base = uri.rstrip("/")
    out = []
    for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=False)):
        if info.type == pafs.FileType.Directory:
            out.append(f"{base}/{info.base_name}")
            if len(out) > limit:
                return None
    return sorted(out)


def _remote_row(prefix: str, info) -> ListedFile:
    path = prefix + info.path
    mtime = info.mtime.astimezone(dt.timezone.utc).replace(tzinfo=None) if info.mtime is not None else None
    return ListedFile(path, int(info.size or 0), mtime)
