"""spark-submit entry point: `spark-submit jobs/report.py --conf conf/default.yaml ...` (see README)."""
import sys

from pipeline.cli import job_main


def main(argv=None) -> int:
    return job_main("report", argv)


if __name__ == "__main__":
    sys.exit(main())
