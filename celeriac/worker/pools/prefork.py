"""Prefork pool: forked children run the tasks; the parent only moves bytes on the worker loop.

The worker forks after loading the app, so children inherit every task. Parent and child
share a socketpair and exchange length-prefixed pickles (pickle is safe here: both ends
are this process tree). A frame is a 4-byte big-endian length and one pickled *list* of
messages, so everything written to a child in one loop tick costs one ``pickle.dumps``
and one ``send``::

    parent -> child   (JOB, job fields) | (CANCEL, task_id) | (EXIT,)
    child -> parent   (DONE, outcome fields, runtime) | (CANCELLED, task_id) | (BYE,)

``Job`` and ``Outcome`` travel as plain tuples of their fields (in dataclass field order),
not as dataclass instances: pickling a slotted dataclass runs its Python
``__getstate__``/``__setstate__`` per object, which made framing the largest cost of the
pipe on both ends. Anything inside (headers, follow-up ``Outgoing`` messages, a
``ChordJoin``) is pickled as it is. Reads go into one preallocated buffer with
``recv_into``: a fresh 256 KiB ``recv`` costs an mmap/mremap/munmap per call.

A child runs its jobs in the order received. ``bye`` means "I ran nothing after my last
reply and I am exiting" (max_tasks_per_child, max_memory_per_child), so jobs the parent
had already written to it are requeued, not lost.

Throughput: the parent writes frames once per loop tick per child and reads whatever has
arrived in one ``recv``. A child whose queued jobs are all known to be short (per-task-name
average runtime under ``FAST_TASK``) may hold up to ``PIPELINE_DEPTH`` jobs, so it does not
sit idle while the loop is busy; nothing is ever queued behind a slow or unknown task, so
a long task cannot hold up another. Hard limits are timed by the parent from the moment
a job becomes the head of its child's queue.

Death is seen through a pidfd (or EOF on the socket where there are no pidfds); every
child is reaped with ``waitpid`` and replaced unless the pool is shrinking or stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

from ...exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from ._prefork_child import (
    _PROTOCOL,
    _READ_SIZE,
    BYE,
    CANCEL,
    CANCELLED,
    DONE,
    EXIT,
    JOB,
    _ChildLoop,
    _frame,
    _job_fields,
    _Reader,
    _reset_after_fork,
)
from .base import Job, Outcome, Runner

logger = logging.getLogger(__name__)


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"signal {-code} ({name})"
    return f"exitcode {code}"


@dataclass(slots=True, eq=False)
class _Entry:
    job: Job
    fut: asyncio.Future[Outcome]
    fast: bool = False
    timer: asyncio.TimerHandle | None = None
    signum: int = 0  # terminate() sent this signal
    hard: bool = False  # killed for its hard time limit


@dataclass(slots=True, eq=False)
class _Child:
    pid: int
    sock: socket.socket
    pidfd: int
    queue: deque[_Entry] = field(default_factory=deque)  # written, in order; [0] is running
    reader: _Reader = field(default_factory=_Reader)
    outbox: list[tuple[Any, ...]] = field(default_factory=list)  # framed at the next flush
    wbuf: bytearray = field(default_factory=bytearray)  # framed, not yet taken by the kernel
    writing: bool = False
    slow: int = 0  # queued jobs not known to be fast
    sent: int = 0
    accepting: bool = True
    retire: bool = False  # shrink/stop: exit once idle, no replacement
    bye: bool = False
    exit_sent: bool = False
    gone: bool = False


class PreforkPool:
    kind: ClassVar[str] = "prefork"
    PIPELINE_DEPTH: ClassVar[int] = 8
    FAST_TASK: ClassVar[float] = 0.005

    def __init__(
        self,
        runner: Runner,
        concurrency: int,
        *,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
    ) -> None:
        self._runner = runner
        self._target = max(1, concurrency)
        self._max_tasks = max_tasks_per_child or 0
        self._max_memory = max_memory_per_child or 0  # KiB of ru_maxrss
        self._children: dict[int, _Child] = {}
        self._pending: deque[_Entry] = deque()
        self._runtimes: dict[str, float] = {}  # task name -> moving average, seconds
        self._dirty: set[_Child] = set()
        self._flush_handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._empty: asyncio.Future[None] | None = None
        self._rview = memoryview(bytearray(_READ_SIZE))  # every read lands here first

    # -- Pool API ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._target

    def pids(self) -> list[int]:
        return [c.pid for c in self._children.values() if not c.gone]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._balance()

    async def run(self, job: Job) -> Outcome:
        loop = self._loop
        if loop is None:
            raise RuntimeError("PreforkPool.run() called before start()")
        if self._closing:
            return self._runner.lost(job, WorkerLostError("The pool is stopping"))
        entry = _Entry(job, loop.create_future())
        self._pending.append(entry)
        self._dispatch()
        return await entry.fut

    def grow(self, n: int = 1) -> None:
        self._target += max(0, n)
        self._balance()

    def shrink(self, n: int = 1) -> None:
        """Retire ``n`` children: idle ones now, busy ones after the jobs they hold."""
        count = min(max(0, n), self._target)
        self._target -= count
        live = [c for c in self._children.values() if not c.retire and not c.gone]
        live.sort(key=lambda c: len(c.queue))
        for child in live[:count]:
            self._retire(child)

    def terminate(self, task_id: str, signum: int) -> bool:
        for child in self._children.values():
            for index, entry in enumerate(child.queue):
                if entry.job.task_id != task_id:
                    continue
                entry.signum = signum
                if index == 0:
                    logger.info("Terminating %s in process %d (%d)", task_id, child.pid, signum)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signum)
                else:  # written to the child but not started: it skips the job
                    self._write(child, (CANCEL, task_id))
                return True
        for entry in self._pending:
            if entry.job.task_id == task_id and not entry.fut.done():
                self._pending.remove(entry)
                entry.fut.set_result(self._runner.lost(entry.job, Terminated(signum)))
                return True
        return False

    async def stop(self, *, graceful: bool) -> None:
        loop = self._loop or asyncio.get_running_loop()
        if graceful:
            waiting = [e.fut for e in self._entries() if not e.fut.done()]
            if waiting:
                await asyncio.wait(waiting)
        self._closing = True
        lost = WorkerLostError("Worker stopped before the task started")
        while self._pending:
            entry = self._pending.popleft()
            if not entry.fut.done():
                entry.fut.set_result(self._runner.lost(entry.job, lost))
        for child in list(self._children.values()):
            if graceful:
                self._retire(child)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
        if self._children:
            self._empty = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._empty), 10.0)
            except TimeoutError:
                logger.warning("Pool children did not exit in time; killing them")
                for child in list(self._children.values()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
                await self._empty
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    # -- children ---------------------------------------------------------------------

    def _entries(self) -> list[_Entry]:
        return [*self._pending, *(e for c in self._children.values() for e in c.queue)]

    def _balance(self) -> None:
        if self._loop is None or self._closing:
            return
        live = sum(1 for c in self._children.values() if not c.retire)
        for _ in range(self._target - live):
            self._spawn()
        self._dispatch()

    def _spawn(self) -> None:
        loop = self._loop
        assert loop is not None
        parent_sock, child_sock = socket.socketpair()
        for stream in (sys.stdout, sys.stderr):  # else buffered output is written twice
            with contextlib.suppress(Exception):
                stream.flush()
        with warnings.catch_warnings():  # 3.12+ warns about forking with threads; we only
            warnings.simplefilter("ignore", DeprecationWarning)  # run the runner in the child
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            parent_sock.close()
            self._child_main(child_sock)
        child_sock.close()
        parent_sock.setblocking(False)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = -1
        child = _Child(pid, parent_sock, pidfd)
        self._children[pid] = child
        loop.add_reader(parent_sock.fileno(), self._on_readable, child)
        if pidfd >= 0:
            loop.add_reader(pidfd, self._check_exit, child)
        logger.debug("Started pool process %d", pid)

    def _retire(self, child: _Child) -> None:
        child.accepting = False
        child.retire = True
        if not child.queue:
            self._send_exit(child)

    def _send_exit(self, child: _Child) -> None:
        if not (child.exit_sent or child.bye or child.gone):
            child.exit_sent = True
            self._write(child, (EXIT,))

    # -- jobs -------------------------------------------------------------------------

    def _is_fast(self, name: str) -> bool:
        average = self._runtimes.get(name)
        return average is not None and average < self.FAST_TASK

    def _pick(self) -> _Child | None:
        best: _Child | None = None
        for child in self._children.values():
            if not child.accepting or child.gone:
                continue
            held = len(child.queue)
            if held == 0:
                return child
            pipelined = child.slow == 0 and held < self.PIPELINE_DEPTH  # see module docstring
            if pipelined and (best is None or held < len(best.queue)):
                best = child
        return best

    def _dispatch(self) -> None:
        while self._pending:
            if self._pending[0].fut.done():  # the caller gave up while it waited
                self._pending.popleft()
                continue
            child = self._pick()
            if child is None:
                return
            entry = self._pending.popleft()
            entry.fast = self._is_fast(entry.job.name)
            child.slow += not entry.fast
            child.queue.append(entry)
            child.sent += 1
            if self._max_tasks and child.sent >= self._max_tasks:
                child.accepting = False  # it exits by itself after this job
            self._write(child, (JOB, _job_fields(entry.job)))
            if len(child.queue) == 1:
                self._arm(child)

    def _arm(self, child: _Child) -> None:
        head = child.queue[0]
        if head.job.time_limit and self._loop is not None:
            head.timer = self._loop.call_later(head.job.time_limit, self._hard_kill, child, head)

    def _hard_kill(self, child: _Child, entry: _Entry) -> None:
        if child.gone or not child.queue or child.queue[0] is not entry:
            return
        job = entry.job
        msg = "Hard time limit (%ss) exceeded for %s[%s] pid:%d"
        logger.error(msg, job.time_limit, job.name, job.task_id, child.pid)
        entry.hard = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)

    def _take(self, child: _Child, task_id: str) -> _Entry | None:
        """Remove the entry for ``task_id`` (normally the head) from ``child``'s queue."""
        for index, entry in enumerate(child.queue):
            if entry.job.task_id == task_id:
                del child.queue[index]
                child.slow -= not entry.fast
                if entry.timer is not None:
                    entry.timer.cancel()
                if index == 0 and child.queue and not child.gone:
                    self._arm(child)
                return entry
        logger.warning("Process %d replied for unknown task %s", child.pid, task_id)
        return None

    def _handle(self, child: _Child, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == DONE:
            outcome, runtime = Outcome(*message[1]), message[2]
            entry = self._take(child, outcome.task_id)
            if entry is not None:
                name = entry.job.name
                average = self._runtimes.get(name)
                self._runtimes[name] = runtime if average is None else 0.7 * average + 0.3 * runtime
                if not entry.fut.done():
                    entry.fut.set_result(outcome)
        elif kind == CANCELLED:
            entry = self._take(child, message[1])
            if entry is not None and not entry.fut.done():
                exc = Terminated(entry.signum)
                entry.fut.set_result(self._runner.lost(entry.job, exc))
        elif kind == BYE:
            child.bye = True
            child.accepting = False

    def _after_reply(self, child: _Child) -> None:
        if child.retire and not child.queue:
            self._send_exit(child)
        self._dispatch()

    # -- I/O --------------------------------------------------------------------------

    def _write(self, child: _Child, message: tuple[Any, ...]) -> None:
        child.outbox.append(message)
        self._dirty.add(child)
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, set()
        for child in dirty:
            self._send(child)

    def _send(self, child: _Child) -> None:
        if child.gone:
            return
        if child.outbox:
            self._encode(child)
        try:
            sent = child.sock.send(child.wbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the child is dying; its exit handler settles its jobs
            child.wbuf.clear()
            sent = 0
        del child.wbuf[:sent]
        if child.wbuf and not child.writing:
            assert self._loop is not None
            self._loop.add_writer(child.sock.fileno(), self._send, child)
            child.writing = True
        elif not child.wbuf and child.writing:
            assert self._loop is not None
            self._loop.remove_writer(child.sock.fileno())
            child.writing = False

    def _encode(self, child: _Child) -> None:
        outbox, child.outbox = child.outbox, []
        try:
            child.wbuf += _frame(outbox)
            return
        except Exception:  # something in a job does not pickle: fail that job alone
            pass
        good, failed = [], False
        for message in outbox:
            try:
                pickle.dumps(message, protocol=_PROTOCOL)
            except Exception as exc:  # only a job holds user values; task_id comes first
                entry = self._take(child, message[1][0]) if message[0] == JOB else None
                if entry is not None and not entry.fut.done():
                    entry.fut.set_result(self._runner.lost(entry.job, exc))
                failed = True
            else:
                good.append(message)
        if good:
            child.wbuf += _frame(good)
        if failed:  # its slot is free again
            self._after_reply(child)

    def _on_readable(self, child: _Child) -> None:
        try:
            n = child.sock.recv_into(self._rview)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            assert self._loop is not None
            self._loop.remove_reader(child.sock.fileno())
            self._check_exit(child)
            return
        for message in child.reader.feed(self._rview, n):
            self._handle(child, message)
        self._after_reply(child)

    def _check_exit(self, child: _Child) -> None:
        if child.gone:
            return
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere; we cannot know how it ended
            pid, status = child.pid, 0
        if pid == 0:
            if child.pidfd >= 0:
                return  # EOF came first; the pidfd reports the exit
            pid, status = os.waitpid(child.pid, 0)
        self._finalize(child, status)

    def _finalize(self, child: _Child, status: int) -> None:
        loop = self._loop
        assert loop is not None
        messages: list[tuple[Any, ...]] = []
        while True:  # replies written before it died
            try:
                n = child.sock.recv_into(self._rview)
            except OSError:
                break
            if not n:
                break
            messages += child.reader.feed(self._rview, n)
        child.gone = True
        for message in messages:
            self._handle(child, message)
        fd = child.sock.fileno()
        loop.remove_reader(fd)
        if child.writing:
            loop.remove_writer(fd)
        child.sock.close()
        if child.pidfd >= 0:
            loop.remove_reader(child.pidfd)
            os.close(child.pidfd)
        del self._children[child.pid]
        self._dirty.discard(child)
        self._settle_orphans(child, status)
        expected = child.bye or child.exit_sent or self._closing
        if not expected or os.waitstatus_to_exitcode(status) != 0:
            level = logging.DEBUG if self._closing else logging.ERROR
            logger.log(level, "Pool process %d exited: %s", child.pid, _describe(status))
        if self._empty is not None and not self._children and not self._empty.done():
            self._empty.set_result(None)
        self._balance()

    def _settle_orphans(self, child: _Child, status: int) -> None:
        """Resolve the job that was running when ``child`` died; requeue the unstarted."""
        queue = list(child.queue)
        child.queue.clear()
        if not queue:
            return
        if not child.bye:
            head = queue.pop(0)
            if head.timer is not None:
                head.timer.cancel()
            exc: BaseException
            if head.hard:
                exc = TimeLimitExceeded(head.job.time_limit)
            elif head.signum:
                exc = Terminated(head.signum)
            else:
                exc = WorkerLostError(
                    f"Worker exited prematurely: {_describe(status)} Job: {head.job.task_id}"
                )
            if not head.fut.done():
                head.fut.set_result(self._runner.lost(head.job, exc))
        for entry in reversed(queue):
            if entry.timer is not None:
                entry.timer.cancel()
            if entry.fut.done():
                continue
            if entry.signum:
                entry.fut.set_result(self._runner.lost(entry.job, Terminated(entry.signum)))
            elif self._closing:
                lost = WorkerLostError("Worker stopped before the task started")
                entry.fut.set_result(self._runner.lost(entry.job, lost))
            else:
                entry.timer, entry.fast = None, False
                self._pending.appendleft(entry)

    # -- child side -------------------------------------------------------------------

    def _child_main(self, sock: socket.socket) -> NoReturn:  # pragma: no cover - in the child
        code = 1
        try:
            siblings = [(c.sock, c.pidfd) for c in self._children.values()]
            _reset_after_fork(siblings)
            code = _ChildLoop(sock, self._runner, self._max_tasks, self._max_memory).run()
        except (BrokenPipeError, ConnectionResetError):  # the parent is gone
            code = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                logger.exception("Pool process %d crashed", os.getpid())
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(BaseException):
                    stream.flush()
            os._exit(code)
