"""Thread pool: sync tasks on OS threads, with soft and hard time limits.

A thread cannot be killed. The soft limit is raised inside the running thread with
``PyThreadState_SetAsyncExc``; like any asynchronous exception it lands at the next
bytecode, so a task blocked in C (``time.sleep``, a socket read) only sees it when that
call returns. The hard limit therefore reports the job lost, leaves its thread to finish in
the background and gives the slot to a fresh thread, so capacity stays the same.

``SlotPool`` (jobs wait in the pool until one of ``size`` slots frees) is shared with the
solo and asyncio pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import ClassVar

from ...exceptions import SoftTimeLimitExceeded, Terminated, TimeLimitExceeded, WorkerLostError
from .base import Job, Outcome, Runner

logger = logging.getLogger(__name__)

_QUEUED, _RUNNING, _DONE = 0, 1, 2


def async_raise(ident: int, exc: type[BaseException] | None) -> bool:
    """Raise ``exc`` in thread ``ident`` at its next bytecode; ``None`` clears a pending one."""
    arg = ctypes.py_object(exc) if exc is not None else None
    return bool(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), arg))


class _Entry:
    """One job inside a pool, from ``run()`` until its future is resolved."""

    __slots__ = ("fut", "hard", "ident", "job", "pending_exc", "raised", "soft", "state", "task")

    def __init__(self, job: Job, fut: asyncio.Future[Outcome]) -> None:
        self.job = job
        self.fut = fut
        self.state = _QUEUED
        self.ident = 0
        self.pending_exc: type[BaseException] | None = None  # fired before the thread started
        self.raised = False
        self.soft: asyncio.TimerHandle | None = None
        self.hard: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[Outcome] | None = None


class SlotPool:
    """Jobs queue here until one of ``size`` slots is free; subclasses start them."""

    kind: ClassVar[str] = "slots"

    def __init__(self, runner: Runner, concurrency: int) -> None:
        self._runner = runner
        self._capacity = max(1, concurrency)
        self._busy = 0
        self._pending: deque[_Entry] = deque()
        self._running: set[_Entry] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = os.getpid()

    @property
    def size(self) -> int:
        return self._capacity

    def pids(self) -> list[int]:
        return [self._pid]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def run(self, job: Job) -> Outcome:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        entry = _Entry(job, self._loop.create_future())
        self._pending.append(entry)
        self._dispatch()
        return await entry.fut

    def grow(self, n: int = 1) -> None:
        self._capacity += max(0, n)
        self._dispatch()

    def shrink(self, n: int = 1) -> None:
        """Fewer slots; running jobs finish, and their slots are not refilled."""
        self._capacity = max(0, self._capacity - max(0, n))

    def terminate(self, task_id: str, signum: int) -> bool:
        for entry in self._pending:
            if entry.job.task_id == task_id and not entry.fut.done():
                self._pending.remove(entry)
                entry.fut.set_result(self._runner.lost(entry.job, Terminated(signum)))
                return True
        for entry in self._running:
            if entry.job.task_id == task_id:
                self._interrupt(entry, signum)
                return True
        return False

    async def stop(self, *, graceful: bool) -> None:
        if graceful:
            waiting = [e.fut for e in (*self._pending, *self._running) if not e.fut.done()]
            if waiting:
                await asyncio.wait(waiting)
        else:
            lost = WorkerLostError("Worker stopped before the task finished")
            while self._pending:
                entry = self._pending.popleft()
                if not entry.fut.done():
                    entry.fut.set_result(self._runner.lost(entry.job, lost))
            for entry in list(self._running):
                self._abandon(entry)
                self._finish(entry, self._runner.lost(entry.job, lost))
        self._close()

    # -- hooks ------------------------------------------------------------------------

    def _start(self, entry: _Entry) -> None:
        raise NotImplementedError

    def _interrupt(self, entry: _Entry, signum: int) -> None:
        """Best effort: make a running job stop (terminate)."""

    def _abandon(self, entry: _Entry) -> None:
        """A running job's outcome is no longer wanted (cold stop)."""

    def _close(self) -> None:
        """Release threads after stop."""

    # -- slots ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self._pending and self._busy < self._capacity:
            entry = self._pending.popleft()
            if entry.fut.done():  # the caller gave up while it waited
                continue
            self._busy += 1
            self._running.add(entry)
            self._start(entry)

    def _finish(self, entry: _Entry, outcome: Outcome) -> None:
        """Free the slot held by ``entry`` (once) and hand back its outcome."""
        if entry not in self._running:
            return
        self._running.discard(entry)
        self._busy -= 1
        for handle in (entry.soft, entry.hard):
            if handle is not None:
                handle.cancel()
        if not entry.fut.done():
            outcome.worker_pid = outcome.worker_pid or self._pid
            entry.fut.set_result(outcome)
        self._dispatch()


