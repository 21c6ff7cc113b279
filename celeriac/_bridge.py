"""The one way sync code runs celeriac's async I/O.

A thread with no running loop runs the coroutine on a loop it owns (made on first use,
kept for the thread's life), so ``task.delay()`` from a plain thread pays no thread
hop. Such a loop only runs inside calls, so whatever it has written without waiting for
a reply (see :meth:`Portal.flush_before_close`) is flushed before it closes at exit. A
worker lends its loop with :meth:`Portal.adopt`; the worker's pool threads then send
coroutines to it, sharing the worker's connections. A thread that already runs a
loop (an ``async def`` task calling sync ``.delay()``) cannot block on it, so it hops to
a private fallback loop thread. After fork, everything inherited is dropped unclosed:
closing would end the parent's sessions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger(__name__)


class _ThreadLoop(threading.local):
    loop: asyncio.AbstractEventLoop | None = None


class Flushable(Protocol):
    async def flush(self) -> None: ...


#: Per thread loop: what must be flushed before it closes (writes not yet confirmed).
_flush: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakSet[Any]] = (
    weakref.WeakKeyDictionary()
)
FLUSH_TIMEOUT = 10.0


def _close_loop(loop: asyncio.AbstractEventLoop, pid: int) -> None:
    if pid == os.getpid() and not loop.is_closed() and not loop.is_running():
        for obj in list(_flush.pop(loop, ())):
            try:
                loop.run_until_complete(asyncio.wait_for(obj.flush(), FLUSH_TIMEOUT))
            except Exception as exc:  # at exit there is no caller left to raise to
                logger.error("could not flush %r before exit: %s", obj, exc)
        with contextlib.suppress(Exception):  # best effort at thread exit
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class Portal:
    """Run coroutines from sync code on the right loop for the calling thread."""

    def __init__(self) -> None:
        self._local = _ThreadLoop()
        self._adopted: asyncio.AbstractEventLoop | None = None
        self._adopted_thread: int | None = None
        self._fallback: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._warned = False

    def adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Lend ``loop`` (the worker's) to sync callers on other threads."""
        self._adopted = loop
        self._adopted_thread = threading.get_ident()

    def release(self) -> None:
        self._adopted = None
        self._adopted_thread = None

    def run(self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        adopted = self._adopted
        if running is None and adopted is not None and not adopted.is_closed():
            return self._hop(adopted, coro, timeout)
        if running is not None:
            if not self._warned:
                self._warned = True
                logger.info(
                    "A sync celeriac call was made inside a running event loop; it runs on a "
                    "helper thread. In async code, await the a-prefixed twin instead "
                    "(adelay, aapply_async, aget)."
                )
            return self._hop(self._fallback_loop(), coro, timeout)
        loop = self._local.loop
        if loop is None or loop.is_closed():
            loop = asyncio.new_event_loop()
            self._local.loop = loop
            weakref.finalize(self._local, _close_loop, loop, os.getpid())
        if timeout is not None:
            return loop.run_until_complete(asyncio.wait_for(coro, timeout))
        return loop.run_until_complete(coro)

    def thread_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._local.loop

    @staticmethod
    def flush_before_close(loop: asyncio.AbstractEventLoop, obj: Flushable) -> None:
        """``await obj.flush()`` on ``loop`` before it is closed at exit (held weakly)."""
        _flush.setdefault(loop, weakref.WeakSet()).add(obj)

    @staticmethod
    def _hop(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float | None
    ) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def _fallback_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._fallback is None or self._fallback.is_closed():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=serve, name="celeriac-portal", daemon=True).start()
                ready.wait()
                self._fallback = loop
            return self._fallback

    def _forget(self) -> None:
        """After fork: drop inherited loops and threads without closing anything."""
        self._local = _ThreadLoop()
        self._adopted = None
        self._adopted_thread = None
        self._fallback = None
        self._lock = threading.Lock()


portal = Portal()
os.register_at_fork(after_in_child=portal._forget)


def blocking(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Make a sync twin of an async function that runs through the portal."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return portal.run(fn(*args, **kwargs))

    return wrapper
