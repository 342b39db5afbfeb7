"""Stage 3 (the reduce stage): embedding table -> a sharded FAISS index.

Layout of ``<workdir>/index/<tag>/``::

    index.json            what the index is (type, dimension, count, shards, backbone, timings ...)
    units.json            the table's units (row-group slices), their shard and store offset
    trained.faiss         the shared trained (empty) index, for types that need training
    shards/shard_00000.faiss ...
    store/<build>/shard_00000_{vectors,ids,sorted_ids,order}.npy   float32 vectors by FAISS id
    idmap/                Parquet: faiss_id -> image_id, shard

``index.type: auto`` picks the index from the number of vectors and ``index.max_memory``
(:func:`pipeline.core.faiss_index.plan_index`; the decision is recorded in ``index.json``).
The table is read with pyarrow, unit by unit (:mod:`pipeline.core.vector_store`): the
training sample goes from Parquet into numpy on the driver (bounded by
``index.train_sample``), never through the JVM heap; each Spark task builds exactly one
shard from its units (autofaiss ``indices/distributed.py``). The whole folder is built under
a staging name and renamed into place, and ``index.json`` is what marks it complete. FAISS
ids are a hash of the image id, so a rebuild of the same images yields the same ids.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import faiss_index, storage
from pipeline.core import vector_store as vs
from pipeline.encoders import registry
from pipeline.stages import tables

log = logging.getLogger(__name__)


INDEX_JSON = "index.json"


TRAINED = "trained.faiss"
UNITS_JSON = "units.json"
# 2: units.json, hashed FAISS ids, per-shard vector stores (issue 9). An index without it was
# built by an older version: its search needs a rebuild.
LAYOUT = 2


def shard_file(index_dir: str, shard: int) -> str:
    return f"{index_dir}/shards/shard_{shard:05d}.faiss"


# ------------------------------------------------------------------- stage
@dataclass
class IndexInfo:
    path: str
    meta: dict

    @classmethod
    def load(cls, index_dir: str) -> "IndexInfo":
        json_path = f"{index_dir}/{INDEX_JSON}"
        if not storage.file_exists(json_path):
            raise FileNotFoundError(f"no complete index at {index_dir}; run the index job first")
        return cls(index_dir, storage.read_json(json_path))

    def shard_paths(self) -> list[str]:
        return [shard_file(self.path, s["shard"]) for s in self.meta["shards"]]

    def require_layout(self) -> None:
        if self.meta.get("layout") != LAYOUT:
            raise RuntimeError(f"the index at {self.path} was built by an older neardup (no vector stores): "
                               "rebuild it (`neardup index`, or `neardup run`)")

    @property
    def build_id(self) -> str:
        """Changes with every build and every append (caches and derived DBA vectors key on it)."""
        return self.meta.get("build_id", self.meta["created_at"])

    def store_ids(self) -> dict[int, str]:
        """The build that wrote each shard's store (an appended shard: the append's; the others keep theirs)."""
        return {int(s["shard"]): s.get("store", self.build_id) for s in self.meta["shards"]}


# Units per core while a table has fewer than index.query_block rows per core (above it, units
# are query blocks). One, not two as until 2026-12-02: a unit is a task of fixed cost in each
# all-pairs, DBA and index job; 2,794 images,
# default runs alternating in one application (4 rounds each, 2-core Xeon): dedup 5.1 -> 4.7 s,
# the median sum of the stages 17.4 -> 16.9 s. Large tables are cut by index.query_block.
UNITS_PER_CORE = 1


def plan_units(config: Config, table_uri: str, cores: int) -> list[vs.Unit]:
    """Units of the embedding table: small enough to keep every core busy and a task's memory
    bounded (``index.query_block`` rows at most), large enough that Python overhead is small."""
    rows = sum(vs.parquet_rows(uri) for uri in vs.table_files(table_uri))
    max_rows = max(1, min(config.index.query_block, math.ceil(rows / max(UNITS_PER_CORE * cores, 1))))
    return vs.list_units(table_uri, max_rows)


def build_index(spark: SparkSession, config: Config) -> IndexInfo:
    """Build the index of ``config``'s embedding table.

    The driver lists the table's row groups (metadata and the status column only), picks the
    index (:func:`pipeline.core.faiss_index.plan_index`) and trains it on a sample read unit
    by unit. Then one Spark task per shard reads its units straight from Parquet, adds them
    with their hashed FAISS ids, and writes the shard, its vector store and its part of
    the id map. Nothing is shuffled and no vector passes through the JVM.
    """
    workdir = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    settings = config.index
    table_uri = workdir.embeddings(method)
    tables.read_table(spark, table_uri, "embedding table")  # a clear error when missing or half-written
    started = time.perf_counter()
    cores = max(1, spark.sparkContext.defaultParallelism)
    units = plan_units(config, table_uri, cores)
    n = sum(u.ok for u in units)
    if n == 0:
        raise ValueError(f"the embedding table for {method} has no embedded images: nothing to index")
    first = next(u for u in units if u.ok)
    dim = int(vs.read_unit(first)[1].shape[1])
    binary = registry.encoder_for(config).binary
    if binary and settings.type not in ("flat", "auto"):
        log.warning("%s is a binary hash: index.type=%s ignored, using an exact binary index", method, settings.type)
    plan = faiss_index.plan_index(settings, n, dim, binary=binary)
    description = plan.factory
    n_shards = vs.assign_shards(units, plan.shards)
    final_dir = workdir.index_dir(method)
    staging = f"{final_dir}.staging-{uuid.uuid4().hex[:12]}"
    timings = {"plan_seconds": time.perf_counter() - started}

    trained_path = None
    if faiss_index.needs_training(description):
        t = time.perf_counter()
        sample = vs.sample_units(units, plan.train_size)
        timings["sample_seconds"] = time.perf_counter() - t
        log.info("training %s on %d sampled vectors", description, len(sample))
        t = time.perf_counter()
        trained = faiss_index.train_index(description, dim, sample, settings.use_gpu)
        timings["train_seconds"] = time.perf_counter() - t
        del sample
        trained_path = f"{staging}/{TRAINED}"
        faiss_index.write_index(trained_path, trained)
        del trained

    # One task per shard; a shard task may use the cores that no other shard task needs.
    threads = max(1, cores // n_shards)
    t = time.perf_counter()
    unit_dicts = [u.as_dict() for u in units]
    idmap = spark.range(0, n_shards, numPartitions=n_shards).mapInPandas(
        _shard_builder(staging, description, dim, trained_path, unit_dicts, threads),
        schema=S.ID_MAP)
    idmap.write.parquet(f"{staging}/idmap")
    timings["shards_seconds"] = time.perf_counter() - t
    shard_stats = [storage.read_json(f"{staging}/shards/shard_{s:05d}.json") for s in range(n_shards)]
    if n_shards > 1:  # ids are unique within a shard (checked by its task); across shards here
        distinct = tables.read_id_map(spark, staging).select(S.FAISS_ID).distinct().count()
        if distinct != n:
            raise RuntimeError(f"{n - distinct} image ids hash to the FAISS id of another: rename those images")
    storage.write_json(f"{staging}/{UNITS_JSON}", unit_dicts)

    meta = {
        **plan.as_meta(),
        "type": "flat" if binary else plan.type,
        "requested_type": settings.type,
        "max_memory": settings.max_memory,
        "metric": "hamming" if binary else "inner_product",
        "dimension": dim,
        "count": n,
        "units": len(units),
        "layout": LAYOUT,
        "backbone": method,
        "shards": sorted(shard_stats, key=lambda s: s["shard"]),
        "trained": trained_path is not None,
        "build_seconds": time.perf_counter() - started,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "embeddings": table_uri,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Unique per build: executors' shard caches are keyed on it (created_at has 1 s resolution).
        "build_id": staging.rsplit(".staging-", 1)[-1],
    }
    if sum(s["count"] for s in meta["shards"]) != n:
        raise RuntimeError(f"index shards hold {sum(s['count'] for s in meta['shards'])} vectors, expected {n}")
    storage.write_json(f"{staging}/{INDEX_JSON}", meta)
    tables.commit_folder(spark, staging, final_dir)
    log.info("index %s: %d vectors, %d shards, %s (%s) in %.1fs %s", final_dir, n, len(meta["shards"]),
             description, plan.reason, meta["build_seconds"], meta["timings"])
    return IndexInfo(final_dir, meta)


def load_units(info: IndexInfo) -> list[vs.Unit]:
    """The units of the index's shards (units.json is written before index.json: units of a shard
    that an interrupted append left without an index.json entry are not the index's)."""
    shards = {int(s["shard"]) for s in info.meta["shards"]}
    return [vs.Unit(**u) for u in storage.read_json(f"{info.path}/{UNITS_JSON}") if int(u["shard"]) in shards]


