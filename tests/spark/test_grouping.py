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


def test_spark_keep_policies_match_oracle(spark):
    import datetime as dt

    from pipeline.stages.dedup import groups_with_keep

    rng = random.Random(3)
    pairs = _random_pairs(11, nodes=80, edges=60)
    oracle = G.connected_components(pairs)
    day = [None, *(dt.datetime(2020, 1, d) for d in (1, 2, 3))]
    cands = {n: G.Candidate(n, f"/data/{rng.choice('ab')}/{n}.jpg", rng.choice([10, 20]), rng.choice([10, 20]),
                            rng.choice([100, 200]), rng.choice(["JPEG", "PNG", None]), rng.choice(day))
             for n in oracle}
    images = spark.createDataFrame(
        [(c.image_id, c.path, c.width, c.height, c.size_bytes, c.format, c.modification_time) for c in cands.values()],
        "image_id string, path string, width int, height int, size_bytes long, format string, "
        "modification_time timestamp")
    comps = spark.createDataFrame(list(oracle.items()), "image_id string, group_id string")
    members: dict = {}
    for node, group in oracle.items():
        members.setdefault(group, []).append(cands[node])
    for policy, folders in (("pixels", []), ("largest", []), ("oldest", []), ("newest", []), ("pixels", ["/data/b"])):
        rows = groups_with_keep(comps, images, policy, folders).collect()
        keepers = {r[S.GROUP_ID]: r[S.IMAGE_ID] for r in rows if r[S.KEEP]}
        assert keepers == {g: G.choose_keeper(m, policy, folders) for g, m in members.items()}, policy
        assert all(r[S.GROUP_SIZE] == len(members[r[S.GROUP_ID]]) for r in rows)


def test_spark_not_duplicates_match_oracle(spark):
    from pipeline.stages.dedup import components_honouring

    rng = random.Random(8)
    pairs = _random_pairs(13, nodes=120, edges=110)
    edges = [(a, b, round(rng.uniform(0.88, 1.0), 4)) for a, b in pairs]
    df = spark.createDataFrame(edges, S.PAIRS_TABLE)
    # One pair joined directly, one through the long chain, one whose images share no group.
    banned = sorted({G.unordered(*pairs[-1]), ("chain005", "chain030"), ("img0000", "zzz")})
    comps, split = components_honouring(spark, df, banned)
    got = {r[S.IMAGE_ID]: r[S.GROUP_ID] for r in comps.collect()}
    expected = G.components_with_cannot_link(edges, banned)
    assert got == expected
    assert split >= 1 and got["chain005"] != got["chain030"]
