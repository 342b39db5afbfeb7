"""Stage timing (autofaiss ``Timeit`` style): a context manager that logs and records seconds."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)


@contextmanager
def timed(stage: str, into: dict[str, float] | None = None) -> Iterator[None]:
    """Log how long ``stage`` took and store it as ``into[f"{stage}_seconds"]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        if into is not None:
            into[f"{stage}_seconds"] = seconds
        log.info("%s took %.2f s", stage, seconds)
