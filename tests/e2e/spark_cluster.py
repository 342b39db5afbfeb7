"""A real Spark standalone cluster on 127.0.0.1 for the end-to-end tests.

A master and N workers from the classes pyspark ships, ``spark-submit`` of the jobs, the
driver's REST API (to see which stage runs where) and the executor JVMs (to kill one).
Nothing here is mocked: the executors are separate ``CoarseGrainedExecutorBackend`` JVMs
started by the workers, with their own Python workers.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import pyspark

ROOT = Path(__file__).resolve().parents[2]
SPARK_HOME = Path(pyspark.__file__).parent
EXECUTOR_CLASS = "org.apache.spark.executor.CoarseGrainedExecutorBackend"


def make_small_corpus(demo_root: Path, root: Path) -> Path:
    """Three demo photos with all their variants and three unrelated images (39 files)."""
    for name in ("astronaut", "coffee", "rocket"):
        shutil.copytree(demo_root / name, root / name)
    (root / "unrelated").mkdir()
    for name in ("moon", "coins", "clock"):
        shutil.copy(demo_root / "unrelated" / f"{name}.jpg", root / "unrelated")
    return root


def spark_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "SPARK_HOME": str(SPARK_HOME),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit_command(args: list[str]) -> list[str]:
    return [str(SPARK_HOME / "bin" / "spark-submit"), "--conf", f"spark.pyspark.python={sys.executable}",
            "--conf", f"spark.executorEnv.KERAS_HOME={os.environ['KERAS_HOME']}", *args]


def spark_submit(args: list[str], cwd: Path = ROOT, timeout: int = 600,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run spark-submit to the end; ``env`` adds to (or replaces) the environment."""
    return subprocess.run(submit_command(args), cwd=cwd, env={**spark_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.3)
    raise TimeoutError(f"{text!r} not seen in {log}: {log.read_text(errors='replace')[-2000:]}")


@dataclass
class Cluster:
    url: str
    tmp: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def worker_dirs(self) -> list[Path]:
        return sorted(self.tmp.glob("worker-*-work"))

    def processes(self) -> list[psutil.Process]:
        """The master, the workers and everything they started (executors, Python workers)."""
        found = []
        for proc in self.procs:
            try:
                parent = psutil.Process(proc.pid)
                found += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return found

    def leftovers(self) -> list[psutil.Process]:
        """Every live process of this cluster, found by what marks it as ours: the master's port,
        the master URL on the command line (workers, executors) or a working folder under the
        cluster's folder (executors, their Python workers)."""
        found = []
        tmp = str(self.tmp)
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            cmd = proc.info["cmdline"] or []
            master = "org.apache.spark.deploy.master.Master" in cmd and self.url.rsplit(":", 1)[1] in cmd
            if master or any(self.url in arg for arg in cmd) or (proc.info["cwd"] or "").startswith(tmp):
                found.append(proc)
        return [p for p in found if p.pid != os.getpid()]

    def stop(self) -> None:
        """Stop the workers, then the master; kill whatever of theirs is still alive after that."""
        everything = self.processes() + self.leftovers()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _, alive = psutil.wait_procs(everything, timeout=10)
        alive += [p for p in self.leftovers() if p not in alive]
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)


def start_cluster(tmp: Path, workers: int = 2, cores: int = 1, memory: str = "2g") -> Cluster:
    """A master and ``workers`` workers on 127.0.0.1; stop it with :meth:`Cluster.stop`."""
    port = free_port()
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    cluster = Cluster(url=f"spark://127.0.0.1:{port}", tmp=tmp)
    env = spark_env()
    try:
        master_log = tmp / "master.log"
        with open(master_log, "w") as out:
            cluster.procs.append(subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                 "--port", str(port), "--webui-port", str(free_port())],
                env=env, stdout=out, stderr=subprocess.STDOUT))
        wait_for_text(master_log, "I have been elected leader", cluster.procs[0])
        logs = []
        for i in range(workers):
            log = tmp / f"worker-{i}.log"
            with open(log, "w") as out:
                cluster.procs.append(subprocess.Popen(
                    [spark_class, "org.apache.spark.deploy.worker.Worker", cluster.url, "--host", "127.0.0.1",
                     "--cores", str(cores), "--memory", memory, "--webui-port", str(free_port()),
                     "--work-dir", str(tmp / f"worker-{i}-work")],
                    env=env, stdout=out, stderr=subprocess.STDOUT))
            logs.append(log)
        for log, proc in zip(logs, cluster.procs[1:]):
            wait_for_text(log, "Successfully registered with master", proc)
        return cluster
    except BaseException:
        cluster.stop()
        raise


# ------------------------------------------------------------------ the running application
class DriverUI:
    """The driver's monitoring REST API (``/api/v1``) of the one application on ``port``."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}/api/v1"
        self.app_id: str | None = None

    def get(self, path: str):
        with urllib.request.urlopen(self.base + path, timeout=5) as response:
            return json.loads(response.read())

    def app(self) -> str | None:
        """The application id once the driver's UI answers, else None."""
        if self.app_id is None:
            try:
                apps = self.get("/applications")
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                return None
            if apps:
                self.app_id = apps[0]["id"]
        return self.app_id

    def app_get(self, path: str):
        return self.get(f"/applications/{self.app_id}{path}")


def executor_jvms(app_id: str) -> dict[str, psutil.Process]:
    """executor id -> its ``CoarseGrainedExecutorBackend`` JVM, found by command line."""
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if EXECUTOR_CLASS in cmd and app_id in cmd and "--executor-id" in cmd:
            found[cmd[cmd.index("--executor-id") + 1]] = proc
    return found


def kill_executor(app_id: str, executor_id: str) -> int:
    """SIGKILL the whole executor JVM (its Python workers lose their parent and exit)."""
    proc = executor_jvms(app_id)[executor_id]
    pid = proc.pid
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return pid


def poll(condition: Callable[[], object], seconds: float, interval: float = 0.25):
    """The first truthy value of ``condition()`` within ``seconds``, else None."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    return None
