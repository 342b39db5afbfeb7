"""spark-submit entry point: `spark-submit jobs/train.py --method vlad-ssr --input DIR --workdir W` (see README)."""
import sys

from pipeline.cli import job_main


def main(argv=None) -> int:
    return job_main("train", argv)


if __name__ == "__main__":
    sys.exit(main())
