"""Stage 3 (the reduce stage): embedding table -> a sharded FAISS index.

Layout of ``<workdir>/index/<tag>/``::

    index.json            what the index is (type, dimension, count, shards, backbone ...)
    trained.faiss         the shared trained (empty) index, for types that need training
    shards/shard_00000.faiss ...
    idmap/                Parquet: faiss_id -> image_id, shard

``index.type: auto`` picks the index from the number of vectors and ``index.max_memory``
(:func:`pipeline.core.faiss_index.plan_index`; the decision is recorded in ``index.json``).
The training sample streams through a Parquet file into numpy, never through the driver's
JVM heap. Each Spark task builds exactly one shard (autofaiss ``indices/distributed.py``);
the whole folder is built under a staging name and renamed into place, and ``index.json``
is what marks it complete. FAISS ids are assigned by sorting image ids, so a rebuild of
the same table yields the same ids.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline import schemas as S
from pipeline.config import Config
from pipeline.core import storage
from pipeline.core import faiss_index
from pipeline.encoders import registry
from pipeline.stages import tables

log = logging.getLogger(__name__)


INDEX_JSON = "index.json"


TRAINED = "trained.faiss"


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


def with_faiss_ids(embeddings: DataFrame) -> DataFrame:
    """Deterministic ids 0..n-1 in image_id order.

    Only the ids go through the RDD ``zipWithIndex`` (Python rows); the vectors stay in the JVM
    and meet their id in a join (pickling 100k x 1024 floats through Python took minutes).
    """
    ordered = embeddings.select(S.IMAGE_ID).orderBy(S.IMAGE_ID)
    schema = T.StructType([T.StructField(S.IMAGE_ID, T.StringType(), False),
                           T.StructField(S.FAISS_ID, T.LongType(), False)])
    ids = ordered.rdd.zipWithIndex().map(lambda p: (p[0][0], p[1])).toDF(schema)
    return embeddings.join(ids, S.IMAGE_ID)


def one_per_partition_keys(spark: SparkSession, n: int) -> list[int]:
    """``n`` integers that ``repartition(n, key)`` sends to partitions 0..n-1, one each.

    Spark's hash partitioning (pmod(murmur3(key), n)) can put two of n small keys in one
    partition, so one task would build two shards while another idles. The keys are found by
    asking Spark's own hash function, so they hold whatever its version.
    """
    candidates = spark.range(0, max(64, 40 * n)).select(
        F.col("id"), F.pmod(F.hash(F.col("id").cast("int")), F.lit(n)).alias("p"))
    first = candidates.groupBy("p").agg(F.min("id").alias("id")).collect()
    keys = {int(r["p"]): int(r["id"]) for r in first}
    if len(keys) != n:
        raise RuntimeError(f"could not find a partition key for each of {n} shards")
    return [keys[p] for p in range(n)]


def stream_sample(spark: SparkSession, rows: DataFrame, n: int, size: int, folder: str) -> np.ndarray:
    """A uniform sample of about ``size`` embeddings as float32, without collecting rows.

    Spark writes the sample as Parquet; the driver reads it with pyarrow straight into numpy,
    so the JVM heap never holds it (collecting 100k x 1024 rows ran the driver out of memory).
    """
    import pyarrow.parquet as pq

    fraction = min(1.0, size / max(n, 1) * 1.1)
    rows.select(S.EMBEDDING).sample(fraction=fraction, seed=0).limit(size).write.mode("overwrite").parquet(folder)
    fs, path = storage._arrow_fs(folder)
    table = pq.read_table(path, filesystem=fs, columns=[S.EMBEDDING])
    column = table.column(S.EMBEDDING).combine_chunks()
    dim = len(column[0]) if len(column) else 0
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(column), dim)


def build_index(spark: SparkSession, config: Config, trained_from: IndexInfo | None = None) -> IndexInfo:
    """Build the index of ``config``'s embedding table.

    ``trained_from``: an index of nearly the same vectors (DBA's augmented table is built from
    the base table) whose trained quantizer is reused when the plan is the same, instead of
    sampling and training again.
    """
    workdir = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    settings = config.index
    embeddings = (tables.read_table(spark, workdir.embeddings(method), "embedding table")
                  .where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.EMBEDDING))
    started = time.perf_counter()
    rows = with_faiss_ids(embeddings).cache()
    n = rows.count()
    if n == 0:
        raise ValueError(f"the embedding table for {method} has no embedded images: nothing to index")
    dim = len(rows.select(S.EMBEDDING).first()[0])
    binary = registry.encoder_for(config).binary
    if binary and settings.type not in ("flat", "auto"):
        log.warning("%s is a binary hash: index.type=%s ignored, using an exact binary index", method, settings.type)
    plan = faiss_index.plan_index(settings, n, dim, binary=binary)
    description = plan.factory
    n_shards = plan.shards
    final_dir = workdir.index_dir(method)
    staging = f"{final_dir}.staging-{uuid.uuid4().hex[:12]}"

    trained_path = None
    reuse = (trained_from is not None and trained_from.meta.get("trained")
             and trained_from.meta.get("factory") == description)
    if reuse:
        trained_path = f"{staging}/{TRAINED}"
        faiss_index.write_index(trained_path, faiss_index.read_index(f"{trained_from.path}/{TRAINED}"))
        log.info("reusing the trained %s of %s", description, trained_from.path)
    elif faiss_index.needs_training(description):
        sample = stream_sample(spark, rows, n, plan.train_size, f"{staging}/train_sample")
        tables.remove(spark, f"{staging}/train_sample")
        log.info("training %s on %d sampled vectors", description, len(sample))
        trained = faiss_index.train_index(description, dim, sample, settings.use_gpu)
        del sample
        trained_path = f"{staging}/{TRAINED}"
        faiss_index.write_index(trained_path, trained)

    # Contiguous id ranges per shard: shard = faiss_id * n_shards // n; each shard its own task.
    keys = one_per_partition_keys(spark, n_shards)
    key_of = F.element_at(F.array(*[F.lit(k) for k in keys]), F.col(S.SHARD) + 1)
    sharded = rows.withColumn(S.SHARD, (F.col(S.FAISS_ID) * n_shards / n).cast("int"))
    shard_stats = (sharded.withColumn("_key", key_of).repartition(n_shards, "_key")
                   .select(S.SHARD, S.FAISS_ID, S.EMBEDDING)
                   .mapInPandas(_shard_builder(staging, description, dim, trained_path),
                                schema="shard int, count long, seconds double")).collect()
    sharded.select(S.FAISS_ID, S.IMAGE_ID, S.SHARD).write.parquet(f"{staging}/idmap")
    rows.unpersist()

    meta = {
        **plan.as_meta(),
        "type": "flat" if binary else plan.type,
        "requested_type": settings.type,
        "max_memory": settings.max_memory,
        "metric": "hamming" if binary else "inner_product",
        "dimension": dim,
        "count": n,
        "backbone": method,
        "shards": sorted(({"shard": r["shard"], "count": r["count"], "build_seconds": r["seconds"]}
                          for r in shard_stats), key=lambda s: s["shard"]),
        "trained": trained_path is not None,
        "build_seconds": time.perf_counter() - started,
        "embeddings": workdir.embeddings(method),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Unique per build: executors' shard caches are keyed on it (created_at has 1 s resolution).
        "build_id": staging.rsplit(".staging-", 1)[-1],
    }
    if sum(s["count"] for s in meta["shards"]) != n:
        raise RuntimeError(f"index shards hold {sum(s['count'] for s in meta['shards'])} vectors, expected {n}")
    storage.write_json(f"{staging}/{INDEX_JSON}", meta)
    tables.commit_folder(spark, staging, final_dir)
    log.info("index %s: %d vectors, %d shards, %s (%s)", final_dir, n, len(meta["shards"]), description, plan.reason)
    return IndexInfo(final_dir, meta)


def _shard_builder(staging: str, description: str, dim: int, trained_path: str | None):
    """Build and write the shard whose rows are in this partition (one shard per partition)."""
    def build(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        set_task_threads()
        indexes: dict[int, object] = {}
        seconds: dict[int, float] = {}
        for batch in batches:
            for shard, rows in batch.groupby(S.SHARD, sort=True):
                started = time.perf_counter()
                shard = int(shard)
                if shard not in indexes:
                    indexes[shard] = faiss_index.read_index(trained_path) if trained_path else faiss_index.new_index(description, dim)
                vectors = np.stack(rows[S.EMBEDDING].to_numpy()).astype(np.float32)
                if faiss_index.is_binary_index(indexes[shard]):
                    vectors = faiss_index.pack_bits(vectors)
                indexes[shard].add_with_ids(vectors, rows[S.FAISS_ID].to_numpy(dtype=np.int64))
                seconds[shard] = seconds.get(shard, 0.0) + time.perf_counter() - started
        for shard, index in sorted(indexes.items()):
            faiss_index.write_index(shard_file(staging, shard), index)
            yield pd.DataFrame({"shard": [shard], "count": [index.ntotal], "seconds": [seconds[shard]]})

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
