"""Archive-scale benchmark: the real ``index`` and ``dedup`` jobs against plain FAISS, by table size.

For each size N (``--sizes 100000,300000,1000000``; ``--sizes 20000`` is a quick smoke):

1. a synthetic embedding table of N rows is written as a committed neardup workdir (image
   table + MobileNet embedding table) by :mod:`synth`, whose generator is fitted to real
   MobileNet embeddings of ../shared (how: see ``synth``'s docstring and the JSON's
   ``generator``); planted near-copy pairs are kept alongside;
2. ``python -m pipeline.cli index --workdir W`` and ``... dedup --workdir W`` run as
   subprocesses with the default configuration, plus ``--set dedup.rotations=[0]``: a pure
   embedding table has no pixels, so rotated query variants cannot be embedded;
3. while each runs, its process tree is sampled (RSS every 0.25 s, PSS every 2 s): the python process and
   its ``java`` child are the driver (local mode: the JVM also runs the executors), the
   ``pyspark.daemon`` processes are the Python workers. Peak memory is the peak of the summed
   proportional set size (PSS, so forked workers' shared pages count once), RSS too;
4. plain FAISS (``plain_faiss.py``: IVF ~4*sqrt(N) lists, SQfp16, nprobe 16, all-vs-all
   top-k, exact re-scoring) runs on the same table in its own process, monitored the same way;
5. pair recall and precision of both against exact search at the same threshold: all pairs
   when N <= ``--exact-all-below``, else the exact pairs of ``--recall-queries`` sampled rows
   (FAISS ``range_ground_truth`` over the table in blocks); planted pairs too.

Start-up (interpreter, CLI imports, Spark session, first Python worker, a whole job on a
tiny table) is measured separately. Results: ``bench/results/scale_<timestamp>.json`` and
``.png`` (growth curves, log-log), written after every size so a crash keeps what ran; a
failing job is recorded with its error and the benchmark goes on.

    python bench/bench_scale.py --sizes 20000
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import synth  # noqa: E402

METHOD = "mobilenet"
DEFAULT_JOB_SETS = ["dedup.rotations=[0]"]
MIB = 2 ** 20


# ------------------------------------------------------------ machine info
def machine() -> dict:
    info: dict = {"cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        info["hypervisor"] = fields.get("Hypervisor vendor", "").strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as fh:
            info["mem_gib"] = round(int(fh.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    info["hostname"] = os.uname().nodename
    info["python"] = sys.version.split()[0]
    return info


def git_info() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


# --------------------------------------------------------- process memory
def classify(proc, root_pid: int, cache: dict) -> str:
    """driver_python | driver_jvm | python_workers | other, from the command line (cached per pid)."""
    kind = cache.get(proc.pid)
    if kind is None:
        try:
            cmd = " ".join(proc.cmdline())
            name = proc.name()
        except Exception:  # the process ended between listing and reading
            return "other"
        if proc.pid == root_pid:
            kind = "driver_python"
        elif name == "java" or cmd.split(" ", 1)[0].endswith("/java"):
            kind = "driver_jvm"
        elif "pyspark.daemon" in cmd or "pyspark.worker" in cmd or "pyspark/daemon.py" in cmd:
            kind = "python_workers"
        else:
            return "other"  # not cached: spark-submit's shell script exec()s into the JVM, same pid
        cache[proc.pid] = kind
    return kind


class TreeSampler(threading.Thread):
    """Samples a process tree's memory; keeps the peaks per class.

    RSS (``/proc/<pid>/statm``: cheap) every ``interval`` seconds, PSS (``smaps_rollup``: the
    kernel walks the page tables) every ``pss_interval``. psutil's ``memory_full_info`` parses
    the whole ``smaps`` of every process: at 0.2 s on a JVM and workers with memory-mapped
    stores it took most of a core and slowed the jobs it measured about 2x (measured:
    the 100k all-pairs search 87 s sampled that way, 31 s unsampled). The sampler's own CPU
    time is reported, so its cost stays visible.
    """

    def __init__(self, pid: int, interval: float = 0.25, pss_interval: float = 2.0):
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss_interval = pid, interval, pss_interval
        self.halt = threading.Event()
        self.peak_pss: dict[str, float] = defaultdict(float)
        self.peak_rss: dict[str, float] = defaultdict(float)
        self.max_workers = 0
        self.samples = 0
        self.pss_samples = 0
        self.cpu_s = 0.0

    @staticmethod
    def _pss(pid: int) -> float | None:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        return float(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def run(self) -> None:
        import psutil

        started_cpu = time.thread_time()
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        kinds: dict[int, str] = {}
        last_pss = -1e9
        while not self.halt.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            with_pss = time.monotonic() - last_pss >= self.pss_interval
            if with_pss:
                last_pss = time.monotonic()
            pss: dict[str, float] = defaultdict(float)
            rss: dict[str, float] = defaultdict(float)
            workers = 0
            for p in procs:
                try:
                    kind = classify(p, self.pid, kinds)
                    mem = p.memory_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss[kind] += mem.rss
                if with_pss:
                    value = self._pss(p.pid)
                    pss[kind] += mem.rss if value is None else value
                workers += kind == "python_workers"
            for values in ([rss, pss] if with_pss else [rss]):
                values["driver"] = values["driver_python"] + values["driver_jvm"]
                values["total"] = sum(v for k, v in values.items() if k not in ("driver", "total"))
            for k in rss:
                self.peak_rss[k] = max(self.peak_rss[k], rss[k])
            for k in pss:
                self.peak_pss[k] = max(self.peak_pss[k], pss[k])
            self.max_workers = max(self.max_workers, workers)
            self.samples += 1
            self.pss_samples += with_pss
            self.cpu_s = time.thread_time() - started_cpu
            self.halt.wait(self.interval)

    def report(self) -> dict:
        keys = ("driver", "driver_python", "driver_jvm", "python_workers", "total")
        return {"peak_pss_mib": {k: round(self.peak_pss.get(k, 0.0) / MIB, 1) for k in keys},
                "peak_rss_mib": {k: round(self.peak_rss.get(k, 0.0) / MIB, 1) for k in keys},
                "max_python_workers": self.max_workers, "memory_samples": self.samples,
                "pss_samples": self.pss_samples, "sampler_cpu_s": round(self.cpu_s, 2)}


def job_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_monitored(cmd: list[str], log_path: Path, timeout: float) -> dict:
    """Run ``cmd`` in its own process group, sample its tree, never raise: failures are results."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)  # our own process group: the job and its JVM/workers
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        sampler.halt.set()
        sampler.join()
    result = {"command": cmd, "ok": rc == 0 and not timed_out, "returncode": rc, "timed_out": timed_out,
              "wall_s": round(time.perf_counter() - started, 2), "log": str(log_path),
              "loadavg_1_5_15_at_end": [round(v, 2) for v in os.getloadavg()], **sampler.report()}
    if not result["ok"]:
        result["error"] = error_summary(log_path, timed_out, timeout)
    return result


