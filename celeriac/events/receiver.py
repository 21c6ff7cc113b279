"""Receiving events: subscribe to the event channel, decode, and hand each event on.

A receiver sees only events sent while it is subscribed (like Celery's auto-delete
``celeryev.<uuid>`` queues), so ``wakeup`` asks every worker for a heartbeat right after
subscribing: a monitor then learns of live workers at once, not after ``freq`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

import orjson

from .dispatcher import EVENT_CHANNEL, LamportClock

__all__ = ["EventReceiver", "decode"]

logger = logging.getLogger(__name__)

Event = dict[str, Any]
Handler = Callable[[Event], Any]


def decode(payload: bytes | str) -> list[Event]:
    """One broadcast payload to its events (one mapping, or a batch list); junk gives []."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        logger.warning("Ignoring an event payload that is not JSON: %r", payload[:200])
        return []
    items = data if isinstance(data, list) else [data]
    events = [e for e in items if isinstance(e, dict) and isinstance(e.get("type"), str)]
    if len(events) != len(items):
        logger.warning("Ignoring %d malformed event(s)", len(items) - len(events))
    return events


class EventReceiver:
    """``EventReceiver(app, handlers={'task-failed': fn, '*': state.event})``.

    Iterate it with ``async for event in receiver``, or call ``capture()`` (sync) /
    ``acapture()`` to feed the handlers. A handler may be a coroutine function.
    """

    def __init__(
        self,
        app: Any,
        handlers: Mapping[str, Handler] | None = None,
        *,
        channel: str = EVENT_CHANNEL,
        clock: LamportClock | None = None,
    ) -> None:
        self.app = app
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.channel = channel
        self.clock = clock or LamportClock()
        #: Set from a handler to end ``capture`` after the current event.
        self.should_stop = False

    def prepare(self, event: Event) -> Event:
        """Adjust our clock and stamp the local arrival time, as Celery's receiver does."""
        clock = event.get("clock")
        if isinstance(clock, int):
            self.clock.adjust(clock)
        event["local_received"] = time.time()
        return event

    def process(self, event: Event) -> Any:
        handler = self.handlers.get(event["type"]) or self.handlers.get("*")
        return handler(event) if handler is not None else None

    @contextlib.asynccontextmanager
    async def stream(self, *, wakeup: bool = False) -> AsyncIterator[AsyncIterator[Event]]:
        """Subscribe; yield an iterator of prepared events until the block is left."""
        conns = await self.app.connection_for_current_loop()
        async with conns.transport.subscribe(self.channel) as payloads:
            if wakeup:
                await self._wakeup()
            events = self._events(payloads)
            try:
                yield events
            finally:
                # A task still iterating (being cancelled) closes the generator itself.
                with contextlib.suppress(RuntimeError):
                    await events.aclose()

    async def _events(self, payloads: AsyncIterator[bytes]) -> AsyncGenerator[Event, None]:
        async for payload in payloads:
            for item in decode(payload):
                yield self.prepare(item)

    async def _wakeup(self) -> None:
        try:
            await self.app.control.abroadcast("heartbeat")
        except Exception as exc:  # a monitor without control still shows events
            logger.debug("Could not ask workers for a heartbeat: %r", exc)

    async def __aiter__(self) -> AsyncIterator[Event]:
        async with self.stream() as events:
            async for item in events:
                yield item

    async def acapture(
        self, limit: int | None = None, timeout: float | None = None, wakeup: bool = True
    ) -> int:
        """Feed events to the handlers until ``limit`` events, ``timeout`` seconds, or
        ``should_stop``; returns how many were handled."""
        count = 0
        self.should_stop = False
        async with self.stream(wakeup=wakeup) as events:
            try:
                async with asyncio.timeout(timeout) as window:
                    async for item in events:
                        result = self.process(item)
                        if inspect.isawaitable(result):
                            await result
                        count += 1
                        if self.should_stop or (limit is not None and count >= limit):
                            break
            except TimeoutError:
                if not window.expired():
                    raise
        return count

    def capture(
        self, limit: int | None = None, timeout: float | None = None, wakeup: bool = True
    ) -> int:
        count: int = self.app.portal.run(self.acapture(limit, timeout, wakeup))
        return count
