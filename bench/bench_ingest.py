"""Ingest at scale: files/s and driver peak memory on a synthetic tree of small images.

    python bench/bench_ingest.py --make /tmp/tree --files 100000   # write the tree (once)
    python bench/bench_ingest.py --data /tmp/tree [--incremental]  # time `ingest` on it

Driver memory is the peak resident set of the Python driver plus its JVM (the java child of
the driver process), sampled every 50 ms; Python workers (children of the JVM's daemon) are
executors and are not counted. Results go to bench/results/ingest-*.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_tree(root: Path, n_files: int, per_folder: int = 100, fan_out: int = 10) -> None:
    """``n_files`` distinct tiny JPEGs/PNGs (about 2 KB), ``per_folder`` to a folder, two levels deep."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    for i in range(n_files):
        folder = i // per_folder
        d = root / f"a{folder // fan_out:04d}" / f"b{folder % fan_out:02d}"
        if i % per_folder == 0:
            d.mkdir(parents=True, exist_ok=True)
        pixels = base.copy()
        pixels[i % 24, (i // 24) % 24] = (i * 7 % 256, i * 13 % 256, i * 29 % 256)
        buf = io.BytesIO()
        if i % 2:
            Image.fromarray(pixels).save(buf, "PNG")
            (d / f"img{i:06d}.png").write_bytes(buf.getvalue())
        else:
            Image.fromarray(pixels).save(buf, "JPEG", quality=90)
            (d / f"img{i:06d}.jpg").write_bytes(buf.getvalue())


class PeakRss:
    """Peak RSS of this process and of its java descendants (the driver JVM)."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak = {"python": 0, "jvm": 0, "total": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        py = self.me.memory_info().rss
        jvm = 0
        for child in self.me.children(recursive=True):
            try:
                if child.name() == "java":
                    jvm += child.memory_info().rss
            except psutil.Error:
                pass
        self.peak["python"] = max(self.peak["python"], py)
        self.peak["jvm"] = max(self.peak["jvm"], jvm)
        self.peak["total"] = max(self.peak["total"], py + jvm)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--make", help="write a synthetic tree here and exit")
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--data", help="the tree to ingest")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="1g")
    parser.add_argument("--label", default="")
    parser.add_argument("--incremental", action="store_true", help="also time a second, unchanged ingest")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    if args.make:
        t = time.perf_counter()
        make_tree(Path(args.make), min(args.files, 100_000))
        print(f"wrote {args.files} files in {time.perf_counter() - t:.0f} s")
        return 0

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pipeline import api  # noqa: F401  (import cost is not ingest time)
    from pipeline.config import Config

    try:
        from pipeline.stages import ingest as ing
        from pipeline.stages.session import spark_session
    except ImportError:  # the layout before issue 8 (to measure the old ingest)
        from pipeline import ingest as ing
        from pipeline.session import spark_session

    work = tempfile.mkdtemp(prefix="neardup-bench-ingest-")
    config = Config.load(None, [f"workdir={work}", f"ingest.input=[{args.data}]", f"spark.master={args.master}",
                                "max_error_fraction=1.0"])
    os.environ["PYSPARK_SUBMIT_ARGS"] = f"--driver-memory {args.driver_memory} pyspark-shell"
    result = {"label": args.label, "data": args.data, "master": args.master, "driver_memory": args.driver_memory,
              "machine": f"{platform.machine()} {os.cpu_count()} cores, shared VM", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with PeakRss() as rss:
        t = time.perf_counter()
        with spark_session(config) as spark:
            result["session_s"] = time.perf_counter() - t
            t = time.perf_counter()
            report = ing.ingest(spark, config)
            result["ingest_s"] = time.perf_counter() - t
            result["files"] = report.total
            result["by_status"] = report.by_status
            result["files_per_s"] = report.total / result["ingest_s"]
            if args.incremental:
                t = time.perf_counter()
                again = ing.ingest(spark, config)
                result["incremental_s"] = time.perf_counter() - t
                result["incremental_changes"] = again.changes
    result["driver_peak_rss_mib"] = {k: round(v / 2**20) for k, v in rss.peak.items()}
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", args.label).strip("-") or "run"  # a label may hold "/" or spaces
    (out / f"ingest-{slug}-{time.strftime('%Y%m%dT%H%MZ', time.gmtime())}.json").write_text(json.dumps(result, indent=1))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
