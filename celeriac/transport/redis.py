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

Wake-ups: an idle consumer sleeps on its queues' wake channels, polling with backoff
(1 ms doubling to ``max_poll_interval``, 50 ms) for producers that do not PUBLISH, such
as Celery clients, and waking early for the next delayed message due. Pub/sub ignores
the database number, so a push in another database can cause a harmless extra fetch.
Publishing goes through redis-py's retry (3 tries), so a connection lost after the
server ran a publish can, rarely, publish it twice (at least once, like kombu's retry).
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
import os
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, ClassVar

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript

from ..exceptions import ImproperlyConfigured
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
    pack,
    unpack,
    with_dead_reason,
)

__all__ = ["RedisConsumer", "RedisTransport"]

logger = logging.getLogger(__name__)

SEP = "\x06\x16"
STEPS = ("9", "6", "3", "0")  # our pop order: higher priority first
BINDING = "_kombu.binding."
EXCHANGES = "celeriac.exchanges"
DELAYED = "celeriac.delayed"
INFLIGHT = "celeriac.inflight."
HEARTBEATS = "celeriac.heartbeats"
CONSUMERS = "celeriac.consumers"
WAKE = "celeriac.wake."
LOCK = "celeriac.lock."
BROADCAST = "celeriac.bc."
CHUNK = 1000  # messages per publish script call; keeps Lua's unpack() far from its limit
CONN_ERRORS = (rexc.ConnectionError, rexc.TimeoutError, OSError)

_LUA_LIB = r"""
local SEP = '\6\22'
local function lkey(q, step) if step == '0' then return q end return q .. SEP .. step end
local function wake(q)
  local k = 'celeriac.wake.' .. q
  if redis.call('DEL', k) == 1 then redis.call('PUBLISH', k, '') end
end
local function parse(v)
  local step, n, s = string.match(v, '^(%d):(%d+):()')
  local e = s + tonumber(n)
  local q = string.sub(v, s, e - 1)
  return q, lkey(q, step), string.sub(v, e)
end
local function mark(p)
  if string.find(p, '"redelivered":%s*true') then return p end
  local _, e = string.find(p, '"headers":%s*{')
  if not e then return p end
  local rest = string.sub(p, e + 1)
  if string.match(rest, '^%s*}') then return string.sub(p, 1, e) .. '"redelivered":true' .. rest end
  return string.sub(p, 1, e) .. '"redelivered":true,' .. rest
end
local function restore(h, fields, marked)
  table.sort(fields, function(a, b) return tonumber(a) > tonumber(b) end)
  local n = 0
  for _, f in ipairs(fields) do
    local v = redis.call('HGET', h, f)
    if v then
      local q, k, p = parse(v)
      if marked then p = mark(p) end
      redis.call('RPUSH', k, p); redis.call('HDEL', h, f); wake(q); n = n + 1
    end
  end
  return n
end
local function promote(now)
  local qs = redis.call('ZRANGEBYSCORE', 'celeriac.delayed', '-inf', now, 'LIMIT', 0, 100)
  for _, q in ipairs(qs) do
    local dk = 'celeriac.delayed.' .. q
    local due = redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, 1000)
    for _, m in ipairs(due) do
      redis.call('LPUSH', lkey(q, string.sub(m, 1, 1)), string.sub(m, 3))
    end
    if #due > 0 then redis.call('ZREM', dk, unpack(due)) end
    local first = redis.call('ZRANGE', dk, 0, 0, 'WITHSCORES')
    if first[2] then redis.call('ZADD', 'celeriac.delayed', first[2], q)
    else redis.call('ZREM', 'celeriac.delayed', q) end
    wake(q)
  end
end
local function now() local t = redis.call('TIME') return t[1] + t[2] / 1e6 end
"""

# KEYS: one ready list per ready message. ARGV: n_ready, n_delayed, the ready payloads,
# (queue, due, member) per delayed message, then the queues to wake.
_PUBLISH = """
local r, d = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, r do redis.call('LPUSH', KEYS[i], ARGV[2 + i]) end
local b = 2 + r
for i = 0, d - 1 do
  local q, due = ARGV[b + 3 * i + 1], ARGV[b + 3 * i + 2]
  redis.call('ZADD', 'celeriac.delayed.' .. q, due, ARGV[b + 3 * i + 3])
  redis.call('ZADD', 'celeriac.delayed', 'LT', due, q)
end
for i = b + 3 * d + 1, #ARGV do wake(ARGV[i]) end
"""

