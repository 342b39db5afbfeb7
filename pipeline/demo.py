"""``make demo``: a corpus with known near-duplicates, made from photos scikit-image ships.

No user data and no network: each original photo gets near-duplicate variants of the kinds
seen in real archives (crop, rescale, JPEG re-encode, brightness and colour shifts, small
rotation, mirror, a text overlay, a PNG copy, greyscale), and unrelated photos and
textures are added as distractors. The ground truth is written next to the images.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

log = logging.getLogger(__name__)

# Photos with near-duplicates (skimage.data names); "cat" is the same photo as "chelsea".
ORIGINALS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
             "camera", "retina")
DISTRACTORS = ("moon", "coins", "clock", "page", "colorwheel", "brick", "gravel", "text", "logo")


def _crop(im: Image.Image) -> Image.Image:
    w, h = im.size
    return im.crop((int(w * 0.1), int(h * 0.08), int(w * 0.92), int(h * 0.9)))


def _rescale(im: Image.Image) -> Image.Image:
    return im.resize((im.width // 2, im.height // 2), Image.LANCZOS)


def _jpeg(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=25)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _brighter(im: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(im).enhance(1.35)


def _colour_shift(im: Image.Image) -> Image.Image:
    a = np.asarray(im).astype(np.int16)
    a = a + np.array([25, -10, -20], dtype=np.int16)
    return ImageEnhance.Color(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))).enhance(1.4)


def _rotate(im: Image.Image) -> Image.Image:
    return im.rotate(7, resample=Image.BICUBIC, expand=False, fillcolor=(255, 255, 255))


def _mirror(im: Image.Image) -> Image.Image:
    return ImageOps.mirror(im)


def _text_overlay(im: Image.Image) -> Image.Image:
    out = im.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    draw.rectangle((0, int(h * 0.85), w, h), fill=(0, 0, 0))
    draw.text((10, int(h * 0.87)), "(c) neardup demo 2026 - sample watermark", fill=(255, 255, 255))
    return out


def _greyscale(im: Image.Image) -> Image.Image:
    return ImageOps.grayscale(im).convert("RGB")


# name -> (transform, file format)
VARIANTS: dict[str, tuple[Callable[[Image.Image], Image.Image], str]] = {
    "crop": (_crop, "JPEG"),
    "half": (_rescale, "JPEG"),
    "jpeg25": (_jpeg, "JPEG"),
    "bright": (_brighter, "JPEG"),
    "colour": (_colour_shift, "JPEG"),
    "rot7": (_rotate, "JPEG"),
    "mirror": (_mirror, "JPEG"),
    "text": (_text_overlay, "JPEG"),
    "png": (lambda im: im, "PNG"),
    "grey": (_greyscale, "JPEG"),
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


def run_demo(workdir: str, master: str | None = None) -> dict:
    """Build the corpus, run the main job on it, score its pairs against the ground truth."""
    import mlflow

    from pipeline import schemas as S
    from pipeline.core import metrics as M
    from pipeline.core import storage
    from pipeline.cli import run_job
    from pipeline.config import Config

    workdir_path = Path(workdir).resolve()
    corpus = workdir_path.parent / f"{workdir_path.name}-corpus"
    truth_csv = make_demo_corpus(corpus)
    overrides = [f"workdir={workdir_path}", f"ingest.input=[{corpus}]"]
    if master:
        overrides.append(f"spark.master={master}")
    config = Config.load(None, overrides)
    metrics = run_job("run", config)

    with open(truth_csv, encoding="utf-8") as fh:
        group_of = {r["filename"]: r["group"] for r in csv.DictReader(fh)}
    import pyarrow.parquet as pq

    wd = storage.Workdir.of(str(workdir_path))
    images = pq.read_table(storage.local_path_of(wd.images), columns=[S.IMAGE_ID, S.PATH]).to_pylist()
    rel = {r[S.IMAGE_ID]: os.path.relpath(r[S.PATH], corpus) for r in images}
    pairs = pq.read_table(storage.local_path_of(wd.pairs(config.embed.backbone))).to_pylist()
    predicted = [(rel[p[S.IMAGE_ID_A]], rel[p[S.IMAGE_ID_B]]) for p in pairs]
    precision, recall = M.pair_precision_recall(predicted, M.true_pairs(group_of))
    missed = sorted(M.true_pairs(group_of) - {tuple(sorted(p)) for p in predicted})
    with mlflow.start_run(run_id=metrics["mlflow_run_id"]):
        mlflow.log_metrics({"demo_pair_precision": precision, "demo_pair_recall": recall})
    print()
    print(f"demo corpus: {len(rel)} images in {corpus} ({len(ORIGINALS)} photos x {len(VARIANTS)} variants "
          f"+ {len(DISTRACTORS)} unrelated); ground truth: {truth_csv}")
    print(f"pairs found: {len(predicted)}  precision {precision:.3f}  recall {recall:.3f} "
          f"(threshold {config.dedup.threshold})")
    if missed:
        print(f"missed pairs ({len(missed)}), e.g.: " + ", ".join(f"{a} ~ {b}" for a, b in missed[:5]))
    print(f"outputs: {workdir_path}/ (images, embeddings, index, pairs, groups)")
    print(f"MLflow: mlflow ui --backend-store-uri {config.tracking_uri()}   (run {metrics['mlflow_run_id']})")
    report = run_job("report", config)
    print(f"report (opens in any browser, no server): {report.url}")
    return {"precision": precision, "recall": recall, "report": report.url, **metrics}