def error_summary(log_path: Path, timed_out: bool, timeout: float) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    if timed_out:
        return f"timed out after {timeout:.0f} s"
    keys = ("neardup: error", "OutOfMemoryError", "Error:", "Exception:", "Killed", "error:")
    hits = [line.strip() for line in lines if any(k in line for k in keys)]
    return (hits[-1] if hits else (lines[-1].strip() if lines else "no output"))[:500]


# -------------------------------------------------------------- start-up
STARTUP_SCRIPT = r"""
import json, time
t0 = time.perf_counter()
from pyspark.sql import SparkSession
t1 = time.perf_counter()
spark = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").getOrCreate()
t2 = time.perf_counter()
spark.range(1000).count()
t3 = time.perf_counter()
spark.range(10).mapInPandas(lambda it: it, "id long").count()
t4 = time.perf_counter()
spark.stop()
print(json.dumps({"pyspark_import_s": t1 - t0, "jvm_session_s": t2 - t1, "first_jvm_job_s": t3 - t2,
                  "first_python_worker_job_s": t4 - t3}))
"""


def measure_startup(logs: Path, cache_root: Path, gen: synth.Generator, seed: int, job_sets: list[str],
                    timeout: float) -> dict:
    out: dict = {}
    py = sys.executable
    for name, cmd in (("python_interpreter_s", [py, "-c", "pass"]),
                      ("cli_help_s", [py, "-m", "pipeline.cli", "--help"])):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, timeout=300)
        out[name] = round(time.perf_counter() - t, 2)
    try:
        t = time.perf_counter()
        res = subprocess.run([py, "-c", STARTUP_SCRIPT], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                             timeout=600)
        out.update({k: round(v, 2) for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()})
        out["spark_script_total_s"] = round(time.perf_counter() - t, 2)
    except Exception as exc:  # start-up figures are informative; never fatal
        out["spark_error"] = repr(exc)[:300]
    # A whole job on a tiny table: the fixed cost every run pays whatever N.
    tiny = 2000
    workdir, _ = make_table(cache_root, gen, tiny, seed, regenerate=False)
    clean_outputs(workdir)
    for job in ("index", "dedup"):
        res = run_monitored(job_command(job, workdir, job_sets), logs / f"startup_{job}.log", timeout)
        out[f"tiny_{job}_{tiny}_rows_s"] = res["wall_s"] if res["ok"] else None
        if not res["ok"]:
            out[f"tiny_{job}_error"] = res["error"]
            break
    return out


# ----------------------------------------------------------------- tables
def make_table(cache_root: Path, gen: synth.Generator, n: int, seed: int, regenerate: bool,
               block_rows: int = 25_000) -> tuple[Path, dict]:
    """The workdir with an N-row synthetic table, reused when the same generator made it."""
    workdir = cache_root / f"scale-{n}-seed{seed}"
    spec = {"rows": n, "seed": seed, "generator": gen.digest(), "version": synth.GENERATOR_VERSION,
            "block_rows": block_rows}
    marker = workdir / "_synthetic.json"
    if not regenerate and marker.exists() and json.loads(marker.read_text()).get("spec") == spec \
            and (workdir / "embeddings" / METHOD / "_SUCCESS").exists():
        info = json.loads(marker.read_text())
        info["reused"] = True
        return workdir, info
    if workdir.exists():
        shutil.rmtree(workdir)
    started = time.perf_counter()
    plan = synth.block_plan(n, block_rows, gen.burst_every)
    blocks = (synth.generate_block(gen, seed, b, start, rows, bursts) for b, (start, rows, bursts) in enumerate(plan))
    written = synth.write_neardup_tables(workdir, blocks, METHOD, metadata=spec)
    planted = written.pop("planted")
    np.savez(workdir / "planted.npz", rows=np.array([(a, b) for a, b, _, _ in planted], dtype=np.int64).reshape(-1, 2),
             cosine=np.array([c for _, _, c, _ in planted], dtype=np.float32),
             burst=np.array([k == "burst" for _, _, _, k in planted]))
    info = {"spec": spec, "seconds": round(time.perf_counter() - started, 1), "rows": written["rows"],
            "planted_pairs": len(planted), "planted_copy_pairs": sum(k == "copy" for *_, k in planted),
            "planted_burst_pairs": sum(k == "burst" for *_, k in planted),
            "bursts": sum(b for *_, b in plan), "burst_rows": gen.burst_rows,
            "table_bytes": sum(f.stat().st_size for f in (workdir / "embeddings" / METHOD).iterdir())}
    marker.write_text(json.dumps(info, indent=2))
    info["reused"] = False
    return workdir, info


