"""``make demo``: a corpus with known near-duplicates, made from photos scikit-image ships.

No user data and no network: each original photo gets near-duplicate variants of the kinds
seen in real archives (crop, rescale, JPEG re-encode, brightness and colour shifts, small
rotation, mirror, a text overlay, a PNG copy, greyscale), and unrelated photos and
textures are added as distractors. The ground truth is written next to the images.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from pipeline import api
from pipeline import schemas as S
from pipeline.core import augment, storage
from pipeline.core import metrics as M

log = logging.getLogger(__name__)

# Photos with near-duplicates (skimage.data names); "cat" is the same photo as "chelsea".
ORIGINALS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
             "camera", "retina")
DISTRACTORS = ("moon", "coins", "clock", "page", "colorwheel", "brick", "gravel", "text", "logo")


# name -> (transform, file format)
VARIANTS: dict[str, tuple[Callable[[Image.Image], Image.Image], str]] = {
    "crop": (augment.crop, "JPEG"),
    "half": (augment.rescale, "JPEG"),
    "jpeg25": (augment.jpeg, "JPEG"),
    "bright": (augment.brighter, "JPEG"),
    "colour": (augment.colour_shift, "JPEG"),
    "rot7": (augment.rotate, "JPEG"),
    "mirror": (augment.mirror, "JPEG"),
    "text": (augment.text_overlay, "JPEG"),
    "png": (lambda im: im, "PNG"),
    "grey": (augment.greyscale, "JPEG"),
}


def _load(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        image = background
    return image.convert("RGB")


def _save(image: Image.Image, path: Path, fmt: str) -> None:
    kwargs = {"quality": 92} if fmt == "JPEG" else {}
    image.save(path, fmt, **kwargs)


def make_demo_corpus(root: str | os.PathLike) -> Path:
    """Write the corpus under ``root`` (idempotent) and return the path of its ground truth CSV.

    Ground truth columns: filename, group (originals and their variants share a group;
    each distractor is its own group), variant.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ORIGINALS:
        original = _load(name)
        folder = root / name
        folder.mkdir(exist_ok=True)
        _save(original, folder / f"{name}.jpg", "JPEG")
        rows.append((f"{name}/{name}.jpg", name, "original"))
        for variant, (transform, fmt) in VARIANTS.items():
            filename = f"{name}_{variant}.{'png' if fmt == 'PNG' else 'jpg'}"
            _save(transform(original), folder / filename, fmt)
            rows.append((f"{name}/{filename}", name, variant))
    other = root / "unrelated"
    other.mkdir(exist_ok=True)
    for name in DISTRACTORS:
        _save(_load(name), other / f"{name}.jpg", "JPEG")
        rows.append((f"unrelated/{name}.jpg", f"unrelated-{name}", "distractor"))
    truth = root.parent / f"{root.name}-groundtruth.csv"
    with open(truth, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "group", "variant"])
        writer.writerows(rows)
    log.info("demo corpus: %d images in %s", len(rows), root)
    return truth


def run_demo(workdir: str, master: str | None = None) -> DemoResult:
    """Build the corpus, run the main job on it, score its pairs against the ground truth."""
    import mlflow
    import pyarrow.parquet as pq

    workdir_path = Path(workdir).resolve()
    corpus = workdir_path.parent / f"{workdir_path.name}-corpus"
    truth_csv = make_demo_corpus(corpus)
    result = api.run(input=str(corpus), workdir=str(workdir_path), spark__master=master)

    with open(truth_csv, encoding="utf-8") as fh:
        group_of = {r["filename"]: r["group"] for r in csv.DictReader(fh)}
    images = pq.read_table(storage.local_path_of(result.tables["images"]), columns=[S.IMAGE_ID, S.PATH]).to_pylist()
    rel = {r[S.IMAGE_ID]: os.path.relpath(r[S.PATH], corpus) for r in images}
    pairs = pq.read_table(storage.local_path_of(result.tables["pairs"])).to_pylist()
    predicted = [(rel[p[S.IMAGE_ID_A]], rel[p[S.IMAGE_ID_B]]) for p in pairs]
    precision, recall = M.pair_precision_recall(predicted, M.true_pairs(group_of))
    missed = sorted(M.true_pairs(group_of) - {tuple(sorted(p)) for p in predicted})
    with mlflow.start_run(run_id=result.mlflow_run_id):
        mlflow.log_metrics({"demo_pair_precision": precision, "demo_pair_recall": recall})
    lines = [result.report, "",
             f"demo corpus: {len(rel)} images in {corpus} ({len(ORIGINALS)} photos x {len(VARIANTS)} variants "
             f"+ {len(DISTRACTORS)} unrelated); ground truth: {truth_csv}",
             f"pairs found: {len(predicted)}  precision {precision:.3f}  recall {recall:.3f} "
             f"(threshold {result.config.dedup.threshold} on the {result.config.dedup.score} score"
             f"{': expected pair precision' if result.config.dedup.score == 'calibrated' else ''})"]
    if missed:
        lines.append(f"missed pairs ({len(missed)}), e.g.: " + ", ".join(f"{a} ~ {b}" for a, b in missed[:5]))
    lines.append(f"outputs: {workdir_path}/ (images, embeddings, index, pairs, groups)")
    lines.append(f"MLflow: mlflow ui --backend-store-uri {result.config.tracking_uri()}   (run {result.mlflow_run_id})")
    report = api.report(config=result.config)
    lines.append(f"report (opens in any browser, no server): {report.url}")
    return DemoResult(result.metrics, precision, recall, len(missed), "\n".join(lines), report.url)


@dataclass
class DemoResult:
    """The demo run's metrics and its pair precision / recall against the ground truth."""

    metrics: dict
    precision: float
    recall: float
    missed: int
    report: str
    report_url: str = ""
