"""Stage 3 (the reduce stage): embedding table -> a sharded FAISS index.

Layout of ``<workdir>/index/<tag>/``::

    index.json            what the index is (type, dimension, count, shards, backbone ...)
    trained.faiss         the shared trained (empty) index, for types that need training
    shards/shard_00000.faiss ...
    idmap/                Parquet: faiss_id -> image_id, shard

Each Spark task builds one shard from its partition (autofaiss ``indices/distributed.py``);
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
from pipeline.core.faiss_index import (BINARY_FLAT, deserialize, factory_string, is_binary_index, needs_training,
                                       new_index, pack_bits, serialize, train_index)
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
    """Deterministic ids 0..n-1 in image_id order."""
    ordered = embeddings.orderBy(S.IMAGE_ID)
    schema = T.StructType(ordered.schema.fields + [T.StructField(S.FAISS_ID, T.LongType(), False)])
    return ordered.rdd.zipWithIndex().map(lambda p: tuple(p[0]) + (p[1],)).toDF(schema)


def build_index(spark: SparkSession, config: Config) -> IndexInfo:
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
    n_shards = min(settings.shards, n)
    binary = registry.encoder_for(config).binary
    if binary and settings.type != "flat":
        log.warning("%s is a binary hash: index.type=%s ignored, using an exact binary index", method, settings.type)
    description = BINARY_FLAT if binary else factory_string(settings, n, dim)
    final_dir = workdir.index_dir(method)
    staging = f"{final_dir}.staging-{uuid.uuid4().hex[:12]}"

    trained_path = None
    if needs_training(settings) and not binary:
        fraction = min(1.0, settings.train_sample / n * 1.2)
        sample = np.array([r[0] for r in rows.select(S.EMBEDDING).sample(fraction=fraction, seed=0)
                           .limit(settings.train_sample).collect()], dtype=np.float32)
        trained = train_index(description, dim, sample, settings.use_gpu)
        trained_path = f"{staging}/{TRAINED}"
        storage.write_bytes(trained_path, serialize(trained))

    # Contiguous id ranges per shard: shard = faiss_id * n_shards // n.
    sharded = rows.withColumn(S.SHARD, (F.col(S.FAISS_ID) * n_shards / n).cast("int"))
    sharded = sharded.repartition(n_shards, S.SHARD)
    shard_stats = sharded.select(S.SHARD, S.FAISS_ID, S.EMBEDDING).mapInPandas(
        _shard_builder(staging, description, dim, trained_path),
        schema="shard int, count long, seconds double",
    ).collect()
    sharded.select(S.FAISS_ID, S.IMAGE_ID, S.SHARD).write.parquet(f"{staging}/idmap")
    rows.unpersist()

    meta = {
        "type": "flat" if binary else settings.type,
        "factory": description,
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
    log.info("index %s: %d vectors, %d shards, %s", final_dir, n, len(meta["shards"]), description)
    return IndexInfo(final_dir, meta)


def _shard_builder(staging: str, description: str, dim: int, trained_path: str | None):
    """Build and write every shard whose rows are in this partition.

    Hash partitioning puts all rows of a shard in one partition, but may put two shards
    in the same one, so shards are kept apart by their key, not by partition.
    """
    def build(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        template = storage.read_bytes(trained_path) if trained_path else None
        indexes: dict[int, object] = {}
        seconds: dict[int, float] = {}
        for batch in batches:
            for shard, rows in batch.groupby(S.SHARD, sort=True):
                started = time.perf_counter()
                shard = int(shard)
                if shard not in indexes:
                    indexes[shard] = deserialize(template) if template else new_index(description, dim)
                vectors = np.stack(rows[S.EMBEDDING].to_numpy()).astype(np.float32)
                if is_binary_index(indexes[shard]):
                    vectors = pack_bits(vectors)
                indexes[shard].add_with_ids(vectors, rows[S.FAISS_ID].to_numpy(dtype=np.int64))
                seconds[shard] = seconds.get(shard, 0.0) + time.perf_counter() - started
        for shard, index in sorted(indexes.items()):
            storage.write_bytes(shard_file(staging, shard), serialize(index))
            yield pd.DataFrame({"shard": [shard], "count": [index.ntotal], "seconds": [seconds[shard]]})

    return build
