"""spark-submit entry point: `spark-submit jobs/train.py --input DIR ...`: learns embed.postprocess,
or with `--method vlad-ssr` a classical method's vocabulary (see README)."""
import sys

from pipeline.cli import job_main


def main(argv=None) -> int:
    return job_main("train", argv)


if __name__ == "__main__":
    sys.exit(main())
