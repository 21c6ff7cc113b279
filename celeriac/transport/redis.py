"""Redis broker: kombu's list layout, so Celery workers, clients and Flower share queues.

Storage layout (one Redis database, the URL's; ``SEP`` is kombu's ``"\\x06\\x16"``):

==================================  =====  ================================================
key                                 type   content
==================================  =====  ================================================
``<queue>``                         list   ready messages of priority bucket 0; LPUSH to
                                           publish, RPOP to consume (FIFO). Values are
                                           :func:`base.pack` output: kombu's JSON envelope.
``<queue>SEP3`` / ``SEP6`` /        list   buckets 3, 6 and 9 (kombu's ``priority_steps``)
``SEP9``
``_kombu.binding.<exchange>``       set    kombu's bindings: ``routing_key SEP pattern SEP
                                           queue`` (pattern: kombu's regex for topic, ``''``
                                           otherwise), written by :meth:`declare`
``celeriac.exchanges``              hash   exchange -> ``direct|topic|fanout``; absent (a
                                           kombu-declared exchange): topic if the binding
                                           has a pattern, else direct
``celeriac.delayed``                zset   index: queue -> earliest due time in its set
``celeriac.delayed.<queue>``        zset   ``<bucket>:<envelope>`` -> due unix time
``celeriac.inflight.<consumer>``    hash   tag -> ``<bucket>:<len(queue)>:<queue><envelope>``
                                           one per live consumer: its leased messages
``celeriac.heartbeats``             zset   consumer -> lease expiry (Redis server time)
``celeriac.consumers``              hash   consumer -> ``<host identity>|<pid>``, so a
                                           consumer on the same host whose pid is gone is
                                           reaped at once, without waiting for its lease
``celeriac.wake.<queue>``           str    set by a consumer that found nothing; whoever
                                           pushes to ``<queue>`` deletes it and PUBLISHes on
                                           the channel of the same name to wake it
``celeriac.lock.<name>``            str    ``try_lock`` owner, with PX expiry
channel ``celeriac.bc.<db>.<ch>``   pub    :meth:`broadcast` / :meth:`subscribe`
==================================  =====  ================================================

Priority. Our contract is "0-9, higher first"; kombu on Redis pops bucket 0 first. A
message of priority ``p`` goes to kombu's bucket for ``p`` (``p`` floored to 0/3/6/9,
exactly what kombu does), so an unprioritised message lands in ``<queue>`` where a Celery
worker consumes it. Our consumers pop buckets 9, 6, 3, 0 in that order, so priorities
within one bucket (for example 1 and 2) are FIFO, not ordered. Consequences: a Celery
client's ``priority=9`` task is consumed *first* by celeriac (RabbitMQ's meaning, and
ours) though kombu on Redis would run it last; a Celery worker reading celeriac-published
prioritised messages runs the low ones first. Unprioritised traffic is unaffected.

Leases belong to live consumers (no visibility timeout): one Lua call pops up to N
messages, priority-major, and records them in the consumer's in-flight hash; an ack is an
HDEL; a consumer's heartbeat renews its expiry in ``celeriac.heartbeats``; a reaper run
by every consumer returns expired consumers' messages (RPUSH, so they run next, flagged
redelivered) and deletes their keys in one script, so each comes back exactly once.
Delayed messages are never in flight, so a long ETA cannot cause a duplicate. Due ones
are moved to their lists by the next fetch of any celeriac consumer (Celery workers see
them only then). A Celery client's ETA task arrives ready, with an ``eta`` header the
worker honours. Acks are batched: ``ack`` returns at once and every ack of one loop tick
goes out in one HDEL (AMQP's basic.ack is unconfirmed too); leaving the consumer flushes.

Wake-ups: a fetch that leaves every list empty (fewer messages than asked for) sets
the queues' wake keys in the same script, and the consumer then sleeps on their wake
channels instead of fetching again; whoever pushes next deletes the key and PUBLISHes.
So a celeriac producer wakes an idle consumer at once and costs it no polling. For
producers that do not PUBLISH (Celery clients) the consumer also polls, with backoff
from ``min_poll_interval`` (5 ms) doubling to ``max_poll_interval`` (50 ms), and wakes
early for the next delayed message due. Pub/sub ignores the database number, so a push
in another database can cause a harmless extra fetch.

Publishing: each transport has one pipelined connection of its own for the publish
script (``_redis_common.Pipe``): the EVALSHA is encoded by hand and written at
once, replies are read in order. On a loop that keeps running (a worker, ``asyncio``
code awaiting ``adelay``) every publish waits for its reply. A sync ``.delay()`` runs on
its thread's own loop, which stops as soon as the call returns: there the call returns
once the command is written, like AMQP's basic.publish without confirms, and its reply
is read by the next call on that thread, by :meth:`close` (``app.close()``) or at
interpreter exit (``_bridge``); a refusal is logged and raised by the next publish, and
at most ``Pipe.WINDOW`` commands are ever unconfirmed. A process killed
(``SIGKILL``, ``os._exit``) right after such a ``.delay()`` can lose that message;
``broker_transport_options={"confirm_publish": True}`` makes every publish wait. A
connection lost with commands unconfirmed is reopened and those are written again, so
a publish Redis ran but whose reply was lost can run twice (at least once, like kombu's
retry).
Fanout exchanges are bindings like any other here: kombu publishes fanout through
pub/sub, so a kombu producer's fanout messages do not reach celeriac queues.

``size`` counts ready plus delayed messages (not leased ones); ``purge`` drops both.
Needs Redis >= 6.2 (RPOP count, ZADD LT); not for Redis Cluster (scripts touch keys they
compute). Sentinel URLs are not supported yet.

Clients are made with ``socket_timeout=None`` (redis-py 8 defaults to 5 s): with a socket
timeout, redis-py sends through ``asyncio.wait_for``, which on Python 3.11 swallows a
cancellation that lands as the send completes, so a cancelled consumer kept running.
Dead peers are found by TCP keepalive and by the lease machinery instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any, ClassVar

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.commands.core import AsyncScript

from .._bridge import portal
from . import _bindings
from ._redis_common import (
    _BEAT,
    _FETCH,
    _LOCK,
    _LUA_LIB,
    _PUBLISH,
    _REAP,
    _RELEASE,
    _SETTLE,
    BINDING,
    BROADCAST,
    CHUNK,
    CONN_ERRORS,
    DELAYED,
    EXCHANGES,
    LOCK,
    SEP,
    STEPS,
    Pipe,
    _client,
    _close,
    _redis_url,
    _subscribed,
    bucket,
    list_key,
    topic_pattern,
)
from ._redis_consumer import RedisConsumer
from .base import (
    Consumer,
    Features,
    Outgoing,
    QueueSpec,
    Transport,
    TransportError,
    pack,
)

__all__ = ["RedisConsumer", "RedisTransport"]

logger = logging.getLogger(__name__)


PUBLISH_SCRIPT = (_LUA_LIB + _PUBLISH).encode()


def _what(ids: list[str]) -> str:
    return f"task {ids[0]}" if len(ids) == 1 else f"{len(ids)} tasks ({ids[0]}, ...)"


class RedisTransport(Transport):
    """Queues as kombu's Redis lists; leases, delays and wake-ups in Lua."""

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "redis+socket", "sentinel")
    features: ClassVar[Features] = Features()

    def __init__(
        self, url: str = "redis://127.0.0.1:6379/0", options: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(url, options)
        _redis_url(url)  # fail on sentinel now, not at first use
        self.lease_timeout = float(self.options.get("lease_timeout", 15.0))
        self.binding_ttl = float(self.options.get("binding_cache_ttl", 1.0))
        self.confirm_publish = bool(self.options.get("confirm_publish", False))
        self._client_: Redis | None = None
        self._pipe: Pipe | None = None
        self._flush_at_exit: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._scripts: dict[str, AsyncScript] = {}
        self._bindings: dict[str, tuple[float, list[_bindings.Binding]]] = {}

    # -- connection ---------------------------------------------------------

    @property
    def client(self) -> Redis:
        if self._client_ is None:
            self._client_ = _client(self.url, None, 3, self.options)
            for name, body in (
                ("fetch", _FETCH),
                ("settle", _SETTLE),
                ("release", _RELEASE),
                ("reap", _REAP),
                ("beat", _BEAT),
            ):
                self._scripts[name] = self._client_.register_script(_LUA_LIB + body)
            self._scripts["lock"] = self._client_.register_script(_LOCK)
        return self._client_

    @property
    def pipe(self) -> Pipe:
        """The publishing connection (see "Publishing" in the module docstring)."""
        if self._pipe is None:
            self._pipe = Pipe(self.client, resend=True)
        return self._pipe

    def script(self, name: str) -> AsyncScript:
        _ = self.client
        return self._scripts[name]

    async def connect(self) -> None:
        try:
            await self.client.ping()
        except rexc.RedisError as exc:
            raise TransportError(f"cannot reach Redis at {self.describe()}: {exc}") from exc

    async def close(self) -> None:
        """Wait for the replies of publishes that did not wait (see the module docstring)."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            try:
                await pipe.flush()
            except rexc.RedisError as exc:
                logger.error("publishes were lost: %s", exc)
            finally:
                await pipe.close()
        if self._client_ is not None:
            client, self._client_ = self._client_, None
            with suppress(rexc.RedisError, OSError):
                await client.aclose()

    # -- routing ----------------------------------------------------------------

    async def declare(self, queues: Sequence[QueueSpec]) -> None:
        found = [b for b in map(_bindings.binding_of, queues) if b is not None]
        if not found:
            return
        async with self._errors("declare"), self.client.pipeline(transaction=False) as pipe:
            for b in found:
                pattern = topic_pattern(b.binding_key) if b.exchange_type == "topic" else ""
                pipe.sadd(BINDING + b.exchange, SEP.join((b.binding_key, pattern, b.queue)))
                pipe.hset(EXCHANGES, b.exchange, b.exchange_type)
                self._bindings.pop(b.exchange, None)
            await pipe.execute()

    async def _load_bindings(self, exchanges: set[str]) -> None:
        names = sorted(exchanges)
        async with self.client.pipeline(transaction=False) as pipe:
            for ex in names:
                pipe.smembers(BINDING + ex)
                pipe.hget(EXCHANGES, ex)
            replies = await pipe.execute()
        expires = time.monotonic() + self.binding_ttl
        for i, ex in enumerate(names):
            members, kind = replies[2 * i], replies[2 * i + 1]
            rows = []
            for m in sorted(members):
                rk, pattern, queue = m.decode().split(SEP, 2)
                etype = kind.decode() if kind else ("topic" if pattern else "direct")
                rows.append(_bindings.Binding(ex, etype, rk, queue))
            self._bindings[ex] = (expires, rows)

    async def _route(self, items: Sequence[Outgoing]) -> list[list[str]]:
        now = time.monotonic()
        wanted = {i.exchange for i in items if i.exchange}
        stale = {ex for ex in wanted if self._bindings.get(ex, (0.0,))[0] <= now}
        if stale:
            await self._load_bindings(stale)
        out = []
        for item in items:
            rows = self._bindings[item.exchange][1] if item.exchange else []
            names = _bindings.resolve(rows, item.exchange, item.routing_key)
            if not names and item.exchange not in stale:
                await self._load_bindings({item.exchange})  # a fresh binding we missed?
                stale.add(item.exchange)
                names = _bindings.resolve(
                    self._bindings[item.exchange][1], item.exchange, item.routing_key
                )
            if not names:
                raise TransportError(
                    f"no queue is bound to exchange {item.exchange!r} for routing key "
                    f"{item.routing_key!r}; declare a queue bound to it before publishing"
                )
            out.append(names)
        return out

    # -- producing ----------------------------------------------------------------

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        if not items:
            return
        async with self._errors("publish"):
            routes = await self._route(items)
            now = time.time()
            pipe = self.pipe
            calls: list[tuple[bytes, str]] = []
            keys: list[str] = []
            ready: list[Any] = []
            delayed: list[Any] = []
            wake: set[str] = set()
            ids: list[str] = []
            for item, names in zip(items, routes, strict=True):
                env, step = item.envelope, bucket(item.envelope.priority)
                payload = pack(env, item.exchange, item.routing_key)
                ids.append(str(env.headers.get("id") or env.correlation_id))
                for q in names:
                    if item.not_before is not None and item.not_before > now:
                        delayed += (q, repr(item.not_before), f"{step}:".encode() + payload)
                    else:
                        keys.append(list_key(q, step))
                        ready.append(payload)
                        wake.add(q)
                if len(keys) + len(delayed) // 3 >= CHUNK:
                    args = [len(keys), len(delayed) // 3, *ready, *delayed, *wake]
                    calls.append((pipe.evalsha(PUBLISH_SCRIPT, keys, args), _what(ids)))
                    keys, ready, delayed, wake, ids = [], [], [], set(), []
            if keys or delayed:
                args = [len(keys), len(delayed) // 3, *ready, *delayed, *wake]
                calls.append((pipe.evalsha(PUBLISH_SCRIPT, keys, args), _what(ids)))
            await pipe.send(calls, wait=self._must_wait())

    def _must_wait(self) -> bool:
        """Sync callers on their own loop do not wait for the reply (module docstring)."""
        if self.confirm_publish:
            return True
        loop = asyncio.get_running_loop()
        if loop is not portal.thread_loop():
            return True
        if loop not in self._flush_at_exit:
            self._flush_at_exit.add(loop)
            portal.flush_before_close(loop, self.pipe)
        return False

    async def size(self, queue: str) -> int:
        async with self._errors("size"), self.client.pipeline(transaction=False) as pipe:
            for step in STEPS:
                pipe.llen(list_key(queue, step))
            pipe.zcard(f"{DELAYED}.{queue}")
            return int(sum(await pipe.execute()))

    async def purge(self, queue: str) -> int:
        keys = [list_key(queue, s) for s in STEPS]
        async with self._errors("purge"), self.client.pipeline(transaction=True) as pipe:
            for k in keys:
                pipe.llen(k)
            pipe.zcard(f"{DELAYED}.{queue}")
            pipe.delete(*keys, f"{DELAYED}.{queue}")
            pipe.zrem(DELAYED, queue)
            counts = await pipe.execute()
        return int(sum(counts[: len(keys) + 1]))

    # -- broadcast and locks -------------------------------------------------------

    async def broadcast(self, channel: str, payload: bytes) -> None:
        async with self._errors("broadcast"):
            await self.client.publish(self._channel(channel), payload)

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._subscribe(channel)

    def _channel(self, channel: str) -> str:
        """Pub/sub ignores the database number, so the channel names it (as kombu's fanout
        prefix does): otherwise workers on other databases answer and obey our commands."""
        db = self.client.connection_pool.connection_kwargs.get("db", 0)
        return f"{BROADCAST}{db}.{channel}"

    @asynccontextmanager
    async def _subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        box: list[PubSub] = []
        async with self._errors("subscribe"):
            box.append(await _subscribed(self.client, [self._channel(channel)]))
        try:
            yield self._receive(box, channel)
        finally:
            with suppress(*CONN_ERRORS):
                await _close(box[0])

    async def _receive(self, box: list[PubSub], channel: str) -> AsyncIterator[bytes]:
        """Payloads as they come; after a lost connection, resubscribe (what was sent
        meanwhile is lost, as pub/sub always is)."""
        delay = 0.1
        while True:
            try:
                msg = await box[0].get_message(timeout=None)
            except CONN_ERRORS as exc:
                logger.warning(
                    "broadcast channel %r lost its connection (%s); resubscribing", channel, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                with suppress(*CONN_ERRORS):
                    await _close(box[0])
                    box[0] = await _subscribed(self.client, [self._channel(channel)])
                continue
            delay = 0.1
            if msg is not None and msg["type"] == "message":
                yield bytes(msg["data"])

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        async with self._errors("try_lock"):
            got = await self.script("lock")(
                keys=[LOCK + name], args=[owner, max(1, int(ttl * 1000))]
            )
        return bool(got)

    # -- consuming ----------------------------------------------------------------

    def consumer(
        self, queues: Sequence[QueueSpec], *, prefetch: int, consumer_id: str
    ) -> AbstractAsyncContextManager[Consumer]:
        return self._consume(queues, prefetch, consumer_id)

    @asynccontextmanager
    async def _consume(
        self, queues: Sequence[QueueSpec], prefetch: int, consumer_id: str
    ) -> AsyncIterator[Consumer]:
        await self.declare(queues)
        consumer = RedisConsumer(self, list(queues), prefetch, consumer_id)
        await consumer.start()
        try:
            yield consumer
        finally:
            await consumer.stop()

    @asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except rexc.RedisError as exc:
            raise TransportError(f"Redis {what} failed on {self.describe()}: {exc}") from exc
