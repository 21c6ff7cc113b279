"""The Redis consumer: batched Lua fetches, batched acks, heartbeats and reaping.

See ``celeriac/transport/redis.py`` for the key layout and the lease rules.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis import exceptions as rexc
from redis.asyncio.client import PubSub

from ._redis_common import (
    CONN_ERRORS,
    CONSUMERS,
    HEARTBEATS,
    INFLIGHT,
    STEPS,
    WAKE,
    _client,
    _close,
    _slot,
    _subscribed,
    list_key,
)
from .base import (
    Consumer,
    Delivery,
    Envelope,
    QueueSpec,
    TransportError,
    dead_letter_name,
    pack,
    unpack,
    with_dead_reason,
)

if TYPE_CHECKING:
    from .redis import RedisTransport

logger = logging.getLogger("celeriac.transport.redis")  # one name for the whole transport


def _host_identity() -> str:
    """Hostname, boot and pid namespace: equal only for processes that can see each other."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


HOST = _host_identity()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True, slots=True)
class _Receipt:
    tag: int
    step: str


class RedisConsumer(Consumer):
    """Fetches in batches by Lua, acks in batches, heartbeats and reaps in the background."""

    def __init__(
        self, transport: RedisTransport, queues: list[QueueSpec], prefetch: int, consumer_id: str
    ) -> None:
        self._t = transport
        self._queues = queues
        self._prefetch = max(0, prefetch)
        self.consumer_id = consumer_id
        token = secrets.token_hex(4)
        self.id = f"{consumer_id}.{token}"  # unique even if a namesake is still leased
        self.client_name = f"celeriac-consumer-{token}"
        self.inflight = INFLIGHT + self.id
        o = transport.options
        lease = transport.lease_timeout
        self.lease = lease
        self.beat_every = float(o.get("heartbeat_interval", min(1.0, lease / 3)))
        self.reap_every = float(o.get("reap_interval", max(self.beat_every, min(5.0, lease / 2))))
        self.min_poll = float(o.get("min_poll_interval", 0.005))
        self.max_poll = max(self.min_poll, float(o.get("max_poll_interval", 0.05)))
        self.batch = int(o.get("fetch_batch", 100))
        self.client = _client(transport.url, self.client_name, 0, o)
        self._next_tag = 0
        self._outstanding: set[int] = set()
        self._buffer: deque[Delivery] = deque()
        self._acks: list[int] = []
        self._ack_retry = False  # the pending acks may have been applied already
        self._lost: list[int] = []  # tags of fetches whose reply never came
        self._room = asyncio.Event()
        self._wake = asyncio.Event()
        self._pubsub: PubSub | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        self._backoff = 0.1
        self._closed = False
        self._rr = 0

    @property
    def queues(self) -> list[QueueSpec]:
        return list(self._queues)

    def _channels(self) -> list[str]:
        return [WAKE + q.name for q in self._queues] or [WAKE]  # SUBSCRIBE needs one

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._beat()
            await self._reap()
            self._pubsub = await _subscribed(self.client, self._channels())
        except rexc.RedisError as exc:
            await self.client.aclose()
            raise TransportError(
                f"cannot start consuming from {self._t.describe()}: {exc}"
            ) from exc
        loop = asyncio.get_running_loop()
        self._beat_task = loop.create_task(self._beating())
        self._listen_task = loop.create_task(self._listening())
        self._tasks = [self._beat_task, self._listen_task]

    async def stop(self) -> None:
        """Flush acks, then return everything still leased: buffered ones as they were,
        handed-out ones flagged redelivered."""
        self._closed = True
        self._room.set()
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._flusher is not None and not self._flusher.done():
            await asyncio.wait({self._flusher})  # ends after its HDEL: cancelling it could
            # leave us unsure whether that HDEL ran
        unseen = [str(d.tag.tag) for d in self._buffer if isinstance(d.tag, _Receipt)]
        release = self._t.script("release")
        keys = [self.inflight, HEARTBEATS, CONSUMERS]
        for attempt in range(3):
            try:
                await self._flush()
                if self._acks:
                    raise rexc.ConnectionError("acks not flushed")
                if unseen:
                    await release(keys=keys, args=[self.id, "0", *unseen], client=self.client)
                    unseen = []
                await release(keys=keys, args=[self.id, "1", "all"], client=self.client)
                break
            except CONN_ERRORS as exc:
                if attempt == 2:
                    logger.warning(
                        "consumer %s could not return its unacked messages (%s); "
                        "they come back when its lease expires",
                        self.id,
                        exc,
                    )
                else:
                    await asyncio.sleep(0.2)
        self._buffer.clear()
        if self._pubsub is not None:
            with suppress(*CONN_ERRORS):
                await _close(self._pubsub)
        with suppress(*CONN_ERRORS):
            await self.client.aclose()

    # -- the delivery loop -----------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        idle = self.min_poll
        drained = False  # the last fetch emptied every list and armed their wake keys
        due: float | None = None
        while not self._closed:
            if self._buffer:
                yield self._buffer.popleft()
                continue
            room = (self._prefetch - len(self._outstanding)) if self._prefetch else self.batch
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            if drained and not self._wake.is_set():
                # Producers that PUBLISH wake us; the timer is for those that do not
                # (Celery clients) and for the next delayed message.
                timeout = idle if due is None else max(0.0, min(idle, due - time.time()))
                idle = min(idle * 2, self.max_poll)
                alarm = asyncio.get_running_loop().call_later(timeout, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    alarm.cancel()
            self._wake.clear()
            want = min(room, self.batch)
            try:
                if self._lost:
                    await self._recover()
                got, due = await self._fetch(want)
            except CONN_ERRORS as exc:
                drained = False
                await self._trouble(exc)
                continue
            self._fine()
            drained = got < want
            if got:
                idle = self.min_poll

    def _layout(self) -> list[tuple[str, str, str]]:
        """(list key, queue, bucket) in pop order: priority-major, queues round-robin."""
        names = [q.name for q in self._queues]
        if names:
            self._rr = (self._rr + 1) % len(names)
            names = names[self._rr :] + names[: self._rr]
        return [(list_key(q, s), q, s) for s in STEPS for q in names]

    async def _fetch(self, n: int) -> tuple[int, float | None]:
        """Lease up to ``n`` messages into the buffer: (how many came, next delayed due)."""
        layout = self._layout()
        first = self._next_tag
        self._next_tag += n
        try:
            flat, *nxt = await self._t.script("fetch")(
                keys=[self.inflight, HEARTBEATS, *(k for k, _, _ in layout)],
                args=[
                    self.id,
                    n,
                    first,
                    repr(time.time()),
                    self.lease,
                    *(_slot(q, s) for _, q, s in layout),
                    *(q.name for q in self._queues),
                ],
                client=self.client,
            )
        except BaseException:  # lost reply or cancelled: what it leased comes back later
            self._lost.extend(range(first, first + n))
            raise
        garbage = []
        for i in range(0, len(flat), 2):
            tag, (_, queue, step) = first + i // 2, layout[flat[i] - 1]
            try:
                env, exchange, rk, redelivered = unpack(flat[i + 1])
            except ValueError as exc:
                garbage.append((tag, queue, flat[i + 1], str(exc)))
                continue
            self._outstanding.add(tag)
            self._buffer.append(
                Delivery(env, queue, exchange, rk, redelivered, _Receipt(tag, step))
            )
        for n_done, (tag, queue, raw, reason) in enumerate(garbage):
            try:
                await self._bury(tag, queue, raw, reason)
            except BaseException:
                self._lost.extend(g[0] for g in garbage[n_done:])  # fetched again, buried then
                raise
        return len(flat) // 2, float(nxt[0]) if nxt and nxt[0] is not None else None

    async def _bury(self, tag: int, queue: str, raw: bytes, reason: str) -> None:
        dead = dead_letter_name(queue)
        logger.error(
            "dead-lettering an undecodable message from queue %r into %r: %s", queue, dead, reason
        )
        env = Envelope(
            raw, {"x-dead-reason": f"undecodable: {reason}"}, "application/octet-stream", "binary"
        )
        await self._t.script("settle")(
            keys=[self.inflight, list_key(dead, "0")],
            args=[str(tag), pack(env, "", dead), dead],
            client=self.client,
        )

    async def _recover(self) -> None:
        """Return messages a lost fetch reply leased to us but we never saw."""
        lost = [str(t) for t in self._lost]
        await self._t.script("release")(
            keys=[self.inflight, HEARTBEATS, CONSUMERS],
            args=[self.id, "0", *lost],
            client=self.client,
        )
        self._lost.clear()

    # -- settling --------------------------------------------------------------------

    def _settle(self, delivery: Delivery) -> _Receipt | None:
        receipt = delivery.tag
        if not isinstance(receipt, _Receipt) or receipt.tag not in self._outstanding:
            return None
        self._outstanding.discard(receipt.tag)
        self._room.set()
        return receipt

    async def ack(self, delivery: Delivery) -> None:
        """Queue the HDEL; one flush per loop tick carries every ack made in that tick."""
        receipt = self._settle(delivery)
        if receipt is None:
            return
        self._acks.append(receipt.tag)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flushing())

    async def _flushing(self) -> None:
        delay = 0.1
        while self._acks and not self._closed:
            try:
                await self._flush()
            except CONN_ERRORS as exc:
                await self._trouble(exc, delay)
                delay = min(delay * 2, 5.0)

    async def _flush(self) -> None:
        while self._acks:
            batch, retry = self._acks, self._ack_retry
            self._acks, self._ack_retry = [], False
            try:
                done = await self.client.hdel(self.inflight, *map(str, batch))
            except BaseException:
                self._acks, self._ack_retry = batch + self._acks, True  # HDEL is idempotent
                raise
            if done < len(batch) and not retry:
                logger.warning(
                    "%d acks came after consumer %s lost its lease; those messages "
                    "were already returned and may run again",
                    len(batch) - done,
                    self.id,
                )

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        receipt = self._settle(delivery)
        if receipt is None:
            return
        env, queue = delivery.envelope, delivery.queue
        if requeue:
            payload = pack(env, delivery.exchange, delivery.routing_key, redelivered=True)
        else:
            queue = dead_letter_name(queue)
            payload = pack(
                with_dead_reason(env, reason or "rejected"), delivery.exchange, delivery.routing_key
            )
        settle = self._t.script("settle")
        delay = 0.1
        while True:  # idempotent: the HDEL guard makes a retried call a no-op
            try:
                await settle(
                    keys=[self.inflight, list_key(queue, receipt.step)],
                    args=[str(receipt.tag), payload, queue],
                    client=self.client,
                )
                return
            except CONN_ERRORS as exc:
                if self._closed:
                    raise TransportError(f"reject failed: {exc}") from exc
                await self._trouble(exc, delay)
                delay = min(delay * 2, 5.0)

    async def set_prefetch(self, count: int) -> None:
        self._prefetch = max(0, count)
        self._room.set()

    async def add_queue(self, queue: QueueSpec) -> None:
        await self._t.declare([queue])
        if all(q.name != queue.name for q in self._queues):
            self._queues.append(queue)
            if self._pubsub is not None:
                with suppress(*CONN_ERRORS):
                    await self._pubsub.subscribe(WAKE + queue.name)
        self._wake.set()

    async def cancel_queue(self, name: str) -> None:
        self._queues = [q for q in self._queues if q.name != name]
        if self._pubsub is not None:
            with suppress(*CONN_ERRORS):
                await self._pubsub.unsubscribe(WAKE + name)

    # -- background: heartbeat, reaper, wake-ups ---------------------------------------

    async def _beat(self) -> None:
        await self._t.script("beat")(
            keys=[HEARTBEATS, CONSUMERS],
            args=[self.id, self.lease, f"{HOST}|{os.getpid()}"],
            client=self.client,
        )

    async def _reap(self) -> None:
        """Return the leases of consumers whose heartbeat expired or whose pid is gone."""
        if HOST:
            dead: dict[bytes, int] = {}
            entries: dict[bytes, bytes] = await self.client.hgetall(CONSUMERS)  # type: ignore[assignment]
            for cid, who in entries.items():
                host, _, pid = who.decode().rpartition("|")
                if host == HOST and pid.isdigit() and not _pid_alive(int(pid)):
                    dead[cid] = 0
            if dead:
                await self.client.zadd(HEARTBEATS, dead, xx=True)
        n = await self._t.script("reap")(keys=[HEARTBEATS, CONSUMERS], client=self.client)
        if n:
            logger.warning("returned %d messages leased by dead consumers", n)
            self._wake.set()

    async def _beating(self) -> None:
        last_reap = time.monotonic()
        while True:
            await asyncio.sleep(self.beat_every)
            try:
                await self._beat()
                if time.monotonic() - last_reap >= self.reap_every:
                    last_reap = time.monotonic()
                    await self._reap()
            except CONN_ERRORS as exc:
                await self._trouble(exc, 0)

    async def _listening(self) -> None:
        delay = 0.1
        while True:
            try:
                if self._pubsub is None:
                    self._pubsub = await _subscribed(self.client, self._channels())
                    self._wake.set()  # wake-ups may have been missed meanwhile
                await self._pubsub.get_message(timeout=None)
                self._wake.set()
                delay = 0.1
            except CONN_ERRORS as exc:
                ps, self._pubsub = self._pubsub, None
                if ps is not None:
                    with suppress(*CONN_ERRORS):
                        await _close(ps)
                await self._trouble(exc, delay)
                delay = min(delay * 2, 5.0)

    async def _trouble(self, exc: BaseException, delay: float | None = None) -> None:
        """Log once per outage, then back off (0.1 s doubling to 5 s) before retrying."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._backoff = 0.1
            logger.warning("consumer %s lost Redis (%s); retrying", self.id, exc)
        if delay is None:
            delay = self._backoff
            self._backoff = min(self._backoff * 2, 5.0)
        if delay:
            await asyncio.sleep(delay)

    def _fine(self) -> None:
        if self._down_since is not None:
            logger.info(
                "consumer %s reconnected to Redis after %.1f s",
                self.id,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
