"""pyspark's Python worker daemon, minus two costs it pays on every task
(``spark.python.daemon.module`` of local sessions; see :mod:`pipeline.stages.session`).

Both were measured with py-spy on the workers of a default run (2,794 images, 2 cores):
together 46% of the workers' CPU time, more than the model's inference.

- Before each task pyspark calls ``importlib.invalidate_caches()``, which on Python < 3.12
  re-reads the central directory of every zip on ``sys.path``: 50 ms per task for the
  ``pyspark.zip`` and ``py4j-*-src.zip`` that Spark puts first on a worker's path, more for the
  spark-core jar it also puts there. When this interpreter has pyspark and py4j installed (the
  embedded default always does), these archives are duplicates and are dropped; otherwise they stay.
- After each task a reused worker runs ``gc.collect()``, which walks every object alive: 250 ms
  per task once TensorFlow, OpenVINO and FAISS are loaded. Here each task ends with a
  collection and ``gc.freeze()``: what survived (modules, the cached model) is not walked again.
  Only cyclic garbage made of such survivors is never freed; the worker's caches live as long
  as the worker anyway.

Everything else is pyspark's own ``pyspark.daemon``, unchanged.
"""
from __future__ import annotations

import gc
import importlib.machinery
import os
import sys
from typing import Sequence


def is_spark_python_zip(entry: str) -> bool:
    """Whether ``entry`` is one of the archives Spark prepends to a Python worker's path: its
    zipped pyspark and py4j, and the jar of spark-core (which held pyspark in old assemblies)."""
    name = os.path.basename(entry)
    return name == "pyspark.zip" or (name.startswith("py4j-") and name.endswith("-src.zip")) or name.endswith(".jar")


def without_duplicate_zips(path: Sequence[str]) -> list[str]:
    """``path`` without Spark's zips when pyspark and py4j are importable from the rest of it."""
    zips = [p for p in path if is_spark_python_zip(p)]
    rest = [p for p in path if not is_spark_python_zip(p)]
    if zips and all(importlib.machinery.PathFinder.find_spec(m, rest) is not None for m in ("pyspark", "py4j")):
        return rest
    return list(path)


def _drop_duplicate_zips() -> None:
    kept = without_duplicate_zips(sys.path)
    if len(kept) == len(sys.path):
        return
    dropped = [p for p in sys.path if p not in kept]
    sys.path[:] = kept
    # Finding this module created importers for the zips: invalidate_caches() visits those too.
    for entry in list(sys.path_importer_cache):
        if any(entry == z or entry.startswith(z + os.sep) for z in dropped):
            del sys.path_importer_cache[entry]


def _freezing(task_main):
    def run_task(infile, outfile):
        try:
            return task_main(infile, outfile)
        finally:
            gc.collect()
            gc.freeze()

    return run_task


def main() -> None:
    _drop_duplicate_zips()
    from pyspark import daemon

    daemon.worker_main = _freezing(daemon.worker_main)
    daemon.manager()


if __name__ == "__main__":
    main()
