"""Pure grouping logic: connected components, "not duplicates" decisions and the keep policy.

The Spark versions in :mod:`pipeline.stages.components` and :mod:`pipeline.stages.dedup` compute the same things at scale; these small
functions define the semantics, are unit-tested by hand, and are the oracle in the tests.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable, Sequence

from pipeline.config import KEEP_POLICIES  # noqa: F401 (re-exported: the policies live with the config)

# Formats whose files are lossy encodings. At equal pixel count a file in one of these is
# ranked before a lossless file (PNG, TIFF, BMP ...): in real archives a same-size PNG next to
# a JPEG is a decoded-and-saved export of the JPEG (it carries the JPEG's artefacts and no
# extra information), while a JPEG made from a PNG original is the lossy derivative that
# people also downscale. Decoded-pixel equality is not checked (too costly at archive scale).
LOSSY_FORMATS = frozenset({"JPEG", "MPO", "WEBP", "HEIF", "AVIF", "JPEG2000"})


def connected_components(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Map every node that appears in ``pairs`` to its component label (the smallest id in it)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in pairs:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        ra, rb = find(a), find(b)
        if ra != rb:
            # The smaller id becomes the root, so the label is deterministic.
            if rb < ra:
                ra, rb = rb, ra
            parent[rb] = ra
    return {node: find(node) for node in parent}


def unordered(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def components_with_cannot_link(edges: Iterable[tuple[str, str, float]],
                                not_duplicates: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Components of ``edges`` (a, b, similarity) in which no ``not_duplicates`` pair shares a group.

    The declared pairs' own edges are dropped first. A chain through other images could still
    join them, so edges are then added strongest first and an edge is skipped when it would
    merge two sets holding a declared pair (greedy constrained clustering: the weakest links
    of the chain are the ones cut). Images left alone are omitted; labels are the smallest
    id of each resulting group, as in :func:`connected_components`.
    """
    forbidden = {unordered(a, b) for a, b in not_duplicates if a != b}
    kept = sorted(((s, unordered(a, b)) for a, b, s in edges if unordered(a, b) not in forbidden and a != b),
                  key=lambda e: (-e[0], e[1]))
    parent: dict[str, str] = {}
    members: dict[str, set[str]] = {}
    enemies: dict[str, set[str]] = {}
    for a, b in forbidden:
        enemies.setdefault(a, set()).add(b)
        enemies.setdefault(b, set()).add(a)

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, (a, b) in kept:
        for n in (a, b):
            if n not in parent:
                parent[n], members[n] = n, {n}
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        small, large = sorted((members[ra], members[rb]), key=len)
        if any(enemies.get(n, set()) & large for n in small):
            continue
        root, child = (ra, rb) if len(members[ra]) >= len(members[rb]) else (rb, ra)
        parent[child] = root
        members[root] |= members.pop(child)
    out: dict[str, str] = {}
    for group in members.values():
        if len(group) > 1:
            label = min(group)
            out.update({n: label for n in group})
    return out


@dataclass(frozen=True)
class Candidate:
    image_id: str
    path: str
    width: int | None
    height: int | None
    size_bytes: int
    format: str | None = None
    modification_time: dt.datetime | None = None


def folder_rank(path: str, keep_folders: Sequence[str]) -> int:
    """Index of the first preferred folder holding ``path`` (len(keep_folders) when none does)."""
    for i, folder in enumerate(keep_folders):
        if path.startswith(folder.rstrip("/") + "/"):
            return i
    return len(keep_folders)


def _time(c: Candidate, newest: bool) -> tuple[int, float]:
    """Sort key for a modification time; unknown times sort after every known one."""
    if c.modification_time is None:
        return (1, 0.0)
    ts = c.modification_time.timestamp()
    return (0, -ts if newest else ts)


def keep_order_key(c: Candidate, policy: str = "pixels", keep_folders: Sequence[str] = ()) -> tuple:
    """Sort key of the keep policy: the smallest key in a group is the image kept.

    * ``pixels`` (default): most pixels (a downscaled copy is the typical duplicate), then a
      lossy-format file over a lossless re-encode of the same size (:data:`LOSSY_FORMATS`),
      then the oldest file, then the path;
    * ``largest``: largest file, then most pixels, then the path;
    * ``oldest`` / ``newest``: by modification time, then the path.

    Files under ``keep_folders`` win over all others first (the earlier folder in the list
    wins). The path comes last only so the choice is deterministic.
    """
    pixels = (c.width or 0) * (c.height or 0)
    if policy == "pixels":
        lossless = 0 if (c.format or "").upper() in LOSSY_FORMATS else 1
        key: tuple = (-pixels, lossless, _time(c, newest=False))
    elif policy == "largest":
        key = (-c.size_bytes, -pixels)
    elif policy in ("oldest", "newest"):
        key = (_time(c, newest=policy == "newest"),)
    else:
        raise ValueError(f"unknown keep policy {policy!r}; one of {', '.join(KEEP_POLICIES)}")
    return (folder_rank(c.path, keep_folders), *key, c.path)


def choose_keeper(candidates: Iterable[Candidate], policy: str = "pixels", keep_folders: Sequence[str] = ()) -> str:
    return min(candidates, key=lambda c: keep_order_key(c, policy, keep_folders)).image_id
