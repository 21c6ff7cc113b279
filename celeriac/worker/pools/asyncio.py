"""Asyncio pool: ``async def`` tasks run natively on the worker loop, sync ones on threads.

Each async job is its own ``asyncio.Task`` so ``terminate`` can cancel it without touching
the worker's coroutine that awaits ``run()``. Time limits of async jobs are applied by
``runner.aexecute``; sync jobs get the thread pool's soft and hard limits.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import ClassVar

from ...exceptions import Terminated, WorkerLostError
from .base import Job, Outcome, Runner
from .threads import SlotPool, ThreadPool, _Entry

logger = logging.getLogger(__name__)


class _TaskSlots(SlotPool):
    """Async jobs as tasks on the running loop, at most ``size`` at once."""

    kind: ClassVar[str] = "asyncio-tasks"

    def __init__(self, runner: Runner, concurrency: int) -> None:
        super().__init__(runner, concurrency)
        self._signals: dict[_Entry, int] = {}

    def _start(self, entry: _Entry) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._runner.aexecute(entry.job))
        entry.task = task
        task.add_done_callback(lambda t: self._done(entry, t))

    def _done(self, entry: _Entry, task: asyncio.Task[Outcome]) -> None:
        signum = self._signals.pop(entry, 0)
        if task.cancelled():
            exc: BaseException = (
                Terminated(signum) if signum else WorkerLostError("The task was cancelled")
            )
            outcome = self._runner.lost(entry.job, exc)
        elif (error := task.exception()) is not None:
            outcome = self._runner.lost(entry.job, error)
        else:
            outcome = task.result()
        self._finish(entry, outcome)

    def _interrupt(self, entry: _Entry, signum: int) -> None:
        if entry.task is not None:
            logger.info("Cancelling task %s[%s]", entry.job.name, entry.job.task_id)
            self._signals[entry] = signum
            entry.task.cancel()

    def _abandon(self, entry: _Entry) -> None:
        if entry.task is not None:
            entry.task.cancel()


class AsyncioPool:
    kind: ClassVar[str] = "asyncio"

    def __init__(self, runner: Runner, concurrency: int) -> None:
        self._tasks = _TaskSlots(runner, concurrency)
        self._threads = ThreadPool(runner, concurrency)

    @property
    def size(self) -> int:
        return self._tasks.size

    def pids(self) -> list[int]:
        return [os.getpid()]

    async def start(self) -> None:
        await self._tasks.start()
        await self._threads.start()

    async def run(self, job: Job) -> Outcome:
        if job.is_async:
            return await self._tasks.run(job)
        return await self._threads.run(job)

    def grow(self, n: int = 1) -> None:
        self._tasks.grow(n)
        self._threads.grow(n)

    def shrink(self, n: int = 1) -> None:
        self._tasks.shrink(n)
        self._threads.shrink(n)

    def terminate(self, task_id: str, signum: int) -> bool:
        return self._tasks.terminate(task_id, signum) or self._threads.terminate(task_id, signum)

    async def stop(self, *, graceful: bool) -> None:
        await asyncio.gather(
            self._tasks.stop(graceful=graceful), self._threads.stop(graceful=graceful)
        )
