"""Sending events: Celery-shaped dicts, batched per loop tick onto one broadcast channel.

Wire format: each broadcast on channel ``celeriac.events`` is orjson bytes of one event
mapping, or of a list of them (Celery 4's ``task.multi`` batch). Every event carries
``type, hostname, clock, timestamp, utcoffset, pid`` plus its own fields (celery-wire
§4.5). Events are best effort, like Celery's transient ``celeryev`` messages: a failed
broadcast is logged and dropped, never retried, so a broker hiccup cannot back up the
worker loop.

Task events can be switched on and off at run time (``task_events``); worker events
(online, heartbeat, offline) always flow while the dispatcher is enabled. Unlike Celery,
a worker started with ``-E`` can still turn task events off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from .. import __version__
from ..transport.base import Transport

__all__ = [
    "EVENT_CHANNEL",
    "SW_IDENT",
    "EventDispatcher",
    "Heart",
    "LamportClock",
    "event",
    "utcoffset",
]

logger = logging.getLogger(__name__)

EVENT_CHANNEL = "celeriac.events"
SW_IDENT = "py-celeriac"
#: Most events in one broadcast payload (Celery flushes its buffer at 24).
BUFFER_LIMIT = 100


class LamportClock:
    """Logical clock: ``forward()`` before sending, ``adjust(other)`` on receipt."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self._lock = threading.Lock()

    def forward(self) -> int:
        with self._lock:
            self.value += 1
            return self.value

    def adjust(self, other: int) -> int:
        with self._lock:
            self.value = max(self.value, other) + 1
            return self.value


def utcoffset() -> int:
    """Hours west of UTC, Celery's sign convention (UTC+2 gives -2)."""
    return -time.localtime().tm_gmtoff // 3600


def event(type: str, **fields: Any) -> dict[str, Any]:
    """A bare event mapping (Celery's ``Event``): the sender adds hostname, clock and pid."""
    return {"type": type, "timestamp": time.time(), **fields}


def _default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return repr(obj)


class EventDispatcher:
    """Buffers events and broadcasts them in batches from the loop that owns ``transport``.

    ``send`` is sync and cheap: with the dispatcher (or the event's group) disabled it
    returns at once; otherwise it appends to a buffer that one flush task drains on the
    next loop tick, so events sent in the same tick share one broadcast.
    """

    def __init__(
        self,
        transport: Transport,
        hostname: str,
        enabled: bool = True,
        *,
        task_events: bool = True,
        channel: str = EVENT_CHANNEL,
        buffer_limit: int = BUFFER_LIMIT,
        clock: LamportClock | None = None,
    ) -> None:
        self.transport = transport
        self.hostname = hostname
        self.enabled = enabled
        self.task_events = task_events
        self.channel = channel
        self.buffer_limit = max(1, buffer_limit)
        self.clock = clock or LamportClock()
        self.pid = os.getpid()
        self.sent = 0
        self._buffer: list[dict[str, Any]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing = False
        with contextlib.suppress(RuntimeError):  # made off-loop: bound on first send
            self._loop = asyncio.get_running_loop()

    def send(self, type: str, **fields: Any) -> None:
        """Queue one event; may be called from any thread."""
        if not self.enabled or (not self.task_events and type.startswith("task-")):
            return
        self._buffer.append(self.build(type, fields))
        self._kick()

    def build(self, type: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **fields,
            "type": type,
            "hostname": self.hostname,
            "clock": self.clock.forward(),
            "timestamp": time.time(),
            "utcoffset": utcoffset(),
            "pid": self.pid,
        }

    def _kick(self) -> None:
        if self._flusher is not None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None:
            self._loop = running
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # no loop yet: the events wait for an explicit flush()
        if running is loop:
            self._flusher = loop.create_task(self._drain())
        else:
            loop.call_soon_threadsafe(self._kick)

    async def _drain(self) -> None:
        try:
            while self._buffer:
                await self.flush()
        finally:
            self._flusher = None

    async def flush(self) -> None:
        """Broadcast everything buffered now, ``buffer_limit`` events per payload."""
        batch, self._buffer = self._buffer, []
        limit = self.buffer_limit
        for start in range(0, len(batch), limit):
            chunk = batch[start : start + limit]
            body = orjson.dumps(
                chunk[0] if len(chunk) == 1 else chunk,
                default=_default,
                option=orjson.OPT_NON_STR_KEYS,
            )
            try:
                await self.transport.broadcast(self.channel, body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._failing:  # once per failure streak, not once per event
                    logger.warning("Could not send %d event(s): %r; dropped", len(chunk), exc)
                self._failing = True
                continue
            self._failing = False
            self.sent += len(chunk)

    async def close(self) -> None:
        """Send what is buffered, then stop sending."""
        flusher = self._flusher
        if flusher is not None and flusher is not asyncio.current_task():
            await asyncio.gather(flusher, return_exceptions=True)
        await self.flush()
        self.enabled = False


class Heart:
    """Worker events: ``worker-online`` at start, a heartbeat every ``interval`` seconds,
    ``worker-offline`` at stop. ``info()`` supplies ``active`` and ``processed``."""

    def __init__(
        self,
        dispatcher: EventDispatcher,
        *,
        interval: float = 2.0,
        info: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.interval = interval
        self.info = info or dict
        self._task: asyncio.Task[None] | None = None

    def fields(self) -> dict[str, Any]:
        try:
            loadavg = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            loadavg = [0.0, 0.0, 0.0]
        return {
            "freq": self.interval,
            "active": 0,
            "processed": 0,
            **self.info(),
            "loadavg": loadavg,
            "sw_ident": SW_IDENT,
            "sw_ver": __version__,
            "sw_sys": platform.system(),
        }

    def beat(self, type: str = "worker-heartbeat") -> None:
        """Send one worker event now (the ``heartbeat`` control command calls this)."""
        self.dispatcher.send(type, **self.fields())

    async def start(self) -> None:
        self.beat("worker-online")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.beat()
            except Exception:  # a failing info() must not stop the heartbeats for good
                logger.exception("Could not build a heartbeat")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.beat("worker-offline")
        await self.dispatcher.flush()
