"""The speed benchmark's corpus: ../shared images plus generated near-duplicate variants.

ukbench-dev (500 photos, groups of 4) and holidays-dev (398, 150 groups), and per original a
half-size re-encode and a 90 % centre crop (JPEG q75); a quarter of the holidays photos also
get a copy rotated by 90 degrees (sideways copies, what ``dedup.rotations`` is for). Every
variant belongs to its original's group. ``rounds`` > 1 adds, per original and round, another
half-size-like re-encode and centre crop at other scales, margins and JPEG qualities (distinct
files, each embedded: no exact copies), for a corpus of about 1,800 more images a round.
Written once per ``rounds`` under ``bench/results/.cache``;
``manifest.csv`` lists ``path,group,set`` (set: ukbench, holidays or variant).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from PIL import Image

SETS = ("ukbench-dev", "holidays-dev")


def _jpeg(image: Image.Image, quality: int = 75) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def round_variants(image: Image.Image, round_: int) -> dict[str, tuple[Image.Image, int]]:
    """Round 0: the half-size re-encode and the 90 % crop at q75; round r > 0: scale 0.5 + 0.08 r,
    margin (5 + r) % a side, quality 75 - 5 r."""
    w, h = image.size
    if round_ == 0:
        return {"half": (image.resize((w // 2, h // 2), Image.BILINEAR), 75),
                "crop": (image.crop((w // 20, h // 20, w - w // 20, h - h // 20)), 75)}
    scale, margin, quality = 0.5 + 0.08 * round_, (5 + round_) / 100, 75 - 5 * round_
    mw, mh = int(w * margin), int(h * margin)
    return {f"half{round_}": (image.resize((int(w * scale), int(h * scale)), Image.BILINEAR), quality),
            f"crop{round_}": (image.crop((mw, mh, w - mw, h - mh)), quality)}


def build(data: Path, out: Path, rounds: int = 1) -> Path:
    """Write the corpus under ``out`` (once); returns the manifest path."""
    manifest = out / "manifest.csv"
    if manifest.exists():
        return manifest
    rows = []
    for name in SETS:
        folder = data / name
        with open(folder / "groundtruth.csv", encoding="utf-8") as fh:
            truth = list(csv.DictReader(fh))
        tag = name.split("-")[0]
        for i, r in enumerate(truth):
            group = f"{tag}:{r['group']}"
            src = folder / r["filename"]
            dst = out / tag / r["filename"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
            rows.append((str(dst.relative_to(out)), group, tag))
            image = Image.open(src)
            image.load()
            stem = Path(r["filename"]).stem
            variants = round_variants(image, 0)
            if tag == "holidays" and i % 4 == 0:
                variants["rot90"] = (image.transpose(Image.Transpose.ROTATE_90), 75)
            for round_ in range(1, rounds):
                variants.update(round_variants(image, round_))
            for kind, (variant, quality) in variants.items():
                rel = Path("variants") / tag / f"{stem}_{kind}.jpg"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(_jpeg(variant, quality))
                rows.append((str(rel), group, "variant"))
    tmp = manifest.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "group", "set"])
        writer.writerows(rows)
    tmp.replace(manifest)
    return manifest


def read(manifest: Path) -> list[dict]:
    with open(manifest, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def subset(corpus: Path, rows: list[dict], out: Path) -> tuple[Path, Path]:
    """A smoke-run corpus: links to ``rows`` of ``corpus`` under ``out``; returns (folder, manifest)."""
    for r in rows:
        dst = out / r["path"]
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes((corpus / r["path"]).read_bytes())
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "group", "set"])
        writer.writeheader()
        writer.writerows(rows)
    return out, manifest
