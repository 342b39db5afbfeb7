"""`neardup query` of a few files against a 100k-image archive: wall time, start-up included.

The archive: a real small workdir (its images embedded by the pipeline, e.g. the demo subset
the tests use) plus synthetic rows (:func:`pipeline.core.synthetic.near_copy_table`) up to
``--n`` images, written in the layout the jobs write: embedding and image tables (pyarrow),
the index of ``index.type: auto`` (IVF with fp16 codes at 100k, trained and filled by the same
FAISS helpers the index stage calls), and the per-image state of the last dedup (augmented
vectors: for the synthetic rows their raw vectors, which changes no timing). Then the real
command line runs ``--rounds`` times as a user would: a new process each time.

    python bench/bench_query.py --real /tmp/qdev/work --queries /tmp/qdev/queries --out /tmp/qbench
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_scale import git_info, machine  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.core import faiss_index, storage, synthetic  # noqa: E402
from pipeline.core.calibration import Calibration, shipped, space_of  # noqa: E402


def _write(table: pa.Table, folder: Path, meta: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-00000.parquet", row_group_size=8192)
    if meta is not None:
        (folder / storage.METADATA_FILE).write_text(json.dumps(meta))
    (folder / "_SUCCESS").write_bytes(b"")


def _vectors(column) -> np.ndarray:
    col = column.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)


def build_archive(real: Path, out: Path, n: int, seed: int = 0) -> dict:
    started = time.perf_counter()
    emb = pq.read_table(real / "embeddings" / "mobilenet", columns=["image_id", "embedding", "status"])
    emb = emb.filter(pa.compute.equal(emb.column("status"), "ok"))
    images = pq.read_table(real / "images", columns=["image_id", "path"])
    real_ids = emb.column("image_id").to_pylist()
    real_vecs = _vectors(emb.column("embedding"))
    synth, _ = synthetic.near_copy_table(n - len(real_ids), real_vecs.shape[1], seed=seed)
    ids = real_ids + [f"s{i:019d}" for i in range(len(synth))]
    vecs = np.concatenate([real_vecs, synth]).astype(np.float32)
    order = np.argsort(np.asarray(ids))
    ids = [ids[i] for i in order]
    vecs = vecs[order]
    dim = vecs.shape[1]
    flat = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim).cast(pa.list_(pa.float32()))
    work = out / "work"
    _write(pa.table({"image_id": ids, "content_sha256": ids, "backbone": ["mobilenet"] * n, "embedding": flat,
                     "status": ["ok"] * n, "error": pa.nulls(n, pa.string())}), work / "embeddings" / "mobilenet")
    path_of = dict(zip(images.column("image_id").to_pylist(), images.column("path").to_pylist()))
    _write(pa.table({"image_id": ids, "path": [path_of.get(i, f"/synthetic/{i}.jpg") for i in ids],
                     "status": ["ok"] * n}), work / "images")
    # The index as `neardup index` with the defaults (index.type auto) makes it.
    settings = Config().index
    plan = faiss_index.plan_index(settings, n, dim)
    index_dir = work / "index" / "mobilenet"
    (index_dir / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    if faiss_index.needs_training(plan.factory):
        sample = vecs[rng.choice(n, plan.train_size, replace=False)]
        index = faiss_index.train_index(plan.factory, dim, sample, "never")
        faiss_index.write_index(str(index_dir / "trained.faiss"), index)
    else:
        index = faiss_index.new_index(plan.factory, dim)
    if plan.shards != 1:
        raise SystemExit(f"plan has {plan.shards} shards; this bench writes one")
    index.add_with_ids(vecs, np.arange(n, dtype=np.int64))
    faiss_index.write_index(str(index_dir / "shards" / "shard_00000.faiss"), index)
    train_seconds = time.perf_counter() - t
    pq.write_table(pa.table({"faiss_id": pa.array(np.arange(n), pa.int64()), "image_id": ids,
                             "shard": pa.array(np.zeros(n, np.int32))}), index_dir / "idmap.parquet")
    (index_dir / "idmap").mkdir(exist_ok=True)
    os.replace(index_dir / "idmap.parquet", index_dir / "idmap" / "part-00000.parquet")
    build_id = uuid.uuid4().hex[:12]
    meta = {**plan.as_meta(), "metric": "inner_product", "dimension": dim, "count": n, "backbone": "mobilenet",
            "shards": [{"shard": 0, "count": n}], "trained": faiss_index.needs_training(plan.factory),
            "build_id": build_id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (index_dir / "index.json").write_text(json.dumps(meta))
    empty = pa.array([[]] * n, pa.list_(pa.string()))
    # Calibrated scores (the default) read each archive image's level from the state: its
    # similarity to its 10th other neighbour, here from the index itself.
    calibration = Calibration.load(shipped(space_of(False, True)))
    t = time.perf_counter()
    sims, found = index.search(vecs, calibration.rank + 1)
    others = np.where(found == np.arange(n)[:, None], -np.inf, sims)
    levels = np.sort(others, axis=1)[:, ::-1][:, calibration.rank - 1].astype(np.float64)
    levels_seconds = time.perf_counter() - t
    _write(pa.table({"image_id": ids, "content_sha256": ids, "aug": flat, "dba_ids": empty,
                     "dba_sims": pa.array([[]] * n, pa.list_(pa.float32())), "rot_90": flat, "rot_270": flat,
                     "level": pa.array(levels, pa.float64())}),
           work / "incremental" / "mobilenet",
           meta={"index_build_id": build_id, "count": n, "calibration": calibration.version})
    return {"n": n, "real_rows": len(real_ids), "index": plan.factory, "index_reason": plan.reason,
            "index_build_seconds": train_seconds, "levels_seconds": levels_seconds,
            "build_seconds": time.perf_counter() - started}


def run_query(work: Path, queries: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "query", "--workdir", str(work),
                           "--input", str(queries), "--set", "progress=never"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("files:", "light path", "spark path"))]
    inner = re.search(r"path, ([0-9.]+) s", proc.stdout)
    return {"wall_seconds": wall, "job_seconds": float(inner.group(1)) if inner else None,
            "load_before": load, "load_after": os.getloadavg()[0], "summary": summary}


def prepare_runtime(work: Path) -> dict:
    from pipeline.encoders import registry

    config = Config().with_overrides(workdir=str(work))
    encoder = registry.encoder_for(config)
    choice = encoder.runtime() if hasattr(encoder, "runtime") else None
    return {} if choice is None else {"runtime": choice.runtime, "precision": choice.precision,
                                      "reason": choice.reason}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", type=Path, required=True, help="a workdir whose images were embedded by `run`")
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    built = None
    if not (args.out / "work" / "incremental" / "mobilenet" / "_SUCCESS").exists():
        built = build_archive(args.real, args.out, args.n)
    # The archive's embed job converted the model for its runtime once (OpenVINO IR under
    # <workdir>/models/); do the same here, outside the timed rounds, as that job would have.
    runtime = prepare_runtime(args.out / "work")
    rounds = [run_query(args.out / "work", args.queries) for _ in range(args.rounds)]
    result = {"machine": machine(), "git": git_info(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "archive": built, "runtime": runtime, "queries": str(args.queries), "rounds": rounds,
              "median_wall_seconds": float(np.median([r["wall_seconds"] for r in rounds]))}
    path = ROOT / "bench" / "results" / f"query_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
