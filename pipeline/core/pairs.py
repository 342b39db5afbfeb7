"""The dedup's pair arithmetic in numpy: kNN rows -> lists, levels, scores, histograms, and
the groups with their keep decision (the candidate pairs: :func:`pipeline.core.calibration.candidate_pairs`).

:mod:`pipeline.stages.dedup` computes the same in Spark at scale. A small table takes this
path on the driver instead: there the Spark version is a chain of about twenty short jobs
(3-4 s of a 17 s run of 2,794 images) for a few megabytes of rows. The tests run both on the
same collections and compare the tables.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.core import grouping as G
from pipeline.core.calibration import Calibration, level_of_row

HISTOGRAM_BINS = 200  # similarity histogram over [-1, 1] in steps of 0.01


def knn_lists(query_ids: np.ndarray, neighbor_ids: np.ndarray, ranks: np.ndarray, sims: np.ndarray,
              k: int) -> tuple[list[str], list[list[str]], list[np.ndarray]]:
    """Per query with other neighbours: its other neighbours (self excluded), by rank (then id),
    at most ``k``; sims as float32. Queries in id order."""
    frame = pd.DataFrame({"q": np.asarray(query_ids, object), "n": np.asarray(neighbor_ids, object),
                          "r": np.asarray(ranks), "s": np.asarray(sims, np.float32)})
    frame = frame[frame.q != frame.n].sort_values(["q", "r", "n"], kind="stable")
    q = frame.q.to_numpy()
    n, s = frame.n.to_numpy(), frame.s.to_numpy()
    if not len(q):
        return [], [], []
    starts = np.r_[0, np.flatnonzero(q[1:] != q[:-1]) + 1]
    ends = np.r_[starts[1:], len(q)]
    ids = [q[a] for a in starts]
    lists = [n[a:min(b, a + k)].tolist() for a, b in zip(starts, ends)]
    values = [s[a:min(b, a + k)] for a, b in zip(starts, ends)]
    return ids, lists, values


def list_levels(ids: Sequence[str], values: Sequence[np.ndarray], rank: int) -> dict[str, float]:
    """Each listed image's similarity to its ``rank``-th other neighbour (fewer: the last one),
    as the float32 value widened: the Spark twin reads it from the same float lists."""
    return {i: level_of_row(v, rank) for i, v in zip(ids, values)}


def pair_scores(a: np.ndarray, b: np.ndarray, sims: np.ndarray, levels: Mapping[str, float],
                calibration: Calibration) -> np.ndarray:
    """The calibrated probability of each pair (float32); an image without a level counts -1."""
    la = np.array([levels.get(x, -1.0) for x in a], np.float64)
    lb = np.array([levels.get(x, -1.0) for x in b], np.float64)
    return calibration.probability(np.asarray(sims, np.float32).astype(np.float64), la, lb).astype(np.float32)


def histogram(values: np.ndarray) -> dict[str, int]:
    """Counts per 0.01 bin over [-1, 1] (key: the bin's lower edge, e.g. "0.87"), NaN skipped."""
    width = 2.0 / HISTOGRAM_BINS
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    bins = np.minimum(np.floor((v + 1.0) / width), HISTOGRAM_BINS - 1).astype(np.int64)
    found, counts = np.unique(bins, return_counts=True)
    return {f"{-1.0 + b * width:.2f}": int(c) for b, c in zip(found.tolist(), counts.tolist())}


def _candidate(image_id: str, info: Mapping[str, Any] | None) -> G.Candidate:
    info = info or {}
    mtime = info.get("modification_time")
    if mtime is None or pd.isna(mtime):
        mtime = None
    elif not isinstance(mtime, dt.datetime):
        mtime = pd.Timestamp(mtime).to_pydatetime()

    def number(name: str) -> int | None:
        value = info.get(name)
        return None if value is None or pd.isna(value) else int(value)
    return G.Candidate(image_id, info.get("path") or "", number("width"), number("height"),
                       number("size_bytes") or 0, info.get("format"), mtime)


def groups_with_keep(labels: Mapping[str, str], info: Mapping[str, Mapping[str, Any]] | None,
                     policy: str = "pixels", keep_folders: Sequence[str] = ()) -> pd.DataFrame:
    """(group_id, image_id, group_size, keep) of every grouped image: the keep policy of
    :func:`pipeline.core.grouping.keep_order_key`, ties to the smallest image id. ``info``:
    image id -> its image-table row (None: no image table, each group keeps its smallest id)."""
    members: dict[str, list[str]] = {}
    for image, group in labels.items():
        members.setdefault(group, []).append(image)
    rows = []
    for group, images in members.items():
        if info is None:
            keeper = min(images)
        else:
            keeper = min(images, key=lambda i: (G.keep_order_key(_candidate(i, info.get(i)), policy, keep_folders), i))
        rows.extend((group, i, len(images), i == keeper) for i in sorted(images))
    return pd.DataFrame(rows, columns=["group_id", "image_id", "group_size", "keep"]).astype(
        {"group_size": np.int64, "keep": bool})
