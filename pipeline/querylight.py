"""The light path of ``neardup query``: a few new images against an archive, without Spark.

Imports no PySpark: the files are listed and read here (:mod:`pipeline.core.listing`,
:func:`pipeline.core.imageio.probe`, as the ingest stage does), embedded by the encoder's own
batch function (:meth:`~pipeline.encoders.base.Encoder.embed_function`, the embed stage's, so
the vectors are the same), and searched against the archive's files: the FAISS shards, id
map (hashed FAISS ids) and vector stores of ``index/<tag>/`` and, with re-ranking, the
per-image state of the last dedup (``incremental/<tag>/``, its augmented vectors). Tables
are read with pyarrow.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import Config
from pipeline.core import calibration as cal_core
from pipeline.core import faiss_index, imageio, matching, storage
from pipeline.core import listing as L
from pipeline.core import vector_store as vs
from pipeline.encoders import registry

log = logging.getLogger(__name__)


class S:
    """Column names and statuses of :mod:`pipeline.schemas`, which imports PySpark (a test checks they agree)."""

    STATUS_OK, STATUS_ERROR = "ok", "error"
    IMAGE_ID, PATH, EMBEDDING, FAISS_ID = "image_id", "path", "embedding", "faiss_id"


@dataclass
class QueryFile:
    """One input file: its status and, for ok images, the vectors it searches with."""

    path: str
    status: str = S.STATUS_ERROR
    error: str | None = None
    content: bytes | None = None
    vector: np.ndarray | None = None          # raw embedding (0 degrees)
    rotated: dict[int, np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------- inputs
def list_query_files(inputs: list[str], follow_symlinks: bool = True) -> list[L.ListedFile]:
    """Every entry under the inputs, in path order (the ingest stage's listing, in this process)."""
    local = [storage.local_path_of(u) for u in inputs]
    if any(p is None for p in local):
        raise ValueError("the light query path reads local files only; use query.force_path=spark")
    roots = L.input_roots(local)
    real_roots = [os.path.realpath(r) for r in roots]
    files = [f for task in L.plan_tasks(roots, 1) for f in L.list_task(task, real_roots, follow_symlinks)]
    first: dict[str, bytes] = {}
    for f in files:
        if f.walk_key is not None and (f.walk_key not in first or f.walk_sort < first[f.walk_key]):
            first[f.walk_key] = f.walk_sort
    return sorted((f for f in files if f.walk_key is None or first[f.walk_key] == f.walk_sort), key=lambda f: f.path)


def describe(listed: L.ListedFile, max_pixels: int) -> QueryFile:
    """Read and probe one file; never raises (a bad file is a status and a reason)."""
    out = QueryFile(L.display_path(listed.path))
    if listed.listing_error is not None:
        out.status, out.error = listed.listing_status, listed.listing_error
        return out
    try:
        with open(L.raw_path_of(listed.path), "rb") as fh:
            content = fh.read()
    except OSError as exc:
        out.error = f"unreadable file: {exc.strerror or exc}"
        return out
    probe = imageio.probe(content, listed.path, max_pixels)
    out.status, out.error = probe.status, probe.error
    if probe.status == S.STATUS_OK:
        out.content = content
    return out


def embed_files(config: Config, files: list[QueryFile], rotations: list[int]) -> None:
    """Embed the ok files (and their rotations) with the embed stage's batch function.

    Encoders that embed several views at once decode each file once for all rotations (the
    embed stage's one-pass views, so the vectors are the ones dedup searched with)."""
    ok = [f for f in files if f.status == S.STATUS_OK]
    if not ok:
        return
    encoder = registry.encoder_for(config)
    contents = [f.content for f in ok]
    if rotations and encoder.embeds_views:
        per_view, errors = encoder.embed_function().views(contents, (0, *rotations))
    else:
        per_view, errors = [], None
        for rotation in [0] + rotations:
            cfg = config.with_overrides(embed__rotation=rotation) if rotation else config
            vectors, view_errors = registry.encoder_for(cfg).embed_function()(contents)
            per_view.append(vectors)
            errors = view_errors if errors is None else errors
    for f, v, e in zip(ok, per_view[0], errors):
        f.vector = None if v is None else np.asarray(v, np.float32)
        if e is not None:
            f.status, f.error = S.STATUS_ERROR, e
    for rotation, vectors in zip(rotations, per_view[1:]):
        for f, v in zip(ok, vectors):
            if v is not None:
                f.rotated[rotation] = np.asarray(v, np.float32)
    for f in files:
        f.content = None


# --------------------------------------------------------------- archive
def read_columns(uri: str, columns: list[str]):
    """A committed Parquet table's columns (pyarrow; refuses a folder without _SUCCESS)."""
    import pyarrow.parquet as pq

    if not storage.file_exists(f"{uri}/_SUCCESS"):
        raise FileNotFoundError(f"no complete table at {uri}")
    fs, path = storage._arrow_fs(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def vectors_of(table, column: str) -> np.ndarray:
    values = table.column(column).combine_chunks()
    dim = len(values[0]) if len(values) else 0
    return values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(values), dim)


class Archive:
    """The archive's index shards, id map and (with re-ranking) augmented vectors, loaded once."""

    def __init__(self, config: Config):
        workdir = storage.Workdir.of(config.workdir)
        method = config.embed.backbone
        self.index_dir = workdir.index_dir(method)
        if not storage.file_exists(f"{self.index_dir}/index.json"):
            raise FileNotFoundError(f"no complete index at {self.index_dir}; run the index job first")
        self.meta = storage.read_json(f"{self.index_dir}/index.json")
        self.settings = config.index
        self.shards: list = []
        self.id_of: dict[int, str] = {}
        self.state_ids: np.ndarray | None = None
        self.aug: np.ndarray | None = None
        self.levels: dict[str, float] = {}
        self.workdir = workdir
        self.method = method

    def load(self, augmented: bool) -> "Archive":
        """Read the shards and the id map, and with ``augmented`` the state's augmented vectors."""
        self.shards = [faiss_index.read_index(f"{self.index_dir}/shards/shard_{s['shard']:05d}.faiss")
                       for s in self.meta["shards"]]
        for shard in self.shards:
            faiss_index.set_search_params(shard, self.settings)
        idmap = read_columns_any(f"{self.index_dir}/idmap", [S.FAISS_ID, S.IMAGE_ID])
        self.id_of = dict(zip(idmap.column(S.FAISS_ID).to_pylist(), idmap.column(S.IMAGE_ID).to_pylist()))
        if augmented:
            self.load_augmented()
        return self

    def state_usable(self) -> bool:
        """The last dedup's state matches this index (written together; a rebuilt index makes it stale)."""
        uri = self.workdir.incremental(self.method)
        return (storage.file_exists(f"{uri}/_SUCCESS")
                and storage.read_metadata(uri).get("index_build_id") == self.meta.get("build_id"))

    def load_augmented(self) -> None:
        state = read_columns(self.workdir.incremental(self.method), [S.IMAGE_ID, "aug"])
        self.state_ids = np.asarray(state.column(S.IMAGE_ID).to_pylist(), dtype=object)
        self.aug = vectors_of(state, "aug")

    def load_levels(self, calibration: cal_core.Calibration) -> None:
        """Each archive image's level (calibrated scores), from the last dedup's state."""
        uri = self.workdir.incremental(self.method)
        version = storage.read_metadata(uri).get("calibration") if storage.file_exists(f"{uri}/_SUCCESS") else None
        if version != calibration.version or not self.state_usable():
            raise ValueError(f"dedup.score=calibrated: the last dedup's state at {uri} has no levels for calibration "
                             f"{calibration.version} and this index (run dedup with these settings, or query with "
                             "dedup.score=cosine)")
        state = read_columns(uri, [S.IMAGE_ID, "level"])
        self.levels = dict(zip(state.column(S.IMAGE_ID).to_pylist(), state.column("level").to_pylist()))

    def search_raw(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-``k`` raw neighbours over every shard (the index job's FAISS search)."""
        sims, ids = faiss_index.search_shards(self.shards, np.ascontiguousarray(vectors, np.float32), k)
        return sims, [[self.id_of[int(i)] for i in row if i >= 0] for row in ids]

    def paths(self, ids: set[str]) -> dict[str, str]:
        images = self.workdir.images
        if not ids or not storage.file_exists(f"{images}/_SUCCESS"):
            return {}
        table = read_columns(images, [S.IMAGE_ID, S.PATH])
        return {i: p for i, p in zip(table.column(S.IMAGE_ID).to_pylist(), table.column(S.PATH).to_pylist())
                if i in ids}


def read_columns_any(uri: str, columns: list[str]):
    import pyarrow.parquet as pq

    fs, path = storage._arrow_fs(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


# ----------------------------------------------------------------- search
def query_variants(config: Config, archive: Archive, vectors: np.ndarray,
                   rotated: list[list[np.ndarray | None]]) -> np.ndarray:
    """(n, 1 + rotations, d): each query's augmented vector (DBA over the archive plus itself), then its rotations."""
    d = config.dedup
    aug = vectors
    if d.dba_k > 1 and len(vectors):
        sims, ids = archive.search_raw(vectors, d.dba_k)
        needed = sorted({i for row in ids for i in row})
        raw = archive_raw_vectors(archive, needed)
        aug = np.stack([matching.augment_query(vectors[q], sims[q][: len(ids[q])], [raw[i] for i in ids[q]], d.dba_k, d.dba_alpha)
                        for q in range(len(vectors))])
    parts = [aug] + [np.stack([aug[q] if r[q] is None else r[q] for q in range(len(aug))]) for r in rotated]
    return np.stack(parts, axis=1) if len(aug) else np.zeros((0, len(parts), archive.meta["dimension"]), np.float32)


def archive_raw_vectors(archive: Archive, ids: list[str]) -> dict[str, np.ndarray]:
    """Raw embeddings of a few archive images: from the index's vector stores (by hashed id,
    a few page reads), else (an index without stores) from the embedding table: the id column
    is read whole, the vector column only in the row groups that hold a wanted id."""
    import pyarrow.parquet as pq

    if archive.meta.get("layout", 1) >= 2:  # pipeline.stages.index.LAYOUT (that module imports PySpark)
        build = archive.meta.get("build_id", archive.meta.get("created_at"))
        stores = {int(s["shard"]): s.get("store", build) for s in archive.meta["shards"]}
        found = vs.lookup(archive.index_dir, stores, list(ids))
        if len(found) == len(set(ids)):
            return found
    wanted = set(ids)
    out: dict[str, np.ndarray] = {}
    fs, root = storage._arrow_fs(archive.workdir.embeddings(archive.method))
    from pyarrow import fs as pafs

    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    for name in files:
        with fs.open_input_file(name) as fh:
            parquet = pq.ParquetFile(fh)
            for group in range(parquet.num_row_groups):
                id_column = parquet.read_row_group(group, columns=[S.IMAGE_ID]).column(S.IMAGE_ID).to_pylist()
                rows = [i for i, v in enumerate(id_column) if v in wanted]
                if rows:
                    vectors = vectors_of(parquet.read_row_group(group, columns=[S.EMBEDDING]).take(rows), S.EMBEDDING)
                    out.update({id_column[i]: v for i, v in zip(rows, vectors)})
    return out


def calibration_for(config: Config) -> cal_core.Calibration | None:
    """The calibration query scores with (dedup.score=calibrated, float re-rankable encoders), else None."""
    if config.dedup.score != "calibrated" or not registry.encoder_for(config).reranking:
        return None
    space = cal_core.space_of(bool(config.embed.postprocess), config.dedup.dba_k > 1)
    return cal_core.Calibration.load(config.dedup.calibration or cal_core.shipped(space, config.embed.backbone))


def calibrated_matches(ids: list[str], sims: np.ndarray, levels: dict[str, float], calibration: cal_core.Calibration,
                       k: int, threshold: float) -> list[tuple[str, float, float]]:
    """A query's matches by calibrated score, as dedup scores a pair from the query's side: the
    candidates are its top ``k`` by similarity, its level is read from them (as if it were in the
    archive), each archive image's level is the last dedup's. Best score first (ties: image id)."""
    top = sorted(zip(ids, np.asarray(sims, np.float32).tolist()), key=lambda t: (-t[1], t[0]))[:k]
    if not top:
        return []
    level_q = cal_core.level_of_row(np.array([s for _, s in top]), calibration.rank)
    level_y = np.array([levels.get(i, -1.0) for i, _ in top], np.float64)
    p = calibration.probability(np.array([s for _, s in top], np.float64), level_q, level_y).astype(np.float32)
    kept = [(i, s, float(v)) for (i, s), v in zip(top, p) if v >= threshold]
    return sorted(kept, key=lambda t: (-np.float32(t[2]), t[0]))


def search(config: Config, archive: Archive, variants: np.ndarray, k: int,
           calibration: cal_core.Calibration | None = None) -> list[list[tuple[str, float, float | None]]]:
    """Each query's top-``k`` archive images by its best variant's similarity, as (image id, similarity,
    calibrated score or None), at or above the threshold (on the calibrated score when there is one)."""
    threshold = config.dedup.threshold
    if archive.aug is not None:
        scores = matching.directed_scores(variants, archive.aug)
        if calibration is not None:
            ids = archive.state_ids.tolist()
            return [calibrated_matches(ids, row, archive.levels, calibration, k, threshold) for row in scores]
        return [[(str(archive.state_ids[c]), s, None) for c, s in row]
                for row in matching.best_matches(scores, k, threshold)]
    out = []
    n, v, dim = variants.shape
    sims, ids = archive.search_raw(variants.reshape(n * v, dim), k)
    for q in range(n):
        best: dict[str, float] = {}
        for row in range(q * v, (q + 1) * v):
            for image_id, s in zip(ids[row], sims[row]):
                best[image_id] = max(best.get(image_id, -2.0), float(s))
        if calibration is not None:
            out.append(calibrated_matches(list(best), np.array(list(best.values())), archive.levels, calibration, k,
                                          threshold))
            continue
        ranked = sorted(((i, s, None) for i, s in best.items() if s >= threshold), key=lambda t: (-t[1], t[0]))
        out.append(ranked[:k])
    return out


def _timed_load(archive: Archive, augmented: bool, calibration: cal_core.Calibration | None) -> tuple[Archive, float]:
    t = time.perf_counter()
    archive.load(augmented)
    if calibration is not None:
        archive.load_levels(calibration)
    return archive, time.perf_counter() - t


def run_light(config: Config, rotations: list[int], listed: list | None = None) -> tuple[list[QueryFile], list[list[tuple[str, float]]], dict, dict]:
    """List, embed and search the query inputs; returns (files, matches per file, archive paths, timings)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if listed is None:
        listed = list_query_files(config.query.input, config.ingest.follow_symlinks)
    files = [describe(f, config.ingest.max_pixels) for f in listed]
    timings["read_seconds"] = time.perf_counter() - started
    # The archive is read (pyarrow, FAISS: no GIL held) while TensorFlow starts and embeds.
    with ThreadPoolExecutor(max_workers=1) as pool:
        calibration = calibration_for(config)
        loading = pool.submit(_timed_load, Archive(config), config.dedup.dba_k > 1, calibration)
        t = time.perf_counter()
        embed_files(config, files, rotations)
        timings["embed_seconds"] = time.perf_counter() - t
        archive, timings["load_archive_seconds"] = loading.result()
    t = time.perf_counter()
    ok = [f for f in files if f.status == S.STATUS_OK and f.vector is not None]
    vectors = np.stack([f.vector for f in ok]) if ok else np.zeros((0, archive.meta["dimension"]), np.float32)
    variants = query_variants(config, archive, vectors, [[f.rotated.get(r) for f in ok] for r in rotations])
    found = search(config, archive, variants, config.dedup.k, calibration) if ok else []
    by_file = dict(zip((id(f) for f in ok), found))
    matches = [by_file.get(id(f), []) for f in files]
    paths = archive.paths({m[0] for row in matches for m in row})
    timings["search_seconds"] = time.perf_counter() - t
    return files, matches, paths, timings