def _shard_builder(staging: str, description: str, dim: int, trained_path: str | None, units: list[dict],
                   threads: int):
    """Build, store and write each shard of this partition's ids (one shard per task)."""
    build_id = staging.rsplit(".staging-", 1)[-1]  # as index.json records it

    def build(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        faiss_index.set_threads(threads)
        for batch in batches:
            for shard in batch["id"].to_numpy():
                started = time.perf_counter()
                shard = int(shard)
                mine = [vs.Unit(**u) for u in units if u["shard"] == shard and u["ok"]]
                index = faiss_index.read_index(trained_path) if trained_path else faiss_index.new_index(description, dim)
                names, ids, vectors = [], [], []
                for unit in mine:
                    image_ids, x = vs.read_unit(unit)
                    fids = vs.faiss_ids(image_ids)
                    index.add_with_ids(faiss_index.pack_bits(x) if faiss_index.is_binary_index(index) else x, fids)
                    names.append(image_ids)
                    ids.append(fids)
                    vectors.append(x.astype(vs.STORE_DTYPE))
                fids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
                vs.write_store(staging, shard, build_id, fids, np.concatenate(vectors) if vectors
                               else np.zeros((0, dim), vs.STORE_DTYPE))
                del vectors
                faiss_index.write_index(shard_file(staging, shard), index)
                count = int(index.ntotal)
                del index
                storage.write_json(f"{staging}/shards/shard_{shard:05d}.json",
                                   {"shard": shard, "count": count, "store": build_id,
                                    "build_seconds": time.perf_counter() - started})
                yield pd.DataFrame({S.FAISS_ID: fids,
                                    S.IMAGE_ID: np.concatenate(names) if names else np.zeros(0, object),
                                    S.SHARD: np.full(len(fids), shard, dtype=np.int32)})

    return build


def set_task_threads() -> None:
    """FAISS threads = this Spark task's CPUs (see :func:`faiss_index.set_threads`)."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        cpus = int(ctx.cpus()) if ctx is not None else 0
    except Exception:  # outside a task, or an older PySpark
        cpus = 0
    faiss_index.set_threads(cpus)


# ----------------------------------------------------------------- append
def append_to_index(config: Config, info: IndexInfo, ids: list[str], vectors: np.ndarray) -> IndexInfo:
    """The new vectors as one more shard (incremental dedup), in the layout :func:`build_index` writes.

    FAISS ids are the same hash of the image id; the shard gets its own store under
    ``store/<append build>/`` (the other shards keep theirs: ``IndexInfo.store_ids``) and units
    over that store, so the all-pairs search finds every vector without reading the embedding
    table (which the incremental embed rewrote). Written in this order, ``index.json`` last:
    shard, store, id-map part, units.json; anything an interrupted append left is ignored
    (units of unlisted shards) or removed by the next append (id-map parts, stores).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = dict(info.meta)
    if not ids:
        return info
    started = time.perf_counter()
    _drop_orphans(info, meta.get("appended", []))
    faiss_ids = vs.faiss_ids(ids)
    stores = info.store_ids()
    for old in stores:  # a hash shared with an indexed image (or an image indexed twice) is an error
        if (vs.positions(info.path, old, stores[old], faiss_ids) >= 0).any():
            raise RuntimeError("a new image id hashes to the FAISS id of an indexed image: rename it")
    shard = max(s["shard"] for s in meta["shards"]) + 1
    if meta.get("trained"):
        index = faiss_index.read_index(f"{info.path}/{TRAINED}")
    else:
        index = faiss_index.new_index(meta["factory"], int(meta["dimension"]))
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index.add_with_ids(faiss_index.pack_bits(vectors) if faiss_index.is_binary_index(index) else vectors, faiss_ids)
    build = uuid.uuid4().hex[:12]
    vs.write_store(info.path, shard, build, faiss_ids, vectors)
    part = f"{info.path}/idmap/part-appended-{build}.parquet"
    idmap = pa.table({S.FAISS_ID: pa.array(faiss_ids, pa.int64()), S.IMAGE_ID: pa.array(ids, pa.string()),
                      S.SHARD: pa.array([shard] * len(ids), pa.int32())})
    fs, path = storage._arrow_fs(part)
    pq.write_table(idmap, path, filesystem=fs)
    faiss_index.write_index(shard_file(info.path, shard), index)
    units = [u.as_dict() for u in load_units(info)]
    units += [u.as_dict() for u in vs.stored_units(shard, len(ids), config.index.query_block)]
    storage.write_json(f"{info.path}/{UNITS_JSON}", units)
    meta["shards"] = meta["shards"] + [{"shard": shard, "count": len(ids), "store": build,
                                        "build_seconds": time.perf_counter() - started}]
    # The shards built with the index keep their store's name after build_id moves on.
    meta["shards"] = [{**s, "store": s.get("store", info.build_id)} for s in meta["shards"]]
    meta["count"] = int(meta["count"]) + len(ids)
    meta["units"] = len(units)
    meta["build_id"] = build
    meta["appended"] = meta.get("appended", []) + [build]
    storage.write_json(f"{info.path}/{INDEX_JSON}", meta)
    return IndexInfo(info.path, meta)


def _drop_orphans(info: IndexInfo, committed: list[str]) -> None:
    """Id-map parts and stores of an append interrupted before its index.json was written."""
    from pyarrow import fs as pafs

    fs, root = storage._arrow_fs(f"{info.path}/idmap")
    for entry in fs.get_file_info(pafs.FileSelector(root)):
        name = entry.base_name
        if name.startswith("part-appended-") and name[len("part-appended-"):].split(".")[0] not in committed:
            log.warning("removing %s: left by an interrupted incremental dedup", entry.path)
            fs.delete_file(entry.path)
    fs, root = storage._arrow_fs(f"{info.path}/store")
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return
    used = set(info.store_ids().values())
    for entry in fs.get_file_info(pafs.FileSelector(root)):
        if entry.type == pafs.FileType.Directory and entry.base_name not in used:
            log.warning("removing %s: left by an interrupted incremental dedup", entry.path)
            fs.delete_dir(entry.path)
