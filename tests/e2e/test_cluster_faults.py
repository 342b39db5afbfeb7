"""Faults on a real standalone cluster: a whole executor JVM killed in the middle of a job.

Two workers with one core each, so the application has two executors. While ``embed`` (the
CNN UDF stage) or ``dedup`` (the index search stage) runs, the test finds a running task of
that stage through the driver's REST API, finds that task's executor JVM
(``CoarseGrainedExecutorBackend``) by its command line, and sends it SIGKILL: its running
tasks, its Python workers, its shuffle files and cached blocks are gone. The standalone master
launches a replacement executor, the driver reschedules the lost tasks and recomputes lost
shuffle output. The jobs must finish, and their tables must match a run without faults: one
row per image, the same pairs and groups.

The event log of each run is read afterwards to prove that the fault hit a running task of
that stage (a test whose kill came too late would prove nothing).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.e2e.spark_cluster import (ROOT, Cluster, DriverUI, free_port, kill_executor, make_small_corpus,
                                     spark_env, start_cluster, submit_command)

# Rotated query variants and the incremental-dedup state off: they only make the run longer
# here (the kill points are the embed stage and the index search). TensorFlow, not the OpenVINO
# default: with files read from their paths an OpenVINO embed task over these 39 images lasts
# about as long as the kill's 1.5 s wait, so the task could end just before its executor died
# (seen once: the killed task had succeeded); loading TensorFlow keeps the first task of each
# executor running for several seconds.
SETTINGS = ["--set", "index.shards=2", "--set", "dedup.rotations=[0]", "--set", "dedup.incremental=never",
            "--set", "embed.runtime=tensorflow"]
PARALLELISM = 4  # two tasks per executor in the embed and search stages
RUN_TIMEOUT = 900  # a whole run takes about a minute on an idle 2-core machine, 7 when it is shared


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("fault-cluster"), workers=2, cores=1, memory="1g")
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.leftovers(), "cluster processes left running"


@pytest.fixture(scope="module")
def corpus(demo_corpus, tmp_path_factory):
    return make_small_corpus(demo_corpus[0], tmp_path_factory.mktemp("fault-corpus") / "corpus")


@dataclass
class Kill:
    executor_id: str
    pid: int
    stage_id: int
    task_id: int
    task_seconds: float


@dataclass
class Run:
    returncode: int
    log: str
    events: list[dict]
    kill: Kill | None


def _task_seconds(task: dict) -> float:
    launched = datetime.strptime(task["launchTime"].replace("GMT", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")
    return time.time() - launched.timestamp()


def running_python_tasks(ui: DriverUI, plan_node: str) -> list[dict]:
    """Running tasks of the Python stage of a running query whose physical plan has ``plan_node``.

    With adaptive execution the exchange before the Python stage runs as a job of its own; the
    Python stage is the last stage of a later job of the same query (its earlier stages skipped).
    """
    jobs = [job for e in ui.app_get("/sql?details=true&planDescription=false")
            if e["status"] == "RUNNING" and any(n["nodeName"] == plan_node for n in e.get("nodes", []))
            for job in e.get("runningJobIds", [])]
    tasks = []
    for job_id in jobs:
        stage_ids = ui.app_get(f"/jobs/{job_id}")["stageIds"]
        if len(stage_ids) < 2:
            continue
        stage_id = max(stage_ids)
        for attempt in ui.app_get(f"/stages/{stage_id}"):
            if attempt["status"] == "ACTIVE":
                found = ui.app_get(f"/stages/{stage_id}/{attempt['attemptId']}/taskList?status=running&length=1000")
                tasks += [{**t, "stageId": stage_id} for t in found]
    return tasks


def _kill_when_running(ui: DriverUI, proc: subprocess.Popen, plan_node: str, min_seconds: float,
                       deadline: float) -> Kill | None:
    """SIGKILL the executor of the first task of that stage that has run ``min_seconds``."""
    while proc.poll() is None and time.time() < deadline:
        try:
            tasks = running_python_tasks(ui, plan_node) if ui.app() else []
        except OSError:  # the UI is starting or the query just ended between two calls
            tasks = []
        for task in tasks:
            seconds = _task_seconds(task)
            if seconds >= min_seconds:
                pid = kill_executor(ui.app_id, task["executorId"])
                return Kill(task["executorId"], pid, task["stageId"], task["taskId"], seconds)
        time.sleep(0.2)
    return None


def submit_job(cluster: Cluster, job: str, args: list[str], cwd: Path, kill_in: str | None = None,
               min_task_seconds: float = 0.0) -> Run:
    """spark-submit ``jobs/<job>.py`` to the cluster; with ``kill_in`` (a plan node name), kill the
    executor of a task of that stage while it runs."""
    port = free_port()
    events = cwd / "events"
    events.mkdir(exist_ok=True)
    command = submit_command([
        "--master", cluster.url, "--conf", "spark.executor.memory=1g", "--conf", "spark.executor.cores=1",
        "--conf", f"spark.default.parallelism={PARALLELISM}", "--conf", "spark.task.maxFailures=4",
        "--conf", f"spark.ui.port={port}", "--conf", "spark.port.maxRetries=0",
        "--conf", "spark.eventLog.enabled=true", "--conf", f"spark.eventLog.dir={events}",
        "--conf", "spark.eventLog.compress=false", "--conf", "spark.eventLog.rolling.enabled=false",
        str(ROOT / "jobs" / f"{job}.py"), *args, *SETTINGS])
    log_path = cwd / f"{job}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=spark_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + RUN_TIMEOUT
        try:
            kill = _kill_when_running(DriverUI(port), proc, kill_in, min_task_seconds, deadline) if kill_in else None
            proc.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = sorted(events.iterdir(), key=lambda p: p.stat().st_mtime)
    event_list = [json.loads(line) for line in logs[-1].read_text().splitlines()] if logs else []
    return Run(proc.returncode, log_path.read_text(errors="replace"), event_list, kill)


def tables(workdir: Path) -> dict[str, list[dict]]:
    def rows(rel: str, columns=None) -> list[dict]:
        return pq.read_table(workdir / rel, columns=columns).to_pylist()

    return {
        "images": rows("images", ["image_id", "path", "status", "content_sha256"]),
        "embeddings": rows("embeddings/mobilenet", ["image_id", "content_sha256", "status", "embedding"]),
        "idmap": rows("index/mobilenet/idmap"),
        "pairs": rows("pairs/mobilenet"),
        "groups": rows("groups/mobilenet"),
    }


def assert_one_row_per_image(t: dict[str, list[dict]], corpus: Path) -> None:
    files = sorted(str(p) for p in corpus.rglob("*") if p.is_file())
    assert sorted(r["path"] for r in t["images"]) == files
    ids = {r["image_id"] for r in t["images"]}
    assert len(ids) == len(files)
    assert sorted(r["image_id"] for r in t["embeddings"]) == sorted(ids)
    assert {r["status"] for r in t["embeddings"]} == {"ok"}
    assert sorted(r["image_id"] for r in t["idmap"]) == sorted(ids)
    assert len({r["faiss_id"] for r in t["idmap"]}) == len(ids)
    grouped = [r["image_id"] for r in t["groups"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) <= ids
    pairs = [(r["image_id_a"], r["image_id_b"]) for r in t["pairs"]]
    assert len(pairs) == len(set(pairs)) and all(a < b and {a, b} <= ids for a, b in pairs)
    keep = {}
    for r in t["groups"]:
        keep[r["group_id"]] = keep.get(r["group_id"], 0) + r["keep"]
    assert set(keep.values()) == {1}


def assert_same_results(t: dict[str, list[dict]], expected: dict[str, list[dict]]) -> None:
    """Same rows as the run without faults; vectors and similarities to float rounding."""
    def by_id(rows):
        return {r["image_id"]: r for r in rows}

    assert {k: (r["path"], r["content_sha256"]) for k, r in by_id(t["images"]).items()} == {
        k: (r["path"], r["content_sha256"]) for k, r in by_id(expected["images"]).items()}
    got, want = by_id(t["embeddings"]), by_id(expected["embeddings"])
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k]["embedding"] for k in sorted(got)], [want[k]["embedding"] for k in sorted(want)],
                               atol=1e-4)
    sims = {(r["image_id_a"], r["image_id_b"]): r["similarity"] for r in t["pairs"]}
    want_sims = {(r["image_id_a"], r["image_id_b"]): r["similarity"] for r in expected["pairs"]}
    assert sims.keys() == want_sims.keys()
    assert max((abs(sims[k] - want_sims[k]) for k in sims), default=0.0) < 1e-4
    assert sorted((r["image_id"], r["faiss_id"]) for r in t["idmap"]) == sorted(
        (r["image_id"], r["faiss_id"]) for r in expected["idmap"])
    assert sorted((r["group_id"], r["image_id"], r["group_size"], r["keep"]) for r in t["groups"]) == sorted(
        (r["group_id"], r["image_id"], r["group_size"], r["keep"]) for r in expected["groups"])


def assert_fault_hit_a_running_task(run: Run, cluster: Cluster) -> None:
    assert run.kill is not None, "no task of the stage was seen running: the fault was not injected"
    victim = run.kill.executor_id
    lost = [e for e in run.events if e["Event"] == "SparkListenerTaskEnd"
            and e["Task Info"]["Task ID"] == run.kill.task_id]
    assert lost and lost[0]["Task End Reason"]["Reason"] == "ExecutorLostFailure", lost
    assert lost[0]["Task End Reason"]["Executor ID"] == victim
    assert any(e["Event"] == "SparkListenerExecutorRemoved" and e["Executor ID"] == victim for e in run.events)
    # The lost task's partition was computed again, elsewhere, to success.
    index = lost[0]["Task Info"]["Index"]
    redone = [e for e in run.events if e["Event"] == "SparkListenerTaskEnd" and e["Stage ID"] == run.kill.stage_id
              and e["Task Info"]["Index"] == index and e["Task End Reason"]["Reason"] == "Success"]
    assert redone and all(e["Task Info"]["Executor ID"] != victim for e in redone)
    # The standalone worker saw its executor die (SIGKILL: exit status 137) and the master had a
    # worker launch a replacement.
    app = next(e["App ID"] for e in run.events if e["Event"] == "SparkListenerApplicationStart")
    worker_logs = "".join(p.read_text(errors="replace") for p in cluster.tmp.glob("worker-*.log")).splitlines()
    assert any(f"{app}/{victim} finished with state" in line and "exitStatus 137" in line for line in worker_logs)
    launched = {line.rsplit("/", 1)[1].split()[0] for line in worker_logs if f"Asked to launch executor {app}/" in line}
    assert len(launched) >= 3 and victim in launched, launched


@pytest.fixture(scope="module")
def fault_free(cluster, corpus, tmp_path_factory):
    """The same job on the same cluster without faults: what every faulty run must reproduce."""
    cwd = tmp_path_factory.mktemp("fault-free")
    # A relative workdir: must be resolved on the driver, since executors have another cwd.
    run = submit_job(cluster, "run", ["--input", str(corpus), "--workdir", "rel/work"], cwd)
    assert run.returncode == 0, run.log[-4000:]
    return cwd / "rel" / "work", tables(cwd / "rel" / "work")


def test_fault_free_run_on_two_workers(fault_free, corpus, cluster):
    """spark-submit jobs/run.py to a standalone cluster: the executors run in other JVMs, Python
    processes and folders than the driver, so anything that only works in local mode fails here."""
    workdir, t = fault_free
    assert_one_row_per_image(t, corpus)
    folder_of = {r["image_id"]: Path(r["path"]).parent.name for r in t["images"]}
    by_group: dict[str, set[str]] = {}
    for r in t["groups"]:
        by_group.setdefault(r["group_id"], set()).add(folder_of[r["image_id"]])
    assert sorted(tuple(sorted(v)) for v in by_group.values()) == [("astronaut",), ("coffee",), ("rocket",)]
    assert sorted(p.name for p in (workdir / "index" / "mobilenet" / "shards").glob("*.faiss")) == [
        "shard_00000.faiss", "shard_00001.faiss"]
    # Both executors worked (each worker has its own executor folder with a log).
    assert len(cluster.worker_dirs()) == 2
    assert all(any(folder.rglob("stderr")) for folder in cluster.worker_dirs())


def test_executor_killed_in_the_middle_of_embed(cluster, corpus, fault_free, tmp_path):
    run = submit_job(cluster, "run", ["--input", str(corpus), "--workdir", str(tmp_path / "work")], tmp_path,
                     kill_in="ArrowEvalPython", min_task_seconds=1.5)
    assert run.returncode == 0, run.log[-4000:]
    assert_fault_hit_a_running_task(run, cluster)
    t = tables(tmp_path / "work")
    assert_one_row_per_image(t, corpus)
    assert_same_results(t, fault_free[1])


def test_executor_killed_in_the_middle_of_dedup(cluster, corpus, fault_free, tmp_path):
    # dedup alone, on a copy of the fault-free run's tables (images, embeddings, index, DBA).
    workdir = tmp_path / "work"
    shutil.copytree(fault_free[0], workdir, ignore=shutil.ignore_patterns("pairs", "groups", "mlflow.db", "mlruns"))
    # The Spark path of the dedup (a table this small is otherwise made on the driver, whose only
    # executor tasks are the search's).
    run = submit_job(cluster, "dedup", ["--workdir", str(workdir), "--set", "dedup.driver_max_images=0"], tmp_path,
                     kill_in="MapInPandas",
                     min_task_seconds=0.5)
    assert run.returncode == 0, run.log[-4000:]
    assert_fault_hit_a_running_task(run, cluster)
    t = tables(workdir)
    assert_one_row_per_image(t, corpus)
    assert_same_results(t, fault_free[1])
