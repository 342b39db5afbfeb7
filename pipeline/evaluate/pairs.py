"""Pair precision-recall of the evaluate job: the curve of every candidate pair, the operating point.

The candidates are the dedup search's (each image's ``dedup.k`` nearest neighbours, same
re-ranking), scored exactly as :mod:`pipeline.stages.dedup` scores them; recall counts every
true pair of the ground truth, so duplicates the search never proposed count as missed.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np
from pyspark.sql import SparkSession

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import calibration as cal_core
from pipeline.core import metrics as M
from pipeline.stages import dedup as dd
from pipeline.stages import search

log = logging.getLogger(__name__)

CURVE_POINTS = 300
# Rows of the printed table: probabilities, or cosines with dedup.score=cosine.
TABLE_THRESHOLDS = {"calibrated": (0.5, 0.7, 0.8, 0.9, 0.95, 0.99), "cosine": (0.8, 0.85, 0.88, 0.9, 0.93, 0.96)}


def scored_candidates(spark: SparkSession, cfg: Config) -> tuple[list, np.ndarray, np.ndarray | None]:
    """(image id pairs, cosines, calibrated scores or None) of every candidate pair of the dedup search."""
    neighbors = search.search_neighbors(spark, cfg, cfg.dedup.k + 1).localCheckpoint()
    candidates = dd.pairs_from_neighbors(neighbors, -1.0)
    if dd.uses_calibration(cfg):
        candidates = dd.score_pairs(candidates, neighbors, dd.load_calibration(cfg))
        rows = candidates.select(S.IMAGE_ID_A, S.IMAGE_ID_B, S.SIMILARITY, dd.SCORE).collect()
        return ([(r[0], r[1]) for r in rows], np.array([r[2] for r in rows], np.float64),
                np.array([r[3] for r in rows], np.float64))
    rows = candidates.select(S.IMAGE_ID_A, S.IMAGE_ID_B, S.SIMILARITY).collect()
    return [(r[0], r[1]) for r in rows], np.array([r[2] for r in rows], np.float64), None


def pair_curves(spark: SparkSession, cfg: Config, name_of: Mapping[str, str],
                group_of: Mapping[str, str], threshold: float) -> dict[str, Any]:
    """Curves of the calibrated score (when used) and of the raw cosine, and the operating point."""
    pairs, cosine, score = scored_candidates(spark, cfg)
    truth = M.true_pairs({n: g for n, g in group_of.items() if n in set(name_of.values())})
    labels = np.array([tuple(sorted((name_of[a], name_of[b]))) in truth for a, b in pairs], bool)
    n_true = len(truth)
    used = score if score is not None else cosine
    out: dict[str, Any] = {
        "score": "calibrated" if score is not None else "cosine",
        "candidates": len(pairs), "true_pairs": n_true,
        "candidate_recall": float(labels.sum() / n_true) if n_true else 1.0,
        "operating_point": cal_core.precision_recall(used, labels, n_true, [threshold])[0],
        "curve": cal_core.curve(used, labels, n_true, CURVE_POINTS),
    }
    out["table"] = cal_core.precision_recall(used, labels, n_true, TABLE_THRESHOLDS[out["score"]])
    if score is not None:
        out["cosine_curve"] = cal_core.curve(cosine, labels, n_true, CURVE_POINTS)
    # The raw cosine at the threshold that was the default before calibration, for comparison.
    out["cosine_0.88"] = cal_core.precision_recall(cosine, labels, n_true, [0.88])[0]
    return out


def curve_png(result: Mapping[str, Any], path: str, title: str) -> str:
    """The precision-recall curve(s) as a PNG (matplotlib, Agg), the operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    try:
        pts = result["curve"]
        label = "calibrated score" if result["score"] == "calibrated" else "cosine"
        ax.plot([p["recall"] for p in pts], [p["precision"] for p in pts], color="#c0392b", lw=2, label=label)
        if result.get("cosine_curve"):
            cpts = result["cosine_curve"]
            ax.plot([p["recall"] for p in cpts], [p["precision"] for p in cpts], color="#7f8c8d", lw=1.2,
                    ls="--", label="raw cosine")
        op = result["operating_point"]
        ax.plot([op["recall"]], [op["precision"]], "o", color="#2c3e50", ms=8,
                label=f"threshold {op['threshold']:.2f}: P {op['precision']:.3f} R {op['recall']:.3f}")
        ax.set_xlabel("pair recall (of all true pairs)")
        ax.set_ylabel("pair precision")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=9)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def format_curve(result: Mapping[str, Any]) -> str:
    """The operating point and a few points of the curve, for the evaluate report."""
    op = result["operating_point"]
    lines = [f"pairs ({result['score']}): operating point threshold {op['threshold']:.3f} -> precision "
             f"{op['precision']:.3f}, recall {op['recall']:.3f} ({op['pairs']} pairs; {result['true_pairs']} true "
             f"pairs, {result['candidate_recall']:.3f} of them among the {result['candidates']} candidates)",
             f"  {'threshold':>9} {'pairs':>6} {'precision':>9} {'recall':>6}"]
    for p in result["table"]:
        lines.append(f"  {p['threshold']:>9.3f} {p['pairs']:>6} {p['precision']:>9.3f} {p['recall']:>6.3f}")
    return "\n".join(lines)
