"""The analysts' notebook runs headless on a small real evaluate run and shows the study table."""
from __future__ import annotations

import csv
import shutil

import nbformat
from nbclient import NotebookClient

from pipeline.evaluate.study import evaluate
from tests.helpers import ROOT, make_config, shared_path

FAST = dict(embed__input="squash", embed__trim_borders=False, dedup__rotations=[0], dedup__dba_k=0)


def _subset(src, dst, keep_groups: int):
    rows = list(csv.DictReader(open(src / "groundtruth.csv", encoding="utf-8")))
    groups = sorted({r["group"] for r in rows}, key=int)[:keep_groups]
    kept = [r for r in rows if r["group"] in groups]
    dst.mkdir(parents=True)
    for r in kept:
        shutil.copy(src / r["filename"], dst / r["filename"])
    with open(dst / "groundtruth.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return dst


def test_backbone_comparison_notebook(spark, tmp_path, monkeypatch):
    ukb = _subset(shared_path("data", "ukbench-dev"), tmp_path / "ukb", 5)
    hol = _subset(shared_path("data", "holidays-dev"), tmp_path / "hol", 5)
    work = tmp_path / "work"
    # densenet121's ImageNet weights must be unavailable, also on a machine with internet access.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    for dataset, folder, backbones in (("ukbench", ukb, ["mobilenet-0.25", "densenet121"]),
                                       ("holidays", hol, ["mobilenet-0.25"])):
        config = make_config(work, evaluate__dataset=dataset, evaluate__input=str(folder),
                             evaluate__backbones=backbones, **FAST)
        # evaluate() itself, not the CLI: the CLI refuses a named backbone whose weights are
        # missing (only `--backbones all` falls back), evaluate() times it with random weights.
        evaluate(spark, config.validate())

    plot = tmp_path / "plot.png"
    monkeypatch.setenv("NEARDUP_TRACKING_URI", config.tracking_uri())
    monkeypatch.setenv("NEARDUP_PLOT_PATH", str(plot))
    nb = nbformat.read(ROOT / "notebooks" / "backbone_comparison.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells for o in c.get("outputs", []))
    assert "UKBench N-S" in text and "Holidays mAP" in text
    assert "mobilenet-0.25" in text
    # densenet121 has no ImageNet weights here: timed with random weights, no accuracy shown.
    assert "timing only" in text
    assert plot.exists() and plot.stat().st_size > 1000
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