def clean_outputs(workdir: Path) -> None:
    """Remove everything the jobs wrote (index, pairs, groups, derived tables, MLflow), keep the input."""
    keep = {"images", "embeddings", "_synthetic.json", "planted.npz"}
    for child in workdir.iterdir():
        if child.name not in keep:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def job_command(job: str, workdir: Path, job_sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline.cli", job, "--workdir", str(workdir)]
    for item in job_sets:
        cmd += ["--set", item]
    return cmd


# --------------------------------------------------------------- accuracy
def table_ids(table: Path) -> np.ndarray:
    return np.concatenate([ids for ids, _ in synth.iter_embedding_blocks(table)])


def committed_table(workdir: Path, name: str) -> Path | None:
    """``<workdir>/<name>/<method>`` if committed, else the first committed match further down."""
    direct = workdir / name / METHOD
    if (direct / "_SUCCESS").exists():
        return direct
    for marker in sorted(workdir.glob(f"**/{name}/{METHOD}/_SUCCESS")):
        if "derived" not in marker.parts:
            return marker.parent
    return None


def read_pairs(pairs_dir: Path, ids: np.ndarray) -> np.ndarray:
    """The pairs table as (row_a, row_b) with row_a < row_b, rows in table order."""
    import pandas as pd
    import pyarrow.dataset as ds

    t = ds.dataset(str(pairs_dir), format="parquet").to_table(columns=["image_id_a", "image_id_b"])
    index = pd.Index(ids)
    a = index.get_indexer(t.column("image_id_a").to_numpy(zero_copy_only=False))
    b = index.get_indexer(t.column("image_id_b").to_numpy(zero_copy_only=False))
    if (a < 0).any() or (b < 0).any():
        raise ValueError("the pairs table names image ids that are not in the embedding table")
    return np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.int64)