# KEYS: in-flight hash, heartbeats, then the ready lists in pop order. ARGV: consumer,
# max count, first tag, client now (for due delays), lease, one slot prefix per list,
# then the queues to flag idle when nothing came back. Returns {idx, payload, ...}, next due.
_FETCH = """
redis.call('ZADD', KEYS[2], now() + ARGV[5], ARGV[1])
promote(ARGV[4])
local n, tag, lists = tonumber(ARGV[2]), tonumber(ARGV[3]), #KEYS - 2
local out, fields = {}, {}
for i = 1, lists do
  if n <= 0 then break end
  local got = redis.call('RPOP', KEYS[i + 2], n)
  if got then
    for _, p in ipairs(got) do
      fields[#fields + 1] = tostring(tag); fields[#fields + 1] = ARGV[5 + i] .. p
      out[#out + 1] = i; out[#out + 1] = p; tag = tag + 1
    end
    n = n - #got
  end
end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields))
else for i = 6 + lists, #ARGV do redis.call('SET', 'celeriac.wake.' .. ARGV[i], '1') end end
local nxt = redis.call('ZRANGE', 'celeriac.delayed', 0, 0, 'WITHSCORES')
return {out, nxt[2]}
"""

# KEYS: in-flight hash, destination list. ARGV: tag, payload, queue to wake.
_SETTLE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2]); wake(ARGV[3]); return 1
"""

# KEYS: in-flight hash, heartbeats, consumers. ARGV: consumer, marked, 'all' | tags...
_RELEASE = """
local all = ARGV[3] == 'all'
local fields = all and redis.call('HKEYS', KEYS[1]) or {unpack(ARGV, 3)}
local n = restore(KEYS[1], fields, ARGV[2] == '1')
if all then
  redis.call('DEL', KEYS[1]); redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
end
return n
"""

_REAP = """
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now(), 'LIMIT', 0, 50)) do
  local h = 'celeriac.inflight.' .. id
  n = n + restore(h, redis.call('HKEYS', h), true)
  redis.call('DEL', h); redis.call('ZREM', KEYS[1], id); redis.call('HDEL', KEYS[2], id)
end
return n
"""

_BEAT = """
redis.call('ZADD', KEYS[1], now() + ARGV[2], ARGV[1]); redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
"""

_LOCK = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""


def bucket(priority: int | None) -> str:
    """kombu's bucket for a priority: clamped to 0-9 and floored to 0, 3, 6 or 9."""
    p = clamp_priority(priority)
    return str(p - p % 3)


def list_key(queue: str, step: str) -> str:
    return queue if step == "0" else f"{queue}{SEP}{step}"


def _slot(queue: str, step: str) -> str:
    return f"{step}:{len(queue.encode())}:{queue}"


def topic_pattern(key: str) -> str:
    """kombu's regex for a topic binding key, stored so kombu producers can route too."""
    wild = {"*": r".*?[^\.]", "#": r".*?"}
    return "^" + r"\.".join(wild.get(w, re.escape(w)) for w in key.split(".")) + "$"


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


def _redis_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "sentinel":
        raise ImproperlyConfigured(
            "The Redis transport does not support sentinel:// URLs yet; "
            "point broker_url at the Redis master (redis://host:port/db)."
        )
    if scheme == "redis+socket":
        return "unix://" + rest.replace("virtual_host=", "db=")
    return url


def _client(url: str, name: str | None, retries: int, options: Mapping[str, Any]) -> Redis:
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries) if retries else Retry(
        NoBackoff(), 0)
    return Redis.from_url(
        _redis_url(url), retry=retry, client_name=name, socket_keepalive=True,
        socket_connect_timeout=float(options.get("socket_connect_timeout", 5.0)),
        socket_timeout=options.get("socket_timeout"),  # see the module docstring
    )


