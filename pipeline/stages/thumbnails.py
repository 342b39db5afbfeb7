"""Report thumbnails in Spark: executors decode and shrink, the driver writes the small files.

Thumbnails travel back as a few kilobytes each through ``toLocalIterator`` (one partition at a
time), so the report folder may be on the driver's disk whatever the cluster; image bytes
never leave the executors.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator

import pandas as pd
from pyspark.sql import DataFrame

from pipeline import schemas as S
from pipeline.core import image_source, imageio, thumbnails

log = logging.getLogger(__name__)

THUMB_SCHEMA = f"{S.IMAGE_ID} string, thumbnail binary, {S.ERROR} string"


def thumbnail_name(image_id: str) -> str:
    return f"{image_id}.jpg"


def make_thumbnails(images: DataFrame, max_side: int, quality: int, max_pixels: int) -> DataFrame:
    """(image_id, thumbnail, error) for rows of the image table (content, else read from path)."""

    def shrink(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            thumbs, errors = [], []
            # No hash check: a thumbnail shows the file as it is now.
            for content in image_source.sources(batch[S.CONTENT], batch[S.PATH], [None] * len(batch)):
                try:
                    thumbs.append(thumbnails.thumbnail_jpeg(content, max_side, quality, max_pixels))
                    errors.append(None)
                except (imageio.ImageDecodeError, OSError) as exc:
                    thumbs.append(None)
                    errors.append(str(exc))
            yield pd.DataFrame({S.IMAGE_ID: batch[S.IMAGE_ID], "thumbnail": thumbs, S.ERROR: errors})

    return images.select(S.IMAGE_ID, S.PATH, S.CONTENT).mapInPandas(shrink, THUMB_SCHEMA)


def write_thumbnails(images: DataFrame, folder: str, max_side: int, quality: int, max_pixels: int,
                     progress=None) -> dict[str, str]:
    """Write ``folder/<image_id>.jpg`` for every row; returns {image_id: error} for those that failed."""
    os.makedirs(folder, exist_ok=True)
    failed: dict[str, str] = {}
    rows = make_thumbnails(images, max_side, quality, max_pixels).toLocalIterator(prefetchPartitions=True)
    for row in rows:
        if row["thumbnail"] is None:
            failed[row[S.IMAGE_ID]] = row[S.ERROR]
            continue
        path = os.path.join(folder, thumbnail_name(row[S.IMAGE_ID]))
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(row["thumbnail"])
        os.replace(tmp, path)
        if progress is not None:
            progress(1)
    if failed:
        log.warning("%d thumbnails could not be made, e.g. %r", len(failed), next(iter(failed.values())))
    return failed
