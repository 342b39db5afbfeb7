"""Embedding tables read in blocks straight from Parquet, and dense vector stores (no Spark).

The index and search stages read the embedding table with pyarrow inside their tasks, one
*unit* (a slice of one Parquet row group) at a time, instead of going through Spark rows:
no id join, no shuffle of 4 KB vectors, no JVM <-> Python conversion of every float.

* **FAISS ids** are a 63-bit hash of the image id: the same for the same image whatever
  the table's file layout (an incremental table and a fresh one give the same ids), and
  computed where the row is read, so no job has to join vectors with their ids.
* **Stores**: each index shard keeps its vectors as a dense array in unit order
  (``vectors.npy``, :data:`STORE_DTYPE`) with the sorted ids and their positions
  (``sorted_ids.npy``, ``order.npy``), so a task can fetch any vector of the shard by FAISS
  id. DBA writes the augmented vectors of each unit the same way; re-scoring reads them by
  position. The files are memory-mapped (read from local disk; a remote one is copied to
  local disk once). After the build, the all-pairs search reads its queries from the stores
  too (:func:`read_stored`), not from the table: an incremental embed rewrites the table's
  files, and an appended shard has no Parquet units at all.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.core import storage

IMAGE_ID, EMBEDDING, STATUS, STATUS_OK = "image_id", "embedding", "status", "ok"

# float32, not fp16: calibrated scores, the incremental dedup and `query` compare pair cosines
# with the full dedup's to 1e-4 (fp16 vectors move a cosine by up to about 1e-3). fp16 would
# halve the stores' disk and page cache (TODO in docs/scaling.md: an option, with looser
# guarantees, for archives where that matters).
STORE_DTYPE = np.float32


# ------------------------------------------------------------------- ids
def faiss_ids(image_ids) -> np.ndarray:
    """63-bit ids from image ids (blake2b): layout-independent, unique in practice.

    The index job checks uniqueness (a collision is an error, about 1 in 10**7 at 1M images).
    """
    out = np.empty(len(image_ids), dtype=np.int64)
    for i, value in enumerate(image_ids):
        digest = hashlib.blake2b(str(value).encode("utf-8", "surrogateescape"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
    return out


# ------------------------------------------------------------------ units
@dataclass
class Unit:
    """A slice [start, stop) of one Parquet row group; ``ok`` rows of it are indexed.

    ``shard`` is the index shard its rows go to, ``offset`` the store position of its first
    ok row in that shard (units of a shard are stored one after the other).
    """

    file: str
    row_group: int
    start: int
    stop: int
    ok: int = 0
    shard: int = 0
    offset: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def table_files(table_uri: str) -> list[str]:
    """The Parquet files of a committed table (sorted), as URIs of the same scheme."""
    from pyarrow import fs as pafs

    fs, path = storage._arrow_fs(table_uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    base = table_uri.rstrip("/")
    files = []
    for info in infos:
        name = info.path[len(path.rstrip("/")) + 1:]
        if info.type == pafs.FileType.File and name.endswith(".parquet") and not any(
                part.startswith(("_", ".")) for part in name.split("/")):
            files.append(f"{base}/{name}")
    return sorted(files)


def _parquet(uri: str):
    import pyarrow.parquet as pq

    fs, path = storage._arrow_fs(uri)
    return pq.ParquetFile(fs.open_input_file(path))


def list_units(table_uri: str, max_rows: int) -> list[Unit]:
    """Units of at most ``max_rows`` rows over the table's row groups, with their ok counts."""
    units = []
    for uri in table_files(table_uri):
        pf = _parquet(uri)
        for rg in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(rg).num_rows
            if rows == 0:
                continue
            status = pf.read_row_group(rg, columns=[STATUS]).column(0).to_numpy(zero_copy_only=False)
            pieces = max(1, math.ceil(rows / max_rows))
            bounds = np.linspace(0, rows, pieces + 1).astype(int)
            for a, b in zip(bounds[:-1], bounds[1:]):
                units.append(Unit(uri, rg, int(a), int(b), int((status[a:b] == STATUS_OK).sum())))
    return units


