"""Incremental dedup: add new images to the index and score only new-against-all.

The pairs of a dedup are ``S(x, y) >= threshold`` (:mod:`pipeline.core.matching`), a function of
each image's augmented vector (DBA) and rotated embeddings. New images change:

* their own pairs, and
* the augmented vector of every old image whose ``dba_k`` nearest raw neighbours now include a
  new image (its scores against everything change, in both directions, rotations included).

So the images to re-score are D = new images + those old images, and only pairs touching D can
change. The state needed for that, per image (augmented vector, its DBA list, rotated
embeddings), is the table ``<workdir>/incremental/<tag>/``, written after every dedup. Pairs
touching D are recomputed exactly against every image (one scan of the state table); the
others are kept; the groups (components, "not duplicates", keep) are recomputed from the
pairs, which is linear in the pairs and exact whatever merged.

With calibrated scores (``dedup.score=calibrated``, the default) a pair's score also depends on
both images' levels, read from their kNN lists, which new images change:
:mod:`pipeline.stages.incremental_knn` keeps every list and level in the state, updates them
exactly, and re-scores the images whose level moved as well as D.

The result is identical to a full rebuild (the test checks it on real images, with both scores)
when the full dedup itself is exact and not truncated by ``dedup.k``: the index is exact (flat),
and (cosine) no image has ``dedup.k`` or more partners (checked before and after; then each kNN
list holds every partner above the threshold), (calibrated) no pair outside the kNN lists could
reach the threshold (the bound of :mod:`pipeline.stages.incremental_knn`, checked on the full
dedup's lists and on every list an update changes). Otherwise, and for query expansion, binary
hashes, changed or deleted images, or changed settings (threshold, score kind and calibration
artifact included), the full path runs and the log says why.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import matching, storage
from pipeline.encoders import registry
from pipeline.stages import dedup as dd
from pipeline.stages import embed as em
from pipeline.stages import incremental_knn as knn
from pipeline.stages import index as ix
from pipeline.stages import progress, rerank, steps, tables, tracking
from pipeline.stages.state_writer import StateWriter
from pipeline.stages.timing import timed

log = logging.getLogger(__name__)

STATE_VERSION = 2
AUG, DBA_IDS, DBA_SIMS = "aug", "dba_ids", "dba_sims"


def rot_column(r: int) -> str:
    return f"rot_{r}"


def rotations_of(config: Config) -> list[int]:
    return sorted({int(r) for r in config.dedup.rotations if int(r) % 360})


def dba_on(config: Config) -> bool:
    return config.dedup.dba_k > 1


def fingerprint(config: Config, threshold: float) -> dict:
    """What the state (and the pairs it goes with) depends on besides the images: a changed
    threshold, score kind or calibration artifact means the full path."""
    d = config.dedup
    calibrated = dd.uses_calibration(config)
    return {"version": STATE_VERSION, "embed": em.model_fingerprint(config), "threshold": float(threshold),
            "k": d.k, "dba_k": d.dba_k if dba_on(config) else 0, "dba_alpha": float(d.dba_alpha),
            "rotations": rotations_of(config), "score": "calibrated" if calibrated else "cosine",
            "calibration": dd.load_calibration(config).version if calibrated else None}


def _ids_digest(frame: DataFrame, column: str = S.IMAGE_ID) -> list[int]:
    row = frame.agg(F.count(F.lit(1)).alias("n"), F.sum(F.crc32(F.col(column))).alias("h")).first()
    return [int(row["n"]), int(row["h"] or 0)]


def _ok_embeddings(spark: SparkSession, config: Config) -> DataFrame:
    uri = storage.Workdir.of(config.workdir).embeddings(config.embed.backbone)
    return (tables.read_table(spark, uri, "embedding table").where(F.col(S.STATUS) == S.STATUS_OK)
            .select(S.IMAGE_ID, S.CONTENT_SHA256, S.EMBEDDING))


def dedup_step(spark: SparkSession, config: Config, rebuild_index: bool) -> dict[str, Any]:
    """The index + dedup steps of a job: incremental when :func:`plan` allows, else the full path.

    ``rebuild_index``: the job builds the index on the full path (``run``); ``dedup`` does not.
    After a full dedup the incremental state is written (unless ``dedup.incremental=never``).
    """
    todo, why = plan(spark, config)
    if todo is not None:
        metrics: dict[str, Any] = {}
        with timed("dedup", metrics), progress.spark_stage(spark, "dedup", config.progress):
            counts = update(spark, config, todo)
        if not isinstance(counts, str):
            metrics.update(counts)
            tracking.log_metrics(metrics)
            return metrics
        why = counts
    log.info("full dedup: %s", why)
    metrics = steps.index_step(spark, config) if rebuild_index else {}
    encoder = registry.encoder_for(config)
    state = None
    if config.dedup.incremental != "never" and not encoder.binary and config.dedup.qe_k == 0:
        state = StateWriter(spark, config, write_state)
    try:
        metrics.update(steps.dedup_step(spark, config, on_lists=state.start if state else None))
    except BaseException:
        if state is not None:
            state.abandon()
        raise
    metrics["dedup_incremental"] = 0
    if state is not None:
        # The wait after the dedup (the state's own duration is logged): the stages sum to the wall time.
        with timed("incremental_state", metrics):
            state.finish()
    tracking.log_metrics(metrics)
    return metrics


# ------------------------------------------------------------------ state
def write_state(spark: SparkSession, config: Config, threshold: float) -> None:
    """The per-image state of the dedup just done: augmented vector, DBA list, rotated embeddings.

    The augmented vectors and their DBA lists are the ones the dedup searched with, read
    from the DBA store of this index build (:func:`pipeline.stages.rerank.ensure_dba`; one
    task per unit, no second search); rotated embeddings from the tables the dedup made.
    """
    config = registry.encoder_for(config).search_config()
    workdir = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    emb = _ok_embeddings(spark, config)
    index = ix.IndexInfo.load(workdir.index_dir(method))
    if int(index.meta["count"]) <= config.dedup.driver_max_images:
        return _write_state_on_driver(spark, config, threshold, emb, index)
    if dba_on(config):
        n = int(index.meta["count"])
        state = tables.lookup(emb.select(S.IMAGE_ID, S.CONTENT_SHA256), n).join(_dba_state(spark, config, index),
                                                                                S.IMAGE_ID)
    else:
        state = emb.select(S.IMAGE_ID, S.CONTENT_SHA256, F.col(S.EMBEDDING).alias(AUG),
                           F.array().cast("array<string>").alias(DBA_IDS), F.array().cast("array<float>").alias(DBA_SIMS))
    for r in rotations_of(config):
        rotated = tables.read_table(spark, rerank.ensure_rotated(spark, config, r), "rotated embedding table")
        rotated = rotated.where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, F.col(S.EMBEDDING).alias(rot_column(r)))
        state = state.join(rotated, S.IMAGE_ID, "left")
    meta = {**fingerprint(config, threshold), "index_build_id": index.meta.get("build_id"), "count": index.meta["count"]}
    if dd.uses_calibration(config):
        state, meta["unlisted_risk"] = knn.with_lists(spark, config, state, int(index.meta["count"]),
                                                      dd.load_calibration(config), threshold)
    tables.write_table(state, workdir.incremental(method), metadata=meta)


def _write_state_on_driver(spark: SparkSession, config: Config, threshold: float, emb: DataFrame,
                           index: ix.IndexInfo) -> None:
    """:func:`write_state` for a small table (``dedup.driver_max_images``): the same rows from the
    same stores and tables, joined on the driver instead of a dozen short Spark jobs."""
    # With DBA the state's vectors are the augmented ones, from the store: the raw ones stay in Spark.
    state = (emb.select(S.IMAGE_ID, S.CONTENT_SHA256) if dba_on(config) else emb).toPandas()
    if dba_on(config):
        store = rerank.ensure_dba(spark, config, index, lambda kk: _raw_self_search(spark, config, index, kk))
        image_of = dict(tables.read_id_map(spark, index.path).select(S.FAISS_ID, S.IMAGE_ID).toPandas()
                        .itertuples(index=False, name=None))
        rows = store.rows_by_image(index.path, index.store_ids(), image_of)
        images = state[S.IMAGE_ID][state[S.IMAGE_ID].isin(rows.keys())]
        state = pd.DataFrame({S.IMAGE_ID: images, S.CONTENT_SHA256: state[S.CONTENT_SHA256][images.index],
                              **{c: [rows[i][j] for i in images] for j, c in enumerate((AUG, DBA_IDS, DBA_SIMS))}})
    else:
        state = pd.DataFrame({S.IMAGE_ID: state[S.IMAGE_ID], S.CONTENT_SHA256: state[S.CONTENT_SHA256], AUG: state[S.EMBEDDING],
                              DBA_IDS: [[]] * len(state), DBA_SIMS: [np.zeros(0, np.float32)] * len(state)})
    text, floats, texts, double = T.StringType(), T.ArrayType(T.FloatType()), T.ArrayType(T.StringType()), T.DoubleType()
    columns = [(S.IMAGE_ID, text), (S.CONTENT_SHA256, text), (AUG, floats), (DBA_IDS, texts), (DBA_SIMS, floats)]
    for r in rotations_of(config):
        rotated = tables.read_table(spark, rerank.ensure_rotated(spark, config, r), "rotated embedding table")
        rotated = dict(rotated.where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.EMBEDDING).toPandas()
                       .itertuples(index=False, name=None))
        state[rot_column(r)] = [rotated.get(i) for i in state[S.IMAGE_ID]]
        columns.append((rot_column(r), floats))
    meta = {**fingerprint(config, threshold), "index_build_id": index.meta.get("build_id"), "count": index.meta["count"]}
    if dd.uses_calibration(config):
        state, meta["unlisted_risk"] = knn.lists_on_driver(spark, config, state, int(index.meta["count"]),
                                                           dd.load_calibration(config), threshold)
        columns += [(knn.KNN_IDS, texts), (knn.KNN_SIMS, floats), (knn.KNN_BOUND, double), (knn.LEVEL, double)]
    tables.write_frame(spark, state, T.StructType([T.StructField(name, kind) for name, kind in columns]),
                       storage.Workdir.of(config.workdir).incremental(config.embed.backbone), metadata=meta)


def _dba_state(spark: SparkSession, config: Config, index: ix.IndexInfo) -> DataFrame:
    """(image id, augmented vector, DBA list as image ids, its similarities) of every indexed image,
    from the DBA store (the store of this build; built here if the dedup did not)."""
    store = rerank.ensure_dba(spark, config, index, lambda kk: _raw_self_search(spark, config, index, kk))
    units = [u.as_dict() for u in store.units]
    stores = index.store_ids()
    path = index.path

    def rows(with_vectors: bool):
        """Per unit: FAISS ids and DBA lists, with the augmented vectors when ``with_vectors``
        (the lists alone feed the id-map join, so the vectors are read once)."""
        def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            from pipeline.core import vector_store as vs

            for u, unit in vs.task_units(batches, units):
                ids, sims = store.lists(u)
                keep = ids >= 0
                out = {S.FAISS_ID: vs.stored_ids(path, unit, stores[unit.shard]),
                       "dba_fids": [i[m] for i, m in zip(ids, keep)]}
                if with_vectors:
                    out[AUG] = list(np.asarray(vs.load_array(store.file(u)), dtype=np.float32))
                    out[DBA_SIMS] = [v[m] for v, m in zip(sims, keep)]
                yield pd.DataFrame(out)

        return run

    def per_unit(with_vectors: bool, schema: str) -> DataFrame:
        return spark.range(0, len(units), numPartitions=max(1, len(units))).mapInPandas(rows(with_vectors), schema)

    listed = per_unit(True, f"{S.FAISS_ID} long, dba_fids array<long>, {AUG} array<float>, {DBA_SIMS} array<float>")
    lists = per_unit(False, f"{S.FAISS_ID} long, dba_fids array<long>")
    n = int(index.meta["count"])
    idmap = tables.lookup(tables.read_id_map(spark, path).select(S.FAISS_ID, S.IMAGE_ID), n)
    # The lists name FAISS ids: to image ids through the id map, keeping each list's order.
    named = (lists.select(S.FAISS_ID, F.posexplode("dba_fids").alias("pos", "nfid"))
             .join(idmap.select(F.col(S.FAISS_ID).alias("nfid"), F.col(S.IMAGE_ID).alias("nid")), "nfid")
             .groupBy(S.FAISS_ID).agg(F.sort_array(F.collect_list(F.struct("pos", "nid"))).alias("l"))
             .select(S.FAISS_ID, F.col("l.nid").alias(DBA_IDS)))
    # The vectors stay where they are made: the id map and the named lists come to them.
    return (listed.join(idmap, S.FAISS_ID).join(tables.lookup(named, n), S.FAISS_ID, "left")
            .select(S.IMAGE_ID, AUG, F.coalesce(DBA_IDS, F.array().cast("array<string>")).alias(DBA_IDS), DBA_SIMS))


def _raw_self_search(spark: SparkSession, config: Config, index: ix.IndexInfo, k: int):
    from pipeline.stages import allpairs

    return allpairs.self_search(spark, index, config.index, k, f"{allpairs.new_folder(config.workdir)}/k{k}")


# --------------------------------------------------------------- decision
def plan(spark: SparkSession, config: Config) -> tuple[dict | None, str]:
    """(what to add, "") when the incremental update gives the full rebuild's result; else (None, why not)."""
    d = config.dedup
    encoder = registry.encoder_for(config)
    config = encoder.search_config()
    workdir = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    if d.incremental == "never":
        return None, "dedup.incremental=never"
    if encoder.binary:
        return None, f"{method} is a binary hash (Hamming search)"
    if config.dedup.qe_k > 0:
        return None, "query expansion (dedup.qe_k > 0) makes every list depend on every other"
    for uri, what in ((workdir.pairs(method), "pairs"), (workdir.groups(method), "groups"),
                      (workdir.incremental(method), "incremental state")):
        if not tables.is_committed(spark, uri):
            return None, f"no {what} table of a previous dedup"
    try:
        index = ix.IndexInfo.load(workdir.index_dir(method))
    except FileNotFoundError:
        return None, "no index"
    state_meta = storage.read_metadata(workdir.incremental(method))
    pairs_meta = storage.read_metadata(workdir.pairs(method))
    threshold = pairs_meta.get("threshold")
    if threshold is None or abs(threshold - encoder.threshold(index.meta.get("metric"))) > 1e-9:
        return None, "the threshold changed since the last dedup"
    if {k: state_meta.get(k) for k in fingerprint(config, threshold)} != fingerprint(config, threshold):
        return None, "the model or the dedup settings changed since the last dedup"
    if index.meta.get("layout") != ix.LAYOUT:
        return None, "the index was built by an older version (no vector stores)"
    if state_meta.get("index_build_id") != index.meta.get("build_id"):
        return None, "the index was rebuilt since the last dedup"
    if index.meta.get("type") != "flat" and d.incremental != "always":
        return None, (f"index type {index.meta.get('type')} is approximate, so a rebuild would not give identical "
                      "pairs (dedup.incremental=always updates anyway, scoring new pairs exactly)")
    state = tables.read_table(spark, workdir.incremental(method), "incremental state")
    emb = _ok_embeddings(spark, config)
    gone = state.select(S.IMAGE_ID, S.CONTENT_SHA256).join(emb.select(S.IMAGE_ID, S.CONTENT_SHA256),
                                                           [S.IMAGE_ID, S.CONTENT_SHA256], "left_anti").count()
    if gone:
        return None, f"{gone} image(s) changed or were deleted since the last dedup"
    new = emb.join(state.select(S.IMAGE_ID), S.IMAGE_ID, "left_anti")
    n_new = new.count()
    if n_new > d.incremental_max_new:
        return None, f"{n_new} new images > dedup.incremental_max_new={d.incremental_max_new}"
    if dd.uses_calibration(config):
        if state_meta.get("unlisted_risk", 1):
            return None, (f"{state_meta.get('unlisted_risk')} image(s) could have a pair outside their dedup.k={d.k} "
                          "nearest neighbours at or above the threshold")
    elif max_degree(tables.read_table(spark, workdir.pairs(method), "pairs table")) >= d.k:
        return None, f"an image has dedup.k={d.k} or more partners: its kNN list was truncated"
    return {"new": n_new, "threshold": float(threshold), "index": index}, ""


