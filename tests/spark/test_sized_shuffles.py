"""Shuffle partitions sized from the images a job handles, never above the session's setting."""
from __future__ import annotations

from pipeline.stages import tables


def test_shuffles_start_small_for_small_jobs_and_the_setting_is_restored(spark):
    cores = spark.sparkContext.defaultParallelism
    before = spark.conf.get(tables.SHUFFLE_PARTITIONS)
    adaptive = spark.conf.get(tables.ADAPTIVE)
    assert tables.shuffle_partitions_for(spark, 2_800) == min(int(before), tables.SHUFFLE_PARTITIONS_PER_CORE * cores)
    assert tables.shuffle_partitions_for(spark, 10_000_000) == int(before)  # capped by the setting
    with tables.sized_shuffles(spark, 2_800):
        assert spark.conf.get(tables.SHUFFLE_PARTITIONS) == str(min(int(before), tables.SHUFFLE_PARTITIONS_PER_CORE * cores))
        frame = spark.range(0, 5_000).selectExpr("id % 97 as key").groupBy("key").count()
        assert frame.count() == 97  # a real shuffle under the setting
        assert spark.conf.get(tables.ADAPTIVE) == "false"  # a small job: no adaptive re-planning
    with tables.sized_shuffles(spark, 1_000_000):
        assert spark.conf.get(tables.ADAPTIVE) == adaptive
    assert spark.conf.get(tables.SHUFFLE_PARTITIONS) == before and spark.conf.get(tables.ADAPTIVE) == adaptive
