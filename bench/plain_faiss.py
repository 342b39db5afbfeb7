"""The comparison row: plain FAISS in one Python process on the same embedding table.

IVF with ``nlist`` lists (default about 4*sqrt(N), the FAISS guideline), fp16 scalar
quantizer, ``nprobe`` 16; every row searched against all (top-k), candidates re-scored
exactly from the float32 vectors, pairs kept at the threshold. No Spark, no sharding: what a
user with one machine and FAISS would write. Run as its own process by bench_scale.py so its
peak memory is its own:

    python bench/plain_faiss.py --table WORKDIR/embeddings/mobilenet --out pairs.npz --threshold 0.88 --k 21
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synth  # noqa: E402


def default_nlist(n: int) -> int:
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39 or 1))


def load(table: Path) -> np.ndarray:
    blocks = [v for _, v in synth.iter_embedding_blocks(table)]
    out = np.empty((sum(len(b) for b in blocks), blocks[0].shape[1]), dtype=np.float32)
    at = 0
    for b in blocks:
        out[at:at + len(b)] = b
        at += len(b)
    return out


def run(table: Path, threshold: float, k: int, nlist: int | None, nprobe: int, train_points: int | None,
        query_block: int = 4096, seed: int = 0) -> tuple[dict, np.ndarray]:
    import faiss

    timings = {}
    t = time.perf_counter()
    x = load(table)
    timings["load_s"] = time.perf_counter() - t
    n, d = x.shape
    nlist = nlist or default_nlist(n)
    factory = f"IVF{nlist},SQfp16"
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    train_n = min(n, train_points or 64 * nlist)
    sample = x[np.sort(np.random.default_rng(seed).choice(n, train_n, replace=False))]
    t = time.perf_counter()
    index.train(sample)
    timings["train_s"] = time.perf_counter() - t
    del sample
    t = time.perf_counter()
    index.add(x)
    timings["add_s"] = time.perf_counter() - t
    timings["build_s"] = timings["train_s"] + timings["add_s"]
    faiss.extract_index_ivf(index).nprobe = nprobe
    t = time.perf_counter()
    pairs = []
    for start in range(0, n, query_block):
        q = x[start:start + query_block]
        _, ids = index.search(q, min(k, n))
        rows = np.arange(start, start + len(q))[:, None]
        valid = (ids >= 0) & (ids != rows)
        safe = np.where(ids >= 0, ids, 0)
        exact = np.einsum("qd,qkd->qk", q, x[safe])  # re-scored from the float32 vectors
        keep = valid & (exact >= threshold)
        a, b = np.broadcast_to(rows, ids.shape)[keep], ids[keep]
        pairs.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    found = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)
    timings["search_s"] = time.perf_counter() - t
    timings["total_s"] = timings["load_s"] + timings["build_s"] + timings["search_s"]
    info = {"factory": factory, "nlist": nlist, "nprobe": nprobe, "k": k, "train_points": train_n, "rows": n,
            "dimension": d, "threshold": threshold, "pairs": int(len(found)), "faiss_threads": faiss.omp_get_max_threads(),
            "index_bytes": int(n * (index.sa_code_size() + 8) + nlist * d * 4), **timings,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return info, found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help=".npz with the pairs (row numbers in table order)")
    p.add_argument("--threshold", type=float, required=True)
    p.add_argument("--k", type=int, default=21)
    p.add_argument("--nlist", type=int, default=0)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--train-points", type=int, default=0)
    args = p.parse_args(argv)
    info, pairs = run(args.table, args.threshold, args.k, args.nlist or None, args.nprobe, args.train_points or None)
    np.savez(args.out, pairs=pairs)
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