class _Threads:
    """Daemon threads fed from one queue; a new thread starts only when none is idle."""

    def __init__(self, work: Callable[[_Entry], None], name: str) -> None:
        self._work = work
        self._name = name
        self._queue: queue.SimpleQueue[_Entry | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self.threads: set[threading.Thread] = set()

    def submit(self, entry: _Entry) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._queue.put(entry)
        if spawn:
            thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            with self._lock:
                self.threads.add(thread)
            thread.start()

    def retire_idle(self, n: int) -> None:
        with self._lock:
            count = min(n, self._idle)
            self._idle -= count
        for _ in range(count):
            self._queue.put(None)

    def retire_all(self) -> None:
        """One exit marker per thread: idle ones leave now, busy ones after their job."""
        with self._lock:
            count = len(self.threads)
            self._idle = 0
        for _ in range(count):
            self._queue.put(None)

    def _main(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                break
            try:
                self._work(entry)
            except BaseException:
                logger.exception("Thread pool worker failed")
            with self._lock:
                self._idle += 1
        with self._lock:
            self.threads.discard(threading.current_thread())


class ThreadPool(SlotPool):
    kind: ClassVar[str] = "threads"

    def __init__(self, runner: Runner, concurrency: int) -> None:
        super().__init__(runner, concurrency)
        self._lock = threading.Lock()  # orders async exceptions against a job's start and end
        self._threads = _Threads(self._work, f"celeriac-{self.kind}")
        self._stuck: set[_Entry] = set()  # past the hard limit, still running

    def shrink(self, n: int = 1) -> None:
        super().shrink(n)
        self._threads.retire_idle(n)

    def _start(self, entry: _Entry) -> None:
        loop, job = self._loop, entry.job
        assert loop is not None
        if job.soft_time_limit:
            entry.soft = loop.call_later(
                job.soft_time_limit, self._raise_in, entry, SoftTimeLimitExceeded
            )
        if job.time_limit:
            entry.hard = loop.call_later(job.time_limit, self._hard_limit, entry)
        self._threads.submit(entry)

    def _raise_in(self, entry: _Entry, exc: type[BaseException]) -> None:
        with self._lock:
            if entry.state == _RUNNING:
                entry.raised = async_raise(entry.ident, exc) or entry.raised
            elif entry.state == _QUEUED:
                entry.pending_exc = exc

    def _interrupt(self, entry: _Entry, signum: int) -> None:
        job = entry.job
        logger.info("Terminating task %s[%s] (signal %d)", job.name, job.task_id, signum)
        self._raise_in(entry, Terminated)

    def _hard_limit(self, entry: _Entry) -> None:
        if entry not in self._running:
            return
        limit = entry.job.time_limit
        logger.error(
            "Hard time limit (%ss) exceeded for %s[%s]; a thread cannot be killed, so it "
            "keeps running in the background and a new thread takes its slot",
            limit,
            entry.job.name,
            entry.job.task_id,
        )
        self._stuck.add(entry)
        self._raise_in(entry, TimeLimitExceeded)  # stops it if it is running Python code
        self._finish(entry, self._runner.lost(entry.job, TimeLimitExceeded(limit)))

    def _abandon(self, entry: _Entry) -> None:
        self._stuck.add(entry)

    def _work(self, entry: _Entry) -> None:
        """Runs in a pool thread."""
        with self._lock:
            entry.ident = threading.get_ident()
            entry.state = _RUNNING
            if entry.pending_exc is not None:
                entry.raised = async_raise(entry.ident, entry.pending_exc)
        outcome: Outcome | None = None
        error: BaseException | None = None
        try:
            outcome = self._runner.execute(entry.job)
        except BaseException as exc:  # escaped the runner: a limit landing after the task
            error = exc
        while True:
            try:
                with self._lock:
                    entry.state = _DONE
                    if entry.raised:
                        async_raise(entry.ident, None)
                break
            except BaseException as exc:  # delivered between the task's end and here
                error = error or exc
        if outcome is None:
            outcome = self._runner.lost(entry.job, error or WorkerLostError("no outcome"))
        loop = self._loop
        assert loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: the worker is gone
            loop.call_soon_threadsafe(self._done, entry, outcome)

    def _done(self, entry: _Entry, outcome: Outcome) -> None:
        self._stuck.discard(entry)
        self._finish(entry, outcome)

    def _close(self) -> None:
        self._threads.retire_all()
        stuck = {entry.ident for entry in self._stuck}
        deadline = time.monotonic() + 2.0
        for thread in list(self._threads.threads):
            if thread.ident not in stuck and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