def max_degree(pairs: DataFrame) -> int:
    ends = pairs.select(F.col(S.IMAGE_ID_A).alias("x")).unionAll(pairs.select(F.col(S.IMAGE_ID_B).alias("x")))
    row = ends.groupBy("x").count().agg(F.max("count")).first()
    return int(row[0] or 0)


# ----------------------------------------------------------------- update
def _dba_scan(new_ids: list[str], new_vectors: np.ndarray, dba_k: int):
    """Per old image: its DBA list merged with the new images (emitted if it changed); per new image:
    its best ``dba_k`` old neighbours within this batch (merged on the driver)."""
    def scan(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        ids_new = np.asarray(new_ids, dtype=object)
        for pdf in batches:
            if not len(pdf):
                continue
            sims = knn.stack(pdf[S.EMBEDDING]) @ new_vectors.T
            rows = []
            for i, (image_id, old_ids, old_sims) in enumerate(zip(pdf[S.IMAGE_ID], pdf[DBA_IDS], pdf[DBA_SIMS])):
                old_ids = np.asarray(list(old_ids), dtype=object)
                vals = np.concatenate([np.asarray(old_sims, np.float32), sims[i]])
                cols = np.lexsort((np.arange(len(vals)), -vals))[:dba_k]
                if (cols >= len(old_ids)).any():
                    merged = np.concatenate([old_ids, ids_new])[cols]
                    rows.append(("old", image_id, list(merged), [float(v) for v in vals[cols]]))
            best_sims, best_rows = matching.top_k(sims.T, dba_k)
            old = pdf[S.IMAGE_ID].to_numpy()
            for j, n in enumerate(ids_new):
                rows.append(("new", n, list(old[best_rows[j]]), [float(v) for v in best_sims[j]]))
            yield pd.DataFrame(rows, columns=["kind", S.IMAGE_ID, DBA_IDS, DBA_SIMS])

    return scan


def _pair_scan(d_ids: list[str], d_variants: np.ndarray, d_aug: np.ndarray, rot_cols: list[str],
               threshold: float):
    """Every pair (x in D, old y) with S(x, y) >= threshold; y's augmented vector is D's new one when y is in D."""
    index_of = {x: i for i, x in enumerate(d_ids)}

    def scan(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            if not len(pdf):
                continue
            aug = knn.stack(pdf[AUG])
            for i, y in enumerate(pdf[S.IMAGE_ID]):
                if y in index_of:
                    aug[i] = d_aug[index_of[y]]
            variants = knn.variants_of(aug, [pdf[c] for c in rot_cols])
            scores = matching.pair_scores(d_variants, d_aug, variants, aug)
            xs, ys = np.nonzero(scores >= threshold)
            yids = pdf[S.IMAGE_ID].to_numpy()
            out = pd.DataFrame({"x": np.asarray(d_ids, dtype=object)[xs], "y": yids[ys],
                                S.SIMILARITY: scores[xs, ys].astype(np.float32)})
            yield out[out["x"] != out["y"]]

    return scan


def update(spark: SparkSession, config: Config, todo: dict) -> dict[str, Any] | str:
    """Add the new images (index, pairs, groups, state); a reason (str) when the result needs the full path."""
    started = time.perf_counter()
    config = registry.encoder_for(config).search_config()
    d = config.dedup
    workdir = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    threshold = todo["threshold"]
    rot = rotations_of(config)
    rot_cols = [rot_column(r) for r in rot]
    state = tables.read_table(spark, workdir.incremental(method), "incremental state")
    emb = _ok_embeddings(spark, config)
    new_rows = sorted(emb.join(state.select(S.IMAGE_ID), S.IMAGE_ID, "left_anti").collect(), key=lambda r: r[S.IMAGE_ID])
    new_ids = [r[S.IMAGE_ID] for r in new_rows]
    dim = todo["index"].meta["dimension"]
    vn = knn.stack(r[S.EMBEDDING] for r in new_rows) if new_rows else np.zeros((0, dim), np.float32)

    # 1. DBA lists: old images that gain a new neighbour, and the new images' own lists.
    lists: dict[str, tuple[list, list]] = {}
    if dba_on(config) and new_ids:
        k = d.dba_k
        scanned = (state.select(S.IMAGE_ID, DBA_IDS, DBA_SIMS).join(emb.select(S.IMAGE_ID, S.EMBEDDING), S.IMAGE_ID)
                   .mapInPandas(_dba_scan(new_ids, vn, k),
                                schema=f"kind string, {S.IMAGE_ID} string, {DBA_IDS} array<string>, {DBA_SIMS} array<float>")
                   .collect())
        among_new = vn @ vn.T
        partial: dict[str, list] = {n: [(float(among_new[j, i]), new_ids[i]) for i in range(len(new_ids))]
                                    for j, n in enumerate(new_ids)}
        for r in scanned:
            if r["kind"] == "old":
                lists[r[S.IMAGE_ID]] = (list(r[DBA_IDS]), list(r[DBA_SIMS]))
            else:
                partial[r[S.IMAGE_ID]] += list(zip(r[DBA_SIMS], r[DBA_IDS]))
        for n, cands in partial.items():
            best = sorted(cands, key=lambda c: (-c[0], c[1]))[:k]
            lists[n] = ([c[1] for c in best], [c[0] for c in best])
    d_ids = sorted(set(new_ids) | set(lists))
    if not d_ids:  # nothing new: the pairs stand; the groups follow the current decisions
        counts = dd.write_groups(spark, config, threshold, storage.read_metadata(workdir.pairs(method)).get("score", "cosine"))
        counts.update({"dedup_incremental": 1, "incremental_new_images": 0, "incremental_rescored_images": 0,
                       "incremental_seconds": time.perf_counter() - started})
        return counts

    # 2. Vectors of D: augmented from the lists, rotated embeddings (new images: embedded now).
    old_d = sorted(set(d_ids) - set(new_ids))
    old_state = {r[S.IMAGE_ID]: r for r in state.where(F.col(S.IMAGE_ID).isin(old_d)).collect()} if old_d else {}
    raw = {r[S.IMAGE_ID]: np.asarray(r[S.EMBEDDING], np.float32) for r in new_rows}
    members = sorted({m for ids, _ in lists.values() for m in ids} - set(raw))
    if members:
        raw.update({r[S.IMAGE_ID]: np.asarray(r[S.EMBEDDING], np.float32)
                    for r in emb.where(F.col(S.IMAGE_ID).isin(members)).select(S.IMAGE_ID, S.EMBEDDING).collect()})
    if dba_on(config):
        d_aug = np.stack([matching.augment(np.stack([raw[m] for m in lists[x][0]])[None],
                                           np.asarray(lists[x][1], np.float32)[None], d.dba_alpha)[0]
                          for x in d_ids]) if d_ids else np.zeros((0, dim), np.float32)
    else:
        d_aug = np.stack([raw[x] for x in d_ids]) if d_ids else np.zeros((0, dim), np.float32)
    rotated_new = em.embed_rotated(spark, config, new_ids, rot)
    new_set = set(new_ids)
    d_rot = [[rotated_new[r].get(x) if x in new_set else old_state[x][rot_column(r)] for x in d_ids] for r in rot]
    d_variants = knn.variants_of(d_aug, d_rot)

    # 3. Pairs touching D (calibrated: and images whose level changed), exact, against everything.
    calibrated = dd.uses_calibration(config)
    knn_lists: dict = {}
    if calibrated:
        calibration = dd.load_calibration(config)
        updated = knn.update_lists(state, calibration, threshold, d.k, d.incremental_max_new, d_ids, d_aug,
                                   d_variants, new_ids, rot_cols)
        if isinstance(updated, str):
            return updated
        knn_lists, old_level, recomputed = updated
        x_ids, best = knn.rescore_pairs(spark, state, calibration, threshold, knn_lists, old_level, d_ids, d_aug,
                                        d_variants, new_ids, rot_cols)
        extra = {"incremental_lists_changed": len(knn_lists) - len(d_ids), "incremental_lists_recomputed": recomputed,
                 "incremental_levels_changed": len(x_ids) - len(d_ids)}
    else:
        extra = {}
        x_ids, best = d_ids, _cosine_pairs(state, d_ids, d_variants, d_aug, new_ids, rot_cols, threshold)
    touched = spark.createDataFrame([(x,) for x in x_ids], "x string")
    old_pairs = tables.read_table(spark, workdir.pairs(method), "pairs table")
    kept = old_pairs
    for column in (S.IMAGE_ID_A, S.IMAGE_ID_B):
        kept = kept.join(F.broadcast(touched), F.col(column) == F.col("x"), "left_anti")
    fresh = spark.createDataFrame([(a, b, *v) for (a, b), v in sorted(best.items())],
                                  f"{S.IMAGE_ID_A} string, {S.IMAGE_ID_B} string, {S.SIMILARITY} float, {dd.SCORE} float")
    pairs = kept.select(*old_pairs.columns).unionByName(fresh.select(*old_pairs.columns)).localCheckpoint()
    if not calibrated and max_degree(pairs) >= d.k:
        return f"an image would have dedup.k={d.k} or more partners"

    # 4. Commit: pairs, groups, the index with the new vectors, then the state (the marker of it all).
    pairs_meta = storage.read_metadata(workdir.pairs(method))
    pairs_meta["incremental"] = {"new_images": len(new_ids), "rescored_images": len(x_ids),
                                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tables.write_table(pairs, workdir.pairs(method), metadata=pairs_meta)
    counts = dd.write_groups(spark, config, threshold, pairs_meta.get("score", "cosine"))
    info = ix.append_to_index(config, todo["index"], new_ids, vn)
    sha = {**{x: r[S.CONTENT_SHA256] for x, r in old_state.items()}, **{r[S.IMAGE_ID]: r[S.CONTENT_SHA256] for r in new_rows}}
    d_rows = [(x, sha[x], d_aug[i].tolist(),
               [str(m) for m in lists[x][0]] if x in lists else list(old_state[x][DBA_IDS] or []),
               [float(v) for v in lists[x][1]] if x in lists else list(old_state[x][DBA_SIMS] or []),
               *[None if v is None else [float(f) for f in v] for v in (d_rot[j][i] for j in range(len(rot)))],
               *(knn_lists[x] if calibrated else ()))
              for i, x in enumerate(d_ids)]
    state_rows = spark.createDataFrame(d_rows, state.schema)
    d_frame = spark.createDataFrame([(x,) for x in d_ids], "x string")
    new_state = state.join(F.broadcast(d_frame), F.col(S.IMAGE_ID) == F.col("x"), "left_anti").select(*state.columns)
    changed = knn.state_update(spark, knn_lists, d_ids) if calibrated else None
    if changed is not None:  # other images' kNN lists that took in a re-scored image
        renamed = changed.select(F.col(S.IMAGE_ID).alias("_id"), *[F.col(c).alias(f"_{c}") for c in knn.KNN_COLUMNS])
        new_state = new_state.join(F.broadcast(renamed), F.col(S.IMAGE_ID) == F.col("_id"), "left").select(
            *[F.when(F.col("_id").isNotNull(), F.col(f"_{c}")).otherwise(F.col(c)).alias(c)
              if c in knn.KNN_COLUMNS else F.col(c) for c in state.columns])
    meta = {**storage.read_metadata(workdir.incremental(method)), "index_build_id": info.meta["build_id"],
            "count": info.meta["count"]}
    tables.write_table(new_state.unionByName(state_rows).localCheckpoint(), workdir.incremental(method), metadata=meta)
    counts.update({"dedup_incremental": 1, "incremental_new_images": len(new_ids),
                   "incremental_rescored_images": len(x_ids), **extra,
                   "incremental_seconds": time.perf_counter() - started})
    log.info("incremental dedup: %d new images, %d re-scored: %s", len(new_ids), len(x_ids), counts)
    return counts


def _cosine_pairs(state: DataFrame, d_ids: list[str], d_variants: np.ndarray, d_aug: np.ndarray, new_ids: list[str],
                  rot_cols: list[str], threshold: float) -> dict:
    """``{(a, b): (similarity, None)}``: pairs touching D at or above a cosine threshold."""
    found = (state.select(S.IMAGE_ID, AUG, *rot_cols)
             .mapInPandas(_pair_scan(d_ids, d_variants, d_aug, rot_cols, threshold),
                          schema=f"x string, y string, {S.SIMILARITY} float").collect())
    rows = [(r["x"], r["y"], float(r[S.SIMILARITY])) for r in found]
    if new_ids:
        pos = [d_ids.index(n) for n in new_ids]
        scores = matching.pair_scores(d_variants, d_aug, d_variants[pos], d_aug[pos])
        for i, j in zip(*np.nonzero(scores >= threshold)):
            if d_ids[i] != new_ids[j]:
                rows.append((d_ids[i], new_ids[j], float(scores[i, j])))
    best: dict[tuple[str, str], float] = {}
    for x, y, s in rows:
        key = (min(x, y), max(x, y))
        best[key] = max(best.get(key, -2.0), s)
    return {key: (s, None) for key, s in best.items()}
