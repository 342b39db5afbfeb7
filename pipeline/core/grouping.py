"""Pure grouping logic: connected components and the keep policy.

The Spark versions in :mod:`pipeline.stages.components` and :mod:`pipeline.stages.dedup` compute the same things at scale; these small
functions define the semantics, are unit-tested by hand, and are the oracle in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


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


@dataclass(frozen=True)
class Candidate:
    image_id: str
    path: str
    width: int | None
    height: int | None
    size_bytes: int


def keep_order_key(c: Candidate) -> tuple:
    """The keep policy: most pixels, then largest file, then first path in byte order.

    The best copy is the one with the most information: resolution first (a downscaled
    copy is the typical duplicate), then file size (less compressed at equal resolution),
    then the path, only so the choice is deterministic.
    """
    pixels = (c.width or 0) * (c.height or 0)
    return (-pixels, -c.size_bytes, c.path)


def choose_keeper(candidates: Iterable[Candidate]) -> str:
    return min(candidates, key=keep_order_key).image_id
