"""Units, hashed ids and vector stores (pipeline.core.vector_store), and the incremental append
in the same layout (pipeline.stages.index.append_to_index), without a Spark session."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import faiss_index, storage
from pipeline.core import vector_store as vs
from pipeline.core.vectors import l2_normalize

DIM = 8


def _table(folder, n, seed=0, start=0):
    """An embedding table of two Parquet files (row groups of 9), every 7th row an error."""
    rng = np.random.default_rng(seed)
    x = l2_normalize(rng.standard_normal((n, DIM)).astype(np.float32))
    ids = [f"img{i:04d}" for i in range(start, start + n)]
    status = ["error" if i % 7 == 3 else "ok" for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    half = n // 2
    for name, sl in (("part-0.parquet", slice(0, half)), ("part-1.parquet", slice(half, n))):
        table = pa.table({"image_id": ids[sl], "status": status[sl],
                          "embedding": pa.array([list(map(float, v)) for v in x[sl]], pa.list_(pa.float32()))})
        pq.write_table(table, folder / name, row_group_size=9)
    ok = np.array([s == "ok" for s in status])
    return np.asarray(ids, dtype=object)[ok], x[ok]


def _stores(tmp_path, n=50, shards=2):
    ids, x = _table(tmp_path / "emb", n)
    units = vs.list_units(str(tmp_path / "emb"), max_rows=5)
    used = vs.assign_shards(units, shards)
    index_dir = str(tmp_path / "index")
    for shard in range(used):
        mine = [u for u in units if u.shard == shard and u.ok]
        parts = [vs.read_unit(u) for u in mine]
        vs.write_store(index_dir, shard, "b1", vs.faiss_ids(np.concatenate([p[0] for p in parts])),
                       np.concatenate([p[1] for p in parts]))
    return ids, x, units, used, index_dir


def test_faiss_ids_are_63_bit_and_stable():
    a = vs.faiss_ids(["x", "y", "x"])
    assert a[0] == a[2] != a[1] and (a >= 0).all()
    assert (vs.faiss_ids(np.array(["x"], dtype=object)) == a[0]).all()


def test_stored_units_give_back_the_table_rows_exactly(tmp_path):
    ids, x, units, used, index_dir = _stores(tmp_path)
    assert used == 2 and sum(u.ok for u in units) == len(ids)
    got_ids, got_x = [], []
    for u in units:
        if not u.ok:
            continue
        names, vectors = vs.read_unit(u)
        fids, stored = vs.read_stored(index_dir, u, "b1")
        # float32 stores: the all-pairs search reads bit-identical queries (exact cosines downstream).
        assert stored.dtype == np.float32 and np.array_equal(stored, vectors)
        assert np.array_equal(fids, vs.faiss_ids(names))
        assert np.array_equal(vs.positions(index_dir, u.shard, "b1", fids), np.arange(u.offset, u.offset + u.ok))
        got_ids += list(names)
        got_x.append(vectors)
    assert got_ids == list(ids) and np.array_equal(np.concatenate(got_x), x)
    unknown = vs.positions(index_dir, 0, "b1", np.array([-1, 12345], np.int64))
    assert (unknown == -1).all()


def test_stored_units_cover_a_store_in_order():
    units = vs.stored_units(3, 10, 4)
    assert [(u.start, u.stop, u.offset, u.ok, u.shard) for u in units] == [
        (0, 3, 0, 3, 3), (3, 6, 3, 3, 3), (6, 10, 6, 4, 3)]
    assert vs.stored_units(0, 0, 4) == []


def _index(tmp_path, config):
    """A flat index of the table's ok rows in the layout build_index writes (shards, stores, units, id map)."""
    from pipeline.stages import index as ix

    ids, x, units, used, index_dir = _stores(tmp_path)
    shards = []
    for shard in range(used):
        index = faiss_index.new_index("IDMap2,Flat", DIM)
        mine = [u for u in units if u.shard == shard and u.ok]
        for u in mine:
            names, vectors = vs.read_unit(u)
            index.add_with_ids(vectors, vs.faiss_ids(names))
        faiss_index.write_index(ix.shard_file(index_dir, shard), index)
        shards.append({"shard": shard, "count": int(index.ntotal), "store": "b1"})
    storage.write_json(f"{index_dir}/{ix.UNITS_JSON}", [u.as_dict() for u in units])
    (tmp_path / "index" / "idmap").mkdir()
    pq.write_table(pa.table({"faiss_id": pa.array(vs.faiss_ids(ids), pa.int64()), "image_id": list(ids),
                             "shard": pa.array([0] * len(ids), pa.int32())}), f"{index_dir}/idmap/part-0.parquet")
    meta = {"factory": "IDMap2,Flat", "dimension": DIM, "count": len(ids), "shards": shards, "trained": False,
            "layout": ix.LAYOUT, "build_id": "b1", "created_at": "now", "metric": "inner_product", "type": "flat"}
    storage.write_json(f"{index_dir}/{ix.INDEX_JSON}", meta)
    return ids, x, ix.IndexInfo.load(index_dir)


