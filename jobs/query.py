"""Entry point: `spark-submit jobs/query.py --set query.force_path=spark ...` (few files: no Spark needed; see README)."""
import sys

from pipeline.cli import job_main


def main(argv=None) -> int:
    return job_main("query", argv)


if __name__ == "__main__":
    sys.exit(main())