def read_unit(unit: Unit, vectors: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(image ids, float32 vectors) of the unit's ok rows, in table order."""
    columns = [IMAGE_ID, STATUS] + ([EMBEDDING] if vectors else [])
    table = _parquet(unit.file).read_row_group(unit.row_group, columns=columns).slice(
        unit.start, unit.stop - unit.start)
    ok = table.column(STATUS).to_numpy(zero_copy_only=False) == STATUS_OK
    ids = table.column(IMAGE_ID).to_numpy(zero_copy_only=False)[ok]
    if not vectors:
        return ids, None
    column = table.column(EMBEDDING).filter(ok).combine_chunks()
    if len(column) == 0:
        return ids, np.zeros((0, 0), np.float32)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return ids, flat.reshape(len(column), -1)


def assign_shards(units: list[Unit], shards: int) -> int:
    """Consecutive units to ``shards`` shards of about equal ok counts; returns the shards used."""
    total = sum(u.ok for u in units)
    done = 0
    offsets: dict[int, int] = {}
    for u in units:
        u.shard = min(shards - 1, done * shards // max(total, 1))
        u.offset = offsets.get(u.shard, 0)
        offsets[u.shard] = u.offset + u.ok
        done += u.ok
    # Renumber so shards with vectors are 0..S-1 (tiny tables may leave some empty).
    used = sorted({u.shard for u in units if u.ok})
    number = {s: i for i, s in enumerate(used)}
    for u in units:
        u.shard = number.get(u.shard, 0)
    return len(used)


def sample_units(units: list[Unit], size: int, seed: int = 0) -> np.ndarray:
    """A uniform sample of about ``size`` ok vectors, read unit by unit (memory: the sample + one unit).

    Only a random subset of units is read when the table is much bigger than the sample.
    """
    rng = np.random.default_rng(seed)
    total = sum(u.ok for u in units)
    if total == 0 or size <= 0:
        return np.zeros((0, 0), np.float32)
    chosen = [u for u in units if u.ok]
    if total > 4 * size:
        order = rng.permutation(len(chosen))
        picked, rows = [], 0
        for i in order:
            picked.append(chosen[i])
            rows += chosen[i].ok
            if rows >= 4 * size:
                break
        chosen = [chosen[i] for i in sorted(order[:len(picked)])]
    rows = sum(u.ok for u in chosen)
    p = min(1.0, size / rows)
    parts = []
    for u in chosen:
        _, x = read_unit(u)
        keep = rng.random(len(x)) < p
        parts.append(x[keep])
    sample = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return np.ascontiguousarray(sample[:size])


# ------------------------------------------------------------- npy files
def save_array(uri: str, array: np.ndarray) -> None:
    """Write a .npy file atomically (temp name, then rename)."""
    local = storage.local_path_of(uri)
    if local is None:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        storage.write_bytes(uri, buf.getvalue())
        return
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex[:12]}.npy"
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, local)


_LOCAL_COPIES: dict[str, str] = {}
_MAPS: dict[str, np.ndarray] = {}


def local_file(uri: str) -> str:
    """A local path for ``uri``: itself when local, else a copy in the temp folder (once per process)."""
    local = storage.local_path_of(uri)
    if local is not None:
        return local
    if uri not in _LOCAL_COPIES:
        folder = os.path.join(tempfile.gettempdir(), "neardup-store")
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, hashlib.sha1(uri.encode()).hexdigest() + ".npy")
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as out:
            out.write(storage.read_bytes(uri))
        os.replace(tmp, target)
        _LOCAL_COPIES[uri] = target
    return _LOCAL_COPIES[uri]


def load_array(uri: str) -> np.ndarray:
    """A read-only memory map of a .npy file (cached per process: page cache, not task memory)."""
    array = _MAPS.get(uri)
    if array is None:
        if len(_MAPS) > 256:
            _MAPS.clear()
        array = np.load(local_file(uri), mmap_mode="r", allow_pickle=False)
        _MAPS[uri] = array
    return array


def forget(prefix: str) -> None:
    """Drop cached maps under ``prefix`` (a rebuilt store replaces its files)."""
    for key in [k for k in _MAPS if k.startswith(prefix)]:
        del _MAPS[key]


# ----------------------------------------------------------------- stores
def store_files(index_dir: str, shard: int, build_id: str) -> dict[str, str]:
    """The store files of one shard of one index build.

    The build id is in the path: workers cache memory maps by path, and a rebuilt index
    replaces the folder under the same name.
    """
    base = f"{index_dir}/store/{build_id}/shard_{shard:05d}"
    return {name: f"{base}_{name}.npy" for name in ("vectors", "ids", "sorted_ids", "order")}


def write_store(index_dir: str, shard: int, build_id: str, ids: np.ndarray, vectors: np.ndarray) -> None:
    """A shard's vectors (:data:`STORE_DTYPE`, in unit order) and the lookup from FAISS id to position."""
    files = store_files(index_dir, shard, build_id)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if len(sorted_ids) > 1 and (np.diff(sorted_ids) == 0).any():
        raise RuntimeError("two image ids hash to the same FAISS id: rename one image or report this")
    save_array(files["vectors"], np.asarray(vectors, dtype=STORE_DTYPE))
    save_array(files["ids"], ids.astype(np.int64))
    save_array(files["sorted_ids"], sorted_ids.astype(np.int64))
    save_array(files["order"], order.astype(np.int64))


