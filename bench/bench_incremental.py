"""A `run` after a few new files, incremental against full dedup, side by side in one process.

Two copies of a workdir deduped by `run` (the same archive folder as input) get the same new
files; `neardup run` is then timed (a new process each, start-up included) on one with the
defaults (incremental dedup) and on the other with `dedup.incremental=never` (index rebuilt,
every image searched again). Both ingest and embed only the new files (those stages were
already incremental).

    python bench/bench_incremental.py --workdir /tmp/qdev/work --archive /tmp/qdev/archive --new /tmp/qdev/queries
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_scale import git_info, machine  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a workdir `run` has deduped (with its state)")
    parser.add_argument("--archive", type=Path, required=True, help="its input folder (new files are copied in)")
    parser.add_argument("--new", type=Path, required=True, help="a folder of new files")
    args = parser.parse_args(argv)
    import re
    import subprocess

    other = args.workdir.with_name(args.workdir.name + "-full")
    if other.exists():
        shutil.rmtree(other)
    shutil.copytree(args.workdir, other)
    added = []
    for src in sorted(p for p in args.new.rglob("*") if p.is_file()):
        dst = args.archive / "new" / src.relative_to(args.new)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        added.append(str(dst))
    result = {"machine": machine(), "git": git_info(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "new_files": len(added), "runs": {}}
    for name, workdir, extra in (("incremental", args.workdir, []), ("full", other, ["--set", "dedup.incremental=never"])):
        load = os.getloadavg()[0]
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--workdir", str(workdir), "--input",
                               str(args.archive), "--master", "local[2]", "--set", "progress=never", *extra],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        mode = re.findall(r"(incremental dedup: .*|full dedup: .*)", proc.stderr)
        result["runs"][name] = {"seconds": time.perf_counter() - t, "load_before": load,
                                "load_after": os.getloadavg()[0], "log": mode[:1]}
    result["ratio_full_over_incremental"] = result["runs"]["full"]["seconds"] / result["runs"]["incremental"]["seconds"]
    path = ROOT / "bench" / "results" / f"incremental_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
