"""All-pairs search of the indexed table in Spark tasks, without shuffling vectors.

Three kinds of task, each reading what it needs straight from files (the index shards and
their vector stores, sliced in the index's units; :mod:`pipeline.core.vector_store`). The
embedding table itself is read only by the index build: the incremental embed rewrites its
files, and a shard appended by the incremental dedup has no Parquet behind it:

1. :func:`self_search`: one task per (unit, shard): the unit's vectors searched against the
   shard; its top-k (FAISS ids, store positions, similarities) is written as one small
   ``.npz`` candidates file under a scratch folder (faiss contrib/big_batch_search keeps
   such per-block results too);
2. DBA (:func:`pipeline.stages.rerank.ensure_dba`): one task per unit computes the augmented
   vectors of its rows from the top ``dba_k`` of the same candidates;
3. :func:`finish`: one task per unit merges its candidates over the shards, optionally
   re-scores them exactly with the augmented vectors (a true cosine again), and yields the
   top k rows; only these small rows enter Spark (joined with the id map for image ids).
"""
from __future__ import annotations

import io
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.config import IndexSettings
from pipeline.core import faiss_index, storage
from pipeline.core import vector_store as vs
from pipeline.stages import index as ix
from pipeline.stages import tables

log = logging.getLogger(__name__)

# Rows re-scored at once (rows x candidates x dim float32 in memory).
RESCORE_ROWS = 256
FilesOf = Callable[[int], list]


@dataclass
class Candidates:
    """Where :func:`self_search` wrote its per-(unit, shard) top-k files."""

    folder: str
    k: int
    shards: int
    units: list

    def file(self, unit: int, shard: int) -> str:
        return f"{self.folder}/cand_{unit:05d}_{shard:05d}.npz"


def new_folder(workdir: str) -> str:
    """A scratch folder for one search; earlier searches' folders of this workdir are removed."""
    parent = storage.Workdir.of(workdir).derived("search").root
    _remove_children(parent)
    return f"{parent}/{uuid.uuid4().hex[:12]}"


def _remove_children(parent: str) -> None:
    from pyarrow import fs as pafs

    fs, path = storage._arrow_fs(parent)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)


def raw_files(info: ix.IndexInfo) -> FilesOf:
    """The store of each shard, as the (first position, file) parts :func:`vs.gather` reads."""
    path, stores = info.path, info.store_ids()
    return lambda shard: [(0, vs.store_files(path, shard, stores[shard])["vectors"])]


