"""Synthetic embedding tables whose similarity statistics are fitted to real MobileNet embeddings.

How the fit is done (recorded in every result JSON through :func:`describe_fit`):

1. **Real vectors.** Every image of ``ukbench-dev``, ``holidays-dev`` and ``holidays-fullres``
   is embedded with MobileNet (ImageNet weights, 224x224 squashed, ``mobilenet``
   preprocessing, global average pooling) and L2-normalised. Each image is also edited once
   the way archives copy images (JPEG recompression, downscale, border crop, brightness,
   a combination; the edit is chosen by the image's position) and embedded again: the
   cosine between an image and its edit is a *real near-copy cosine*. The vectors are cached
   under ``bench/results/.cache``.
2. **Unrelated rows.** ``x = l2(mu + a * (z * s) @ U + b * sigma * e)``: ``mu`` the real mean
   vector, ``U, s`` the top ``rank`` principal directions and standard deviations of the
   centred real vectors, ``sigma`` the root mean variance left outside them (an isotropic
   residual), ``z, e`` standard normal. The two scales ``a, b`` are fitted (Nelder-Mead, fixed
   draws) so that the cosine between independent synthetic rows has the mean and standard
   deviation of the cosine between real images of *different* groups.
3. **Near-copies** (10% of the rows by default): ``l2(c * x + sqrt(1 - c^2) * u)``, ``u`` a
   unit vector orthogonal to the original ``x`` drawn from the same noise model, so the
   copy's cosine to its original is exactly ``c``. ``c`` is drawn from the real near-copy
   cosines (bootstrap plus a little jitter), or uniformly from a range (``copy_cosine``).
4. **Bursts** (chains of frames): each frame is a near-copy of the previous one with a step
   cosine drawn uniformly from ``burst_step``; after a few hundred frames the ends are unrelated.

Rows are generated in blocks (deterministic per ``seed`` and block number) and a copy's
original is in the same block, so a table of any size is written without holding it.
Image ids are random hex strings: the order of ids says nothing about content.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
REAL_SETS = ("ukbench-dev", "holidays-dev", "holidays-fullres")


# ------------------------------------------------------------ real vectors
def _edit(image, kind: int):
    """One archive-style edit of a PIL image (the kind is chosen by the caller)."""
    from PIL import Image, ImageEnhance

    def jpeg(img, quality):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        buf.seek(0)
        return Image.open(buf).convert("RGB")

    w, h = image.size
    if kind == 0:
        return jpeg(image, 30)
    if kind == 1:
        return jpeg(image.resize((max(1, int(w * 0.4)), max(1, int(h * 0.4))), Image.BILINEAR), 75)
    if kind == 2:
        dx, dy = int(w * 0.05), int(h * 0.05)
        return image.crop((dx, dy, w - dx, h - dy))
    if kind == 3:
        return jpeg(ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(1.15)).enhance(1.1), 85)
    dx, dy = int(w * 0.03), int(h * 0.03)
    small = image.crop((dx, dy, w - dx, h - dy))
    return jpeg(small.resize((max(1, int(small.width * 0.6)), max(1, int(small.height * 0.6))), Image.BILINEAR), 70)


EDIT_NAMES = ("jpeg q30", "downscale 40% + jpeg q75", "crop 5% each side", "brightness 1.15, contrast 1.1 + jpeg q85",
              "crop 3% + downscale 60% + jpeg q70")


def _list_real(data_root: Path) -> list[tuple[Path, str]]:
    """(file, group label) for every real image; holidays-dev and -fullres share group labels."""
    out = []
    for name in REAL_SETS:
        folder = data_root / name
        if not folder.is_dir():
            continue
        groups = {}
        gt = folder / "groundtruth.csv"
        if gt.exists():
            with open(gt, newline="") as fh:
                groups = {row["filename"]: row["group"] for row in csv.DictReader(fh)}
        prefix = "ukbench" if name.startswith("ukbench") else "holidays"
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                out.append((f, f"{prefix}:{groups.get(f.name, f.name)}"))
    return out


def embed_real(data_root: Path, cache_dir: Path, batch: int = 32) -> dict:
    """Real MobileNet vectors (and their edits), cached as ``real_mobilenet.npz``."""
    files = _list_real(data_root)
    if not files:
        raise FileNotFoundError(f"no real images under {data_root} ({', '.join(REAL_SETS)})")
    key = hashlib.sha1(json.dumps([[str(f), g, f.stat().st_size] for f, g in files]).encode()).hexdigest()[:12]
    cache = cache_dir / f"real_mobilenet_{key}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        return {k: data[k] for k in data.files}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from PIL import Image, ImageOps

    model = keras.applications.MobileNet(include_top=False, pooling="avg", weights="imagenet",
                                         input_shape=(224, 224, 3))
    preprocess = keras.applications.mobilenet.preprocess_input

    def load(path):
        img = Image.open(path)
        img.draft("RGB", (448, 448))  # big JPEGs: decode at reduced scale, as the pipeline does
        return ImageOps.exif_transpose(img).convert("RGB")

    def embed(images):
        vecs = []
        for i in range(0, len(images), batch):
            arr = np.stack([np.asarray(im.resize((224, 224), Image.BILINEAR), dtype=np.float32)
                            for im in images[i:i + batch]])
            vecs.append(model.predict_on_batch(preprocess(arr)))
        v = np.concatenate(vecs).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    originals, edited = [], []
    for i, (f, _) in enumerate(files):
        img = load(f)
        originals.append(img)
        edited.append(_edit(img, i % len(EDIT_NAMES)))
    vectors, edit_vectors = embed(originals), embed(edited)
    data = {"vectors": vectors, "edit_vectors": edit_vectors,
            "groups": np.array([g for _, g in files]), "names": np.array([f"{f.parent.name}/{f.name}" for f, _ in files]),
            "edit_kind": np.arange(len(files)) % len(EDIT_NAMES)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}.npz")
    np.savez(tmp, **data)
    os.replace(tmp, cache)
    return data


# ----------------------------------------------------------- statistics
def cosine_stats(values: np.ndarray, threshold: float) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"count": 0}
    q = np.quantile(v, [0.01, 0.5, 0.99, 0.999])
    return {"count": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "p01": float(q[0]),
            "p50": float(q[1]), "p99": float(q[2]), "p999": float(q[3]), "max": float(v.max()),
            "fraction_at_threshold": float((v >= threshold).mean())}


def unrelated_cosines(vectors: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Cosines of all pairs i < j in different groups (all pairs when groups is None)."""
    sims = vectors @ vectors.T
    iu = np.triu_indices(len(vectors), 1)
    if groups is None:
        return sims[iu]
    different = groups[:, None] != groups[None, :]
    return sims[iu][different[iu]]


