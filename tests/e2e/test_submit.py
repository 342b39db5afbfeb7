"""The jobs as users run them: ``spark-submit jobs/*.py``, locally and on a real standalone
cluster (a master and a worker from the classes pyspark ships, on 127.0.0.1).

On the cluster the executors run in the worker's own folder, in other JVMs and Python
processes than the driver, so anything that only works in local mode (relative paths,
driver-only files, module globals set on the driver) fails here.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pyspark
import pytest

ROOT = Path(__file__).resolve().parents[2]
SPARK_HOME = Path(pyspark.__file__).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "SPARK_HOME": str(SPARK_HOME),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    return env


def spark_submit(args: list[str], cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), "--conf", f"spark.pyspark.python={sys.executable}",
           "--conf", f"spark.executorEnv.KERAS_HOME={os.environ['KERAS_HOME']}", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_corpus(demo_corpus, tmp_path_factory):
    """Three photos with their variants and three unrelated images."""
    corpus, _ = demo_corpus
    root = tmp_path_factory.mktemp("small") / "corpus"
    for name in ("astronaut", "coffee", "rocket"):
        shutil.copytree(corpus / name, root / name)
    (root / "unrelated").mkdir()
    for name in ("moon", "coins", "clock"):
        shutil.copy(corpus / "unrelated" / f"{name}.jpg", root / "unrelated")
    return root


def _wait_for(log: Path, text: str, proc: subprocess.Popen, seconds: int = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not seen in {log}: {log.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    master_log, worker_log = tmp / "master.log", tmp / "worker.log"
    procs = []
    try:
        with open(master_log, "w") as out:
            procs.append(subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                 "--port", str(port), "--webui-port", str(_free_port())],
                env=_env(), stdout=out, stderr=subprocess.STDOUT))
        _wait_for(master_log, "I have been elected leader", procs[0])
        url = f"spark://127.0.0.1:{port}"
        with open(worker_log, "w") as out:
            procs.append(subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                 "--cores", "2", "--memory", "4g", "--webui-port", str(_free_port()),
                 "--work-dir", str(tmp / "worker-work")],
                env=_env(), stdout=out, stderr=subprocess.STDOUT))
        _wait_for(worker_log, "Successfully registered with master", procs[1])
        yield url, tmp
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_spark_submit_ingest_local(small_corpus, tmp_path):
    result = spark_submit(["--master", "local[2]", str(ROOT / "jobs" / "ingest.py"),
                           "--input", str(small_corpus), "--workdir", str(tmp_path / "work")])
    assert result.returncode == 0, result.stderr[-3000:]
    table = pq.read_table(tmp_path / "work" / "images", columns=["path", "status"])
    assert table.num_rows == sum(len(files) for _, _, files in os.walk(small_corpus))
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_spark_submit_rejects_bad_arguments_before_any_work(tmp_path):
    result = spark_submit(["--master", "local[1]", str(ROOT / "jobs" / "embed.py"),
                           "--backbone", "resnet5", "--workdir", str(tmp_path / "work")], timeout=120)
    assert result.returncode == 2
    # spark-submit hands the Python driver's stderr to its own stdout.
    assert "unknown backbone 'resnet5'" in result.stdout + result.stderr
    assert not (tmp_path / "work").exists()


def test_run_job_on_a_standalone_cluster(standalone_cluster, small_corpus, tmp_path):
    url, cluster_tmp = standalone_cluster
    # A relative workdir: must be resolved on the driver, since executors have another cwd.
    result = spark_submit(["--master", url, "--conf", "spark.executor.memory=2g",
                           str(ROOT / "jobs" / "run.py"), "--input", str(small_corpus),
                           "--workdir", "rel/work", "--set", "index.shards=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    work = tmp_path / "rel" / "work"
    images = pq.read_table(work / "images", columns=["image_id", "path"]).to_pylist()
    folder_of = {r["image_id"]: Path(r["path"]).parent.name for r in images}
    groups = pq.read_table(work / "groups" / "mobilenet").to_pylist()
    by_group: dict[str, set[str]] = {}
    for r in groups:
        by_group.setdefault(r["group_id"], set()).add(folder_of[r["image_id"]])
    assert sorted(tuple(sorted(v)) for v in by_group.values()) == [("astronaut",), ("coffee",), ("rocket",)]
    assert sum(r["keep"] for r in groups) == 3
    assert sorted(p.name for p in (work / "index" / "mobilenet" / "shards").iterdir()) == [
        "shard_00000.faiss", "shard_00001.faiss"]
    # The work really ran on the cluster's executors, not in the driver.
    assert any((cluster_tmp / "worker-work").rglob("stderr"))
