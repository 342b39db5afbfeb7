"""Writing the incremental state of a full dedup (:func:`pipeline.stages.incremental.write_state`):
alongside the dedup's pairs and groups on small tables, after them on large ones."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from pyspark.sql import SparkSession

from pipeline.config import Config
from pipeline.core import storage
from pipeline.stages import index as ix
from pipeline.stages import tables

log = logging.getLogger(__name__)


# At most this many images: the state is written while the dedup writes its pairs and groups.
# Both are then chains of short Spark jobs, mostly waiting on scheduling, so they overlap on
# the same cores (a 2,800-image run: 4.3 s of state, most of it hidden). Larger tables are
# compute- and memory-bound: written after the dedup, one heavy job at a time.
CONCURRENT_STATE_MAX_IMAGES = 200_000


class StateWriter:
    """Writes the incremental state of a full dedup, once its kNN lists and DBA store exist."""

    def __init__(self, spark: SparkSession, config: Config,
                 write_state: Callable[[SparkSession, Config, float], None]):
        self.spark, self.config, self.write_state = spark, config, write_state
        # The index this dedup searches (built before the writer is made).
        index = ix.IndexInfo.load(storage.Workdir.of(config.workdir).index_dir(config.embed.backbone))
        self.images = int(index.meta["count"])
        self.threshold: float | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, threshold: float) -> None:
        self.threshold = float(threshold)
        if self.images > CONCURRENT_STATE_MAX_IMAGES:
            return
        # A session of its own: the same SparkContext, but its SQL settings (no auto broadcast)
        # do not leak into the dedup's joins running meanwhile.
        session = self.spark.newSession()
        self.thread = threading.Thread(target=self._run, args=(session,), name="incremental-state", daemon=True)
        self.thread.start()

    def _run(self, session: SparkSession) -> None:
        try:
            self._write(session)
        except BaseException as exc:  # re-raised by finish(), in the job's thread
            self.error = exc

    def _write(self, session: SparkSession) -> None:
        started = time.perf_counter()
        with tables.no_auto_broadcast(session), tables.sized_shuffles(session, self.images):
            self.write_state(session, self.config, self.threshold)
        log.info("incremental state written in %.1fs", time.perf_counter() - started)

    def finish(self) -> None:
        if self.thread is not None:
            self.thread.join()
            if self.error is not None:
                raise self.error
            return
        if self.threshold is None:  # the dedup did not call back: read what it committed
            workdir = storage.Workdir.of(self.config.workdir)
            self.threshold = float(storage.read_metadata(workdir.pairs(self.config.embed.backbone))["threshold"])
        self._write(self.spark)

    def abandon(self) -> None:
        """The dedup failed: a state written meanwhile would not match the pairs on disk."""
        if self.thread is None:
            return
        self.thread.join()
        tables.remove(self.spark, storage.Workdir.of(self.config.workdir).incremental(self.config.embed.backbone))
