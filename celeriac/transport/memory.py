"""In-process broker: for tests, notebooks and ``task_always_eager``-free local runs.

Every transport in this process with the same URL (``memory://`` or ``memory://name``)
shares one :class:`_Broker`, whatever event loop or thread it runs on: a sync producer
thread owns its own loop while the worker runs another. So the state is module-level,
guarded by a ``threading.Lock``, and a consumer on another loop is woken with
``loop.call_soon_threadsafe(event.set)``.

Storage layout (per broker, all in memory):

* ``queues[name].ready``: heap of ``(-priority, seq, _Msg)``; higher priority first,
  FIFO within a priority because ``seq`` only grows.
* ``queues[name].delayed``: heap of ``(not_before, seq, _Msg)``; moved to ``ready``
  when due, so nothing is handed out early.
* ``bindings``: set of :class:`~._bindings.Binding`.
* ``locks[name] = (owner, expires)`` with wall-clock expiry.
* leases live in each consumer's ``unacked`` dict (tag -> ``(queue, _Msg)``); leaving
  the consumer context puts them back flagged ``redelivered``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from . import _bindings
from .base import (
    Consumer,
    Delivery,
    Envelope,
    Features,
    Outgoing,
    QueueSpec,
    Transport,
    TransportError,
    clamp_priority,
    dead_letter_name,
    with_dead_reason,
)

__all__ = ["MemoryTransport", "Waker", "reset"]

logger = logging.getLogger(__name__)

#: A subscriber that falls this far behind loses the oldest payloads (logged once).
SUBSCRIBER_BUFFER = 10_000


@dataclass(slots=True)
class _Msg:
    envelope: Envelope
    exchange: str
    routing_key: str
    priority: int
    seq: int
    redelivered: bool = False


@dataclass(slots=True)
class _Queue:
    ready: list[tuple[int, int, _Msg]] = field(default_factory=list)
    delayed: list[tuple[float, int, _Msg]] = field(default_factory=list)

    def promote(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            _, seq, msg = heapq.heappop(self.delayed)
            heapq.heappush(self.ready, (-msg.priority, seq, msg))

    def put(self, msg: _Msg, not_before: float | None = None) -> None:
        if not_before is not None and not_before > time.time():
            heapq.heappush(self.delayed, (not_before, msg.seq, msg))
        else:
            heapq.heappush(self.ready, (-msg.priority, msg.seq, msg))


class Waker:
    """An asyncio.Event owned by one loop that any thread may set (sqlite uses it too)."""

    __slots__ = ("event", "fired", "loop")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.fired = False

    def wake(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.event.set()
            return
        with suppress(RuntimeError):  # that loop is closed; its consumer is gone
            self.loop.call_soon_threadsafe(self.event.set)

    async def nap(self, timeout: float | None) -> bool:
        """Sleep until woken or ``timeout`` passes; true if something woke us."""
        if timeout is None:
            await self.event.wait()
            self.event.clear()
            return True
        self.fired = False
        handle = self.loop.call_later(max(timeout, 0.0), self._alarm)
        try:
            await self.event.wait()
        finally:
            handle.cancel()
        self.event.clear()
        return not self.fired

    def _alarm(self) -> None:
        self.fired = True
        self.event.set()


class _Broker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seq = itertools.count()
        self.queues: dict[str, _Queue] = {}
        self.bindings: set[_bindings.Binding] = set()
        self.locks: dict[str, tuple[str, float]] = {}
        self.waiters: dict[Waker, set[str]] = {}
        self.subscribers: dict[str, set[_Subscriber]] = {}

    def clear(self) -> None:
        with self.lock:
            self.queues.clear()
            self.bindings.clear()
            self.locks.clear()

    def queue(self, name: str) -> _Queue:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = _Queue()
        return q

    def wake_for(self, names: set[str]) -> None:
        """Call with the lock held: wake consumers reading any of ``names``."""
        for waker, wanted in self.waiters.items():
            if wanted & names:
                waker.wake()


class _Subscriber:
    __slots__ = ("buffer", "overflowed", "waker")

    def __init__(self) -> None:
        self.waker = Waker()
        self.buffer: deque[bytes] = deque(maxlen=SUBSCRIBER_BUFFER)
        self.overflowed = False


_registry_lock = threading.Lock()
_brokers: dict[str, _Broker] = {}


def _key(url: str) -> str:
    return url.split("://", 1)[1].strip("/") if "://" in url else ""


def _broker_for(url: str) -> _Broker:
    with _registry_lock:
        broker = _brokers.get(_key(url))
        if broker is None:
            broker = _brokers[_key(url)] = _Broker()
        return broker


def reset(url: str | None = None) -> None:
    """Empty one in-memory broker (or all of them). Meant for tests."""
    with _registry_lock:
        targets = list(_brokers.values()) if url is None else [_brokers.get(_key(url))]
    for broker in targets:
        if broker is not None:
            broker.clear()


class MemoryTransport(Transport):
    """One-process broker sharing state across loops and threads by URL."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    features: ClassVar[Features] = Features(push_delivery=True, cross_process=False)

    def __init__(self, url: str = "memory://", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self._broker = _broker_for(url)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def declare(self, queues: Sequence[QueueSpec]) -> None:
        new = [b for b in map(_bindings.binding_of, queues) if b is not None]
        with self._broker.lock:
            for spec in queues:
                self._broker.queue(spec.name)
            self._broker.bindings.update(new)

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        b = self._broker
        with b.lock:
            routed = [(item, _route(b, item)) for item in items]
            touched: set[str] = set()
            for item, names in routed:
                env = item.envelope
                for name in names:
                    msg = _Msg(
                        env,
                        item.exchange,
                        item.routing_key,
                        clamp_priority(env.priority),
                        next(b.seq),
                    )
                    b.queue(name).put(msg, item.not_before)
                    touched.add(name)
            b.wake_for(touched)

    def consumer(
        self, queues: Sequence[QueueSpec], *, prefetch: int, consumer_id: str
    ) -> AbstractAsyncContextManager[Consumer]:
        return self._consume(queues, prefetch, consumer_id)

    @asynccontextmanager
    async def _consume(
        self, queues: Sequence[QueueSpec], prefetch: int, consumer_id: str
    ) -> AsyncIterator[Consumer]:
        await self.declare(queues)
        consumer = MemoryConsumer(self, list(queues), prefetch, consumer_id)
        with self._broker.lock:
            self._broker.waiters[consumer.waker] = {q.name for q in queues}
        try:
            yield consumer
        finally:
            consumer.close()

    async def purge(self, queue: str) -> int:
        with self._broker.lock:
            q = self._broker.queues.get(queue)
            if q is None:
                return 0
            count = len(q.ready) + len(q.delayed)
            q.ready.clear()
            q.delayed.clear()
            return count

    async def size(self, queue: str) -> int:
        """Ready plus delayed messages; leased ones belong to their consumer."""
        with self._broker.lock:
            q = self._broker.queues.get(queue)
            return 0 if q is None else len(q.ready) + len(q.delayed)

    async def broadcast(self, channel: str, payload: bytes) -> None:
        with self._broker.lock:
            for sub in self._broker.subscribers.get(channel, ()):
                if len(sub.buffer) == sub.buffer.maxlen and not sub.overflowed:
                    sub.overflowed = True
                    logger.warning(
                        "subscriber on %r is %d payloads behind; dropping the oldest",
                        channel,
                        SUBSCRIBER_BUFFER,
                    )
                sub.buffer.append(payload)
                sub.waker.wake()

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._subscribe(channel)

    @asynccontextmanager
    async def _subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        sub = _Subscriber()
        with self._broker.lock:
            self._broker.subscribers.setdefault(channel, set()).add(sub)
        try:
            yield _Drain(sub)
        finally:
            with self._broker.lock:
                self._broker.subscribers.get(channel, set()).discard(sub)

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        now = time.time()
        with self._broker.lock:
            locks = self._broker.locks
            if len(locks) > 1000:  # beat claims one lock per due time: drop expired ones
                for key in [k for k, (_, until) in locks.items() if until < now]:
                    del locks[key]
            held = locks.get(name)
            if held is None or held[1] < now or held[0] == owner:
                self._broker.locks[name] = (owner, now + ttl)
                return True
            return False


def _route(broker: _Broker, item: Outgoing) -> list[str]:
    names = _bindings.resolve(broker.bindings, item.exchange, item.routing_key)
    if not names:
        raise TransportError(
            f"no queue is bound to exchange {item.exchange!r} for routing key "
            f"{item.routing_key!r}; declare a queue bound to it before publishing"
        )
    return names


class _Drain:
    """The subscriber's iterator: a class, not a generator, so cancelling a read is safe."""

    def __init__(self, sub: _Subscriber) -> None:
        self._sub = sub

    def __aiter__(self) -> _Drain:
        return self

    async def __anext__(self) -> bytes:
        while not self._sub.buffer:
            await self._sub.waker.nap(None)
        return self._sub.buffer.popleft()


class MemoryConsumer(Consumer):
    def __init__(
        self, transport: MemoryTransport, queues: list[QueueSpec], prefetch: int, cid: str
    ) -> None:
        self._t = transport
        self._broker = transport._broker
        self._queues = queues
        self._prefetch = max(0, prefetch)
        self.consumer_id = cid
        self.unacked: dict[object, tuple[str, _Msg]] = {}
        self.waker = Waker()
        self._closed = False

    @property
    def queues(self) -> list[QueueSpec]:
        return list(self._queues)

    def __aiter__(self) -> MemoryConsumer:
        return self

    async def __anext__(self) -> Delivery:
        while not self._closed:
            timeout: float | None = None
            if not self._prefetch or len(self.unacked) < self._prefetch:
                got, timeout = self._take()
                if got is not None:
                    return got
            await self.waker.nap(timeout)
        raise StopAsyncIteration

    def _take(self) -> tuple[Delivery | None, float | None]:
        """Lease the best due message across our queues, or say when one will be due."""
        now = time.time()
        best: tuple[int, int, str] | None = None
        due: float | None = None
        with self._broker.lock:
            for spec in self._queues:
                q = self._broker.queues.get(spec.name)
                if q is None:
                    continue
                q.promote(now)
                if q.ready:
                    key = (q.ready[0][0], q.ready[0][1], spec.name)
                    best = key if best is None or key < best else best
                if q.delayed:
                    at = q.delayed[0][0]
                    due = at if due is None else min(due, at)
            if best is None:
                return None, None if due is None else due - now
            _, _, msg = heapq.heappop(self._broker.queues[best[2]].ready)
        self.unacked[msg.seq] = (best[2], msg)
        return Delivery(
            msg.envelope, best[2], msg.exchange, msg.routing_key, msg.redelivered, msg.seq
        ), None

    def _settle(self, delivery: Delivery) -> tuple[str, _Msg] | None:
        held = self.unacked.pop(delivery.tag, None)
        self.waker.wake()
        return held

    async def ack(self, delivery: Delivery) -> None:
        self._settle(delivery)

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        held = self._settle(delivery)
        if held is None:
            return
        queue, msg = held
        b = self._broker
        with b.lock:
            if requeue:
                msg.redelivered = True
                b.queue(queue).put(msg)
                b.wake_for({queue})
            else:
                dead = dead_letter_name(queue)
                env = with_dead_reason(msg.envelope, reason or "rejected")
                b.queue(dead).put(replace(msg, envelope=env, seq=next(b.seq), redelivered=False))
                b.wake_for({dead})

    async def set_prefetch(self, count: int) -> None:
        self._prefetch = max(0, count)
        self.waker.wake()

    async def add_queue(self, queue: QueueSpec) -> None:
        await self._t.declare([queue])
        if all(q.name != queue.name for q in self._queues):
            self._queues.append(queue)
        self._rewatch()

    async def cancel_queue(self, name: str) -> None:
        self._queues = [q for q in self._queues if q.name != name]
        self._rewatch()

    def _rewatch(self) -> None:
        with self._broker.lock:
            if self.waker in self._broker.waiters:
                self._broker.waiters[self.waker] = {q.name for q in self._queues}
        self.waker.wake()

    def close(self) -> None:
        """Return every unacked delivery to its queue, flagged redelivered."""
        self._closed = True
        b = self._broker
        with b.lock:
            b.waiters.pop(self.waker, None)
            for queue, msg in self.unacked.values():
                msg.redelivered = True
                b.queue(queue).put(msg)
            b.wake_for({q for q, _ in self.unacked.values()})
        self.unacked.clear()
        self.waker.wake()
