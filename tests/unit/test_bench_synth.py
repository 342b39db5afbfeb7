"""The scale benchmark's table generator (bench/synth.py): valid neardup tables, planted pairs exact."""
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline import schemas as S

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import synth  # noqa: E402


def _real_like(n=240, d=64, seed=0):
    """Stand-in for the real MobileNet vectors: clustered, non-negative, unit rows, with edits."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(n // 4, d)))
    groups = np.repeat(np.arange(n // 4), 4)
    vectors = synth._l2(centres[groups] + 0.6 * np.abs(rng.normal(size=(n, d))))
    edits = synth._l2(vectors + 0.15 * rng.normal(size=(n, d)))
    return {"vectors": vectors.astype(np.float32), "edit_vectors": edits.astype(np.float32),
            "groups": groups.astype(str), "edit_kind": np.arange(n) % 5}


def test_fit_matches_unrelated_cosine_statistics():
    real = _real_like()
    gen, report = synth.fit(real, rank=16, fit_rows=400)
    target_mean, target_std = report["target_unrelated_mean_std"]
    got = synth.synthetic_statistics(gen, 0.88, 400, seed=0)["unrelated_pairs"]
    assert abs(got["mean"] - target_mean) < 0.02
    assert abs(got["std"] - target_std) < 0.2 * target_std


def test_tables_are_neardup_tables_and_planted_pairs_are_exact(tmp_path):
    gen, _ = synth.fit(_real_like(), rank=16, fit_rows=300)
    gen.burst_rows, gen.burst_every = 20, 500
    plan = synth.block_plan(1000, 400, gen.burst_every)
    assert sum(rows for _, rows, _ in plan) == 1000 and sum(b for *_, b in plan) == 2
    blocks = [synth.generate_block(gen, 7, b, start, rows, bursts) for b, (start, rows, bursts) in enumerate(plan)]
    again = synth.generate_block(gen, 7, 0, *plan[0][:2], plan[0][2])
    assert np.array_equal(again.vectors, blocks[0].vectors)  # deterministic per seed and block

    written = synth.write_neardup_tables(tmp_path, iter(blocks), "mobilenet")
    for table, schema in (("images", S.IMAGE_TABLE), ("embeddings/mobilenet", S.EMBEDDING_TABLE)):
        folder = tmp_path / table
        assert (folder / "_SUCCESS").exists() and (folder / "_neardup.json").exists()
        assert pq.read_schema(next(folder.glob("*.parquet"))).names == schema.fieldNames()
    ids, vectors = map(np.concatenate, zip(*synth.iter_embedding_blocks(tmp_path / "embeddings" / "mobilenet")))
    assert len(set(ids)) == 1000 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    planted = written["planted"]
    assert sum(k == "copy" for *_, k in planted) == 100  # 10% of the rows
    assert sum(k == "burst" for *_, k in planted) == 2 * 19
    a, b, cos = (np.array(x) for x in zip(*[(p[0], p[1], p[2]) for p in planted]))
    assert np.allclose(np.einsum("ij,ij->i", vectors[a], vectors[b]), cos, atol=1e-4)
