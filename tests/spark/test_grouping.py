"""Connected components and the keep policy: Spark against the pure oracle."""
import random

from pipeline.core import grouping as G
from pipeline import schemas as S


def _random_pairs(seed: int, nodes: int = 300, edges: int = 260):
    rng = random.Random(seed)
    ids = [f"img{i:04d}" for i in range(nodes)]
    out = set()
    while len(out) < edges:
        a, b = rng.sample(ids, 2)
        out.add((min(a, b), max(a, b)))
    # A long chain: the worst case for label propagation.
    chain = [f"chain{i:03d}" for i in range(40)]
    out.update(zip(chain, chain[1:]))
    return sorted(out)


def test_spark_components_match_union_find(spark):
    from pipeline.stages.components import connected_components

    pairs = _random_pairs(7)
    df = spark.createDataFrame([(a, b, 0.9) for a, b in pairs], S.PAIRS_TABLE)
    got = {r[S.IMAGE_ID]: r[S.GROUP_ID] for r in connected_components(df).collect()}
    assert got == G.connected_components(pairs)


def test_spark_keep_policy_matches_oracle(spark):
    from pipeline.stages.dedup import groups_with_keep

    rng = random.Random(3)
    pairs = _random_pairs(11, nodes=80, edges=60)
    oracle = G.connected_components(pairs)
    cands = {n: G.Candidate(n, f"/data/{rng.choice('ab')}/{n}.jpg", rng.choice([10, 20]), rng.choice([10, 20]),
                            rng.choice([100, 200])) for n in oracle}
    images = spark.createDataFrame(
        [(c.image_id, c.path, c.width, c.height, c.size_bytes) for c in cands.values()],
        "image_id string, path string, width int, height int, size_bytes long")
    comps = spark.createDataFrame(list(oracle.items()), "image_id string, group_id string")
    rows = groups_with_keep(comps, images).collect()
    keepers = {r[S.GROUP_ID]: r[S.IMAGE_ID] for r in rows if r[S.KEEP]}
    members: dict = {}
    for node, group in oracle.items():
        members.setdefault(group, []).append(cands[node])
    assert keepers == {g: G.choose_keeper(m) for g, m in members.items()}
    assert all(r[S.GROUP_SIZE] == len(members[r[S.GROUP_ID]]) for r in rows)
