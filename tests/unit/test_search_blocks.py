"""How the all-pairs search groups units into query blocks (pure planning, no Spark session)."""
from pipeline.core.vector_store import Unit
from pipeline.stages.allpairs import unit_groups


def units(*oks):
    return [Unit("f", 0, 0, ok, ok) for ok in oks]


def test_blocks_are_consecutive_cover_every_unit_with_rows_and_respect_the_cap():
    us = units(5000, 5000, 0, 5000, 5000, 5000, 3000)
    groups = unit_groups(us, max_rows=16384, parallelism=2)
    assert [i for g in groups for i in g] == [0, 1, 3, 4, 5, 6]  # the empty unit has no block
    assert all(sum(us[i].ok for i in g) <= 16384 for g in groups)
    assert all(b == a + 1 or us[a + 1].ok == 0 for g in groups for a, b in zip(g, g[1:]))


def test_at_least_one_block_per_core_when_units_allow():
    assert len(unit_groups(units(1000, 1000, 1000, 1000), max_rows=16384, parallelism=2)) == 2
    assert len(unit_groups(units(1000), max_rows=16384, parallelism=8)) == 1


def test_a_unit_larger_than_the_cap_is_its_own_block():
    assert unit_groups(units(20000, 10, 10), max_rows=16384, parallelism=1) == [[0], [1, 2]]
