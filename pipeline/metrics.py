"""Retrieval and dedup metrics as small pure functions (no Spark, no FAISS)."""
from __future__ import annotations

import itertools
from typing import Iterable, Mapping, Sequence


def ns_score(rankings: Mapping[str, Sequence[str]], group_of: Mapping[str, object], top: int = 4) -> float:
    """UKBench N-S score: mean number of the query's group members in its top-``top`` results.

    The query itself counts (it is normally its own first result), so the maximum is 4.0
    for UKBench's groups of four.
    """
    if not rankings:
        raise ValueError("no rankings to score")
    total = 0
    for query, ranked in rankings.items():
        group = group_of[query]
        total += sum(1 for r in list(ranked)[:top] if group_of.get(r) == group)
    return total / len(rankings)


def average_precision(ranked: Sequence[str], relevant: set[str]) -> float:
    """Average precision as in the official INRIA Holidays evaluation script.

    That script interpolates precision trapezoidally between consecutive relevant results
    (``score_ap_from_ranks_1`` in holidays_map.py); relevant images never retrieved add 0.
    ``ranked`` must not contain the query.
    """
    if not relevant:
        raise ValueError("average precision needs at least one relevant item")
    ap = 0.0
    step = 1.0 / len(relevant)
    hits = 0
    for rank, item in enumerate(ranked):
        if item not in relevant:
            continue
        precision_before = 1.0 if rank == 0 else hits / rank
        precision_after = (hits + 1) / (rank + 1)
        ap += (precision_before + precision_after) * step / 2.0
        hits += 1
    return ap


def mean_average_precision(rankings: Mapping[str, Sequence[str]], relevant: Mapping[str, Iterable[str]]) -> float:
    """Holidays mAP over the queries in ``relevant``; each query is dropped from its own ranking."""
    if not relevant:
        raise ValueError("no queries to score")
    aps = []
    for query, rel in relevant.items():
        ranked = [r for r in rankings.get(query, ()) if r != query]
        aps.append(average_precision(ranked, set(rel)))
    return sum(aps) / len(aps)


def true_pairs(group_of: Mapping[str, object]) -> set[tuple[str, str]]:
    """All unordered pairs (a < b) of items that share a group."""
    members: dict[object, list[str]] = {}
    for item, group in group_of.items():
        members.setdefault(group, []).append(item)
    pairs = set()
    for items in members.values():
        for a, b in itertools.combinations(sorted(items), 2):
            pairs.add((a, b))
    return pairs


def pair_precision_recall(predicted: Iterable[tuple[str, str]], truth: set[tuple[str, str]]) -> tuple[float, float]:
    """Precision and recall of predicted duplicate pairs (order within a pair ignored)."""
    pred = {tuple(sorted(p)) for p in predicted}
    tp = len(pred & truth)
    precision = tp / len(pred) if pred else 1.0
    recall = tp / len(truth) if truth else 1.0
    return precision, recall
