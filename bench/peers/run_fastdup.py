"""fastdup on the speed corpus, end to end, in its own virtualenv (bench/.venv-fastdup).

    bench/.venv-fastdup/bin/python bench/peers/run_fastdup.py CORPUS MANIFEST OUT.json
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

from common import Clock, args, load_manifest, ns_score, pair_scores, write

started = time.perf_counter()
import fastdup  # noqa: E402

corpus, manifest, out = args()
rows = load_manifest(manifest)
result = {"tool": "fastdup", "version": fastdup.__version__, "import_seconds": time.perf_counter() - started}
work = tempfile.mkdtemp(prefix="fastdup-")
try:
    clock = Clock()
    fd = fastdup.create(work_dir=work, input_dir=corpus)
    fd.run(num_threads=2, overwrite=True, verbose=False)
    result["run_seconds"] = clock.lap()
    result["images"] = len(rows)
    result["images_per_second"] = len(rows) / result["run_seconds"]
    sim = fd.similarity()
    threshold = 0.9  # fastdup's default similarity threshold for its similarity/galleries
    result["threshold"] = threshold
    rel = lambda p: os.path.relpath(p, corpus)  # noqa: E731
    a = sim["filename_from"] if "filename_from" in sim else sim["from"]
    b = sim["filename_to"] if "filename_to" in sim else sim["to"]
    keep = sim["distance"] >= threshold
    predicted = {(rel(x), rel(y)) for x, y in zip(a[keep], b[keep])}
    result.update(pair_scores(predicted, rows))
    names, feats = fastdup.load_binary_feature(os.path.join(work, "atrain_features.dat"), d=576)
    index = {rel(n): i for i, n in enumerate(names)}
    uk = [r for r in rows if r["set"] == "ukbench"]
    result["ns_score_ukbench"] = ns_score(np.asarray(feats)[[index[r["path"]] for r in uk]], [r["group"] for r in uk])
finally:
    shutil.rmtree(work, ignore_errors=True)
write(out, result)
print(result)
