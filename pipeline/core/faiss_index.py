"""FAISS helpers (no Spark): the index plan (``index.type: auto``: type, lists, shards from N and
``index.max_memory``), training, index files, the per-worker shard cache and the search of one
shard (BLAS list scans for big query blocks) with the top-k merge across shards.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import uuid
from dataclasses import dataclass

import numpy as np

from pipeline.config import IndexSettings, parse_memory
from pipeline.core import storage


# Perceptual hashes (pipeline.core.classical): 0/1 floats in the table, packed bits in a FAISS
# binary index searched by Hamming distance, reported as the similarity 1 - d / bits.
BINARY_FLAT = "BinaryIDMap,BinaryFlat"

log = logging.getLogger(__name__)


# ------------------------------------------------------------ FAISS helpers
# Bytes FAISS keeps per stored id in an inverted list or an IDMap (autofaiss external/metadata.py).
ID_BYTES = 8
# One task peaks at about twice its shard while the shard is read and (de)serialised, so a
# shard gets half of index.max_memory (the rest: that copy, the query block and the results).
SHARD_FRACTION = 0.5


@dataclass
class IndexPlan:
    """What the index job builds, and why (written into index.json)."""

    type: str
    factory: str
    nlist: int
    nprobe: int
    shards: int
    bytes_per_vector: int
    estimated_bytes: int
    train_size: int
    reason: str

    def as_meta(self) -> dict:
        return {"type": self.type, "factory": self.factory, "nlist": self.nlist, "nprobe": self.nprobe,
                "bytes_per_vector": self.bytes_per_vector, "estimated_bytes": self.estimated_bytes,
                "train_size": self.train_size, "reason": self.reason}


def optimal_nlist(n_vectors: int) -> int:
    """Inverted lists for ``n_vectors``: the power of two nearest 4*sqrt(n).

    That is autofaiss ``get_optimal_nb_clusters`` below 1M vectors. Above, autofaiss moves to
    16384-65536 lists for single-query latency; an all-pairs dedup instead pays N x nlist for
    the coarse assignment plus N x nprobe x N / nlist for the scan, balanced near
    sqrt(nprobe * N) ~ 4*sqrt(N), so the rule stays. Capped so k-means has >= 39 points a list.
    """
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n_vectors, 1)), 1)))
    return max(1, min(nlist, n_vectors // 39 or 1))


def default_nlist(n_vectors: int) -> int:
    return optimal_nlist(n_vectors)


def auto_nprobe(nlist: int) -> int:
    """Lists probed per query when ``index.nprobe`` is 0: 16 up to 1,024 lists, then 16*sqrt(nlist/1024).

    A near-copy pair is missed when its partner sits in a list ranked below nprobe; with more,
    smaller lists that happens more often at a fixed nprobe. Measured on the bench-scale tables
    (pair recall at the threshold, both search directions, 2-core VM, 2026-12-01): at 1M rows and
    4,096 lists nprobe 16 found 0.952, 24 0.969, 32 0.980, 48 0.988 (at 100k and 1,024 lists, 16
    found 0.994). The square root keeps recall near 0.98-0.99 while the scan, N*nprobe/nlist
    codes a query, grows as sqrt(N) like the coarse search beside it.
    """
    if nlist <= 0:
        return 0
    return min(nlist, max(16, round(16 * math.sqrt(nlist / 1024))))


def nprobe_for(settings: IndexSettings, nlist: int) -> int:
    return min(settings.nprobe, nlist) if settings.nprobe else auto_nprobe(nlist)


def pq_bits_for(requested: int, n_vectors: int) -> int:
    # PQ training needs at least 2**bits points per sub-quantizer.
    fit = int(math.floor(math.log2(max(n_vectors, 2))))
    return max(1, min(requested, fit))


def vector_bytes(index_type: str, dim: int, settings: IndexSettings) -> int:
    """Bytes one vector costs in the index (autofaiss ``IndexMetadata.estimated_index_size_in_bytes``)."""
    if index_type == "ivf_sq":
        code = 2 * dim if settings.sq_type == "fp16" else dim
    elif index_type == "ivf_pq":
        # PQ codes plus the fp16 refinement codes that give back the exact-enough cosine.
        code = math.ceil(settings.pq_m * settings.pq_bits / 8) + 2 * dim
    elif index_type == "hnsw":
        code = 4 * dim + settings.hnsw_m * 2 * 4
    else:  # flat, ivf_flat
        code = 4 * dim
    return code + ID_BYTES


def plan_index(settings: IndexSettings, n_vectors: int, dim: int, binary: bool = False) -> IndexPlan:
    """Choose the index (``index.type: auto``), its size and its shards from N and ``index.max_memory``.

    The rules follow autofaiss ``get_optimal_index_keys_v2`` where they fit dedup: exact search
    while N is small (all-pairs Flat search is a few BLAS calls; measured on a 2-core VM it stays
    ahead of IVF up to a few tens of thousands of vectors, ``index.auto_flat_max``), else IVF with
    autofaiss's list count. autofaiss would pick HNSW whenever it fits in memory: not here, since
    an all-pairs dedup searches every vector and IVF lists can be scanned in BLAS blocks (faiss
    contrib/big_batch_search.py). The codes are fp16 scalar quantisation, whose inner products
    are the true cosine within ~1e-4, so ``dedup.threshold`` keeps its meaning (PQ, at 16-64 bytes
    a vector, underestimates cosines by 0.1 or more: it is only offered with an fp16 refinement).
    The index is split into shards that each fit one task's share of ``index.max_memory``.
    """
    if binary:
        return IndexPlan("flat", BINARY_FLAT, 0, 0, max(1, min(settings.shards or 1, n_vectors)),
                         dim // 8 + ID_BYTES, n_vectors * (dim // 8 + ID_BYTES), 0,
                         "binary hash: exact Hamming search")
    kind = settings.type
    reason = f"index.type={kind}"
    if kind == "auto":
        if n_vectors <= settings.auto_flat_max:
            kind, reason = "flat", f"auto: {n_vectors} <= index.auto_flat_max={settings.auto_flat_max}: exact search"
        else:
            kind = "ivf_sq"
            reason = (f"auto: {n_vectors} > index.auto_flat_max={settings.auto_flat_max}: IVF with "
                      f"{'fp16' if settings.sq_type == 'fp16' else '8-bit'} codes, lists from autofaiss rules")
    nlist = 0
    if kind in ("ivf_flat", "ivf_sq", "ivf_pq"):
        nlist = settings.nlist or optimal_nlist(n_vectors)
    factory = factory_for(kind, settings, n_vectors, dim, nlist)
    per_vector = vector_bytes(kind, dim, settings)
    total = n_vectors * per_vector
    shared = nlist * dim * 4  # every shard carries the coarse quantizer
    query_block = settings.query_block * dim * 4
    budget = int(parse_memory(settings.max_memory) * SHARD_FRACTION) - shared - query_block
    if settings.shards:
        shards = settings.shards
    else:
        if budget <= per_vector:
            raise ValueError(f"index.max_memory={settings.max_memory} leaves no room for a shard next to the "
                             f"{nlist} list centroids and a query block of {settings.query_block}: raise it")
        shards = max(1, math.ceil(total / budget))
        reason += f"; {shards} shard(s) of <= {budget // (1 << 20)} MiB (half of index.max_memory={settings.max_memory})"
    shards = max(1, min(shards, n_vectors))
    train_size = 0
    if kind in ("ivf_flat", "ivf_sq", "ivf_pq"):
        # faiss k-means uses at most 256 points per centroid; 64 per list trains it well
        # (autofaiss get_optimal_train_size asks 30-256); PQ needs 2**bits points per sub-quantizer.
        wanted = max(64 * nlist, 2 ** settings.pq_bits * 4 if kind == "ivf_pq" else 0)
        cap = settings.train_sample or wanted
        train_size = min(n_vectors, wanted, cap)
    return IndexPlan(kind, factory, nlist, nprobe_for(settings, nlist) if nlist else 0, shards, per_vector,
                     total + shards * shared, train_size, reason)


def factory_for(kind: str, settings: IndexSettings, n_vectors: int, dim: int, nlist: int) -> str:
    """The FAISS index_factory description of one index type."""
    if kind == "flat":
        return "IDMap2,Flat"
    if kind == "hnsw":
        return f"IDMap2,HNSW{settings.hnsw_m},Flat"
    if kind == "ivf_flat":
        return f"IVF{nlist},Flat"
    if kind == "ivf_sq":
        return f"IVF{nlist},SQ{settings.sq_type}"
    if kind == "ivf_pq":
        if dim % settings.pq_m:
            raise ValueError(f"index.pq_m={settings.pq_m} must divide the embedding dimension {dim}")
        # The fp16 refinement re-scores PQ's candidates, so similarities are cosines again.
        # IDMap2: IndexRefine cannot add vectors with ids of its own.
        return f"IDMap2,IVF{nlist},PQ{settings.pq_m}x{pq_bits_for(settings.pq_bits, n_vectors)},Refine(SQfp16)"
    raise ValueError(f"unknown index type {kind!r}")


def factory_string(settings: IndexSettings, n_vectors: int, dim: int) -> str:
    """The FAISS index_factory description for the configured type, sized from the data."""
    return plan_index(settings, n_vectors, dim).factory


def needs_training(factory: str) -> bool:
    return "IVF" in factory


def new_index(description: str, dim: int):
    import faiss

    if description == BINARY_FLAT:
        return faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(dim))
    index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
    if "SQ" in description and "Refine" not in description:
        # Codes of the vectors, not of their residuals to the list centroid: the BLAS list scan
        # (big_batch_search) decodes residuals and loses the <query, centroid> term of an inner
        # product; fp16 codes of the raw vectors are as exact (measured: |error| < 1e-4).
        faiss.extract_index_ivf(index).by_residual = False
    return index


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
    # Walk the wrappers (IDMap2 -> Refine -> IVF, IDMap2 -> HNSW) and tune each layer.
    node = faiss.downcast_index(index)
    for _ in range(4):
        if isinstance(node, faiss.IndexRefine):
            node.k_factor = REFINE_K_FACTOR
            node = faiss.downcast_index(node.base_index)
        elif isinstance(node, faiss.IndexIVF):
            node.nprobe = nprobe_for(settings, node.nlist)
            return
        elif hasattr(node, "hnsw"):
            node.hnsw.efSearch = settings.ef_search
            return
        elif hasattr(node, "index"):
            node = faiss.downcast_index(node.index)
        else:
            return


# PQ candidates re-scored by the fp16 refinement per requested neighbour.
REFINE_K_FACTOR = 4


# ------------------------------------------------------------------- files
def write_index(uri: str, index) -> None:
    """Write an index file; a local one straight from FAISS (no second copy in memory)."""
    import faiss

    local = storage.local_path_of(uri)
    if local is None or is_binary_index(index):
        storage.write_bytes(uri, serialize(index))
        return
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex[:12]}"
    faiss.write_index(index, tmp)
    os.replace(tmp, local)


def read_index(uri: str):
    """Read an index file; a local one straight into FAISS (no bytes copy next to the index)."""
    import faiss

    local = storage.local_path_of(uri)
    if local is None:
        return deserialize(storage.read_bytes(uri))
    with open(local, "rb") as fh:
        binary = fh.read(2) == b"IB"
    return faiss.read_index_binary(local) if binary else faiss.read_index(local)


def set_threads(cpus: int) -> None:
    """FAISS threads in a Spark task = the task's CPUs (spark.task.cpus), not every core.

    Spark already runs one task per core; FAISS's default OpenMP pool of all cores in each
    task oversubscribes the machine.
    """
    import faiss

    if cpus > 0:
        faiss.omp_set_num_threads(cpus)


# ------------------------------------------------------------------ search
# One shard per Python worker: a task searches exactly one shard, and tasks are ordered shard by
# shard, so a worker loads each shard about once and never holds two.
_SHARD_CACHE: dict[tuple[str, str], object] = {}


def load_shard(path: str, build_id: str, settings: IndexSettings):
    """The shard file ``path`` of an index build, loaded once per Python worker (a rebuild is a new id)."""
    key = (path, build_id)
    index = _SHARD_CACHE.get(key)
    if index is None:
        _SHARD_CACHE.clear()  # drop the previous shard before reading the next
        index = read_index(path)
        if settings.use_gpu != "never" and gpu_available(settings.use_gpu):
            index = to_gpu(index)
        _SHARD_CACHE[key] = index
    set_search_params(index, settings)  # cheap, and a later job may ask for another nprobe / efSearch
    return index


def to_gpu(index):
    """Move a shard to the GPU for search (faiss-gpu); binary and HNSW shards stay on the CPU."""
    import faiss

    if is_binary_index(index) or "HNSW" in type(faiss.downcast_index(index)).__name__:
        return index
    try:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, index)
        log.info("searching shard on the GPU")
        return gpu
    except Exception as exc:  # an index type faiss-gpu lacks: search on the CPU
        log.warning("shard stays on the CPU (%s)", exc)
        return index


def search_shard(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of one shard for a block of queries: (similarities, faiss ids), -1 ids padded.

    A big block against an IVF shard is scanned list by list with BLAS (faiss
    contrib/big_batch_search.py): each list's vectors are decoded once and multiplied with the
    queries that probe it. Measured on 30k x 1024 fp16 vectors, 3000 queries: 2.7 s against 8 s
    for ``index.search`` on one core, with the same results.
    """
    import faiss

    kk = min(k, index.ntotal)
    if kk == 0:
        return (np.full((len(queries), 0), -np.inf, np.float32), np.full((len(queries), 0), -1, np.int64))
    if is_binary_index(index):  # Hamming distance -> similarity on the threshold's scale
        d, i = index.search(pack_bits(queries), kk)
        return 1.0 - d.astype(np.float32) / index.d, i
    ivf = None
    if type(index).__name__.startswith("IndexIVF"):
        ivf = faiss.extract_index_ivf(index)
    if ivf is not None and len(queries) * ivf.nprobe > 4 * ivf.nlist and not _on_gpu(index):
        from faiss.contrib.big_batch_search import big_batch_search

        if getattr(ivf, "by_residual", False):
            return index.search(queries, kk)  # see new_index: the list scan needs raw-vector codes
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines print at verbose=0
            return big_batch_search(index, queries, kk, method="knn_function", verbose=0, threaded=0)
    return index.search(queries, kk)


def _on_gpu(index) -> bool:
    return "Gpu" in type(index).__name__


def merge_topk(sims: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into one (descending similarity, -1 ids dropped to the end)."""
    sim = np.concatenate(sims, axis=1)
    idx = np.concatenate(ids, axis=1)
    sim = np.where(idx < 0, -np.inf, sim)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, order, axis=1), np.take_along_axis(idx, order, axis=1)


def search_shards(shards: list, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search several in-memory shards and merge (tests and small local use)."""
    parts = [search_shard(index, queries, k) for index in shards]
    return merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
