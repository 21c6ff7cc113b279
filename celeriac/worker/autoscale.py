"""``--autoscale=max,min``: grow the pool under pressure, shrink it after a quiet spell.

Pressure is how many messages the worker holds (running plus reserved). Every
``interval`` the pool grows at once to ``min(pressure, max)``; it shrinks toward
``max(pressure, min)`` only after ``keepalive`` seconds in which pressure stayed below
the pool size, so a bursty queue does not make the pool flap.

The worker's prefetch window should stay at ``max * worker_prefetch_multiplier`` while
autoscaling: pressure can only exceed the pool size if the worker may hold more
messages than it runs, which is what makes growing possible at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

from .pools.base import Pool

__all__ = ["Autoscaler"]

logger = logging.getLogger("celeriac.worker.autoscale")


class Autoscaler:
    def __init__(
        self,
        pool: Pool,
        max_concurrency: int,
        min_concurrency: int = 0,
        *,
        get_pressure: Callable[[], int],
        keepalive: float = 30.0,
        interval: float = 1.0,
        on_resize: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrency < min_concurrency:
            raise ValueError(
                f"--autoscale max ({max_concurrency}) is below min ({min_concurrency})"
            )
        self.pool = pool
        self.max_concurrency = max_concurrency
        self.min_concurrency = max(0, min_concurrency)
        self.get_pressure = get_pressure
        self.keepalive = keepalive
        self.interval = interval
        self.on_resize = on_resize
        self.clock = clock
        self._last_busy = clock()
        self._lock = threading.Lock()  # control commands may arrive from another thread
        self._stuck = False

    @property
    def processes(self) -> int:
        return self.pool.size

    async def run(self, stop: asyncio.Event) -> None:
        """Scale every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.maybe_scale()
            except Exception:  # one bad reading must not end autoscaling
                logger.exception("Autoscaler step failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    def maybe_scale(self) -> int:
        """One step; returns the change in pool size (positive = grew)."""
        with self._lock:
            pressure = max(0, int(self.get_pressure()))
            size = self.processes
            now = self.clock()
            if pressure >= size:
                self._last_busy = now
            if pressure > size and size < self.max_concurrency:
                return self._grow(min(pressure, self.max_concurrency) - size)
            target = max(pressure, self.min_concurrency)
            if size > target and now - self._last_busy >= self.keepalive:
                return self._shrink(size - target)
            return 0

    def update(self, max: int | None = None, min: int | None = None) -> tuple[int, int]:
        """New bounds (the ``autoscale`` control command); the pool follows at once."""
        with self._lock:
            if max is not None:
                if max < self.processes:
                    self._shrink(self.processes - max)
                self.max_concurrency = max
            if min is not None:
                if min > self.processes:
                    self._grow(min - self.processes)
                self.min_concurrency = min
            if self.min_concurrency > self.max_concurrency:
                self.min_concurrency = self.max_concurrency
            return self.max_concurrency, self.min_concurrency

    def force_scale_up(self, n: int) -> None:
        """``pool_grow`` while autoscaling: raise ``max`` if needed, then grow."""
        with self._lock:
            self.max_concurrency = max(self.max_concurrency, self.processes + n)
            self._last_busy = self.clock()
            self._grow(n)

    def force_scale_down(self, n: int) -> None:
        """``pool_shrink`` while autoscaling: lower ``min`` if needed, then shrink."""
        with self._lock:
            n = min(n, self.processes)
            self.min_concurrency = min(self.min_concurrency, self.processes - n)
            self._shrink(n)

    def info(self) -> dict[str, int]:
        """What ``inspect stats`` reports under ``autoscaler`` (Celery's keys)."""
        return {
            "max": self.max_concurrency,
            "min": self.min_concurrency,
            "current": self.processes,
            "qty": max(0, int(self.get_pressure())),
        }

    def _grow(self, n: int) -> int:
        if n <= 0:
            return 0
        before = self.processes
        self.pool.grow(n)
        return self._changed(before, "up")

    def _shrink(self, n: int) -> int:
        if n <= 0:
            return 0
        before = self.processes
        self.pool.shrink(n)
        return self._changed(before, "down")

    def _changed(self, before: int, direction: str) -> int:
        delta = self.processes - before
        if delta == 0:
            if not self._stuck:  # e.g. the solo pool: say so once, not every second
                self._stuck = True
                logger.warning(
                    "The %s pool cannot be resized; --autoscale has no effect", self.pool.kind
                )
            return 0
        logger.info("Scaling %s %s processes.", direction, abs(delta))
        if self.on_resize is not None:
            self.on_resize(self.processes)
        return delta