def unit_groups(units: list, max_rows: int, parallelism: int) -> list[list[int]]:
    """Consecutive units (their positions) searched together as one block of queries.

    FAISS's list-by-list scan (big_batch_search) costs a fixed overhead per list and block,
    so bigger blocks are faster: measured on 100k x 1024 fp16 vectors (IVF1024, one core),
    425 us per query in blocks of 5,000, 181 us in blocks of 16,384, 152 us in 50,000. A
    block holds at most ``max_rows`` queries (``index.query_block``: the memory bound), and
    there are at least ``parallelism`` blocks when there are that many units.
    """
    ok = [i for i, u in enumerate(units) if u.ok]
    total = sum(units[i].ok for i in ok)
    cap = max(1, min(max_rows, -(-total // max(1, parallelism))))
    groups: list[list[int]] = []
    rows = 0
    for i in ok:
        if groups and rows + units[i].ok <= cap:
            groups[-1].append(i)
            rows += units[i].ok
        else:
            groups.append([i])
            rows = units[i].ok
    return groups


def self_search(spark: SparkSession, info: ix.IndexInfo, settings: IndexSettings, k: int, folder: str) -> Candidates:
    """Every indexed vector searched against every shard: top-``k`` candidates files (pass 1)."""
    units = ix.load_units(info)
    n_shards = len(info.meta["shards"])
    k = min(k, info.meta["count"])
    cands = Candidates(folder, k, n_shards, units)
    started = time.perf_counter()
    unit_dicts = [u.as_dict() for u in units]
    groups = unit_groups(units, settings.query_block, spark.sparkContext.defaultParallelism)
    tasks = len(groups) * n_shards
    # Shard-major task order: the tasks of one shard run together, a worker loads it once.
    spark.range(0, tasks, numPartitions=max(1, tasks)).mapInPandas(
        _searcher(info.path, info.build_id, info.store_ids(), settings, unit_dicts, groups, cands),
        schema="unit int, shard int, rows long").collect()
    log.info("searched %d units in %d blocks x %d shards (k=%d) in %.1fs", len(units), len(groups), n_shards, k,
             time.perf_counter() - started)
    return cands


def _searcher(index_path: str, build_id: str, stores: dict[int, str], settings: IndexSettings, units: list[dict],
              groups: list[list[int]], cands: Candidates):
    n_groups = len(groups)

    def search(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        ix.set_task_threads()
        for batch in batches:
            for task in batch["id"].to_numpy():
                shard, g = divmod(int(task), n_groups)
                members = [vs.Unit(**units[u]) for u in groups[g]]
                x = np.concatenate([vs.read_stored(index_path, unit, stores[unit.shard])[1] for unit in members])
                index = faiss_index.load_shard(ix.shard_file(index_path, shard), build_id, settings)
                sims, ids = faiss_index.search_shard(index, x, cands.k)
                sims, ids = faiss_index.merge_topk([sims], [ids], cands.k)  # sorted, -1 padding last
                pos = vs.positions(index_path, shard, stores[shard], ids)
                sims = np.clip(sims, -1.0, 1.0).astype(np.float32)
                at = 0
                for u, unit in zip(groups[g], members):
                    part = slice(at, at + unit.ok)
                    save_npz(cands.file(u, shard), ids=ids[part], pos=pos[part], sims=sims[part])
                    at += unit.ok
                yield pd.DataFrame({"unit": groups[g], "shard": [shard] * len(members),
                                    "rows": [unit.ok for unit in members]})

    return search


def save_npz(uri: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(uri, buf.getvalue())


def load_candidates(cands: Candidates, unit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(faiss ids, shards, store positions, similarities) of a unit's rows over all shards, best first."""
    ids, shards, pos, sims = [], [], [], []
    for shard in range(cands.shards):
        with np.load(io.BytesIO(storage.read_bytes(cands.file(unit, shard)))) as f:
            ids.append(f["ids"])
            pos.append(f["pos"])
            sims.append(np.where(f["ids"] < 0, -np.inf, f["sims"]).astype(np.float32))
            shards.append(np.full(f["ids"].shape, shard, dtype=np.int64))
    ids, shards, pos, sims = (np.concatenate(a, axis=1) for a in (ids, shards, pos, sims))
    if cands.shards > 1:
        order = np.argsort(-sims, axis=1, kind="stable")
        ids, shards, pos, sims = (np.take_along_axis(a, order, axis=1) for a in (ids, shards, pos, sims))
    return ids, shards, pos, sims


def rescore(queries: np.ndarray, files_of: FilesOf, shards: np.ndarray, pos: np.ndarray, dim: int) -> np.ndarray:
    """Exact inner products of each query row with its candidates' stored vectors (-inf: no vector)."""
    out = np.full(pos.shape, -np.inf, dtype=np.float32)
    for a in range(0, len(queries), RESCORE_ROWS):
        b = min(a + RESCORE_ROWS, len(queries))
        p = pos[a:b]
        vectors = vs.gather(files_of, shards[a:b], p, dim).reshape(b - a, p.shape[1], dim)
        sims = np.einsum("qd,qkd->qk", queries[a:b], vectors)
        out[a:b] = np.where(p >= 0, np.clip(sims, -1.0, 1.0), -np.inf)
    return out


def finish(spark: SparkSession, info: ix.IndexInfo, cands: Candidates, k: int,
           vectors_of: FilesOf | None = None) -> DataFrame:
    """The NEIGHBORS_TABLE rows of every unit (pass 3), re-scored with ``vectors_of``'s vectors if given.

    With ``vectors_of`` (the DBA store, or the raw store: :func:`raw_files`) a row's
    similarity is the inner product of the query's and the neighbour's stored vectors (an
    exact cosine, whatever the index's compression), and the candidates are re-ranked by it.
    """
    units = [u.as_dict() for u in cands.units]
    dim = int(info.meta["dimension"])
    k = min(k, cands.k * cands.shards)
    schema = f"query_faiss_id long, {S.FAISS_ID} long, {S.RANK} int, {S.SIMILARITY} float"
    raw = spark.range(0, len(units), numPartitions=max(1, len(units))).mapInPandas(
        _finisher(info.path, info.store_ids(), cands, units, k, dim, vectors_of), schema=schema)
    # Query ids too come from the id map (the stores hold FAISS ids, not image ids).
    idmap = tables.lookup(tables.read_id_map(spark, info.path).select(S.FAISS_ID, S.IMAGE_ID),
                          int(info.meta["count"]))
    queries = idmap.select(F.col(S.FAISS_ID).alias("query_faiss_id"), F.col(S.IMAGE_ID).alias(S.QUERY_ID))
    neighbours = idmap.select(S.FAISS_ID, F.col(S.IMAGE_ID).alias(S.NEIGHBOR_ID))
    return (raw.join(queries, "query_faiss_id").join(neighbours, S.FAISS_ID)
            .select(S.QUERY_ID, S.NEIGHBOR_ID, S.RANK, S.SIMILARITY))


def _finisher(index_path: str, stores: dict[int, str], cands: Candidates, units: list[dict], k: int, dim: int,
              vectors_of: FilesOf | None):
    def finish_units(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for u, unit in vs.task_units(batches, units):
            query_ids = vs.stored_ids(index_path, unit, stores[unit.shard])
            ids, shards, pos, sims = load_candidates(cands, u)
            if vectors_of is not None:
                own = np.arange(unit.ok, dtype=np.int64) + unit.offset
                queries = vs.gather(vectors_of, np.full(unit.ok, unit.shard), own, dim)
                sims = rescore(queries, vectors_of, shards, pos, dim)
                order = np.argsort(-sims, axis=1, kind="stable")
                ids, sims = np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)
            ids, sims = ids[:, :k], sims[:, :k]
            valid = (ids >= 0) & np.isfinite(sims)
            kk = ids.shape[1]
            yield pd.DataFrame({
                "query_faiss_id": np.repeat(query_ids, kk)[valid.reshape(-1)],
                S.FAISS_ID: ids[valid],
                S.RANK: np.tile(np.arange(kk, dtype=np.int32), len(ids))[valid.reshape(-1)],
                S.SIMILARITY: sims[valid].astype(np.float32),
            })

    return finish_units


def remove(spark: SparkSession, folder: str) -> None:
    tables.remove(spark, folder)