class RedisTransport(Transport):
    """Queues as kombu's Redis lists; leases, delays and wake-ups in Lua."""

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "redis+socket", "sentinel")
    features: ClassVar[Features] = Features()

    def __init__(self, url: str = "redis://127.0.0.1:6379/0",
                 options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        _redis_url(url)  # fail on sentinel now, not at first use
        self.lease_timeout = float(self.options.get("lease_timeout", 15.0))
        self.binding_ttl = float(self.options.get("binding_cache_ttl", 1.0))
        self._client_: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._bindings: dict[str, tuple[float, list[_bindings.Binding]]] = {}

    # -- connection ---------------------------------------------------------

    @property
    def client(self) -> Redis:
        if self._client_ is None:
            self._client_ = _client(self.url, None, 3, self.options)
            for name, body in (("publish", _PUBLISH), ("fetch", _FETCH), ("settle", _SETTLE),
                               ("release", _RELEASE), ("reap", _REAP), ("beat", _BEAT)):
                self._scripts[name] = self._client_.register_script(_LUA_LIB + body)
            self._scripts["lock"] = self._client_.register_script(_LOCK)
        return self._client_

    def script(self, name: str) -> AsyncScript:
        _ = self.client
        return self._scripts[name]

    async def connect(self) -> None:
        try:
            await self.client.ping()
        except rexc.RedisError as exc:
            raise TransportError(f"cannot reach Redis at {self.describe()}: {exc}") from exc

    async def close(self) -> None:
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
                names = _bindings.resolve(self._bindings[item.exchange][1], item.exchange,
                                          item.routing_key)
            if not names:
                raise TransportError(
                    f"no queue is bound to exchange {item.exchange!r} for routing key "
                    f"{item.routing_key!r}; declare a queue bound to it before publishing")
            out.append(names)
        return out

    # -- producing ----------------------------------------------------------------

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        if not items:
            return
        async with self._errors("publish"):
            routes = await self._route(items)
            now = time.time()
            calls: list[tuple[list[str], list[Any]]] = []
            keys: list[str] = []
            ready: list[Any] = []
            delayed: list[Any] = []
            wake: set[str] = set()
            for item, names in zip(items, routes, strict=True):
                env, step = item.envelope, bucket(item.envelope.priority)
                payload = pack(env, item.exchange, item.routing_key)
                for q in names:
                    if item.not_before is not None and item.not_before > now:
                        delayed += (q, repr(item.not_before), f"{step}:".encode() + payload)
                    else:
                        keys.append(list_key(q, step))
                        ready.append(payload)
                        wake.add(q)
                if len(keys) + len(delayed) // 3 >= CHUNK:
                    calls.append((keys, [len(keys), len(delayed) // 3, *ready, *delayed, *wake]))
                    keys, ready, delayed, wake = [], [], [], set()
            if keys or delayed:
                calls.append((keys, [len(keys), len(delayed) // 3, *ready, *delayed, *wake]))
            publish = self.script("publish")
            if len(calls) == 1:
                await publish(keys=calls[0][0], args=calls[0][1])
                return
            async with self.client.pipeline(transaction=False) as pipe:
                for k, a in calls:
                    await publish(keys=k, args=a, client=pipe)
                await pipe.execute()

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
                logger.warning("broadcast channel %r lost its connection (%s); resubscribing",
                               channel, exc)
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
            got = await self.script("lock")(keys=[LOCK + name],
                                            args=[owner, max(1, int(ttl * 1000))])
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


async def _subscribed(client: Redis, channels: list[str]) -> PubSub:
    """A PubSub whose subscriptions the server has confirmed, so nothing sent after
    this returns can be missed."""
    ps = client.pubsub()
    await ps.subscribe(*channels)
    pending = len(channels)
    while pending:
        msg = await ps.get_message(timeout=5.0)
        if msg is None:
            raise rexc.TimeoutError("no subscribe confirmation from Redis")
        if msg["type"] == "subscribe":
            pending -= 1
    return ps


async def _close(ps: PubSub) -> None:
    await ps.aclose()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class _Receipt:
    tag: int
    step: str


class RedisConsumer(Consumer):
    """Fetches in batches by Lua, acks in batches, heartbeats and reaps in the background."""

    def __init__(self, transport: RedisTransport, queues: list[QueueSpec], prefetch: int,
                 consumer_id: str) -> None:
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
        self.max_poll = float(o.get("max_poll_interval", 0.05))
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
            raise TransportError(f"cannot start consuming from {self._t.describe()}: {exc}") \
                from exc
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
                    logger.warning("consumer %s could not return its unacked messages (%s); "
                                   "they come back when its lease expires", self.id, exc)
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
        idle = 0.001
        while not self._closed:
            if self._buffer:
                yield self._buffer.popleft()
                continue
            room = (self._prefetch - len(self._outstanding)) if self._prefetch else self.batch
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            self._wake.clear()
            try:
                if self._lost:
                    await self._recover()
                due = await self._fetch(min(room, self.batch))
            except CONN_ERRORS as exc:
                await self._trouble(exc)
                continue
            self._fine()
            if self._buffer:
                idle = 0.001
                continue
            timeout = idle if due is None else max(0.0, min(idle, due - time.time()))
            idle = min(idle * 2, self.max_poll)
            alarm = asyncio.get_running_loop().call_later(timeout, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                alarm.cancel()

    def _layout(self) -> list[tuple[str, str, str]]:
        """(list key, queue, bucket) in pop order: priority-major, queues round-robin."""
        names = [q.name for q in self._queues]
        if names:
            self._rr = (self._rr + 1) % len(names)
            names = names[self._rr:] + names[: self._rr]
        return [(list_key(q, s), q, s) for s in STEPS for q in names]

    async def _fetch(self, n: int) -> float | None:
        layout = self._layout()
        first = self._next_tag
        self._next_tag += n
        try:
            flat, *nxt = await self._t.script("fetch")(
                keys=[self.inflight, HEARTBEATS, *(k for k, _, _ in layout)],
                args=[self.id, n, first, repr(time.time()), self.lease,
                      *(_slot(q, s) for _, q, s in layout), *(q.name for q in self._queues)],
                client=self.client)
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
            self._buffer.append(Delivery(env, queue, exchange, rk, redelivered,
                                         _Receipt(tag, step)))
        for n_done, (tag, queue, raw, reason) in enumerate(garbage):
            try:
                await self._bury(tag, queue, raw, reason)
            except BaseException:
                self._lost.extend(g[0] for g in garbage[n_done:])  # fetched again, buried then
                raise
        return float(nxt[0]) if nxt and nxt[0] is not None else None

    async def _bury(self, tag: int, queue: str, raw: bytes, reason: str) -> None:
        dead = dead_letter_name(queue)
        logger.error("dead-lettering an undecodable message from queue %r into %r: %s",
                     queue, dead, reason)
        env = Envelope(raw, {"x-dead-reason": f"undecodable: {reason}"},
                       "application/octet-stream", "binary")
        await self._t.script("settle")(keys=[self.inflight, list_key(dead, "0")],
                                       args=[str(tag), pack(env, "", dead), dead],
                                       client=self.client)

    async def _recover(self) -> None:
        """Return messages a lost fetch reply leased to us but we never saw."""
        lost = [str(t) for t in self._lost]
        await self._t.script("release")(keys=[self.inflight, HEARTBEATS, CONSUMERS],
                                        args=[self.id, "0", *lost], client=self.client)
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
                logger.warning("%d acks came after consumer %s lost its lease; those messages "
                               "were already returned and may run again", len(batch) - done,
                               self.id)

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        receipt = self._settle(delivery)
        if receipt is None:
            return
        env, queue = delivery.envelope, delivery.queue
        if requeue:
            payload = pack(env, delivery.exchange, delivery.routing_key, redelivered=True)
        else:
            queue = dead_letter_name(queue)
            payload = pack(with_dead_reason(env, reason or "rejected"), delivery.exchange,
                           delivery.routing_key)
        settle = self._t.script("settle")
        delay = 0.1
        while True:  # idempotent: the HDEL guard makes a retried call a no-op
            try:
                await settle(keys=[self.inflight, list_key(queue, receipt.step)],
                             args=[str(receipt.tag), payload, queue], client=self.client)
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
        await self._t.script("beat")(keys=[HEARTBEATS, CONSUMERS],
                                     args=[self.id, self.lease, f"{HOST}|{os.getpid()}"],
                                     client=self.client)

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
            logger.info("consumer %s reconnected to Redis after %.1f s", self.id,
                        time.monotonic() - self._down_since)
            self._down_since = None
