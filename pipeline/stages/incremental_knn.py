"""Incremental dedup with calibrated scores (``dedup.score=calibrated``): kNN lists kept exact.

A calibrated pair score ``p = sigmoid(b + c_cos * S + c_norm * (S - min(max(level_a, level_b), cap)))``
(:mod:`pipeline.core.calibration`) depends on the pair's similarity S and on both images'
levels: the similarity to the ``rank``-th other image of their kNN lists, which hold the top
``dir(x -> .)`` (:mod:`pipeline.core.matching`). The full dedup (:func:`pipeline.stages.dedup.dedup`)
takes as candidates the pairs of those lists and keeps ``p >= threshold``.

Exactness rests on two facts:

* **Completeness.** Both coefficients are positive (checked), so p rises with S and falls with
  the level. If for every image a, ``p(u(a), min(level_a, cap)) < threshold`` where ``u(a)`` bounds
  ``dir(a -> y)`` for every y outside a's list (its k-th value), no pair outside the lists can pass:
  the full dedup's pairs are then exactly ALL pairs with ``p >= threshold``, with S the max of both
  directions (a pair whose larger direction is unlisted is below the threshold either way).
  This is checked on the full dedup's lists (state metadata ``unlisted_risk``) and on every list
  an update changes; when it fails, the full path runs (a larger ``dedup.k`` restores it).
* **What changes.** With D = new images + old images whose augmented vector changed (see
  :mod:`pipeline.stages.incremental`), ``dir(z -> y)`` changes only when z or y is in D. So an old
  image z outside D keeps its list except the entries of D, and
  * scan 1 (one pass over the state) drops z's D entries and merges in its new ``dir(z -> D)``
    values (:func:`pipeline.core.matching.merge_list`); what falls off the list raises its
    bound, "every unlisted image is at most this". In the same pass every D member's own list,
    ``dir(x -> all)``, is computed exactly (per batch top-(k+1), merged on the driver);
  * a changed list whose level it cannot tell (too many D entries dropped, their new values
    below the bound), or whose bound is too loose for the completeness check, is recomputed
    exactly from the state (scan 1b, only when needed);
  * X = D + the images whose level changed; scan 2 rescores every pair touching X exactly
    (S and p with the new levels). A pair with neither end in X keeps its S, its levels and so
    its p: the old pairs table holds it exactly when it passes.

The state table carries, per image, the list (``knn_ids``, ``knn_sims``, best first, at most k
others), ``knn_bound`` (:data:`pipeline.core.matching.NO_BOUND`: nothing is unlisted) and
``level``. Ties at equal similarity are broken by image id here and by FAISS order in the full
dedup: a tie at the ``rank``-th place gives the same level either way, one at a list's end can
differ only at pairs far below the threshold.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import calibration as cal_core
from pipeline.core import matching, storage
from pipeline.stages import dedup as dd
from pipeline.stages import tables

log = logging.getLogger(__name__)

AUG = "aug"
KNN_IDS, KNN_SIMS, KNN_BOUND, LEVEL = dd.KNN_IDS, dd.KNN_SIMS, "knn_bound", dd.LEVEL
KNN_COLUMNS = (KNN_IDS, KNN_SIMS, KNN_BOUND, LEVEL)
KNN_SCHEMA = f"{KNN_IDS} array<string>, {KNN_SIMS} array<float>, {KNN_BOUND} double, {LEVEL} double"


def stack(values) -> np.ndarray:
    values = list(values)
    return np.stack(values).astype(np.float32) if values else np.zeros((0, 0), np.float32)


def variants_of(aug: np.ndarray, rotated: list) -> np.ndarray:
    """(n, 1 + rotations, d): the augmented vector, then each rotated embedding (a missing one: aug again)."""
    parts = [aug]
    for column in rotated:
        parts.append(np.stack([aug[i] if v is None else np.asarray(v, np.float32) for i, v in enumerate(column)]))
    return np.stack(parts, axis=1)


# ------------------------------------------------------------- full dedup
def with_lists(spark: SparkSession, config: Config, state: DataFrame, count: int,
               calibration: cal_core.Calibration, threshold: float) -> tuple[DataFrame, int]:
    """The state with the full dedup's lists (``neighbors/<tag>/``), bounds and levels; and how
    many images could have a pair outside the lists at or above the threshold (0: complete)."""
    k = config.dedup.k
    lists = tables.read_table(spark, storage.Workdir.of(config.workdir).neighbors(config.embed.backbone),
                              "neighbour lists")
    # More than k others: each list is the exact top k, the k-th value bounds the rest.
    bound = F.element_at(KNN_SIMS, k).cast("double") if count - 1 > k else F.lit(matching.NO_BOUND)
    level = F.expr(f"if(size({KNN_SIMS}) = 0, -1.0D, "
                   f"cast(element_at({KNN_SIMS}, least({int(calibration.rank)}, size({KNN_SIMS}))) as double))")
    lists = lists.select(S.IMAGE_ID, KNN_IDS, KNN_SIMS, bound.alias(KNN_BOUND), level.alias(LEVEL)).localCheckpoint()
    risky = lists.select(KNN_SIMS, KNN_BOUND, LEVEL).mapInPandas(_risk_scan(calibration, threshold, k),
                                                                 schema="n long").collect()
    return state.join(lists, S.IMAGE_ID), int(sum(r["n"] for r in risky))


def lists_on_driver(spark: SparkSession, config: Config, state: pd.DataFrame, count: int,
                    calibration: cal_core.Calibration, threshold: float) -> tuple[pd.DataFrame, int]:
    """:func:`with_lists` on the driver, for a state held there (a small table's)."""
    k = config.dedup.k
    lists = tables.read_table(spark, storage.Workdir.of(config.workdir).neighbors(config.embed.backbone),
                              "neighbour lists").select(S.IMAGE_ID, KNN_IDS, KNN_SIMS).toPandas()
    sims = [np.asarray(v, np.float32) for v in lists[KNN_SIMS]]
    bounds = [(float(v[k - 1]) if len(v) >= k else None) if count - 1 > k else matching.NO_BOUND for v in sims]
    levels = [cal_core.level_of_row(v, calibration.rank) for v in sims]
    lists = pd.DataFrame({S.IMAGE_ID: lists[S.IMAGE_ID], KNN_IDS: lists[KNN_IDS], KNN_SIMS: sims,
                          KNN_BOUND: bounds, LEVEL: levels})
    risky = sum(at_risk(list(v), b, lv, calibration, threshold, k)
                for v, b, lv in zip(sims, bounds, levels) if b is not None)
    return state.merge(lists, on=S.IMAGE_ID, how="inner"), int(risky)


def _risk_scan(calibration: cal_core.Calibration, threshold: float, k: int):
    def scan(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        n = 0
        for pdf in batches:
            n += sum(at_risk(list(s), b, lv, calibration, threshold, k)
                     for s, b, lv in zip(pdf[KNN_SIMS], pdf[KNN_BOUND], pdf[LEVEL]))
        yield pd.DataFrame({"n": [n]})

    return scan


def at_risk(sims: list, bound: float, level: float, calibration: cal_core.Calibration, threshold: float,
            k: int) -> bool:
    upper = matching.outside_bound(sims, float(bound), k)
    return upper is not None and bool(cal_core.unlisted_can_pass(np.array([upper]), np.array([level]),
                                                                 calibration, threshold)[0])


# ----------------------------------------------------------------- update
def _batch_vectors(pdf: pd.DataFrame, d_index: dict, d_aug: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A state batch's augmented vectors and ids, with D's new vectors in place of D members' old ones."""
    aug = stack(pdf[AUG])
    ids = pdf[S.IMAGE_ID].to_numpy()
    for i, y in enumerate(ids):
        if y in d_index:
            aug[i] = d_aug[d_index[y]]
    return aug, ids


def _list_scan(d_ids: list[str], d_aug: np.ndarray, q_ids: list[str], q_variants: np.ndarray,
               rot_cols: list[str], k: int, merge_others: bool):
    """Per state batch: ``dir(q -> batch)`` top k+1 for each query q (kind "q"); with
    ``merge_others``, every other image's list updated with its new ``dir(z -> D)`` (kind "z",
    emitted when it changed). The batch's augmented vectors are D's new ones for D members."""
    d_index = {x: i for i, x in enumerate(d_ids)}
    d_set = set(d_ids)
    q_arr = np.asarray(q_ids, dtype=object)

    def scan(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            if not len(pdf):
                continue
            aug, ids = _batch_vectors(pdf, d_index, d_aug)
            rows = []
            if len(q_ids):
                from_q = matching.directed_scores(q_variants, aug)
                from_q[q_arr[:, None] == ids[None, :]] = -np.inf
                vals, cols = matching.top_k(from_q, k + 1)
                for j, q in enumerate(q_ids):
                    keep = np.isfinite(vals[j])
                    rows.append(("q", q, list(ids[cols[j][keep]]), vals[j][keep].tolist(), 0.0, 0.0))
            if merge_others and len(d_ids):
                variants = variants_of(aug, [pdf[c] for c in rot_cols])
                vals, cols = matching.top_k(matching.directed_scores(variants, d_aug), k + 1)
                d_arr = np.asarray(d_ids, dtype=object)
                for i, z in enumerate(ids):
                    if z in d_set:
                        continue
                    old_bound = float(pdf[KNN_BOUND].iloc[i])
                    # Most images: no D entry listed and every new value below the bound, so the list
                    # (exact values of its images) and its bound (above every unlisted one) still hold.
                    if vals[i, 0] < old_bound and d_set.isdisjoint(pdf[KNN_IDS].iloc[i]):
                        continue
                    old_ids, old_sims = list(pdf[KNN_IDS].iloc[i]), [float(s) for s in pdf[KNN_SIMS].iloc[i]]
                    new = matching.merge_list(old_ids, old_sims, old_bound, d_set, d_arr[cols[i]], vals[i], k)
                    if new != (old_ids, old_sims, old_bound):
                        rows.append(("z", z, new[0], new[1], new[2], float(pdf[LEVEL].iloc[i])))
            yield pd.DataFrame(rows, columns=["kind", S.IMAGE_ID, KNN_IDS, KNN_SIMS, KNN_BOUND, LEVEL])

    return scan


LIST_SCAN_SCHEMA = (f"kind string, {S.IMAGE_ID} string, {KNN_IDS} array<string>, {KNN_SIMS} array<float>, "
                    f"{KNN_BOUND} double, {LEVEL} double")


def _exact_lists(found, q_ids: list[str], extra_ids: list[str], extra: np.ndarray, k: int) -> dict:
    """Exact top-k lists of the queries: the per-batch lists merged with ``extra`` (q x images not in the state)."""
    pool: dict[str, list] = {q: [] for q in q_ids}
    for r in found:
        if r["kind"] == "q":
            pool[r[S.IMAGE_ID]] += list(zip(r[KNN_IDS], r[KNN_SIMS]))
    for j, q in enumerate(q_ids):
        pool[q] += [(w, float(extra[j, c])) for c, w in enumerate(extra_ids) if w != q]
    out = {}
    for q, entries in pool.items():
        ids, sims, bound = matching.merge_list([], [], matching.NO_BOUND, set(), [e[0] for e in entries],
                                               [e[1] for e in entries], k)
        out[q] = (ids, sims, bound)
    return out


def update_lists(state: DataFrame, calibration: cal_core.Calibration, threshold: float, k: int, max_exact: int,
                 d_ids: list[str], d_aug: np.ndarray, d_variants: np.ndarray, new_ids: list[str],
                 rot_cols: list[str]) -> tuple[dict, dict, int] | str:
    """Scans 1 and 1b: ``(lists, old levels, lists recomputed in 1b)``, lists ``{image: (ids, sims,
    bound, level)}`` for every image whose list changed (D members included); a reason (str) when
    the update cannot be exact."""
    rank = calibration.rank
    new_pos = [d_ids.index(n) for n in new_ids]
    state_cols = state.select(S.IMAGE_ID, AUG, *rot_cols, *KNN_COLUMNS)
    found = state_cols.mapInPandas(_list_scan(d_ids, d_aug, d_ids, d_variants, rot_cols, k, True),
                                   schema=LIST_SCAN_SCHEMA).collect()
    to_new = matching.directed_scores(d_variants, d_aug[new_pos]) if new_pos else np.zeros((len(d_ids), 0))
    lists = {x: v for x, v in _exact_lists(found, d_ids, new_ids, to_new, k).items()}
    old_level = {r[S.IMAGE_ID]: r[LEVEL] for r in found if r["kind"] == "z"}
    lists.update({r[S.IMAGE_ID]: (list(r[KNN_IDS]), list(r[KNN_SIMS]), r[KNN_BOUND]) for r in found if r["kind"] == "z"})

    def unsure(x):
        ids, sims, bound = lists[x]
        level = matching.list_level(sims, bound, rank)
        return level is None or at_risk(sims, bound, level, calibration, threshold, k)

    # 1b. Lists the merge cannot tell exactly enough: recomputed against everything.
    redo = sorted(x for x in old_level if unsure(x))
    if len(redo) > max_exact:
        return f"{len(redo)} kNN lists lost too many entries to re-scored images (> dedup.incremental_max_new)"
    if redo:
        rows = {r[S.IMAGE_ID]: r for r in state.where(F.col(S.IMAGE_ID).isin(redo)).select(
            S.IMAGE_ID, AUG, *rot_cols).collect()}
        r_variants = variants_of(stack(rows[x][AUG] for x in redo), [[rows[x][c] for x in redo] for c in rot_cols])
        again = state_cols.mapInPandas(_list_scan(d_ids, d_aug, redo, r_variants, rot_cols, k, False),
                                       schema=LIST_SCAN_SCHEMA).collect()
        to_new = matching.directed_scores(r_variants, d_aug[new_pos]) if new_pos else np.zeros((len(redo), 0))
        lists.update(_exact_lists(again, redo, new_ids, to_new, k))
    out = {}
    for x, (ids, sims, bound) in lists.items():
        level = matching.list_level(sims, bound, rank)
        if level is None or at_risk(sims, bound, level, calibration, threshold, k):
            return (f"image {x}: a pair outside its {k} nearest neighbours could reach the threshold "
                    "(dedup.k too small for this threshold)")
        out[x] = ([str(i) for i in ids], [float(s) for s in sims], float(bound), level)
    return out, old_level, len(redo)


def _pair_scan(x_ids: list[str], x_variants: np.ndarray, x_aug: np.ndarray, x_levels: np.ndarray,
               d_ids: list[str], d_aug: np.ndarray, levels: dict, rot_cols: list[str],
               calibration: cal_core.Calibration, threshold: float):
    """Every pair (x in X, state image y) with calibrated score >= threshold, with the new levels."""
    d_index = {x: i for i, x in enumerate(d_ids)}
    x_arr = np.asarray(x_ids, dtype=object)

    def scan(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            if not len(pdf):
                continue
            aug, ids = _batch_vectors(pdf, d_index, d_aug)
            variants = variants_of(aug, [pdf[c] for c in rot_cols])
            sims = matching.pair_scores(x_variants, x_aug, variants, aug)
            y_levels = np.array([levels.get(y, lv) for y, lv in zip(ids, pdf[LEVEL])], np.float64)
            # The full dedup scores float32 similarities and stores a float32 score.
            p = calibration.probability(sims.astype(np.float32).astype(np.float64), x_levels[:, None],
                                        y_levels[None, :]).astype(np.float32)
            xs, ys = np.nonzero((p >= threshold) & (x_arr[:, None] != ids[None, :]))
            yield pd.DataFrame({"x": x_arr[xs], "y": ids[ys], S.SIMILARITY: sims[xs, ys].astype(np.float32),
                                dd.SCORE: p[xs, ys]})

    return scan


def rescore_pairs(spark: SparkSession, state: DataFrame, calibration: cal_core.Calibration, threshold: float,
                  lists: dict, old_level: dict, d_ids: list[str], d_aug: np.ndarray, d_variants: np.ndarray,
                  new_ids: list[str], rot_cols: list[str]) -> tuple[list[str], dict]:
    """Scan 2: X = D + images whose level changed; returns (X, {(a, b): (similarity, score)})."""
    levels = {x: v[3] for x, v in lists.items()}
    changed = sorted(x for x, lv in old_level.items() if levels[x] != lv)
    x_ids = list(d_ids) + changed
    rows = {r[S.IMAGE_ID]: r for r in state.where(F.col(S.IMAGE_ID).isin(changed)).select(
        S.IMAGE_ID, AUG, *rot_cols).collect()} if changed else {}
    if changed:
        c_aug = stack(rows[x][AUG] for x in changed)
        x_aug = np.concatenate([d_aug, c_aug])
        x_variants = np.concatenate([d_variants, variants_of(c_aug, [[rows[x][c] for x in changed] for c in rot_cols])])
    else:
        x_aug, x_variants = d_aug, d_variants
    x_levels = np.array([levels[x] for x in x_ids], np.float64)
    found = (state.select(S.IMAGE_ID, AUG, LEVEL, *rot_cols)
             .mapInPandas(_pair_scan(x_ids, x_variants, x_aug, x_levels, d_ids, d_aug, levels, rot_cols,
                                     calibration, threshold),
                          schema=f"x string, y string, {S.SIMILARITY} float, {dd.SCORE} float").collect())
    found = [(r["x"], r["y"], float(r[S.SIMILARITY]), float(r[dd.SCORE])) for r in found]
    if new_ids:
        pos = [d_ids.index(n) for n in new_ids]
        sims = matching.pair_scores(x_variants, x_aug, d_variants[pos], d_aug[pos])
        p = calibration.probability(sims.astype(np.float32).astype(np.float64), x_levels[:, None],
                                    np.array([levels[n] for n in new_ids], np.float64)[None, :]).astype(np.float32)
        for i, j in zip(*np.nonzero(p >= threshold)):
            if x_ids[i] != new_ids[j]:
                found.append((x_ids[i], new_ids[j], float(sims[i, j]), float(p[i, j])))
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for x, y, s, p in found:
        key = (min(x, y), max(x, y))
        if key not in best or s > best[key][0]:
            best[key] = (s, p)
    log.info("incremental dedup (calibrated): %d images re-scored, %d of them for a changed level",
             len(x_ids), len(changed))
    return x_ids, best


def state_update(spark: SparkSession, lists: dict, d_ids: list[str]) -> DataFrame | None:
    """The new list columns of images outside D whose list changed (image_id + :data:`KNN_COLUMNS`)."""
    d_set = set(d_ids)
    rows = [(x, *v) for x, v in sorted(lists.items()) if x not in d_set]
    return spark.createDataFrame(rows, f"{S.IMAGE_ID} string, {KNN_SCHEMA}") if rows else None
