"""FAISS helpers (no Spark): index factory strings sized from the data, training,
(de)serialisation, per-worker shard cache and the sharded search with its top-k merge.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.config import IndexSettings
from pipeline.core import storage


# Perceptual hashes (pipeline.core.classical): 0/1 floats in the table, packed bits in a FAISS
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


# ------------------------------------------------------------------ search
_SHARD_CACHE: dict[tuple[str, str], list] = {}


def load_shards(info_path: str, build_id: str, shard_paths: list[str], settings: IndexSettings) -> list:
    """Load every shard once per Python worker, keyed by the index build (a rebuild is a new id)."""
    key = (info_path, build_id)
    shards = _SHARD_CACHE.get(key)
    if shards is None:
        shards = [deserialize(storage.read_bytes(path)) for path in shard_paths]
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