def exact_pairs(table: Path, queries: np.ndarray, threshold: float, margin: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Exact pairs (row_a < row_b, cosine) with cosine >= threshold - margin that involve a query row."""
    import faiss
    from faiss.contrib.exhaustive_search import range_ground_truth

    wanted = np.zeros(0, np.int64)
    xq = []
    at = 0
    qset = np.sort(queries)
    for _, vectors in synth.iter_embedding_blocks(table):
        local = qset[(qset >= at) & (qset < at + len(vectors))] - at
        xq.append(vectors[local])
        wanted = np.concatenate([wanted, local + at])
        at += len(vectors)
    xq = np.concatenate(xq)
    lims, sims, rows = range_ground_truth(xq, (v for _, v in synth.iter_embedding_blocks(table)),
                                          threshold - margin, metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
    q = np.repeat(wanted, np.diff(lims.astype(np.int64)))
    keep = rows != q
    a, b = np.minimum(q[keep], rows[keep]), np.maximum(q[keep], rows[keep])
    keys, first = np.unique(a * (at + 1) + b, return_index=True)
    return np.stack([a[first], b[first]], axis=1), sims[keep][first]


def dba_vectors(workdir: Path, ids: np.ndarray) -> np.ndarray | None:
    """The augmented vectors the dedup job searched with (``derived/dba``), in table order; None without DBA."""
    from pipeline.core import vector_store as vs
    from pipeline.stages import index as ix

    folders = sorted(p for p in (workdir / "derived" / "dba").glob("*") if (p / "_SUCCESS").exists())
    index_dir = workdir / "index" / METHOD
    if not folders or not (index_dir / "units.json").exists():
        return None
    units = ix.load_units(ix.IndexInfo.load(str(index_dir)))
    import pandas as pd

    at = pd.Index(ids)
    out = np.zeros((len(ids), 0), np.float16)
    for i, unit in enumerate(units):
        if not unit.ok:
            continue
        names, _ = vs.read_unit(unit, vectors=False)
        aug = np.load(folders[-1] / f"aug_{i:05d}.npy")
        if out.shape[1] == 0:
            out = np.zeros((len(ids), aug.shape[1]), np.float16)
        out[at.get_indexer(names)] = aug
    return out


def exact_pairs_of(vectors: np.ndarray, queries: np.ndarray, threshold: float, margin: float = 0.02,
                   block: int = 25_000) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_pairs` over an in-memory (fp16) matrix: the reference on the DBA vectors."""
    import faiss
    from faiss.contrib.exhaustive_search import range_ground_truth

    qset = np.sort(queries)
    blocks = (vectors[a:a + block].astype(np.float32) for a in range(0, len(vectors), block))
    lims, sims, rows = range_ground_truth(vectors[qset].astype(np.float32), blocks, threshold - margin,
                                          metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
    q = np.repeat(qset, np.diff(lims.astype(np.int64)))
    keep = rows != q
    a, b = np.minimum(q[keep], rows[keep]), np.maximum(q[keep], rows[keep])
    _, first = np.unique(a * (len(vectors) + 1) + b, return_index=True)
    return np.stack([a[first], b[first]], axis=1), sims[keep][first]


def calibrated_reference(blocks, queries: np.ndarray, n: int, cal, threshold: float, margin: float = 0.02,
                         probe_k: int = 64) -> tuple[np.ndarray, np.ndarray, dict]:
    """Exact pairs of the query rows scored the way ``dedup`` scores them (calibrated).

    A pair's score is ``cal.probability(cosine, level_a, level_b)``, a row's level its cosine
    to its ``cal.rank``-th nearest other row. The reference computes all of it exactly: the
    query rows' exact top ``probe_k`` and levels, the partners that could reach
    ``threshold - margin`` (the score falls with the pair's level, which is at least the
    query's, so ``p(cos, level_q, level_q)`` bounds it), the partners' exact levels, then the
    scores. ``blocks()`` yields the (float32) matrix in row order. Returns the pairs
    (row_a < row_b) with score >= threshold - margin, their scores, and a completeness check.
    """
    import faiss
    from faiss.contrib.exhaustive_search import knn_ground_truth

    def rows_of(wanted: np.ndarray) -> np.ndarray:
        out, at = [], 0
        for v in blocks():
            local = wanted[(wanted >= at) & (wanted < at + len(v))] - at
            out.append(v[local])
            at += len(v)
        return np.concatenate(out)

    def knn(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, ids = knn_ground_truth(rows_of(rows), blocks(), k, metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
        return sims, ids

    def levels_and_others(rows, sims, ids):
        level = np.empty(len(rows))
        others = []
        for i, r in enumerate(rows):
            keep = ids[i] != r
            s, j = sims[i][keep], ids[i][keep]
            level[i] = s[min(cal.rank, len(s)) - 1]
            others.append((j, s))
        return level, others

    qset = np.sort(queries)
    sims, ids = knn(qset, probe_k + 1)
    level_q, others = levels_and_others(qset, sims, ids)
    grid = np.linspace(-1.0, 1.0, 4001)
    incomplete, cand_a, cand_b, cand_s = 0, [], [], []
    for q, lq, (j, s) in zip(qset, level_q, others):
        passes = cal.probability(grid, np.full_like(grid, lq), np.full_like(grid, lq)) >= threshold - margin
        c_min = grid[np.argmax(passes)] if passes.any() else 2.0
        if len(s) and s[-1] >= c_min:
            incomplete += 1  # a pair beyond the probe could still pass: counted, not hidden
        m = s >= c_min
        cand_a.append(np.full(int(m.sum()), q))
        cand_b.append(j[m])
        cand_s.append(s[m])
    qa, pb, cos = np.concatenate(cand_a), np.concatenate(cand_b), np.concatenate(cand_s)
    partners = np.unique(pb)
    level_of = dict(zip(qset.tolist(), level_q.tolist()))
    if len(partners):
        psims, pids = knn(partners, cal.rank + 2)
        level_p, _ = levels_and_others(partners, psims, pids)
        level_of.update(zip(partners.tolist(), level_p.tolist()))
    la = np.array([level_of[a] for a in qa.tolist()])
    lb = np.array([level_of[b] for b in pb.tolist()])
    score = cal.probability(cos, la, lb)
    keep = score >= threshold - margin
    a, b = np.minimum(qa, pb)[keep], np.maximum(qa, pb)[keep]
    _, first = np.unique(a * (n + 1) + b, return_index=True)
    check = {"probe_k": probe_k, "queries_whose_probe_could_miss_a_pair": int(incomplete),
             "partners": int(len(partners)), "candidate_pairs": int(len(qa)),
             "median_query_level": float(np.median(level_q)) if len(level_q) else None}
    return np.stack([a[first], b[first]], axis=1), score[keep][first], check


def pair_metrics(found: np.ndarray, truth: np.ndarray, truth_sims: np.ndarray, queries: np.ndarray, n: int,
                 threshold: float) -> dict:
    """Recall and precision of ``found`` on pairs that involve a query row."""
    is_query = np.zeros(n, bool)
    is_query[queries] = True
    if len(found):
        found = found[is_query[found[:, 0]] | is_query[found[:, 1]]]
    key = lambda p: p[:, 0] * (n + 1) + p[:, 1]  # noqa: E731
    true_keys = key(truth[truth_sims >= threshold]) if len(truth) else np.zeros(0, np.int64)
    near_keys = key(truth) if len(truth) else np.zeros(0, np.int64)
    found_keys = np.unique(key(found)) if len(found) else np.zeros(0, np.int64)
    hit = np.isin(found_keys, true_keys)
    missed = ~np.isin(true_keys, found_keys)
    missed_sims = truth_sims[truth_sims >= threshold][missed] if len(truth) else np.zeros(0)
    return {"exact_pairs": int(len(true_keys)), "found_pairs": int(len(found_keys)), "true_found": int(hit.sum()),
            "recall": float(hit.sum() / len(true_keys)) if len(true_keys) else None,
            "precision": float(hit.sum() / len(found_keys)) if len(found_keys) else None,
            "false_pairs_below_threshold_minus_0.02": int((~np.isin(found_keys[~hit], near_keys)).sum()),
            "missed_within_0.001_of_threshold": int((missed_sims < threshold + 0.001).sum())}


def planted_recall(found: np.ndarray, workdir: Path, n: int, threshold: float) -> dict:
    planted = np.load(workdir / "planted.npz")
    rows, cos, burst = planted["rows"], planted["cosine"], planted["burst"]
    rows = np.stack([rows.min(axis=1), rows.max(axis=1)], axis=1)
    clear = cos >= threshold + 0.001  # planted cosines are exact up to float32 rounding
    keys = rows[:, 0] * (n + 1) + rows[:, 1]
    found_keys = found[:, 0] * (n + 1) + found[:, 1] if len(found) else np.zeros(0, np.int64)
    hit = np.isin(keys, found_keys)
    out = {}
    for name, mask in (("copy", ~burst), ("burst", burst)):
        m = mask & clear
        out[f"planted_{name}_pairs_at_threshold"] = int(m.sum())
        out[f"planted_{name}_recall"] = float(hit[m].mean()) if m.any() else None
    return out


def groups_summary(workdir: Path) -> dict | None:
    import pyarrow.dataset as ds

    groups = committed_table(workdir, "groups")
    if groups is None:
        return None
    t = ds.dataset(str(groups), format="parquet").to_table(columns=["group_id", "group_size"]).to_pandas()
    sizes = t.groupby("group_id")["group_size"].first()
    return {"groups": int(len(sizes)), "images_in_groups": int(len(t)), "largest_group": int(sizes.max()) if len(sizes) else 0}


def index_meta(workdir: Path) -> dict | None:
    for path in sorted(workdir.glob("index/*/index.json")):
        meta = json.loads(path.read_text())
        return {k: meta.get(k) for k in ("type", "factory", "count", "dimension", "build_seconds", "trained",
                                         "timings", "units")} | \
            {"shards": len(meta.get("shards", []))}
    return None


def mlflow_metrics(workdir: Path) -> dict:
    """The metrics the jobs logged (stage timings inside the job), by run name; best effort."""
    db = workdir / "mlflow.db"
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows = con.execute("SELECT r.name, m.key, m.value FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid").fetchall()
    except sqlite3.Error as exc:
        return {"error": str(exc)}
    out: dict = defaultdict(dict)
    for run, key, value in rows:
        out[run or "?"][key] = value
    return dict(out)


# -------------------------------------------------------------- one size
def bench_size(n: int, args, gen: synth.Generator, threshold: float, k: int, logs: Path, calibration=None,
               plain_threshold: float = 0.88) -> dict:
    result: dict = {"rows": n}
    workdir, result["table"] = make_table(args.cache, gen, n, args.seed, args.regenerate)
    result["workdir"] = str(workdir)
    table = workdir / "embeddings" / METHOD
    clean_outputs(workdir)
    ours: dict = {}
    for job in ("index", "dedup"):
        if job == "dedup" and not ours["index"]["ok"]:
            ours[job] = {"ok": False, "skipped": True, "error": "index failed"}
            continue
        print(f"[{n}] {job} ...", flush=True)
        ours[job] = run_monitored(job_command(job, workdir, args.job_sets), logs / f"{n}_{job}.log", args.timeout)
        print(f"[{n}] {job}: {'ok' if ours[job]['ok'] else 'FAILED: ' + ours[job]['error']} "
              f"in {ours[job]['wall_s']:.0f} s", flush=True)
    ours["index_meta"] = index_meta(workdir)
    ours["job_metrics"] = mlflow_metrics(workdir)
    ours["groups"] = groups_summary(workdir)
    ok = ours["index"]["ok"] and ours["dedup"]["ok"]
    ours["total_s"] = ours["index"]["wall_s"] + ours["dedup"]["wall_s"] if ok else None
    ours["peak_driver_mib"] = max(ours[j].get("peak_pss_mib", {}).get("driver", 0) for j in ("index", "dedup"))
    ours["peak_workers_mib"] = max(ours[j].get("peak_pss_mib", {}).get("python_workers", 0) for j in ("index", "dedup"))
    ours["peak_total_mib"] = max(ours[j].get("peak_pss_mib", {}).get("total", 0) for j in ("index", "dedup"))
    result["ours"] = ours

    plain: dict = {}
    if not args.skip_plain:
        print(f"[{n}] plain FAISS ...", flush=True)
        out = logs / f"{n}_plain_pairs.npz"
        cmd = [sys.executable, str(HERE / "plain_faiss.py"), "--table", str(table), "--out", str(out),
               "--threshold", str(plain_threshold), "--k", str(k)]
        plain = run_monitored(cmd, logs / f"{n}_plain.log", args.timeout)
        if plain["ok"]:
            plain.update(json.loads(out.with_suffix(".json").read_text()))
        print(f"[{n}] plain: {'ok' if plain['ok'] else 'FAILED: ' + plain['error']} in {plain['wall_s']:.0f} s",
              flush=True)
    result["plain"] = plain

    print(f"[{n}] exact pairs ...", flush=True)
    started = time.perf_counter()
    ids = table_ids(table)
    rng = np.random.default_rng(args.seed)
    queries = np.arange(n) if n <= args.exact_all_below else np.sort(rng.choice(n, args.recall_queries, replace=False))
    # Plain FAISS thresholds a raw cosine (it has no calibration, no DBA): its reference is exact
    # search of the raw cosine at plain_threshold.
    truth, truth_sims = exact_pairs(table, queries, plain_threshold)
    accuracy = {"threshold": threshold, "score": "calibrated" if calibration is not None else "cosine",
                "plain_cosine_threshold": plain_threshold, "queries": int(len(queries)),
                "all_pairs": bool(len(queries) == n), "exact_seconds": None}
    pairs_dir = committed_table(workdir, "pairs")
    if ours["dedup"]["ok"] and pairs_dir is not None:
        found = read_pairs(pairs_dir, ids)
        augmented = dba_vectors(workdir, ids)
        space = "the job's DBA vectors" if augmented is not None else "the raw vectors"
        if augmented is not None:
            def blocks(block=25_000):
                return (augmented[a:a + block].astype(np.float32) for a in range(0, len(augmented), block))
        else:
            def blocks():
                return (v for _, v in synth.iter_embedding_blocks(table))
        if calibration is not None:
            # The pairs table holds pairs whose calibrated score passes the threshold: the
            # reference scores exact cosines with exact levels (exact kNN) in the same space.
            ref, ref_scores, check = calibrated_reference(blocks, queries, n, calibration, threshold)
            reference = f"exact kNN and calibrated scores over {space}"
        else:
            ref, ref_scores = exact_pairs_of(augmented, queries, threshold) if augmented is not None else \
                exact_pairs(table, queries, threshold)
            check, reference = {}, f"exact search over {space}"
        del augmented
        accuracy["ours"] = pair_metrics(found, ref, ref_scores, queries, n, threshold) | \
            planted_recall(found, workdir, n, plain_threshold) | {
                "pairs_total": int(len(found)), "reference": reference} | check
    if plain.get("ok"):
        found = np.load(logs / f"{n}_plain_pairs.npz")["pairs"]
        accuracy["plain"] = pair_metrics(found, truth, truth_sims, queries, n, plain_threshold) | \
            planted_recall(found, workdir, n, plain_threshold) | {"pairs_total": int(len(found))}
    accuracy["exact_seconds"] = round(time.perf_counter() - started, 1)
    result["accuracy"] = accuracy
    result["ratios"] = ratios(ours, plain)
    if not args.keep_outputs:
        clean_outputs(workdir)
    return result


def ratios(ours: dict, plain: dict) -> dict:
    if not plain.get("ok"):
        return {}
    out = {}
    if ours["index"]["ok"]:
        out["index_over_plain_build"] = ours["index"]["wall_s"] / plain["build_s"]
    if ours["dedup"]["ok"]:
        out["dedup_over_plain_search"] = ours["dedup"]["wall_s"] / plain["search_s"]
    if ours["total_s"]:
        out["total_over_plain_total"] = ours["total_s"] / plain["total_s"]
        out["total_over_plain_wall"] = ours["total_s"] / plain["wall_s"]
    if plain["peak_pss_mib"]["total"]:
        out["peak_memory_over_plain"] = ours["peak_total_mib"] / plain["peak_pss_mib"]["total"]
    return {k: round(v, 2) for k, v in out.items()}


# ------------------------------------------------------------- reporting
def summary_table(sizes: list[dict]) -> str:
    head = ("N", "index s", "dedup s", "ours s", "plain s", "ratio", "recall", "prec", "plain rec",
            "driver MiB", "workers MiB", "plain MiB")
    lines = ["  ".join(f"{h:>11}" for h in head)]

    def f(v, fmt="{:.0f}"):
        return "FAILED" if v is False else ("-" if v is None else fmt.format(v))

    for r in sizes:
        o, p, a = r["ours"], r.get("plain") or {}, r.get("accuracy", {})
        row = (r["rows"], o["index"]["wall_s"] if o["index"]["ok"] else False,
               o["dedup"]["wall_s"] if o["dedup"]["ok"] else False, o["total_s"],
               p.get("wall_s") if p.get("ok") else (False if p else None),
               r.get("ratios", {}).get("total_over_plain_wall"),
               a.get("ours", {}).get("recall"), a.get("ours", {}).get("precision"), a.get("plain", {}).get("recall"),
               o["peak_driver_mib"], o["peak_workers_mib"], p.get("peak_pss_mib", {}).get("total"))
        fmts = ("{}", "{:.0f}", "{:.0f}", "{:.0f}", "{:.0f}", "{:.2f}", "{:.3f}", "{:.3f}", "{:.3f}", "{:.0f}",
                "{:.0f}", "{:.0f}")
        lines.append("  ".join(f"{f(v, fm):>11}" for v, fm in zip(row, fmts)))
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The README / docs/scaling.md table of one result JSON."""
    def cell(v, fmt):
        return "-" if v is None else fmt.format(v)

    m = result["machine"]
    lines = [f"Measured {result['date'][:10]} on {m.get('cpu_model', '?')}, {m.get('cores')} cores, "
             f"{m.get('mem_gib')} GiB (commit {(result['git']['commit'] or '?')[:8]}; "
             f"`{result['settings']['job_commands']}`):", "",
             "| N | index job | dedup job | ours total | plain FAISS | ours / plain | recall ours / plain "
             "| precision ours | driver peak | workers peak | plain peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["sizes"]:
        o, p, a = r["ours"], r.get("plain") or {}, r.get("accuracy", {})

        def job(name, o=o):
            j = o[name]
            return f"{j['wall_s']:.0f} s" if j["ok"] else ("skipped" if j.get("skipped") else
                                                           f"**failed** after {j['wall_s']:.0f} s: {j['error'][:80]}")
        lines.append(" | ".join([
            f"| {r['rows']:,}", job("index"), job("dedup"), cell(o["total_s"], "{:.0f} s"),
            cell(p.get("wall_s") if p.get("ok") else None, "{:.0f} s"),
            cell(r.get("ratios", {}).get("total_over_plain_wall"), "{:.1f}×"),
            f"{cell(a.get('ours', {}).get('recall'), '{:.3f}')} / {cell(a.get('plain', {}).get('recall'), '{:.3f}')}",
            cell(a.get("ours", {}).get("precision"), "{:.3f}"), cell(o["peak_driver_mib"], "{:.0f} MiB"),
            cell(o["peak_workers_mib"], "{:.0f} MiB"),
            cell(p.get("peak_pss_mib", {}).get("total") if p.get("ok") else None, "{:.0f} MiB")]) + " |")
    for r in result["sizes"]:
        o, p = r["ours"], r.get("plain") or {}
        timings = (o.get("index_meta") or {}).get("timings")
        if timings:
            lines.append(f"\n{r['rows']:,} rows, inside the index job: " + ", ".join(
                f"{k.replace('_seconds', '')} {v:.0f} s" for k, v in timings.items()) +
                (f"; plain FAISS: train {p['train_s']:.0f} s, add {p['add_s']:.0f} s, search {p['search_s']:.0f} s"
                 if p.get("ok") else "") + ".")
    acc = (result["sizes"][0].get("accuracy") or {}) if result["sizes"] else {}
    if acc.get("score") == "calibrated":
        lines.append(f"\nRecall and precision of ours: the jobs' pairs (calibrated score >= {acc['threshold']}) against "
                     "exact kNN, exact levels and the same calibrated scores over the job's DBA vectors "
                     "(`calibrated_reference`); plain FAISS: raw cosine >= "
                     f"{acc.get('plain_cosine_threshold')} against exact search of the raw cosine.")
    startup = result.get("startup") or {}
    if startup:
        lines.append("\nFixed costs (JSON `startup`): " + ", ".join(
            f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in startup.items() if isinstance(v, (int, float))) + ".")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Time per stage and peak memory against N, ours against plain FAISS, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))

    def series(get):
        xs, ys = [], []
        for r in sizes:
            try:
                v = get(r)
            except (KeyError, TypeError):
                v = None
            if v:
                xs.append(r["rows"])
                ys.append(v)
        return xs, ys

    def job(name, key="wall_s"):
        return lambda r: r["ours"][name][key] if r["ours"][name]["ok"] else None

    time_lines = [("ours: index job", job("index"), "C0", "-o"), ("ours: dedup job", job("dedup"), "C1", "-o"),
                  ("ours: index + dedup", lambda r: r["ours"]["total_s"], "k", "-s"),
                  ("plain FAISS: build", lambda r: r["plain"]["build_s"], "C0", "--^"),
                  ("plain FAISS: search", lambda r: r["plain"]["search_s"], "C1", "--^"),
                  ("plain FAISS: whole process", lambda r: r["plain"]["wall_s"] if r["plain"]["ok"] else None, "k",
                   "--D")]
    for label, get, color, style in time_lines:
        xs, ys = series(get)
        if xs:
            ax_t.plot(xs, ys, style, color=color, label=label)
    for r in sizes:  # failures: where they happened, and after how long
        for name in ("index", "dedup"):
            j = r["ours"][name]
            if not j["ok"] and not j.get("skipped"):
                ax_t.plot([r["rows"]], [j["wall_s"]], "x", color="red", markersize=10)
                ax_t.annotate(f"{name} failed", (r["rows"], j["wall_s"]), color="red", fontsize=8)
    mem_lines = [("ours: driver (python + JVM)", lambda r: r["ours"]["peak_driver_mib"], "C2", "-o"),
                 ("ours: Python workers", lambda r: r["ours"]["peak_workers_mib"], "C3", "-o"),
                 ("plain FAISS process", lambda r: r["plain"]["peak_pss_mib"]["total"], "k", "--D")]
    for label, get, color, style in mem_lines:
        xs, ys = series(get)
        if xs:
            ax_m.plot(xs, ys, style, color=color, label=label)
    ns = [r["rows"] for r in sizes]
    if len(ns) > 1:  # slope guides through the first plain point
        xs, ys = series(lambda r: r["plain"]["wall_s"] if r["plain"]["ok"] else None)
        if xs:
            grid = np.array([min(ns), max(ns)], dtype=float)
            ax_t.plot(grid, ys[0] * grid / xs[0], ":", color="grey", linewidth=0.8, label="~N")
            ax_t.plot(grid, ys[0] * (grid / xs[0]) ** 2, ":", color="grey", linewidth=1.6, label="~N²")
    for ax, title, unit in ((ax_t, "wall time per stage", "seconds"), (ax_m, "peak memory (PSS)", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows (N)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"neardup index + dedup vs plain FAISS — {m.get('cpu_model', '?')}, {m.get('cores')} cores, "
                 f"{m.get('mem_gib')} GiB — {result['date'][:10]} — {(result['git']['commit'] or '')[:8]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,300000,1000000", help="comma-separated row counts")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="real images to fit the generator to (ukbench-dev, holidays-dev, holidays-fullres)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--cache", type=Path, default=HERE / "results" / ".cache",
                        help="real vectors, synthetic workdirs, job logs (not committed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copy-cosine", default="real",
                        help="near-copy cosines: 'real' (drawn from real image/edit pairs) or LO,HI (uniform)")
    parser.add_argument("--job-set", dest="job_sets", action="append", default=None, metavar="KEY=VALUE",
                        help=f"--set passed to both jobs (default: {' '.join(DEFAULT_JOB_SETS)})")
    parser.add_argument("--recall-queries", type=int, default=4000,
                        help="sampled rows for exact search above --exact-all-below (>= 2000)")
    parser.add_argument("--exact-all-below", type=int, default=25_000, help="exact all-pairs up to this N")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per job before it counts as failed")
    parser.add_argument("--plain-threshold", type=float, default=0.88,
                        help="cosine threshold of plain FAISS (and of the planted-pair recall) when the jobs "
                             "threshold a calibrated score (dedup.score: calibrated, the default)")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--regenerate", action="store_true", help="write the tables again even if cached")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the jobs' index/pairs/groups")
    parser.add_argument("--docs-plot", type=Path, default=ROOT / "docs" / "scaling.png",
                        help="copy of the plot for the README (only written when two or more sizes ran)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="print the markdown table of an existing result JSON and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(args.markdown.read_text())))
        return 0
    args.job_sets = DEFAULT_JOB_SETS if args.job_sets is None else args.job_sets
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    os.environ.setdefault("KERAS_HOME", str(ROOT / ".keras"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from pipeline.config import Config

    config = Config.load(None, list(args.job_sets))
    threshold, k = config.dedup.threshold, config.dedup.k + 1  # +1: dedup's own k counts the query itself
    calibration = None
    if config.dedup.score == "calibrated":
        from pipeline.core import calibration as cal_core

        space = cal_core.space_of(bool(config.embed.postprocess), config.dedup.dba_k > 1)
        calibration = cal_core.Calibration.load(config.dedup.calibration or cal_core.shipped(space, config.embed.backbone))
    plain_threshold = threshold if calibration is None else args.plain_threshold
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    logs = args.cache / "logs" / stamp
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"scale_{stamp}.json", args.out / f"scale_{stamp}.png"

    print("fitting the generator to real MobileNet embeddings ...", flush=True)
    real = synth.embed_real(args.data, args.cache)
    copy_range = None if args.copy_cosine == "real" else tuple(float(v) for v in args.copy_cosine.split(","))
    gen, fit_report = synth.fit(real, seed=args.seed, copy_range=copy_range)
    result = {
        "benchmark": "archive_scale_index_dedup_vs_plain_faiss",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "git": git_info(),
        "settings": {"sizes": sizes, "seed": args.seed, "job_sets": args.job_sets,
                     "job_commands": "python -m pipeline.cli {index,dedup} --workdir W " +
                                     " ".join(f"--set {s}" for s in args.job_sets),
                     "why_rotations_off": "a synthetic embedding table has no pixels: rotated query variants "
                                          "(dedup.rotations) cannot be embedded",
                     "effective_config": {"index": vars(config.index), "dedup": vars(config.dedup),
                                          "spark_master": config.spark.master},
                     "threshold": threshold, "plain_cosine_threshold": plain_threshold,
                     "calibration": None if calibration is None else {"version": calibration.version,
                                                                       "space": calibration.space},
                     "search_k": k, "recall_queries": args.recall_queries,
                     "exact_all_below": args.exact_all_below, "timeout_s": args.timeout,
                     "memory": "peak of the summed PSS (smaps_rollup, every 2 s) and RSS (every 0.25 s) of a job's process tree; driver = the "
                               "python process + its java child (local mode: the JVM runs the executors too), "
                               "workers = pyspark.daemon processes"},
        "generator": {"description": synth.__doc__, "fit": fit_report, "settings": synth.generator_settings(gen),
                      "real": synth.real_statistics(real, plain_threshold),
                      "synthetic": synth.synthetic_statistics(gen, plain_threshold, len(real["vectors"]), args.seed)},
        "startup": None, "sizes": [],
    }

    def save():
        json_path.write_text(json.dumps(result, indent=2, default=str))
        if result["sizes"]:
            plot(result, png_path)

    save()
    if not args.skip_startup:
        print("start-up ...", flush=True)
        result["startup"] = measure_startup(logs, args.cache, gen, args.seed, args.job_sets, args.timeout)
        save()
    for n in sizes:
        result["sizes"].append(bench_size(n, args, gen, threshold, k, logs, calibration, plain_threshold))
        save()
    print(summary_table(result["sizes"]))
    if len(result["sizes"]) > 1 and png_path.exists():
        args.docs_plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png_path, args.docs_plot)
        print(f"plot copied to {args.docs_plot}")
    print(f"written: {json_path}" + (f", {png_path}" if png_path.exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
