"""Throughput side by side, in ONE run on the same images (issue 10): `make bench`.

(a) the plain Keras fp32 loop (MobileNet, 224x224, ``predict_on_batch``; decode excluded),
    and the same model-only loop through each inference runtime / precision we offer (both
    over the 500 ukbench-dev originals of the corpus);
(b) the pipeline's ``run`` with default settings, end to end (the sum of its stage times;
    the Spark JVM start-up reported separately), plus any ``--variant`` settings;
(c) imagededup's CNN mode and (d) fastdup, each in its own virtualenv (``make bench-peer``).

The corpus (bench/speed_corpus.py) is ukbench-dev + holidays-dev + generated variants
(>= 2,000 images). N-S is computed on the 500 ukbench-dev originals from each tool's own
descriptors (cosine top 4); pair precision / recall on the whole corpus, at each tool's
default threshold. Machine, CPU flags and load average go into the JSON; the README's speed
section is generated from it (``--readme``).

    python bench/bench_speed.py --data ../shared/data --out bench/results --readme README.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "peers"))

import speed_corpus  # noqa: E402
import speed_readme  # noqa: E402
from common import ns_score, pair_scores  # noqa: E402

BATCH = 32


def machine() -> dict:
    from pipeline.encoders import runtimes

    info = {"hostname": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "cpu_flags": runtimes.cpu_flags(), "openvino": runtimes.openvino_version()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        with open("/proc/meminfo", encoding="utf-8") as fh:
            info["mem_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------ (a) model-only loops
def decoded_224(corpus: Path, rows: list[dict]) -> np.ndarray:
    """Every image squashed to 224x224 uint8, as the plain loop feeds it (not timed)."""
    from PIL import Image

    out = np.empty((len(rows), 224, 224, 3), np.uint8)
    for i, r in enumerate(rows):
        with Image.open(corpus / r["path"]) as im:
            out[i] = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR))
    return out


def plain_keras(pixels: np.ndarray) -> tuple[float, np.ndarray]:
    """The reference: keras.applications MobileNet, avg pooling, fp32, predict_on_batch. (images/s, vectors)."""
    import keras

    model = keras.applications.MobileNet(include_top=False, weights="imagenet", pooling="avg",
                                         input_shape=(224, 224, 3))
    model.predict_on_batch(pixels[:BATCH].astype(np.float32) / 127.5 - 1.0)  # warm-up (graph tracing)
    out = np.empty((len(pixels), 1024), np.float32)
    started = time.perf_counter()
    for i in range(0, len(pixels), BATCH):
        out[i:i + BATCH] = model.predict_on_batch(pixels[i:i + BATCH].astype(np.float32) / 127.5 - 1.0)
    return len(pixels) / (time.perf_counter() - started), out


def runtime_loops(pixels: np.ndarray, calibration: str, workdir: str) -> dict:
    """The same model-only loop through the pipeline's runtimes (224 squash input, one process)."""
    from pipeline.config import Config
    from pipeline.encoders import registry

    results = {}
    for runtime, precision in [("tensorflow", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"),
                               ("openvino", "int8")]:
        overrides = [f"workdir={workdir}", "embed.input=squash", "embed.trim_borders=false",
                     f"embed.runtime={runtime}", f"embed.precision={precision}", "embed.tf_threads=0"]
        if precision == "int8":
            overrides.append(f"embed.calibration_input=[{calibration}]")
        fn = registry.encoder_for(Config.load(None, overrides).validate()).embed_function()
        from pipeline.encoders import runtimes

        model = runtimes.load(fn.key, fn.choice, 0)
        model(pixels[:BATCH])
        started = time.perf_counter()
        for i in range(0, len(pixels), BATCH):
            model(pixels[i:i + BATCH])
        name = f"{runtime}-{precision}"
        results[name] = {"images_per_second": len(pixels) / (time.perf_counter() - started),
                         "runtime_used": fn.choice.runtime, "precision_used": fn.choice.precision,
                         "reason": fn.choice.reason}
        print(f"  model loop {name}: {results[name]['images_per_second']:.1f} images/s", flush=True)
    return results


# ------------------------------------------------------------------ (b) the pipeline
WARM_UP_IMAGES = 64
RUN_STAGES = speed_readme.RUN_STAGES


def variant_settings(variant: str) -> dict:
    """``--variant``: JSON overrides, or a profile's YAML (conf/fast.yaml) as the same overrides."""
    if not variant.endswith((".yaml", ".yml")):
        return json.loads(variant)
    import yaml

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            name = f"{prefix}__{key}" if prefix else key
            out.update(flat(value, name) if isinstance(value, dict) else {name: value})
        return out

    return flat(yaml.safe_load(Path(variant).read_text()) or {})


def pipeline_run(spark, corpus: Path, rows: list[dict], workdir: str, overrides: dict) -> dict:
    from pipeline import api
    from pipeline import schemas as S
    from pipeline.config import Config
    from pipeline.core import storage
    from pipeline.stages import tables

    config = Config.load(None, [f"workdir={workdir}", "progress=never"]).with_overrides(
        ingest__input=[str(corpus)], **overrides)
    started = time.perf_counter()
    metrics = api.run(config=config, spark=spark).metrics
    wall = time.perf_counter() - started
    stages = {k: v for k, v in metrics.items() if k.endswith("_seconds") and k != "images_per_second"}
    # Every stage `run` times, the incremental state (what makes the next run incremental) included.
    summed = sum(metrics.get(f"{s}_seconds", 0.0) for s in RUN_STAGES)
    wd = storage.Workdir.of(workdir)
    path_of = {r[S.IMAGE_ID]: os.path.relpath(r[S.PATH], corpus)
               for r in tables.read_table(spark, wd.images, "images").select(S.IMAGE_ID, S.PATH).collect()}
    vectors = {path_of[r[S.IMAGE_ID]]: r[S.EMBEDDING] for r in tables.read_table(
        spark, wd.embeddings(config.embed.backbone), "embeddings").where(F_ok()).select(S.IMAGE_ID, S.EMBEDDING).collect()}
    pairs = {(path_of[r[S.IMAGE_ID_A]], path_of[r[S.IMAGE_ID_B]]) for r in tables.read_table(
        spark, wd.pairs(config.embed.backbone), "pairs").collect()}
    uk = [r for r in rows if r["set"] == "ukbench"]
    result = {"settings": {k: v for k, v in overrides.items()}, "stage_seconds": stages,
              "sum_of_stages_seconds": summed, "wall_seconds": wall, "images": len(rows),
              "images_per_second": len(rows) / summed,
              "embed_images_per_second": metrics.get("images_per_second"),
              "exact_copies": metrics.get("embed_exact_copies"),
              "threshold": config.dedup.threshold,
              "ns_score_ukbench": ns_score(np.asarray([vectors[r["path"]] for r in uk]), [r["group"] for r in uk])}
    result.update(pair_scores(pairs, rows))
    return result


def F_ok():
    from pyspark.sql import functions as F

    from pipeline import schemas as S

    return F.col(S.STATUS) == S.STATUS_OK


def summary(run: dict) -> str:
    return (f"{run['images_per_second']:.1f} images/s end to end, N-S {run['ns_score_ukbench']:.3f}, "
            f"P/R {run['pair_precision']:.3f}/{run['pair_recall']:.3f}")


def median_round(rounds: list[dict]) -> dict:
    """The round of median images/s (the lower middle of an even count; a failed round counts
    as 0), with every round's images/s under ``rounds_images_per_second``."""
    speeds = [r.get("images_per_second") or 0.0 for r in rounds]
    order = sorted(range(len(rounds)), key=lambda i: speeds[i])
    chosen = dict(rounds[order[(len(rounds) - 1) // 2]])
    chosen["rounds_images_per_second"] = speeds
    return chosen


# ------------------------------------------------------------------ (c), (d) peers
def peer(name: str, corpus: Path, manifest: Path, out_dir: Path) -> dict:
    python = ROOT / "bench" / f".venv-{name}" / "bin" / "python"
    if not python.exists():
        return {"tool": name, "error": f"not installed: run `make bench-peer` ({python} missing)"}
    out = out_dir / f".peer-{name}.json"
    started = time.perf_counter()
    proc = subprocess.run([str(python), str(ROOT / "bench" / "peers" / f"run_{name}.py"), str(corpus),
                           str(manifest), str(out)], capture_output=True, text=True, timeout=3600)
    result = json.loads(out.read_text()) if out.exists() else {"tool": name}
    result["process_seconds"] = time.perf_counter() - started
    if proc.returncode != 0 and "error" not in result:
        result["error"] = (proc.stderr or proc.stdout)[-800:]
    out.unlink(missing_ok=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--variant", action="append", default=[],
                        help="extra pipeline run with these overrides, JSON, e.g. '{\"dedup__rotations\": [0]}', "
                             "or a profile's YAML, e.g. conf/fast.yaml")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--limit", type=int, default=0, help="smoke run: a corpus of the first N images only")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of generated variants: 1 = 2,794 images, each more about 1,800 more")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the defaults and of each peer, interleaved; the median run is reported")
    parser.add_argument("--readme", help="rewrite the speed section of this README from the JSON")
    args = parser.parse_args(argv)
    data, out_dir = Path(args.data), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / ".cache" / ("speed-corpus" if args.rounds == 1 else f"speed-corpus-r{args.rounds}")
    manifest = speed_corpus.build(data, corpus, args.rounds)
    rows = speed_corpus.read(manifest)
    if args.limit:
        rows = rows[:args.limit]
        corpus, manifest = speed_corpus.subset(corpus, rows, out_dir / ".cache" / f"{corpus.name}-{args.limit}")
    result = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "load_average_start": load_average(), "images": len(rows), "repeats": max(1, args.repeats),
              "command": "python bench/bench_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"corpus: {len(rows)} images; load {result['load_average_start']}", flush=True)

    # The model-only loops run over the ukbench-dev originals (their N-S comes with them).
    uk_rows = [r for r in rows if r["set"] == "ukbench"]
    pixels = decoded_224(corpus, uk_rows)
    plain_ips, plain_vectors = plain_keras(pixels)
    result["plain_keras"] = {"images_per_second": plain_ips, "images": len(uk_rows),
                             "ns_score_ukbench": ns_score(plain_vectors, [r["group"] for r in uk_rows])}
    print(f"(a) plain Keras loop: {plain_ips:.1f} images/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        result["model_loops"] = runtime_loops(pixels, str(data / "holidays-dev"), tmp)
    del pixels

    from pipeline.config import Config
    from pipeline.stages.session import spark_session

    started = time.perf_counter()
    runs = [{}] + [variant_settings(v) for v in args.variant]
    result["pipeline"] = []
    with spark_session(Config.load(None, [])) as spark:
        result["spark_startup_seconds"] = time.perf_counter() - started
        # Once-per-application costs, reported apart from the runs (issue 10: start-up separately):
        # Python workers started and their imports, the model loaded in them, the JVM's first
        # Parquet/shuffle code paths. Measured as a default run over the first 64 images.
        warm_rows = rows[:WARM_UP_IMAGES]
        warm_corpus, _ = speed_corpus.subset(corpus, warm_rows, out_dir / ".cache" / f"speed-corpus-{WARM_UP_IMAGES}")
        from pipeline import api

        # Each setting warms up on its own, so that a variant's one-time model conversion (int8:
        # quantization) is not counted in its run, as the default's is not.
        result["warm_up_seconds_by_run"] = []
        for overrides in runs:
            with tempfile.TemporaryDirectory(prefix="bench-speed-warm-") as tmp:
                started = time.perf_counter()
                api.run(config=Config.load(None, [f"workdir={tmp}", "progress=never"]).with_overrides(
                    ingest__input=[str(warm_corpus)], **overrides), spark=spark)
                result["warm_up_seconds_by_run"].append(time.perf_counter() - started)
        result["warm_up_seconds"] = result["warm_up_seconds_by_run"][0]
        print(f"warm-up ({len(warm_rows)} images, start-up costs): {result['warm_up_seconds']:.1f} s", flush=True)
        # The defaults and the peers take turns, round after round (the VM's speed drifts by
        # +-10% over minutes); each is reported by its median round, with every round kept.
        peer_names = () if args.skip_peers else ("imagededup", "fastdup")
        defaults_rounds: list[dict] = []
        peer_rounds: dict[str, list[dict]] = {n: [] for n in peer_names}
        for i in range(max(1, args.repeats)):
            order = ["neardup", *peer_names]
            order = order[i % len(order):] + order[:i % len(order)]
            for tool in order:
                if tool == "neardup":
                    with tempfile.TemporaryDirectory(prefix="bench-speed-run-") as tmp:
                        r = pipeline_run(spark, corpus, rows, tmp, {})
                    defaults_rounds.append(r)
                    print(f"(b) pipeline defaults, round {i + 1}: {summary(r)}", flush=True)
                else:
                    p = peer(tool, corpus, manifest, out_dir)
                    peer_rounds[tool].append(p)
                    print(f"({tool}) round {i + 1}: {p.get('images_per_second') or p.get('error')}", flush=True)
        result["pipeline"].append(median_round(defaults_rounds))
        for overrides in runs[1:]:
            with tempfile.TemporaryDirectory(prefix="bench-speed-run-") as tmp:
                r = pipeline_run(spark, corpus, rows, tmp, overrides)
            result["pipeline"].append(r)
            print(f"(b) pipeline {overrides}: {summary(r)}", flush=True)
        for r in result["pipeline"]:
            r["vs_plain_keras"] = r["images_per_second"] / plain_ips
    result["peers"] = {n: median_round(rounds) for n, rounds in peer_rounds.items()}
    ours = result["pipeline"][0]["images_per_second"]
    for name, p in result["peers"].items():
        if p.get("images_per_second"):
            p["ours_vs_peer"] = ours / p["images_per_second"]
        print(f"({name}) {p}", flush=True)
    result["load_average_end"] = load_average()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"speed_{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    if args.readme:
        speed_readme.update(Path(args.readme), path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
