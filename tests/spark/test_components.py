"""Connected components in Spark (large-star / small-star): the union-find oracle on many
random graphs, and the shapes that broke label propagation (long chains, one huge group)."""
import math
import random

import pytest
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.core import grouping as G
from pipeline.stages.components import connected_components, round_limit, run_components


def _pairs_df(spark, pairs):
    return spark.createDataFrame([(a, b, 1.0) for a, b in pairs], S.PAIRS_TABLE)


def _random_id(rng: random.Random, prefix: str) -> str:
    # Random order: the smallest id sits anywhere in the graph, as with hashed image ids.
    return f"{prefix}{rng.getrandbits(40):010x}"


def _random_graph(rng: random.Random, case: int) -> list[tuple[str, str]]:
    """A small graph of one of several shapes, with ids unique to ``case``."""
    n = rng.randint(1, 40)
    ids = list({_random_id(rng, f"c{case:03d}-"): None for _ in range(n)})
    n = len(ids)
    shape = rng.choice(["random", "chain", "star", "cycle", "clique", "forest"])
    if shape == "chain":
        pairs = list(zip(ids, ids[1:]))
    elif shape == "star":
        pairs = [(ids[0], x) for x in ids[1:]]
    elif shape == "cycle":
        pairs = list(zip(ids, ids[1:] + ids[:1]))
    elif shape == "clique":
        pairs = [(a, b) for i, a in enumerate(ids[:12]) for b in ids[i + 1:12]]
    elif shape == "forest":
        pairs = [(ids[i], ids[rng.randrange(i)]) for i in range(1, n) if rng.random() < 0.8]
    else:
        pairs = [(rng.choice(ids), rng.choice(ids)) for _ in range(rng.randint(0, 2 * n))]
    if not pairs:
        pairs = [(ids[0], ids[0])]  # a self pair alone still makes its image a node
    # Either orientation, the odd duplicate and self pair: the function must not rely on a < b.
    pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs]
    pairs += rng.sample(pairs, min(2, len(pairs))) + [(ids[-1], ids[-1])]
    return pairs


def test_hundreds_of_random_graphs_match_union_find(spark):
    rng = random.Random(20261130)
    pairs = [p for case in range(200) for p in _random_graph(rng, case)]
    df = _pairs_df(spark, pairs)
    got = {r[S.IMAGE_ID]: r[S.GROUP_ID] for r in connected_components(df, local_max_edges=0).collect()}
    assert got == G.connected_components(pairs)
    # The driver path for small pair tables gives the same groups.
    local = {r[S.IMAGE_ID]: r[S.GROUP_ID] for r in connected_components(df).collect()}
    assert local == got
    assert len(set(got.values())) > 200  # several components per case on average, not one blob


def _hashed(col):
    """A 20-character hex id from an integer column: random order, like image ids."""
    return F.substring(F.sha1(F.concat(F.lit("frame-"), col.cast("string"))), 1, 20)


def _check_one_group(result, n: int):
    groups = result.groups
    stats = groups.agg(F.count(F.lit(1)).alias("rows"), F.countDistinct(S.IMAGE_ID).alias("images"),
                       F.countDistinct(S.GROUP_ID).alias("groups"), F.min(S.IMAGE_ID).alias("smallest"),
                       F.first(S.GROUP_ID).alias("group")).first()
    assert (stats["rows"], stats["images"], stats["groups"]) == (n, n, 1)
    assert stats["group"] == stats["smallest"]


def test_burst_of_3000_frames_with_random_ids_is_one_group_in_log_rounds(spark):
    n = 3000
    frames = spark.range(n)
    pairs = frames.where(F.col("id") < n - 1).select(_hashed(F.col("id")).alias(S.IMAGE_ID_A),
                                                     _hashed(F.col("id") + 1).alias(S.IMAGE_ID_B))
    result = run_components(pairs)
    _check_one_group(result, n)
    # Label propagation needs rounds in the order of the chain's length (~3000 / 2 with jumps);
    # large-star / small-star stays within a small multiple of log2(n) (12 here).
    assert result.rounds <= 2 * math.ceil(math.log2(n))


def test_one_group_of_100k_identical_images(spark):
    """Skew: one image paired with 100k others (bench/bench_components.py also times 100k images
    each paired with their k nearest along a sequence)."""
    n = 100_000
    # The hub is a random one of them, not the smallest.
    pairs = spark.range(n).where(F.col("id") != 777).select(_hashed(F.lit(777)).alias(S.IMAGE_ID_A),
                                                            _hashed(F.col("id")).alias(S.IMAGE_ID_B))
    result = run_components(pairs)
    _check_one_group(result, n)
    # The hub is not the smallest id, so at least one round re-centres the star on it.
    assert 1 <= result.rounds <= 2 * math.ceil(math.log2(n))


@pytest.fixture
def uncoalesced(spark):
    """Keep every shuffle's partitions: the id numbering must hold across several of them."""
    key = "spark.sql.adaptive.coalescePartitions.enabled"
    before = spark.conf.get(key)
    spark.conf.set(key, "false")
    yield
    spark.conf.set(key, before)


def test_reliable_checkpoints_and_many_partitions_give_the_same_groups(spark, tmp_path, uncoalesced):
    rng = random.Random(5)
    pairs = [p for case in range(8) for p in _random_graph(rng, case)]
    folder = tmp_path / "cc"
    result = run_components(_pairs_df(spark, pairs), checkpoint_dir=str(folder))
    assert result.groups.rdd.getNumPartitions() > 1
    got = {r[S.IMAGE_ID]: r[S.GROUP_ID] for r in result.groups.collect()}
    assert got == G.connected_components(pairs)
    # Only the newest checkpoint of each kind is kept while the run goes on.
    kinds = sorted(p.name.split("-")[0] for p in folder.iterdir())
    assert kinds == sorted({"ids", "edges", "labels"} if result.rounds >= 2 else {"ids", "edges"})


def test_round_limit_is_a_clear_error(spark):
    ids = [f"f{i:03d}" for i in random.Random(1).sample(range(1000), 200)]
    with pytest.raises(RuntimeError, match="did not converge in 1 rounds on 200 nodes"):
        run_components(_pairs_df(spark, list(zip(ids, ids[1:]))), max_rounds=1)
    assert round_limit(10**8) >= math.ceil(math.log2(10**8)) ** 2  # a net above the proved bound, not a budget


def test_no_pairs_no_groups(spark):
    empty = spark.createDataFrame([], S.PAIRS_TABLE)
    assert connected_components(empty).collect() == []
