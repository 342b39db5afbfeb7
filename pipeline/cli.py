"""Command line: ``neardup <job> [options]`` and the ``jobs/*.py`` spark-submit entry points.

Every job takes ``--conf FILE`` (YAML, default conf/default.yaml), repeatable
``--set key=value`` overrides and ``--workdir``; job options are shorthands for config keys.
The config is loaded and validated before Spark starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Sequence

from pipeline.config import Config, ConfigError
from pipeline.encoders.backbones import WeightsUnavailableError

# pipeline.api (and with it PySpark) is imported only by the jobs that use it: `query` on
# few files answers in seconds without it.

log = logging.getLogger(__name__)

# option -> (config key, argparse kwargs)
COMMON = {
    "--workdir": ("workdir", {}),
    "--master": ("spark.master", {}),
}
BACKBONE = {
    "--backbone": ("embed.backbone", {}),
    "--weights": ("embed.weights", {}),
}
JOB_OPTIONS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "ingest": {"--input": ("ingest.input", {"nargs": "+"})},
    "embed": {**BACKBONE, "--layer": ("embed.layer", {}), "--batch-size": ("embed.batch_size", {"type": int})},
    "index": {**BACKBONE, "--type": ("index.type", {}), "--shards": ("index.shards", {"type": int})},
    "dedup": {**BACKBONE, "--threshold": ("dedup.threshold", {"type": float}), "--k": ("dedup.k", {"type": int})},
    "evaluate": {
        "--dataset": ("evaluate.dataset", {}),
        "--input": ("evaluate.input", {}),
        "--backbones": ("evaluate.backbones", {}),
        # Backbones and classical methods in one list; all-classical expands to every classical one.
        "--methods": ("evaluate.backbones", {}),
        "--json-out": ("evaluate.json_out", {}),
        "--weights": ("embed.weights", {}),
        "--threshold": ("dedup.threshold", {"type": float}),
        "--mixed-with": ("evaluate.mixed_with", {"nargs": "+"}),
    },
    "train": {
        "--input": ("train.input", {"nargs": "+"}),
        **BACKBONE,
        "--name": ("train.name", {}),
        "--dim": ("train.dim", {"type": int}),
        "--power": ("train.power", {"type": float}),
        "--output": ("train.output", {}),
        "--method": ("embed.backbone", {}),
    },
    "report": {"--backbone": ("embed.backbone", {}), "--out": ("report.out", {})},
    "apply": {
        "--backbone": ("embed.backbone", {}),
        "--mode": ("apply.mode", {"choices": ["report", "move", "hardlink", "symlink"]}),
        "--target": ("apply.target", {}),
        "--execute": ("apply.execute", {"action": "store_true"}),
        "--undo": ("apply.undo", {"metavar": "JOURNAL"}),
    },
    "query": {
        "--input": ("query.input", {"nargs": "+"}),
        **BACKBONE,
        "--threshold": ("dedup.threshold", {"type": float}),
        "--k": ("dedup.k", {"type": int}),
    },
    "run": {
        "--input": ("ingest.input", {"nargs": "+"}),
        **BACKBONE,
        "--threshold": ("dedup.threshold", {"type": float}),
        "--k": ("dedup.k", {"type": int}),
    },
}
HELP = {
    "ingest": "list image files and write the image table",
    "embed": "embed the image table with a CNN backbone",
    "index": "build the sharded FAISS index from the embedding table",
    "dedup": "search all images against the index; write pairs and groups",
    "evaluate": "score backbones and classical methods on UKBench or Holidays",
    "train": "learn the embedding post-processing (PCA-whitening) on another collection via petastorm, or with --method a classical method's vocabulary / GMM",
    "report": "write the static HTML review report (groups as thumbnails, failed files) and log it to MLflow",
    "apply": "turn the keep decisions into file actions: dry run by default, journaled, undoable, never deletes",
    "run": "ingest, embed, index and dedup in one go",
    "query": "near-duplicates of new images in an existing archive (no rebuild; few files: no Spark)",
}


def build_parser(jobs: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neardup", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="job", required=True)
    for job in jobs:
        p = sub.add_parser(job, help=HELP.get(job, job))
        add_job_arguments(p, job)
    demo = sub.add_parser("demo", help="build a small corpus with known near-duplicates and run the pipeline on it")
    demo.add_argument("--workdir", default="demo-work")
    demo.add_argument("--master", default=None)
    return parser


def add_job_arguments(p: argparse.ArgumentParser, job: str) -> None:
    p.add_argument("--conf", default=None, help="YAML config (default: conf/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    for option, (key, kwargs) in {**COMMON, **JOB_OPTIONS[job]}.items():
        p.add_argument(option, dest=key, default=None, help=f"sets {key}", **kwargs)


def config_from_args(job: str, args: argparse.Namespace) -> Config:
    overrides = list(args.set)
    for key, _ in {**COMMON, **JOB_OPTIONS[job]}.values():
        value = getattr(args, key, None)
        if value is None:
            continue
        if isinstance(value, list):
            value = "[" + ", ".join(json.dumps(v) for v in value) + "]"
        elif isinstance(value, str) and key != "evaluate.backbones":
            value = json.dumps(value)  # keep strings strings ("none", "1.0" ...) through YAML parsing
        overrides.append(f"{key}={value}")
    return Config.load(args.conf, overrides)


def run_config(job: str, config: Config) -> Any:
    """Run ``job`` through :mod:`pipeline.api` with a ready config; returns the API's result."""
    if job == "query":
        from pipeline import query

        return query.query(query.validated(config))
    from pipeline import api

    return getattr(api, job)(config=config)


def job_main(job: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/<job>.py`` (also under spark-submit)."""
    parser = argparse.ArgumentParser(prog=f"jobs/{job}.py", description=HELP[job])
    add_job_arguments(parser, job)
    return _guarded(lambda: run_config(job, config_from_args(job, parser.parse_args(argv))))


def main(argv: Sequence[str] | None = None) -> int:
    """The ``neardup`` console command."""
    parser = build_parser(list(JOB_OPTIONS))
    args = parser.parse_args(argv)
    if args.job == "demo":
        from pipeline import demo

        return _guarded(lambda: demo.run_demo(args.workdir, args.master))
    return _guarded(lambda: run_config(args.job, config_from_args(args.job, args)))


def _guarded(action: Callable[[], Any]) -> int:
    """Run ``action``, print its report; exit codes: 0 done, 2 bad settings or input, 3 too many bad files."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = action()
    except (ConfigError, WeightsUnavailableError, FileNotFoundError) as exc:
        print(f"neardup: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        steps = sys.modules.get("pipeline.stages.steps")  # loaded by any job that can raise it
        if steps is None or not isinstance(exc, steps.TooManyErrors):
            raise
        if exc.report:
            print(exc.report)
        print(f"neardup: too many bad input files: {exc}", file=sys.stderr)
        return 3
    report = getattr(result, "report", "")
    if report:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
