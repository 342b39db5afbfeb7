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


def average_precision(ranked: Sequence[str], relevant: set[str], trapezoid: bool = False) -> float:
    """Average precision of one ranking; ``ranked`` must not contain the query.

    Default: the usual non-interpolated AP, the mean of the precision at each relevant
    result (relevant images never retrieved add 0). This is the AP behind the reference
    figures in ../shared (MobileNet 0.845 on holidays-dev) and the R-MAC/GeM literature.
    ``trapezoid=True``: INRIA's own holidays_map.py (``score_ap_from_ranks_1``), which
    interpolates precision trapezoidally between consecutive relevant results and gives
    slightly lower numbers.
    """
    if not relevant:
        raise ValueError("average precision needs at least one relevant item")
    ap = 0.0
    hits = 0
    for rank, item in enumerate(ranked):
        if item not in relevant:
            continue
        precision_after = (hits + 1) / (rank + 1)
        if trapezoid:
            precision_before = 1.0 if rank == 0 else hits / rank
            ap += (precision_before + precision_after) / 2.0
        else:
            ap += precision_after
        hits += 1
    return ap / len(relevant)


def mean_average_precision(rankings: Mapping[str, Sequence[str]], relevant: Mapping[str, Iterable[str]],
                           trapezoid: bool = False) -> float:
    """Holidays mAP over the queries in ``relevant``; each query is dropped from its own ranking."""
    if not relevant:
        raise ValueError("no queries to score")
    aps = []
    for query, rel in relevant.items():
        ranked = [r for r in rankings.get(query, ()) if r != query]
        aps.append(average_precision(ranked, set(rel), trapezoid=trapezoid))
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
