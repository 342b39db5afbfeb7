"""Per-stage progress on a terminal: items done / total, rate and ETA; silent in logs.

Spark does the work on executors, so the driver learns about it from Spark's status tracker:
each stage of the pipeline runs under its own job group, and a driver thread polls the
completed / total tasks of that group's jobs twice a second. Items done are estimated from
that fraction when the item count is known (Spark tasks are not images); a progress bar is
drawn with ``rich`` only when stderr is a terminal (``progress: auto``), so log files and CI
output stay clean.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import uuid
from typing import Iterator

POLL_SECONDS = 0.5


def enabled(mode: str, stream=None) -> bool:
    stream = stream if stream is not None else sys.stderr
    if mode == "always":
        return True
    if mode == "never":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def task_fraction(spark, group: str) -> tuple[int, int]:
    """(completed, total) tasks of every job started so far under ``group``."""
    tracker = spark.sparkContext.statusTracker()
    done = total = 0
    for job_id in tracker.getJobIdsForGroup(group):
        job = tracker.getJobInfo(job_id)
        if job is None:
            continue
        finished = str(job.status) == "SUCCEEDED"  # its skipped stages (shuffle reuse) count as done
        for stage_id in job.stageIds:
            stage = tracker.getStageInfo(stage_id)
            if stage is not None:
                done += stage.numTasks if finished else stage.numCompletedTasks
                total += stage.numTasks
    return done, total


class Bar:
    """A rich progress bar, or nothing when disabled; ``advance`` is for driver-side loops."""

    def __init__(self, mode: str = "auto") -> None:
        self.on = enabled(mode)
        self._progress = None
        self._task = None

    def start(self, name: str, total: int | None) -> None:
        if not self.on:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._progress = Progress(TextColumn("[bold]{task.description:<11}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), console=Console(stderr=True), transient=False,
                                  redirect_stdout=False, redirect_stderr=False)
        self._progress.start()
        self._task = self._progress.add_task(name, total=total, rate="")

    def update(self, completed: float, total: int | None = None) -> None:
        if self._progress is None:
            return
        task = self._progress.tasks[0]
        rate = f"{task.speed:,.1f}/s" if task.speed else ""
        self._progress.update(self._task, completed=completed, rate=rate,
                              **({"total": total} if total is not None else {}))

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self.update(self._progress.tasks[0].completed + n)

    def finish(self) -> None:
        if self._progress is not None:
            task = self._progress.tasks[0]
            if task.total is not None:
                self._progress.update(self._task, completed=task.total)
            self._progress.stop()
            self._progress = None


@contextlib.contextmanager
def spark_stage(spark, name: str, mode: str = "auto", items: int | None = None) -> Iterator[str | None]:
    """Show ``name``'s progress while the block runs Spark jobs (items estimated from tasks).

    Yields the Spark job group the block's jobs run under (None when progress is off).
    """
    if not enabled(mode):
        yield None
        return
    sc = spark.sparkContext
    group = f"neardup-{name}-{uuid.uuid4().hex[:8]}"
    sc.setJobGroup(group, f"neardup {name}")
    bar = Bar(mode)
    bar.start(name, items)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            show(*task_fraction(spark, group))

    def show(done: int, total: int) -> None:
        if items is not None:
            bar.update(items * done / total if total else 0)
        else:
            bar.update(done, total or None)

    thread = threading.Thread(target=poll, name=f"progress-{name}", daemon=True)
    thread.start()
    try:
        yield group
    finally:
        stop.set()
        thread.join()
        show(*task_fraction(spark, group))
        bar.finish()
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)
