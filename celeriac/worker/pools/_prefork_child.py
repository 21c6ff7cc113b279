"""The child side of the prefork pool, and the frame format both ends speak.

See ``prefork.py`` for the protocol and the reasons behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import operator
import os
import pickle
import resource
import signal
import socket
import struct
import time
import warnings
from collections import deque
from types import FrameType
from typing import Any

from ...exceptions import SoftTimeLimitExceeded
from .base import Job, Outcome, Runner

logger = logging.getLogger("celeriac.worker.pools.prefork")

_LENGTH = struct.Struct("!I")
_HEADER = _LENGTH.size
_READ_SIZE = 1 << 18
_PROTOCOL = pickle.HIGHEST_PROTOCOL

JOB, CANCEL, EXIT = 0, 1, 2  # parent -> child
DONE, CANCELLED, BYE = 0, 1, 2  # child -> parent

_job_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(Job)))
_outcome_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(Outcome)))


def _frame(messages: list[tuple[Any, ...]]) -> bytes:
    data = pickle.dumps(messages, protocol=_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def _decode(buf: memoryview | bytearray, out: list[tuple[Any, ...]]) -> int:
    """Append the messages of every complete frame at the front of ``buf``; return bytes used."""
    pos, end = 0, len(buf)
    while end - pos >= _HEADER:
        stop = pos + _HEADER + _LENGTH.unpack_from(buf, pos)[0]
        if stop > end:
            break
        out.extend(pickle.loads(buf[pos + _HEADER : stop]))
        pos = stop
    return pos


class _Reader:
    """Frames arriving on one socket; ``feed`` takes the ``n`` bytes just read into ``view``."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = bytearray()  # the start of a frame that has not fully arrived

    def feed(self, view: memoryview, n: int) -> list[tuple[Any, ...]]:
        messages: list[tuple[Any, ...]] = []
        if self.pending:  # rare: a frame larger than one read, or split by the kernel
            self.pending += view[:n]
            del self.pending[: _decode(self.pending, messages)]
        else:
            used = _decode(view[:n], messages)
            if used < n:
                self.pending += view[used:n]
        return messages


def _reset_after_fork(siblings: list[tuple[socket.socket, int]]) -> None:
    """Drop what the child inherited from the parent's loop and signal setup."""
    signal.set_wakeup_fd(-1)  # else our signals would wake the parent's loop
    for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD"):
        signal.signal(signal.Signals[name], signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    asyncio.events._set_running_loop(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop(None)
    for sock, pidfd in siblings:
        with contextlib.suppress(OSError):
            os.close(sock.fileno())
        if pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(pidfd)


class _ChildLoop:
    """The child: read jobs, run them in order, reply; exit on request or at a limit."""

    def __init__(
        self, sock: socket.socket, runner: Runner, max_tasks: int, max_memory: int
    ) -> None:
        self.sock = sock
        self.runner = runner
        self.max_tasks = max_tasks
        self.max_memory = max_memory
        self.view = memoryview(bytearray(_READ_SIZE))
        self.reader = _Reader()
        self.jobs: deque[Job] = deque()
        self.cancelled: set[str] = set()
        self.exiting = False
        self.armed = False
        self.pid = os.getpid()

    def run(self) -> int:
        signal.signal(signal.SIGALRM, self._on_alarm)
        done = 0
        jobs = self.jobs
        while True:
            if not self._read(block=not jobs):
                return 0  # the parent is gone
            if not jobs:
                if self.exiting:
                    return 0
                continue
            job = jobs.popleft()
            if job.task_id in self.cancelled:
                self.cancelled.discard(job.task_id)
                self._reply((CANCELLED, job.task_id))
                continue
            outcome, runtime = self._execute(job)
            try:
                frame = _frame([(DONE, _outcome_fields(outcome), runtime)])
            except Exception as exc:  # something in the outcome does not pickle
                lost = _outcome_fields(self.runner.lost(job, exc))
                frame = _frame([(DONE, lost, runtime)])
            self.sock.sendall(frame)
            done += 1
            if (self.max_tasks and done >= self.max_tasks) or self._over_memory():
                self._reply((BYE,))
                return 0

    def _read(self, *, block: bool) -> bool:
        """Take frames off the socket; wait for at least one when ``block``."""
        while True:
            try:
                n = self.sock.recv_into(self.view, 0, 0 if block else socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            if not n:
                return False
            messages = self.reader.feed(self.view, n)
            for message in messages:
                kind = message[0]
                if kind == JOB:
                    self.jobs.append(Job(*message[1]))
                elif kind == CANCEL:
                    if any(job.task_id == message[1] for job in self.jobs):
                        self.cancelled.add(message[1])
                elif kind == EXIT:
                    self.exiting = True
            if messages or not block:
                return True

    def _reply(self, message: tuple[Any, ...]) -> None:
        self.sock.sendall(_frame([message]))

    def _execute(self, job: Job) -> tuple[Outcome, float]:
        started = time.perf_counter()
        soft = job.soft_time_limit
        try:
            try:
                if soft:
                    self.armed = True
                    signal.setitimer(signal.ITIMER_REAL, soft)
                outcome = self.runner.execute(job)
            finally:
                if soft:
                    self.armed = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as exc:  # a runner bug, or the alarm landing after the task
            outcome = self.runner.lost(job, exc)
        outcome.worker_pid = self.pid
        return outcome, time.perf_counter() - started

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False
            raise SoftTimeLimitExceeded()

    def _over_memory(self) -> bool:
        if not self.max_memory:
            return False
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if rss > self.max_memory:
            msg = "Pool process %d reached %d KiB (limit %d KiB); replacing it"
            logger.warning(msg, os.getpid(), rss, self.max_memory)
            return True
        return False
