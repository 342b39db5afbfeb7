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
import math
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline import schemas as S, store
from pipeline.config import Config, IndexSettings

log = logging.getLogger(__name__)

INDEX_JSON = "index.json"
TRAINED = "trained.faiss"
# Perceptual hashes (pipeline.classical): 0/1 floats in the table, packed bits in a FAISS
# binary index searched by Hamming distance, reported as the similarity 1 - d / bits.
BINARY_FLAT = "BinaryIDMap,BinaryFlat"


# ------------------------------------------------------------ FAISS helpers
def factory_string(settings: IndexSettings, n_vectors: int, dim: int) -> str:
    """The FAISS index_factory description for an index type, sized from the data."""
    if settings.type == "flat":
        return "IDMap2,Flat"
    if settings.type == "hnsw":
        return f"IDMap2,HNSW{settings.hnsw_m},Flat"
    nlist = settings.nlist or default_nlist(n_vectors)
    if settings.type == "ivf_flat":
        return f"IVF{nlist},Flat"
    if settings.type == "ivf_pq":
        if dim % settings.pq_m:
            raise ValueError(f"index.pq_m={settings.pq_m} must divide the embedding dimension {dim}")
        return f"IVF{nlist},PQ{settings.pq_m}x{pq_bits_for(settings.pq_bits, n_vectors)}"
    raise ValueError(f"unknown index type {settings.type!r}")


def default_nlist(n_vectors: int) -> int:
    # ~4*sqrt(n) lists, but FAISS wants >= 39 training points per list.
    return max(1, min(int(4 * math.sqrt(max(n_vectors, 1))), n_vectors // 39 or 1))


def pq_bits_for(requested: int, n_vectors: int) -> int:
    # PQ training needs at least 2**bits points per sub-quantizer.
    fit = int(math.floor(math.log2(max(n_vectors, 2))))
    return max(1, min(requested, fit))


def needs_training(settings: IndexSettings) -> bool:
    return settings.type in ("ivf_flat", "ivf_pq")


def new_index(description: str, dim: int):
    import faiss

    if description == BINARY_FLAT:
        return faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(dim))
    return faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)


def gpu_available(use_gpu: str) -> bool:
    import faiss

    if use_gpu == "never":
        return False
    has = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu == "always" and not has:
        raise RuntimeError("index.use_gpu=always but faiss has no GPU support or no GPU is visible "
                           "(install the gpu extra: faiss-gpu)")
    return has


def train_index(description: str, dim: int, sample: np.ndarray, use_gpu: str = "auto"):
    """Train on the driver's sample; k-means runs on the GPU when faiss-gpu sees one."""
    import faiss

    index = new_index(description, dim)
    if gpu_available(use_gpu):
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
        gpu_index.train(sample)
        return faiss.index_gpu_to_cpu(gpu_index)
    index.train(sample)
    return index


def serialize(index) -> bytes:
    import faiss

    if isinstance(index, faiss.IndexBinary):
        return faiss.serialize_index_binary(index).tobytes()
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes):
    import faiss

    # Every FAISS binary index's fourcc starts with "IB" (IBMp, IBxF ...), no float one does.
    if data[:2] == b"IB":
        return faiss.deserialize_index_binary(np.frombuffer(data, dtype=np.uint8))
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def is_binary_index(index) -> bool:
    import faiss

    return isinstance(index, faiss.IndexBinary)


def pack_bits(vectors: np.ndarray) -> np.ndarray:
    """0.0 / 1.0 floats (the embedding table's form of a hash) -> packed uint8 bits."""
    return np.packbits(np.asarray(vectors) > 0.5, axis=1)


def set_search_params(index, settings: IndexSettings) -> None:
    import faiss

    if isinstance(index, faiss.IndexBinary):
        return  # exact binary search: nothing to tune

    try:
        faiss.extract_index_ivf(index).nprobe = settings.nprobe
    except (RuntimeError, AttributeError):
        pass
    hnsw = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if hasattr(hnsw, "hnsw"):
        hnsw.hnsw.efSearch = settings.ef_search


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
        if not store.file_exists(json_path):
            raise FileNotFoundError(f"no complete index at {index_dir}; run the index job first")
        return cls(index_dir, store.read_json(json_path))

    def shard_paths(self) -> list[str]:
        return [shard_file(self.path, s["shard"]) for s in self.meta["shards"]]


