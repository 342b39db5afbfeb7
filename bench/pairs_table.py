"""The README's pair precision/recall table, from `neardup evaluate --json-out` files (never typed by hand).

    python bench/pairs_table.py bench/results/eval_ukbench.json bench/results/eval_holidays.json \
        bench/results/eval_mixed.json --readme README.md

Rewrites the block between ``<!-- pairs-table:begin -->`` and ``<!-- pairs-table:end -->``.
"""
from __future__ import annotations

import argparse
import json
import re

BEGIN, END = "<!-- pairs-table:begin -->", "<!-- pairs-table:end -->"
STUDY_BEGIN, STUDY_END = "<!-- calibration-study:begin -->", "<!-- calibration-study:end -->"


def study_table(report: dict) -> str:
    """`make calibrate`'s figures (bench/results/calibration.json): every space and collection."""
    lines = ["| similarity scale | collection | scored by the model fitted on | pairs | precision | recall "
             "| raw cosine ≥ 0.88: precision / recall |", "|---|---|---|---|---|---|---|"]
    for space, body in report["spaces"].items():
        for name, r in body["results"].items():
            op, cos = r["calibrated"], r["cosine_0.88"]
            lines.append(f"| {space} | {name} | {' + '.join(r['scored_by'])} | {op['pairs']} | {op['precision']:.3f} | "
                         f"{op['recall']:.3f} | {cos['precision']:.3f} / {cos['recall']:.3f} |")
    raw = report["spaces"].get("raw", {}).get("best_cosine_cut")
    if raw:
        lines.append("")
        lines.append(f"For comparison, the lowest single raw-cosine threshold with precision ≥ 0.95 on all the raw "
                     f"collections above is {raw['threshold']:.3f}; its recall: " + ", ".join(
                         f"{name} {r['recall']:.3f}" for name, r in raw["results"].items()) + ".")
    return "\n".join(lines)


def replace_block(readme: str, begin: str, end: str, text: str) -> str:
    new, n = re.subn(re.escape(begin) + ".*?" + re.escape(end), lambda m: f"{begin}\n{text}\n{end}", readme, flags=re.S)
    if n != 1:
        raise SystemExit(f"no {begin} ... {end} block")
    return new


def table(results: list[dict]) -> str:
    lines = ["| collection | images | calibration scoring it | threshold | pairs | pair precision | pair recall "
             "| N-S / mAP | raw cosine ≥ 0.88: precision / recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        op = r["operating_point"]
        cos = r["pair_curve"]["cosine_0.88"]
        rank = f"N-S {r['ns_score']:.3f}" if "ns_score" in r else f"mAP {r['map']:.3f}" if "map" in r else "–"
        name = r["dataset"] if r["dataset"] != "mixed" else "ukbench-dev + holidays-dev as one"
        lines.append(f"| {name} | {r['images']} | {r.get('calibration_note', '')} | {op['threshold']:.2f} | "
                     f"{op['pairs']} | **{r['pair_precision']:.3f}** | **{r['pair_recall']:.3f}** | {rank} | "
                     f"{cos['precision']:.3f} / {cos['recall']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", nargs="*")
    ap.add_argument("--note", action="append", default=[], help="per file: which calibration scored it")
    ap.add_argument("--readme")
    ap.add_argument("--study", help="bench/results/calibration.json of make calibrate")
    args = ap.parse_args(argv)
    results = []
    for i, path in enumerate(args.json):
        with open(path) as fh:
            for r in json.load(fh):
                if not r.get("timing_only"):
                    r["calibration_note"] = args.note[i] if i < len(args.note) else ""
                    results.append(r)
    text = table(results)
    if args.readme:
        with open(args.readme) as fh:
            readme = fh.read()
        if results:
            readme = replace_block(readme, BEGIN, END, text)
        if args.study:
            with open(args.study) as fh:
                readme = replace_block(readme, STUDY_BEGIN, STUDY_END, study_table(json.load(fh)))
        with open(args.readme, "w") as fh:
            fh.write(readme)
    print(text)


if __name__ == "__main__":
    main()