def nearest_unrelated(vectors: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Each row's highest cosine to a row of another group (what decides false pairs)."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    if groups is not None:
        sims[groups[:, None] == groups[None, :]] = -np.inf
    return sims.max(axis=1)


def real_statistics(real: dict, threshold: float) -> dict:
    v, g = real["vectors"], real["groups"]
    sims = v @ v.T
    iu = np.triu_indices(len(v), 1)
    same = (g[:, None] == g[None, :])[iu]
    copies = np.einsum("ij,ij->i", v, real["edit_vectors"])
    by_kind = {EDIT_NAMES[k]: cosine_stats(copies[real["edit_kind"] == k], threshold) for k in range(len(EDIT_NAMES))}
    return {"images": int(len(v)), "dimension": int(v.shape[1]),
            "unrelated_pairs": cosine_stats(sims[iu][~same], threshold),
            "same_group_pairs": cosine_stats(sims[iu][same], threshold),
            "near_copy_pairs": cosine_stats(copies, threshold), "near_copy_pairs_by_edit": by_kind,
            "nearest_unrelated_per_row": cosine_stats(nearest_unrelated(v, g), threshold)}


# ----------------------------------------------------------------- model
@dataclass
class Generator:
    mean: np.ndarray                 # (d,)
    components: np.ndarray           # (rank, d) orthonormal rows
    stddevs: np.ndarray              # (rank,)
    residual: float                  # per-dimension std outside the components
    a: float = 1.0                   # fitted scale of the low-rank part
    b: float = 1.0                   # fitted scale of the isotropic residual
    copy_cosines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # real near-copy cosines
    copy_range: tuple[float, float] | None = None  # uniform instead of the real cosines
    copy_fraction: float = 0.10
    burst_rows: int = 200
    burst_every: int = 50_000        # one burst per this many rows (at least one per table)
    burst_step: tuple[float, float] = (0.92, 0.97)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        z = rng.standard_normal((n, len(self.stddevs)), dtype=np.float32)
        out = (z * (self.a * self.stddevs).astype(np.float32)) @ self.components
        out += rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(self.b * self.residual)
        return out

    def unrelated(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return _l2(self.mean.astype(np.float32) + self.noise(rng, n))

    def copies_of(self, rng: np.random.Generator, originals: np.ndarray, cosines: np.ndarray) -> np.ndarray:
        """Rows at exactly ``cosines`` from ``originals`` (unit rows), perturbed along the noise model."""
        u = self.noise(rng, len(originals))
        u -= np.einsum("ij,ij->i", u, originals)[:, None] * originals
        u = _l2(u)
        c = cosines.astype(np.float32)[:, None]
        return _l2(c * originals + np.sqrt(np.maximum(0.0, 1.0 - c * c)) * u)

    def copy_cosine_draws(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.copy_range is not None or len(self.copy_cosines) == 0:
            lo, hi = self.copy_range or (0.90, 0.97)
            return rng.uniform(lo, hi, n).astype(np.float32)
        picks = rng.choice(self.copy_cosines, n) + rng.normal(0.0, 0.005, n)
        return np.clip(picks, -1.0, 0.999).astype(np.float32)

    def digest(self) -> str:
        h = hashlib.sha1()
        for arr in (self.mean, self.components, self.stddevs, self.copy_cosines):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(json.dumps([GENERATOR_VERSION, self.residual, self.a, self.b, self.copy_range, self.copy_fraction,
                             self.burst_rows, self.burst_every, self.burst_step]).encode())
        return h.hexdigest()[:16]


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit(real: dict, rank: int = 128, seed: int = 0, copy_range: tuple[float, float] | None = None,
        fit_rows: int = 1500) -> tuple[Generator, dict]:
    """Fit the generator to the real vectors; returns it and a report of the fit."""
    from scipy.optimize import minimize

    v = real["vectors"].astype(np.float64)
    groups = real["groups"]
    mean = v.mean(axis=0)
    centred = v - mean
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    variances = sing ** 2 / (len(v) - 1)
    rank = min(rank, len(variances) - 1)
    total = float(centred.var(axis=0, ddof=1).sum())
    residual = float(np.sqrt(max(total - variances[:rank].sum(), 1e-12) / (v.shape[1] - rank)))
    real_unrelated = unrelated_cosines(real["vectors"], groups)
    target = np.array([real_unrelated.mean(), real_unrelated.std()])
    gen = Generator(mean=mean.astype(np.float32), components=vt[:rank].astype(np.float32),
                    stddevs=np.sqrt(variances[:rank]).astype(np.float32), residual=residual,
                    copy_cosines=np.einsum("ij,ij->i", real["vectors"], real["edit_vectors"]).astype(np.float32),
                    copy_range=copy_range)

    def stats_for(params) -> np.ndarray:
        gen.a, gen.b = float(np.exp(params[0])), float(np.exp(params[1]))
        c = unrelated_cosines(gen.unrelated(np.random.default_rng(seed), fit_rows), None)
        return np.array([c.mean(), c.std()])

    def loss(params) -> float:
        got = stats_for(params)
        return float(((got - target) / target) @ ((got - target) / target))

    started = time.perf_counter()
    best = minimize(loss, x0=np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-8, "maxiter": 200})
    stats_for(best.x)
    report = {
        "method": "mean + low-rank PCA (top %d components of the centred real vectors) + isotropic residual; "
                  "scales a (low-rank) and b (residual) fitted by Nelder-Mead so that the cosine between "
                  "independent synthetic rows has the mean and std of real different-group pairs" % rank,
        "rank": rank, "variance_explained_by_rank": float(variances[:rank].sum() / total),
        "residual_std_per_dim": residual, "a": gen.a, "b": gen.b, "fit_loss": float(best.fun),
        "fit_seconds": time.perf_counter() - started, "fit_rows": fit_rows,
        "target_unrelated_mean_std": target.tolist(),
    }
    return gen, report


def synthetic_statistics(gen: Generator, threshold: float, n: int, seed: int) -> dict:
    """The same statistics as :func:`real_statistics`, on ``n`` fresh synthetic rows (other draws)."""
    rng = np.random.default_rng(seed + 1_000_003)
    rows = gen.unrelated(rng, n)
    copies = gen.copies_of(rng, rows, gen.copy_cosine_draws(rng, n))
    return {"rows": n, "unrelated_pairs": cosine_stats(unrelated_cosines(rows, None), threshold),
            "near_copy_pairs": cosine_stats(np.einsum("ij,ij->i", rows, copies), threshold),
            "nearest_unrelated_per_row": cosine_stats(nearest_unrelated(rows, None), threshold)}


# ------------------------------------------------------------------ blocks
@dataclass
class Block:
    ids: np.ndarray        # (n,) str
    vectors: np.ndarray    # (n, d) float32, unit rows
    pairs: list            # planted (row_a, row_b, cosine, kind) with rows local to the block


def image_ids(seed: int, start: int, n: int) -> np.ndarray:
    return np.array([hashlib.sha1(f"{seed}:{i}".encode()).hexdigest()[:20] for i in range(start, start + n)])


def generate_block(gen: Generator, seed: int, block_no: int, start: int, n: int, bursts: int) -> Block:
    """Rows ``start .. start+n`` of the table: unrelated rows, near-copies of them, ``bursts`` chains."""
    rng = np.random.default_rng([seed, block_no])
    burst_rows = min(n // 2, gen.burst_rows) if bursts else 0
    n_burst = burst_rows * bursts if burst_rows > 1 else 0
    n_copies = int(round(gen.copy_fraction * n))
    n_base = n - n_copies - n_burst
    if n_base < 1:
        raise ValueError(f"block of {n} rows too small for {n_copies} copies and {n_burst} burst rows")
    rows = np.empty((n, gen.dim), dtype=np.float32)
    rows[:n_base] = gen.unrelated(rng, n_base)
    pairs = []
    originals = rng.integers(0, n_base, n_copies)
    cosines = gen.copy_cosine_draws(rng, n_copies)
    rows[n_base:n_base + n_copies] = gen.copies_of(rng, rows[originals], cosines)
    pairs += [(int(o), n_base + i, float(c), "copy") for i, (o, c) in enumerate(zip(originals, cosines))]
    at = n_base + n_copies
    for _ in range(bursts if n_burst else 0):
        rows[at] = gen.unrelated(rng, 1)[0]
        steps = rng.uniform(*gen.burst_step, burst_rows - 1).astype(np.float32)
        for j in range(1, burst_rows):
            rows[at + j] = gen.copies_of(rng, rows[at + j - 1:at + j], steps[j - 1:j])[0]
            pairs.append((at + j - 1, at + j, float(steps[j - 1]), "burst"))
        at += burst_rows
    # Shuffle so a copy is not stored next to its original.
    order = rng.permutation(n)
    where = np.empty(n, dtype=np.int64)
    where[order] = np.arange(n)
    pairs = [(int(where[a]), int(where[b]), c, k) for a, b, c, k in pairs]
    return Block(ids=image_ids(seed, start, n), vectors=rows[order], pairs=pairs)


def block_plan(n: int, block_rows: int, burst_every: int) -> list[tuple[int, int, int]]:
    """(start, rows, bursts) per block; bursts spread over the blocks, at least one per table."""
    starts = list(range(0, n, block_rows))
    total_bursts = max(1, n // burst_every)
    plan = []
    for b, start in enumerate(starts):
        share = total_bursts * (b + 1) // len(starts) - total_bursts * b // len(starts)
        plan.append((start, min(block_rows, n - start), share))
    return plan


# ------------------------------------------------------------- the tables
def write_neardup_tables(workdir: Path, blocks, method: str = "mobilenet", rows_per_group: int = 5000,
                         metadata: dict | None = None) -> dict:
    """Write ``blocks`` as a committed neardup image table + embedding table under ``workdir``.

    The one place that knows the workdir layout and commit protocol (kept in step with
    ``pipeline`` store/schemas: ``<workdir>/images`` and ``<workdir>/embeddings/<method>``,
    Parquet files written into ``<table>.staging-<id>``, then ``_SUCCESS`` and ``_neardup.json``,
    then one rename). One Parquet file per block, row groups of ``rows_per_group`` rows.
    Returns counts and the planted pairs as global row numbers and image ids.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_schema = pa.schema([
        pa.field("image_id", pa.string(), False), pa.field("path", pa.string(), False),
        pa.field("size_bytes", pa.int64(), False), pa.field("modification_time", pa.timestamp("us", tz="UTC")),
        pa.field("content_sha256", pa.string()), pa.field("format", pa.string()), pa.field("width", pa.int32()),
        pa.field("height", pa.int32()), pa.field("status", pa.string(), False), pa.field("error", pa.string()),
        pa.field("content", pa.binary())])
    embedding_schema = pa.schema([
        pa.field("image_id", pa.string(), False), pa.field("content_sha256", pa.string()),
        pa.field("backbone", pa.string(), False),
        pa.field("embedding", pa.list_(pa.field("element", pa.float32(), False))),
        pa.field("status", pa.string(), False), pa.field("error", pa.string())])
    targets = {"images": workdir / "images", "embeddings": workdir / "embeddings" / method}
    staging = {k: v.with_name(f"{v.name}.staging-{uuid.uuid4().hex[:12]}") for k, v in targets.items()}
    for path in staging.values():
        path.mkdir(parents=True)
    planted, rows, offset = [], 0, 0
    try:
        for b, block in enumerate(blocks):
            n = len(block.ids)
            sha = np.array([hashlib.sha256(i.encode()).hexdigest() for i in block.ids])
            images = pa.table({
                "image_id": block.ids, "path": np.char.add("synthetic://", block.ids),
                "size_bytes": np.full(n, 100_000, np.int64), "modification_time": pa.nulls(n, pa.timestamp("us", tz="UTC")),
                "content_sha256": sha, "format": np.full(n, "JPEG"), "width": np.full(n, 640, np.int32),
                "height": np.full(n, 480, np.int32), "status": np.full(n, "ok"), "error": pa.nulls(n, pa.string()),
                "content": pa.nulls(n, pa.binary())}, schema=image_schema)
            pq.write_table(images, staging["images"] / f"part-{b:05d}.parquet", row_group_size=rows_per_group)
            flat = pa.array(block.vectors.reshape(-1), pa.float32())
            offsets = pa.array(np.arange(0, (n + 1) * block.vectors.shape[1], block.vectors.shape[1], dtype=np.int32))
            embeddings = pa.table({
                "image_id": block.ids, "content_sha256": sha, "backbone": np.full(n, method),
                "embedding": pa.ListArray.from_arrays(offsets, flat).cast(embedding_schema.field("embedding").type),
                "status": np.full(n, "ok"), "error": pa.nulls(n, pa.string())}, schema=embedding_schema)
            pq.write_table(embeddings, staging["embeddings"] / f"part-{b:05d}.parquet", row_group_size=rows_per_group)
            planted += [(offset + a, offset + c, cos, kind) for a, c, cos, kind in block.pairs]
            offset += n
            rows += n
        for name, path in staging.items():
            (path / "_neardup.json").write_text(json.dumps({"synthetic": metadata or {}, "table": name}, indent=2))
            (path / "_SUCCESS").write_text("")
        for name, path in staging.items():
            if targets[name].exists():
                shutil.rmtree(targets[name])
            targets[name].parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, targets[name])
    except BaseException:
        for path in staging.values():
            shutil.rmtree(path, ignore_errors=True)
        raise
    return {"rows": rows, "planted": planted, "images": str(targets["images"]), "embeddings": str(targets["embeddings"])}


def iter_embedding_blocks(table_dir: Path, rows: int = 20_000):
    """(ids, float32 vectors) in table order (files sorted by name), ``rows`` at a time."""
    import pyarrow.parquet as pq

    for f in sorted(p for p in Path(table_dir).iterdir() if p.suffix == ".parquet"):
        reader = pq.ParquetFile(f)
        for batch in reader.iter_batches(batch_size=rows, columns=["image_id", "embedding"]):
            emb = batch.column(1)
            dim = len(emb[0]) if len(emb) else 0
            vectors = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
            yield batch.column(0).to_numpy(zero_copy_only=False), vectors


def generator_settings(gen: Generator) -> dict:
    keep = ("copy_range", "copy_fraction", "burst_rows", "burst_every", "burst_step")
    out = {k: v for k, v in asdict(gen).items() if k in keep}
    out.update(rank=int(len(gen.stddevs)), a=gen.a, b=gen.b, residual=gen.residual,
               copy_cosine_source="uniform %s" % (gen.copy_range,) if gen.copy_range else
               "real near-copy cosines (bootstrap + N(0, 0.005) jitter)", digest=gen.digest())
    return out
