"""Embed-stage throughput: the Spark pipeline against a plain single-process Keras loop.

Both embed the same images with the same backbone, in one run, interleaved (plain,
pipeline, plain, pipeline, ...) because these machines are shared and noisy; the figure
that matters is the ratio. Start-up (Spark session, TensorFlow import and model load in
the driver and in the Python workers) is measured separately and excluded from images/s.

    python bench/bench_embed.py --data ../shared/data/ukbench-dev --out bench/results
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    import multiprocessing

    info = {"hostname": platform.node(), "cpus": multiprocessing.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as fh:
            info["mem_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def plain_keras_loop(files: list[Path], backbone: str, batch_size: int) -> float:
    """The reference: decode, resize, ``predict_on_batch``, one process. Returns images/s."""
    from PIL import Image

    from pipeline.encoders import backbones

    spec = backbones.REGISTRY[backbone]
    model = _plain_model(backbone)
    side = spec.input_size
    started = time.perf_counter()
    for i in range(0, len(files), batch_size):
        batch = np.stack([np.asarray(Image.open(f).convert("RGB").resize((side, side), Image.BILINEAR))
                          for f in files[i:i + batch_size]]).astype(np.float32)
        model.predict_on_batch(batch / 127.5 - 1.0)
    return len(files) / (time.perf_counter() - started)


_PLAIN = {}


def _plain_model(backbone: str):
    if backbone not in _PLAIN:
        import keras

        from pipeline.encoders import backbones

        spec = backbones.REGISTRY[backbone]
        _PLAIN[backbone] = getattr(keras.applications, spec.constructor)(
            include_top=False, weights="imagenet", pooling="avg", input_shape=(spec.input_size,) * 2 + (3,),
            **dict(spec.kwargs))
    return _PLAIN[backbone]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a folder of images (e.g. ../shared/data/ukbench-dev)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--backbone", default="mobilenet")
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tf-threads", type=int, default=1,
                        help="embed.tf_threads: TensorFlow threads per Python worker (0: TF default)")
    args = parser.parse_args(argv)

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    files = sorted(p for p in Path(args.data).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    startup = {}

    t = time.perf_counter()
    import tensorflow  # noqa: F401  (import cost is start-up, not throughput)
    _plain_model(args.backbone)
    startup["plain_tf_import_and_model_load_s"] = time.perf_counter() - t
    plain_keras_loop(files[: args.batch_size], args.backbone, args.batch_size)  # warm-up: graph tracing

    from pipeline.stages import embed as em
    from pipeline.stages import ingest as ing
    from pipeline.config import Config
    from pipeline.stages.session import spark_session

    work = tempfile.mkdtemp(prefix="neardup-bench-")
    # Same processing as the plain loop (224 squashed, no border trim): the ratio measures the
    # pipeline's overhead and overlap, not a different descriptor.
    config = Config.load(None, [f"workdir={work}", f"ingest.input=[{args.data}]", f"spark.master={args.master}",
                                f"embed.backbone={args.backbone}", f"embed.batch_size={args.batch_size}",
                                "embed.input=squash", "embed.trim_borders=false", f"embed.tf_threads={args.tf_threads}"])
    default_descriptor = Config.load(None, [f"workdir={work}", f"ingest.input=[{args.data}]",
                                            f"spark.master={args.master}", f"embed.backbone={args.backbone}",
                                            f"embed.tf_threads={args.tf_threads}"])
    t = time.perf_counter()
    with spark_session(config) as spark:
        startup["spark_session_s"] = time.perf_counter() - t
        ing.ingest(spark, config)
        t = time.perf_counter()
        em.embed(spark, config, incremental=False)  # first run: Python workers start, import TF and load the model
        startup["pipeline_first_embed_s"] = time.perf_counter() - t
        plain, pipeline = [], []
        for _ in range(args.rounds):
            plain.append(plain_keras_loop(files, args.backbone, args.batch_size))
            t = time.perf_counter()
            counts = em.embed(spark, config, incremental=False)  # every image through the model
            pipeline.append(counts["ok"] / (time.perf_counter() - t))
        # For information: the default descriptor (aspect-preserving input, border trim) costs more.
        em.embed(spark, default_descriptor, incremental=False)  # warm-up: new input shapes
        t = time.perf_counter()
        counts = em.embed(spark, default_descriptor, incremental=False)
        default_ips = counts["ok"] / (time.perf_counter() - t)
        parallelism = spark.sparkContext.defaultParallelism
        master = spark.sparkContext.master

    result = {
        "benchmark": "embed_stage_vs_plain_keras",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "data": str(args.data),
        "images": len(files),
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "tf_threads_per_worker": args.tf_threads,
        "spark_master": master,
        "spark_default_parallelism": parallelism,
        "plain_images_per_second": plain,
        "pipeline_images_per_second": pipeline,
        "plain_median": statistics.median(plain),
        "pipeline_median": statistics.median(pipeline),
        "ratio_pipeline_over_plain": statistics.median(p / q for p, q in zip(pipeline, plain)),
        "startup_seconds": startup,
        "pipeline_default_descriptor_images_per_second": default_ips,
        "default_descriptor": {k: getattr(default_descriptor.embed, k)
                               for k in ("input", "max_side", "trim_borders", "pooling", "scales")},
        "note": "images/s exclude start-up; pipeline time includes reading the image table, "
                "decode, model, and writing the embedding table (commit included)",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"embed_{args.backbone}_{dt.datetime.now().strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("plain_median", "pipeline_median", "ratio_pipeline_over_plain",
                                              "pipeline_default_descriptor_images_per_second",
                                              "startup_seconds")}, indent=2))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
