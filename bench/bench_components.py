"""Rounds and seconds of the Spark connected components on the shapes that matter (a benchmark,
not a test): a burst of frames chained with random ids, one group of identical images (a star,
and each image paired with its k nearest along a sequence), and a random graph.

    python bench/bench_components.py [--master local[2]] [--cases chain3000,star100k,...]

Writes one JSON line per case to stdout and to ``bench/results/components.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.stages.components import run_components
from pipeline.stages.session import BASE_CONF


def _hashed(col):
    return F.substring(F.sha1(F.concat(F.lit("img-"), col.cast("string"))), 1, 20)


def band(spark, n: int, k: int):
    """Image i paired with images i+1 .. i+k: a chain when k = 1, a 'k nearest' group otherwise."""
    ids = spark.range(n)
    parts = [ids.where(F.col("id") + j < n).select(_hashed(F.col("id")).alias(S.IMAGE_ID_A),
                                                   _hashed(F.col("id") + j).alias(S.IMAGE_ID_B))
             for j in range(1, k + 1)]
    out = parts[0]
    for p in parts[1:]:
        out = out.union(p)
    return out


def star(spark, n: int):
    return spark.range(n).where(F.col("id") != 777).select(_hashed(F.lit(777)).alias(S.IMAGE_ID_A),
                                                           _hashed(F.col("id")).alias(S.IMAGE_ID_B))


def random_graph(spark, nodes: int, edges: int, seed: int = 1):
    e = spark.range(edges)
    pick = lambda salt: (F.abs(F.xxhash64(F.col("id"), F.lit(seed), F.lit(salt))) % nodes)  # noqa: E731
    return e.select(_hashed(pick(1)).alias(S.IMAGE_ID_A), _hashed(pick(2)).alias(S.IMAGE_ID_B))


CASES = {
    "chain3000": lambda s: band(s, 3000, 1),
    "chain3000_skip": lambda s: band(s, 3000, 2),
    "star100k": lambda s: star(s, 100_000),
    "chain100k": lambda s: band(s, 100_000, 1),
    "knn5_100k": lambda s: band(s, 100_000, 5),
    "knn20_100k": lambda s: band(s, 100_000, 20),
    "random100k_edges": lambda s: random_graph(s, 100_000, 100_000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--cases", default="chain3000,chain3000_skip,star100k,random100k_edges")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "components.jsonl"))
    args = parser.parse_args()
    builder = SparkSession.builder.master(args.master).appName("bench-components")
    for key, value in {**BASE_CONF, "spark.driver.memory": "2g"}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    run_components(band(spark, 10, 1)).groups.count()  # warm-up: JIT, code generation
    for name in args.cases.split(","):
        pairs = CASES[name](spark).localCheckpoint()
        n_pairs = pairs.count()
        started = time.perf_counter()
        result = run_components(pairs)
        groups = result.groups.groupBy(S.GROUP_ID).count()
        stats = groups.agg(F.count(F.lit(1)).alias("groups"), F.sum("count").alias("images"),
                           F.max("count").alias("largest")).first()
        row = {"case": name, "pairs": n_pairs, "images": stats["images"], "groups": stats["groups"],
               "largest_group": stats["largest"], "rounds": result.rounds,
               "seconds_rounds": round(result.seconds, 1),
               "seconds_total": round(time.perf_counter() - started, 1),
               "master": args.master, "machine": platform.processor() or platform.machine(),
               "date": datetime.now(timezone.utc).isoformat(timespec="minutes")}
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    spark.stop()


if __name__ == "__main__":
    main()
