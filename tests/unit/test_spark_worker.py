"""The worker daemon of local sessions: which path entries it drops (the workers themselves:
tests/spark/test_session.py)."""
from __future__ import annotations

from pipeline.stages import spark_worker as W


def _package(root, name):
    import importlib

    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    importlib.invalidate_caches()  # the folder's listing is cached by the first lookup


def test_spark_zips_are_recognised_by_name():
    assert W.is_spark_python_zip("/opt/spark/python/lib/pyspark.zip")
    assert W.is_spark_python_zip("/opt/spark/python/lib/py4j-0.10.9.9-src.zip")
    assert W.is_spark_python_zip("/opt/spark/jars/spark-core_2.13-4.0.5.jar")
    assert not W.is_spark_python_zip("/jobs/deps.zip")
    assert not W.is_spark_python_zip("/usr/lib/python311.zip")


def test_zips_are_dropped_only_when_the_packages_are_installed_elsewhere(tmp_path):
    site = tmp_path / "site"
    zips = [str(tmp_path / "lib" / "pyspark.zip"), str(tmp_path / "lib" / "py4j-0.10.9.9-src.zip"),
            str(tmp_path / "jars" / "spark-core_2.13-4.0.5.jar")]
    path = zips + [str(site), "/jobs/deps.zip"]
    # Neither package besides the zips: the worker needs them, they stay.
    assert W.without_duplicate_zips(path) == path
    _package(site, "pyspark")
    assert W.without_duplicate_zips(path) == path  # py4j still only zipped
    _package(site, "py4j")
    assert W.without_duplicate_zips(path) == [str(site), "/jobs/deps.zip"]
    assert W.without_duplicate_zips([str(site)]) == [str(site)]
