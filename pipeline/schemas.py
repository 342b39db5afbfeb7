"""Every table's schema, declared once. Column names are referenced through these constants.

Tables flow one way: image table -> embedding table -> index (+ id map) -> pairs / groups.
"""
from __future__ import annotations

from pyspark.sql import types as T

# ----------------------------------------------------------------- statuses
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"
STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_SKIPPED)

# ------------------------------------------------------------------ columns
IMAGE_ID = "image_id"
PATH = "path"
SIZE_BYTES = "size_bytes"
MODIFICATION_TIME = "modification_time"
CONTENT_SHA256 = "content_sha256"
FORMAT = "format"
WIDTH = "width"
HEIGHT = "height"
STATUS = "status"
ERROR = "error"
CONTENT = "content"
BACKBONE = "backbone"
EMBEDDING = "embedding"
FAISS_ID = "faiss_id"
SHARD = "shard"
IMAGE_ID_A = "image_id_a"
IMAGE_ID_B = "image_id_b"
SIMILARITY = "similarity"
GROUP_ID = "group_id"
GROUP_SIZE = "group_size"
KEEP = "keep"
QUERY_ID = "query_id"
NEIGHBOR_ID = "neighbor_id"
RANK = "rank"

IMAGE_TABLE = T.StructType(
    [
        T.StructField(IMAGE_ID, T.StringType(), False),
        T.StructField(PATH, T.StringType(), False),
        T.StructField(SIZE_BYTES, T.LongType(), False),
        T.StructField(MODIFICATION_TIME, T.TimestampType(), True),
        T.StructField(CONTENT_SHA256, T.StringType(), True),
        T.StructField(FORMAT, T.StringType(), True),
        T.StructField(WIDTH, T.IntegerType(), True),
        T.StructField(HEIGHT, T.IntegerType(), True),
        T.StructField(STATUS, T.StringType(), False),
        T.StructField(ERROR, T.StringType(), True),
        T.StructField(CONTENT, T.BinaryType(), True),
    ]
)

EMBEDDING_TABLE = T.StructType(
    [
        T.StructField(IMAGE_ID, T.StringType(), False),
        # The image bytes this row was computed from: an incremental embed reuses the row
        # only while the image table still has the same hash for the image id.
        T.StructField(CONTENT_SHA256, T.StringType(), True),
        T.StructField(BACKBONE, T.StringType(), False),
        # L2-normalised float32; null when the image could not be embedded (status=error).
        T.StructField(EMBEDDING, T.ArrayType(T.FloatType(), False), True),
        T.StructField(STATUS, T.StringType(), False),
        T.StructField(ERROR, T.StringType(), True),
    ]
)

ID_MAP = T.StructType(
    [
        T.StructField(FAISS_ID, T.LongType(), False),
        T.StructField(IMAGE_ID, T.StringType(), False),
        T.StructField(SHARD, T.IntegerType(), False),
    ]
)

PAIRS_TABLE = T.StructType(
    [
        T.StructField(IMAGE_ID_A, T.StringType(), False),
        T.StructField(IMAGE_ID_B, T.StringType(), False),
        T.StructField(SIMILARITY, T.FloatType(), False),
    ]
)

GROUPS_TABLE = T.StructType(
    [
        T.StructField(GROUP_ID, T.StringType(), False),
        T.StructField(IMAGE_ID, T.StringType(), False),
        T.StructField(GROUP_SIZE, T.LongType(), False),
        T.StructField(KEEP, T.BooleanType(), False),
    ]
)

# kNN lists (evaluation and search output before thresholding).
NEIGHBORS_TABLE = T.StructType(
    [
        T.StructField(QUERY_ID, T.StringType(), False),
        T.StructField(NEIGHBOR_ID, T.StringType(), False),
        T.StructField(RANK, T.IntegerType(), False),
        T.StructField(SIMILARITY, T.FloatType(), False),
    ]
)


def image_table_unischema():
    """The petastorm view of the image table, for readers such as the ``train`` job.

    Built from :data:`IMAGE_TABLE` so the two can never drift apart. Imported lazily:
    petastorm is only needed by the jobs that read through it.
    """
    import numpy as np
    from petastorm.codecs import ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField

    to_numpy = {
        T.StringType: np.str_,
        T.LongType: np.int64,
        T.IntegerType: np.int32,
        T.BinaryType: np.bytes_,
        T.TimestampType: np.datetime64,
    }
    fields = []
    for f in IMAGE_TABLE.fields:
        spark_type = type(f.dataType)
        fields.append(UnischemaField(f.name, to_numpy[spark_type], (), ScalarCodec(f.dataType), f.nullable))
    return Unischema("ImageTable", fields)
