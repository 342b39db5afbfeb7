"""Local sessions' Python workers run pipeline.stages.spark_worker (real Spark, real workers)."""
from __future__ import annotations

from pipeline.stages import spark_worker as W
from pipeline.stages.session import workers_import_pipeline


def test_a_new_interpreter_here_finds_the_daemon():
    assert workers_import_pipeline()


def test_local_workers_run_without_the_zips_and_with_a_frozen_heap(spark):
    def report(batches):
        import gc
        import sys
        import zipimport

        import pandas as pd

        for _ in batches:
            # What importlib.invalidate_caches() re-reads before every task.
            zips = [k for k, v in sys.path_importer_cache.items() if isinstance(v, zipimport.zipimporter)]
            yield pd.DataFrame({"zips": [sum(W.is_spark_python_zip(p) for p in sys.path) + len(zips)],
                                "frozen": [gc.get_freeze_count()]})

    frame = spark.range(2, numPartitions=2).mapInPandas(report, "zips long, frozen long")
    frame.collect()  # the workers' first tasks: what they import survives, then is frozen
    rows = frame.collect()
    assert [r["zips"] for r in rows] == [0, 0]
    assert all(r["frozen"] > 1000 for r in rows), rows
