"""Solo pool: one task at a time on one executor thread.

The task runs off the loop so heartbeats, control replies and events keep flowing while it
runs (Celery's solo pool blocks its whole consumer). Limits work as in the thread pool.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from .base import Runner
from .threads import ThreadPool

logger = logging.getLogger(__name__)


class SoloPool(ThreadPool):
    kind: ClassVar[str] = "solo"

    def __init__(self, runner: Runner, concurrency: int = 1) -> None:
        if concurrency != 1:
            logger.debug("The solo pool ignores concurrency=%d: one task at a time", concurrency)
        super().__init__(runner, 1)

    def grow(self, n: int = 1) -> None:
        logger.info("The solo pool cannot grow; use --pool=threads or prefork to autoscale")

    def shrink(self, n: int = 1) -> None:
        logger.info("The solo pool cannot shrink below its single slot")