def with_faiss_ids(embeddings: DataFrame) -> DataFrame:
    """Deterministic ids 0..n-1 in image_id order."""
    ordered = embeddings.orderBy(S.IMAGE_ID)
    schema = T.StructType(ordered.schema.fields + [T.StructField(S.FAISS_ID, T.LongType(), False)])
    return ordered.rdd.zipWithIndex().map(lambda p: tuple(p[0]) + (p[1],)).toDF(schema)


def build_index(spark: SparkSession, config: Config) -> IndexInfo:
    workdir = store.Workdir.of(config.workdir)
    method = config.embed.backbone
    settings = config.index
    embeddings = (store.read_table(spark, workdir.embeddings(method), "embedding table")
                  .where(F.col(S.STATUS) == S.STATUS_OK).select(S.IMAGE_ID, S.EMBEDDING))
    started = time.perf_counter()
    rows = with_faiss_ids(embeddings).cache()
    n = rows.count()
    if n == 0:
        raise ValueError(f"the embedding table for {method} has no embedded images: nothing to index")
    dim = len(rows.select(S.EMBEDDING).first()[0])
    n_shards = min(settings.shards, n)
    from pipeline import classical

    binary = classical.is_binary_method(method)
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
        store.write_bytes(trained_path, serialize(trained))

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
    store.write_json(f"{staging}/{INDEX_JSON}", meta)
    store.commit_folder(spark, staging, final_dir)
    log.info("index %s: %d vectors, %d shards, %s", final_dir, n, len(meta["shards"]), description)
    return IndexInfo(final_dir, meta)


def _shard_builder(staging: str, description: str, dim: int, trained_path: str | None):
    """Build and write every shard whose rows are in this partition.

    Hash partitioning puts all rows of a shard in one partition, but may put two shards
    in the same one, so shards are kept apart by their key, not by partition.
    """
    def build(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        template = store.read_bytes(trained_path) if trained_path else None
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
            store.write_bytes(shard_file(staging, shard), serialize(index))
            yield pd.DataFrame({"shard": [shard], "count": [index.ntotal], "seconds": [seconds[shard]]})

    return build


# ------------------------------------------------------------------ search
_SHARD_CACHE: dict[tuple[str, str], list] = {}


def load_shards(info_path: str, build_id: str, shard_paths: list[str], settings: IndexSettings) -> list:
    """Load every shard once per Python worker, keyed by the index build (a rebuild is a new id)."""
    key = (info_path, build_id)
    shards = _SHARD_CACHE.get(key)
    if shards is None:
        shards = [deserialize(store.read_bytes(path)) for path in shard_paths]
        _SHARD_CACHE.clear()  # one index at a time per worker keeps memory bounded
        _SHARD_CACHE[key] = shards
    for index in shards:  # cheap, and a later job may ask for another nprobe / efSearch
        set_search_params(index, settings)
    return shards


def search_shards(shards: list, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search every shard and merge into one top-k list per query (descending similarity)."""
    sims, ids = [], []
    for index in shards:
        kk = min(k, index.ntotal)
        if kk == 0:
            continue
        if is_binary_index(index):  # Hamming distance -> similarity on the threshold's scale
            d, i = index.search(pack_bits(queries), kk)
            d = 1.0 - d.astype(np.float32) / index.d
        else:
            d, i = index.search(queries, kk)
        sims.append(d)
        ids.append(i)
    sim = np.concatenate(sims, axis=1)
    idx = np.concatenate(ids, axis=1)
    sim = np.where(idx < 0, -np.inf, sim)  # -1 ids: fewer than kk results in that shard
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, order, axis=1), np.take_along_axis(idx, order, axis=1)