def stored_ids(index_dir: str, unit: Unit, build_id: str) -> np.ndarray:
    """FAISS ids of a unit's ok rows, in store order (positions ``offset .. offset + ok``)."""
    ids = load_array(store_files(index_dir, unit.shard, build_id)["ids"])
    return np.asarray(ids[unit.offset:unit.offset + unit.ok], dtype=np.int64)


def read_stored(index_dir: str, unit: Unit, build_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(FAISS ids, float32 vectors) of a unit's ok rows from its shard's store (positions
    ``offset .. offset + ok``): what :func:`read_unit` gave at build time, without the table."""
    vectors = load_array(store_files(index_dir, unit.shard, build_id)["vectors"])
    return stored_ids(index_dir, unit, build_id), np.asarray(vectors[unit.offset:unit.offset + unit.ok],
                                                              dtype=np.float32)


def task_units(batches, units: list[dict]):
    """(position, Unit) of each unit with ok rows named by a Spark task's ``id`` batches
    (the per-unit tasks run as ``spark.range(len(units)).mapInPandas``)."""
    for batch in batches:
        for u in batch["id"].to_numpy():
            unit = Unit(**units[int(u)])
            if unit.ok:
                yield int(u), unit


def stored_units(shard: int, count: int, max_rows: int) -> list[Unit]:
    """Units over a whole store of ``count`` vectors (an appended shard: no Parquet behind it)."""
    pieces = max(1, math.ceil(count / max(1, max_rows)))
    bounds = np.linspace(0, count, pieces + 1).astype(int)
    return [Unit("", -1, int(a), int(b), int(b - a), shard, int(a)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def positions(index_dir: str, shard: int, build_id: str, ids: np.ndarray) -> np.ndarray:
    """Store positions of FAISS ids of one shard (-1 for -1 padding or unknown ids)."""
    files = store_files(index_dir, shard, build_id)
    sorted_ids, order = load_array(files["sorted_ids"]), load_array(files["order"])
    ids = np.asarray(ids, dtype=np.int64)
    at = np.searchsorted(sorted_ids, ids)
    at = np.minimum(at, len(sorted_ids) - 1)
    found = (ids >= 0) & (len(sorted_ids) > 0) & (sorted_ids[at] == ids) if len(sorted_ids) else ids < -1
    out = np.full(ids.shape, -1, dtype=np.int64)
    out[found] = order[at[found]]
    return out


def lookup(index_dir: str, stores: dict[int, str], image_ids: list[str]) -> dict[str, np.ndarray]:
    """float32 stored vectors of a few images by image id (hashed, looked up shard by shard);
    ids in no store are left out. ``stores``: shard -> the build id of its store."""
    fids = faiss_ids(image_ids)
    out: dict[str, np.ndarray] = {}
    todo = np.ones(len(fids), dtype=bool)
    for shard, store in sorted(stores.items()):
        if not todo.any():
            break
        pos = positions(index_dir, shard, store, fids)
        hit = np.nonzero((pos >= 0) & todo)[0]
        if len(hit):
            vectors = load_array(store_files(index_dir, shard, store)["vectors"])
            order = hit[np.argsort(pos[hit], kind="stable")]  # sorted reads from the map
            for i, v in zip(order, np.asarray(vectors[pos[order]], dtype=np.float32)):
                out[image_ids[i]] = v
            todo[hit] = False
    return out


def gather(files_of_shard, shards: np.ndarray, pos: np.ndarray, dim: int) -> np.ndarray:
    """float32 vectors at (shard, position) pairs; rows with position -1 are zeros.

    ``files_of_shard(s)`` gives the list of (first position, .npy URI) parts of shard ``s``.
    """
    shards, pos = np.asarray(shards).reshape(-1), np.asarray(pos).reshape(-1)
    out = np.zeros((len(pos), dim), dtype=np.float32)
    valid = pos >= 0
    for s in np.unique(shards[valid]):
        parts = files_of_shard(int(s))
        starts = np.array([p[0] for p in parts], dtype=np.int64)
        rows = np.nonzero(valid & (shards == s))[0]
        part_of = np.searchsorted(starts, pos[rows], side="right") - 1
        for j in np.unique(part_of):
            sel = rows[part_of == j]
            array = load_array(parts[j][1])
            local = pos[sel] - starts[j]
            order = np.argsort(local, kind="stable")  # sorted reads from the map
            out[sel[order]] = array[local[order]]
    return out


def parquet_rows(uri: str) -> int:
    return _parquet(uri).metadata.num_rows
