"""Shared by the peer scripts (run inside their own virtualenvs: only the standard library and numpy)."""
from __future__ import annotations

import csv
import json
import sys
import time
from itertools import combinations

import numpy as np


def load_manifest(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def ns_score(vectors: np.ndarray, groups: list[str]) -> float:
    """UKBench N-S: mean number of same-group images among the top 4 (query included), cosine."""
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    top = np.argsort(-(v @ v.T), axis=1)[:, :4]
    g = np.asarray(groups)
    return float(np.mean([(g[row] == g[i]).sum() for i, row in enumerate(top)]))


def pair_scores(predicted: set, rows: list[dict]) -> dict:
    """Pair precision/recall of unordered path pairs against the corpus groups."""
    by_group: dict[str, list[str]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r["path"])
    truth = {tuple(sorted(p)) for paths in by_group.values() for p in combinations(paths, 2)}
    predicted = {tuple(sorted(p)) for p in predicted if p[0] != p[1]}
    hit = len(predicted & truth)
    return {"pairs_predicted": len(predicted), "pairs_true": len(truth),
            "pair_precision": hit / len(predicted) if predicted else 0.0, "pair_recall": hit / len(truth)}


def write(out: str, result: dict) -> None:
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)


class Clock:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def args() -> tuple[str, str, str]:
    """corpus folder, manifest, output JSON."""
    return sys.argv[1], sys.argv[2], sys.argv[3]