def test_append_adds_a_shard_with_its_store_and_units(tmp_path):
    from pipeline.stages import index as ix
    from tests.helpers import make_config

    config = make_config(tmp_path / "work", index__query_block=4)
    ids, x, info = _index(tmp_path, config)
    rng = np.random.default_rng(1)
    new = l2_normalize(rng.standard_normal((6, DIM)).astype(np.float32))
    new_ids = [f"new{i}" for i in range(6)]
    # The table the index was built from is rewritten (the incremental embed): the index must not need it.
    for f in (tmp_path / "emb").iterdir():
        f.unlink()
    after = ix.append_to_index(config, info, new_ids, new)
    again = ix.IndexInfo.load(info.path)
    assert again.meta == after.meta and again.meta["count"] == len(ids) + 6
    stores = again.store_ids()
    assert stores[0] == stores[1] == "b1" and stores[2] == again.build_id != "b1"
    units = ix.load_units(again)
    assert [u.ok for u in units if u.shard == 2] == [3, 3]
    every_id, every_x = [], []
    for u in units:
        if u.ok:
            fids, vectors = vs.read_stored(info.path, u, stores[u.shard])
            every_id.append(fids)
            every_x.append(vectors)
    want_ids = np.concatenate([vs.faiss_ids(ids), vs.faiss_ids(new_ids)])
    assert np.array_equal(np.concatenate(every_id), want_ids)
    assert np.array_equal(np.concatenate(every_x), np.concatenate([x, new]))
    # The new shard searches like the others; the id map has the new rows under hashed ids.
    shard = faiss_index.read_index(ix.shard_file(info.path, 2))
    sims, found = faiss_index.search_shard(shard, new, 1)
    assert np.array_equal(found[:, 0], vs.faiss_ids(new_ids)) and np.allclose(sims[:, 0], 1.0, atol=1e-5)
    idmap = pq.read_table(f"{info.path}/idmap").to_pydict()
    assert dict(zip(idmap["faiss_id"], idmap["image_id"]))[int(vs.faiss_ids(["new3"])[0])] == "new3"
    # An image already in the index cannot be appended again (its hashed id would repeat).
    with pytest.raises(RuntimeError, match="hashes to the FAISS id"):
        ix.append_to_index(config, again, ["new3"], new[3:4])


def test_lookup_finds_vectors_by_image_id_across_shards(tmp_path):
    ids, x, units, used, index_dir = _stores(tmp_path)
    wanted = [ids[-1], ids[0], "not-indexed", ids[len(ids) // 2]]
    got = vs.lookup(index_dir, {s: "b1" for s in range(used)}, wanted)
    assert set(got) == {ids[-1], ids[0], ids[len(ids) // 2]}
    for i in (-1, 0, len(ids) // 2):
        assert np.array_equal(got[ids[i]], x[i])
