"""Re-ranking in Spark: database-side augmentation (DBA), alpha-query expansion, rotated queries.

Rotated embedding tables live under ``<workdir>/derived/rot<deg>``, DBA's augmented vectors
(one .npy per unit of the index, float32) under ``<workdir>/derived/dba/<build>-k<k>-a<alpha>``;
both are rebuilt when their inputs change.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import rerank as core_rerank
from pipeline.core import storage
from pipeline.core import vector_store as vs
from pipeline.stages import allpairs
from pipeline.stages import embed as em
from pipeline.stages import index as ix
from pipeline.stages import tables

log = logging.getLogger(__name__)


_VECTORS = f"{S.IMAGE_ID} string, {S.EMBEDDING} array<float>"
# Role of a row in a query-expansion group: the query itself, or one of its neighbours.
_ROLE = "role"


def _stack(column: pd.Series) -> np.ndarray:
    return np.stack(column.to_numpy()).astype(np.float32)


def _expand_group(alpha: float):
    def expand(pdf: pd.DataFrame) -> pd.DataFrame:
        is_query = pdf[_ROLE].to_numpy() == 0
        neighbors = pdf[~is_query]
        dim = len(pdf[S.EMBEDDING].iloc[0])
        vectors = _stack(neighbors[S.EMBEDDING]) if len(neighbors) else np.zeros((0, dim), np.float32)
        q = _stack(pdf[is_query][S.EMBEDDING])[:1]
        out = core_rerank.expand_with_neighbors(q, vectors[None], alpha)
        return pd.DataFrame({S.IMAGE_ID: [pdf[S.IMAGE_ID].iloc[0]], S.EMBEDDING: [out[0]]})

    return expand


def _augment_group(alpha: float):
    def augment(pdf: pd.DataFrame) -> pd.DataFrame:
        sims = pdf[S.SIMILARITY].to_numpy(np.float32)
        out = core_rerank.augment_with_neighbors(_stack(pdf[S.EMBEDDING])[None], sims[None], alpha)
        return pd.DataFrame({S.IMAGE_ID: [pdf[S.IMAGE_ID].iloc[0]], S.EMBEDDING: [out[0]]})

    return augment


def expand_queries(spark: SparkSession, config: Config, queries: DataFrame, neighbors: DataFrame,
                   qe_k: int, alpha: float) -> DataFrame:
    """alpha-QE (:func:`pipeline.core.rerank.expand_with_neighbors`) per query, over its qe_k best other neighbours."""
    database = tables.read_table(spark, storage.Workdir.of(config.workdir).embeddings(config.embed.backbone),
                                 "embedding table").select(F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID),
                                                           F.col(S.EMBEDDING).alias("vector"))
    order = Window.partitionBy(S.QUERY_ID).orderBy(F.desc(S.SIMILARITY), F.col(S.NEIGHBOR_ID))
    top = (neighbors.where(F.col(S.QUERY_ID) != F.col(S.NEIGHBOR_ID))
           .withColumn("r", F.row_number().over(order)).where(F.col("r") <= qe_k))
    parts = top.join(database, S.NEIGHBOR_ID).select(
        F.col(S.QUERY_ID).alias(S.IMAGE_ID), F.lit(1).alias(_ROLE), F.col("vector").alias(S.EMBEDDING))
    own = queries.select(S.IMAGE_ID, F.lit(0).alias(_ROLE), S.EMBEDDING)
    return own.unionByName(parts).groupBy(S.IMAGE_ID).applyInPandas(_expand_group(float(alpha)), schema=_VECTORS)


def augment_database(neighbors: DataFrame, embeddings: DataFrame, alpha: float) -> DataFrame:
    """DBA (:func:`pipeline.core.rerank.augment_with_neighbors`) per image, over its self-search neighbours."""
    vectors = embeddings.select(F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID), F.col(S.EMBEDDING).alias("vector"))
    rows = neighbors.join(vectors, S.NEIGHBOR_ID).select(
        F.col(S.QUERY_ID).alias(S.IMAGE_ID), S.SIMILARITY, F.col("vector").alias(S.EMBEDDING))
    return rows.groupBy(S.IMAGE_ID).applyInPandas(_augment_group(float(alpha)), schema=_VECTORS)


# Shared with the embed stage, which writes the rotated tables itself when it embeds everything
# (one decode per image for every view; see pipeline.stages.embed.rotated_meta).
derived_config = em.derived_config


def ensure_rotated(spark: SparkSession, config: Config, rotation: int) -> str:
    """The embedding table of every image rotated by ``rotation`` degrees (built when stale)."""
    sub, target = em.rotated_table(config, rotation)
    images = tables.read_table(spark, storage.Workdir.of(config.workdir).images, "image table")
    meta = em.rotated_meta(config, rotation, images)
    if tables.is_committed(spark, target) and storage.read_metadata(target) == meta:
        return target
    started = time.perf_counter()
    table = em.build_embedding_table(spark, sub, images.where(F.col(S.STATUS) == S.STATUS_OK))
    tables.write_table(table, target, metadata=meta)
    log.info("embedded rotated (%d degrees) query variants in %.1fs", rotation, time.perf_counter() - started)
    _log_metric(f"rotation_{rotation}_embed_seconds", time.perf_counter() - started)
    return target


@dataclass
class DbaStore:
    """The augmented vectors of an index build: one ``.npy`` per unit, in store order."""

    folder: str
    units: list

    def file(self, unit: int) -> str:
        return f"{self.folder}/aug_{unit:05d}.npy"

    def lists_file(self, unit: int) -> str:
        """The unit's DBA lists: the FAISS ids and similarities each augmented vector was summed from."""
        return f"{self.folder}/lists_{unit:05d}.npz"

    def lists(self, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """(FAISS ids, similarities) of the unit's DBA lists, best first (-1: no neighbour)."""
        import io

        with np.load(io.BytesIO(storage.read_bytes(self.lists_file(unit)))) as f:
            return f["ids"], f["sims"]

    def rows_by_image(self, index_path: str, stores: dict, image_of: dict) -> dict[str, tuple]:
        """Image id -> (augmented vector, DBA list as image ids, its similarities), read on the
        driver (a small table's incremental state); ``image_of``: FAISS id -> image id."""
        out = {}
        for u, unit in enumerate(self.units):
            if not unit.ok:
                continue
            ids, sims = self.lists(u)
            vectors = np.asarray(vs.load_array(self.file(u)), dtype=np.float32)
            for fid, vector, listed, values in zip(vs.stored_ids(index_path, unit, stores[unit.shard]).tolist(),
                                                   vectors, ids, sims):
                if fid in image_of:
                    keep = listed >= 0
                    out[image_of[fid]] = (vector, [image_of[f] for f in listed[keep].tolist() if f in image_of],
                                          np.asarray(values[keep], np.float32))
        return out

    def files_of(self):
        """``shard -> [(first position, file)]`` for :func:`pipeline.core.vector_store.gather`."""
        parts: dict[int, list] = {}
        for i, u in enumerate(self.units):
            if u.ok:
                parts.setdefault(u.shard, []).append((u.offset, self.file(i)))
        parts = {s: sorted(p) for s, p in parts.items()}
        return lambda shard: parts[shard]


def ensure_dba(spark: SparkSession, config: Config, info, self_search: Callable[..., object],
               candidates=None) -> DbaStore:
    """Database-side augmentation of the indexed vectors, from ONE raw search (built when stale).

    Each vector becomes the alpha-weighted sum of its ``dba_k`` nearest neighbours (itself
    included), taken from the candidates of the raw all-pairs search (``candidates``, or a
    search of ``dba_k`` run here when the store is stale and none is given). One task per
    unit gathers the neighbours from the stores; no second index is built: search
    re-scores the raw index's candidates with these vectors (:func:`allpairs.finish`).
    ``self_search(k)`` runs that search (passed in: this module does not import the caller).
    """
    d = config.dedup
    build_id = info.meta.get("build_id", info.meta["created_at"])
    units = ix.load_units(info)
    parent = storage.Workdir.of(config.workdir).derived("dba")
    # -l: the store keeps its DBA lists too (the incremental state is written from them).
    folder = parent.join(f"{build_id}-k{d.dba_k}-a{d.dba_alpha:g}-l")
    store = DbaStore(folder, units)
    marker = f"{folder}/_SUCCESS"
    if storage.file_exists(marker):
        return store
    started = time.perf_counter()
    tables.remove(spark, parent.root)  # an older build's augmented vectors
    if candidates is None or candidates.k < d.dba_k:
        candidates = self_search(d.dba_k)
    dim = int(info.meta["dimension"])
    unit_dicts = [u.as_dict() for u in units]
    spark.range(0, len(units), numPartitions=max(1, len(units))).mapInPandas(
        _augmenter(candidates, store, unit_dicts, allpairs.raw_files(info), d.dba_k, float(d.dba_alpha), dim),
        schema="unit int, rows long").collect()
    storage.write_bytes(marker, b"")
    log.info("database-side augmentation (k=%d, alpha=%.1f) in %.1fs", d.dba_k, d.dba_alpha,
             time.perf_counter() - started)
    _log_metric("dba_seconds", time.perf_counter() - started)
    return store


def _augmenter(candidates, store: DbaStore, units: list[dict], raw_files, k: int, alpha: float, dim: int):
    def augment(batches):
        for u, unit in vs.task_units(batches, units):
            ids, shards, pos, sims = allpairs.load_candidates(candidates, u)
            shards, pos, sims = shards[:, :k], pos[:, :k], np.where(pos[:, :k] >= 0, sims[:, :k], 0.0)
            allpairs.save_npz(store.lists_file(u), ids=np.where(pos >= 0, ids[:, :k], -1),
                              sims=sims.astype(np.float32))
            out = np.empty((unit.ok, dim), dtype=vs.STORE_DTYPE)
            for a in range(0, unit.ok, allpairs.RESCORE_ROWS):
                b = min(a + allpairs.RESCORE_ROWS, unit.ok)
                neighbors = vs.gather(raw_files, shards[a:b], pos[a:b], dim).reshape(b - a, -1, dim)
                out[a:b] = core_rerank.augment_with_neighbors(neighbors, sims[a:b], alpha)
            vs.save_array(store.file(u), out)
            yield pd.DataFrame({"unit": [u], "rows": [unit.ok]})

    return augment


def _log_metric(name: str, value: float) -> None:
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_metric(name, float(value))
    except Exception:  # metrics are best effort here
        log.debug("could not log %s", name, exc_info=True)
