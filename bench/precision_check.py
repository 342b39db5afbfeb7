"""Accuracy of each runtime / precision with the default descriptor, in one process (no Spark).

The default pipeline's retrieval, replayed in numpy on the real subsets: aspect-320 descriptor
with border trim, centring learned on the OTHER dataset, database-side augmentation (k=3,
alpha=3), rotated queries (0/90/270, best similarity per neighbour), exact cosine search.
UKBench N-S on ukbench-dev (centring from holidays-dev) and Holidays mAP on holidays-dev
(centring from ukbench-dev), for fp32 TensorFlow (the reference) and each OpenVINO precision.
A quick check of ``embed.precision`` before the e2e accuracy tests (tests/e2e/test_accuracy.py).

    python bench/precision_check.py --data ../shared/data [--variants tensorflow-fp32 openvino-bf16 ...]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import Config  # noqa: E402
from pipeline.core import metrics, rerank  # noqa: E402
from pipeline.encoders import registry  # noqa: E402

VIEWS = (0, 90, 270)


def load(folder: Path):
    with open(folder / "groundtruth.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return rows, [(folder / r["filename"]).read_bytes() for r in rows]


def embed(variant: str, contents, workdir: str, calibration: str, settings=()):
    runtime, precision = variant.split("-")
    overrides = [f"workdir={workdir}", f"embed.runtime={runtime}", f"embed.precision={precision}", *settings]
    if precision == "int8" and calibration != "builtin":
        overrides.append(f"embed.calibration_input=[{calibration}]")
    fn = registry.encoder_for(Config.load(None, overrides).validate()).embed_function()
    per_view, errors = fn.views(contents, VIEWS)
    assert not any(errors), errors
    return fn.choice, [np.stack(v) for v in per_view]


def centred(X: np.ndarray, mean: np.ndarray) -> np.ndarray:
    Y = X - mean
    return Y / np.linalg.norm(Y, axis=1, keepdims=True)


def rankings(views: list[np.ndarray], mean: np.ndarray, k: int = 20) -> np.ndarray:
    """Per query, neighbours by best similarity over the rotated views, against the DBA database."""
    base = centred(views[0], mean)
    sims = base @ base.T
    order = np.argsort(-sims, axis=1)[:, :k]
    database = rerank.database_side_augmentation(base, order, np.take_along_axis(sims, order, 1), 3, 3.0)
    best = database @ database.T
    for view in views[1:]:
        best = np.maximum(best, centred(view, mean) @ database.T)
    return np.argsort(-best, axis=1, kind="stable")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--variants", nargs="+", default=["tensorflow-fp32", "openvino-fp32", "openvino-bf16",
                                                          "openvino-int8"])
    parser.add_argument("--out")
    parser.add_argument("--calibration", default=None,
                        help="int8: calibrate on this folder for both datasets (default: each on the other dataset); "
                             "'builtin': what int8 uses without embed.calibration_input (crops of scikit-image's photos)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another descriptor setting for every variant, e.g. embed.max_side=256")
    parser.add_argument("--no-rotations", action="store_true",
                        help="rank with the upright view only (dedup.rotations=[0]): what the rotated views add")
    args = parser.parse_args(argv)
    used = slice(0, 1) if args.no_rotations else slice(0, len(VIEWS))
    data = Path(args.data)
    uk_rows, uk = load(data / "ukbench-dev")
    ho_rows, ho = load(data / "holidays-dev")
    results: dict = {"calibration": args.calibration or "the other dataset", "settings": args.set,
                     "rotations": list(VIEWS[used]), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        calibration = args.calibration
        for variant in args.variants:
            started = time.perf_counter()
            # int8 is calibrated on the other dataset than the one it is scored on (or on --calibration).
            choice_u, vu = embed(variant, uk, tmp, calibration or str(data / "holidays-dev"), args.set)
            choice_h, vh = embed(variant, ho, tmp, calibration or str(data / "ukbench-dev"), args.set)
            names = [r["filename"] for r in uk_rows]
            order = rankings(vu[used], vh[0].mean(axis=0))
            ns = metrics.ns_score({names[i]: [names[j] for j in row[:4]] for i, row in enumerate(order)},
                                  {r["filename"]: r["group"] for r in uk_rows})
            hnames = [r["filename"] for r in ho_rows]
            order = rankings(vh[used], vu[0].mean(axis=0))
            group = [r["group"] for r in ho_rows]
            queries = [i for i, r in enumerate(ho_rows) if r["is_query"] in ("1", "true", "True")]
            ranked = {hnames[q]: [hnames[j] for j in order[q] if j != q] for q in queries}
            relevant = {hnames[q]: {hnames[j] for j in range(len(hnames)) if group[j] == group[q] and j != q}
                        for q in queries}
            results["variants"][variant] = {"runtime_used": f"{choice_u.runtime}-{choice_u.precision}",
                                            "ns_score": ns, "map": metrics.mean_average_precision(ranked, relevant),
                                            "seconds": time.perf_counter() - started}
            print(variant, results["variants"][variant], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
