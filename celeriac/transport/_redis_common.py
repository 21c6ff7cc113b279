"""Redis key names, Lua scripts and client helpers shared by the transport and its consumer.

The key layout itself is described in ``celeriac/transport/redis.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from ..exceptions import ImproperlyConfigured
from .base import clamp_priority

logger = logging.getLogger("celeriac.transport.redis")

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
# then the queues to flag idle when fewer than asked came back (every list is empty
# then). Returns {idx, payload, ...}, next due.
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
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if n > 0 then
  for i = 6 + lists, #ARGV do redis.call('SET', 'celeriac.wake.' .. ARGV[i], '1') end
end
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
    retry = (
        Retry(ExponentialBackoff(cap=0.5, base=0.05), retries) if retries else Retry(NoBackoff(), 0)
    )
    return Redis.from_url(
        _redis_url(url),
        retry=retry,
        client_name=name,
        socket_keepalive=True,
        socket_connect_timeout=float(options.get("socket_connect_timeout", 5.0)),
        socket_timeout=options.get("socket_timeout"),  # see the module docstring
    )


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


# -- pipelined connections ----------------------------------------------------------------


def resp(*args: bytes | str | int | float) -> bytes:
    """One command in RESP, ready to write (redis-py's packer costs more than the I/O)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


@dataclass(slots=True, eq=False)
class _Sent:
    """A command written to a :class:`Pipe` whose reply has not been read yet."""

    command: bytes
    what: str  # names it in errors; "" for the pipe's own SCRIPT LOADs
    future: asyncio.Future[Any] | None  # None: nobody waits (``send(wait=False)``)


_EVALSHA = b"\r\n$7\r\nEVALSHA\r\n$40\r\n"  # what follows ``*<n>`` in resp(b"EVALSHA", ...)


class Pipe:
    """One dedicated connection, pipelined, without redis-py's per-command layers.

    Commands are written as soon as they are made and replies are read in order, so
    concurrent callers share the socket without taking turns; a caller that does not
    wait (``send(wait=False)``) pays no round trip. One coroutine reads at a time and
    writers never wait for it. A NOSCRIPT reply (script cache flushed) loads the script
    and sends that command again: it did not run. After a lost connection, with
    ``resend`` every command still without a reply is written again on a new connection
    (at least once: for idempotent commands and publishes); without it they fail with
    ``ConnectionError`` (for a fetch, whose caller must know it may have run).
    """

    #: Unconfirmed commands before a non-waiting send waits for the oldest ones.
    WINDOW = 1000
    #: Reconnects in a row that bring no reply before everything pending fails.
    ATTEMPTS = 3

    def __init__(self, client: Redis, *, resend: bool) -> None:
        self._client = client
        self._resend = resend
        self._scripts: dict[bytes, bytes] = {}  # sha -> body, loaded on every connect
        self._conn: AbstractConnection | None = None
        self._pending: deque[_Sent] = deque()
        self._reading: asyncio.Lock | None = None
        self._lost: list[tuple[str, BaseException]] = []  # failures nobody waited for

    def evalsha(self, script: bytes, keys: Sequence[str], args: Sequence[Any]) -> bytes:
        sha = hashlib.sha1(script).hexdigest().encode()
        self._scripts.setdefault(sha, script)
        return resp(b"EVALSHA", sha, len(keys), *keys, *args)

    @property
    def unconfirmed(self) -> int:
        return len(self._pending)

    def _healthy(self) -> AbstractConnection | None:
        conn = self._conn
        return conn if conn is not None and conn.is_connected else None

    async def call(self, command: bytes, what: str = "") -> Any:
        """Run one command and return its reply (``ResponseError`` for an error reply)."""
        return (await self.send([(command, what)], wait=True))[0]

    async def send(self, commands: Sequence[tuple[bytes, str]], *, wait: bool) -> list[Any]:
        """Write ``(command, what)`` pairs. With ``wait``, return their replies once all
        are in (raising the first error); without, return at once, reading only the
        replies already here, or waiting for old ones while :attr:`WINDOW` is full."""
        self._raise_lost()
        loop = asyncio.get_running_loop()
        sent = [_Sent(c, w, loop.create_future() if wait else None) for c, w in commands]
        self._pending.extend(sent)
        conn = self._healthy()
        if conn is not None:
            try:  # nothing is awaited before the bytes are written, so order holds
                await conn.send_packed_command([s.command for s in sent], check_health=False)
            except CONN_ERRORS:
                await conn.disconnect(nowait=True)  # the next read deals with it
        if wait:
            last = sent[-1].future
            assert last is not None
            await self._read(last.done, block=True)
            return [s.future.result() for s in sent if s.future is not None]
        if self._healthy() is None or len(self._pending) > self.WINDOW:
            await self._read(lambda: len(self._pending) <= self.WINDOW // 2, block=True)
        else:
            await self._read(lambda: False, block=False)
        return []

    async def flush(self) -> None:
        """Wait until every command written so far has its reply."""
        await self._read(lambda: not self._pending, block=True)
        self._raise_lost()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)

    def _script_of(self, command: bytes) -> bytes | None:
        at = command.find(_EVALSHA, 0, 32)
        return None if at < 0 else self._scripts.get(command[at + 20 : at + 60])

    def _raise_lost(self) -> None:
        """Raise, once, what failed among commands whose callers did not wait."""
        if self._lost:
            lost, self._lost = self._lost, []
            text = "; ".join(f"{what}: {exc}" for what, exc in lost)
            raise type(lost[0][1])(f"earlier commands that did not wait failed: {text}")

    async def _read(self, done: Any, *, block: bool) -> None:
        """Read replies until ``done()``; ``block=False`` stops at the first one not here.
        A broken connection is dealt with first, whatever ``done`` says."""
        if self._reading is None:
            self._reading = asyncio.Lock()
        async with self._reading:
            attempts = 0
            while self._pending:
                conn = self._healthy()
                if conn is None:
                    attempts += 1
                    try:
                        conn = await self._reconnect()
                    except CONN_ERRORS as exc:
                        if attempts < self.ATTEMPTS:
                            continue
                        self._fail_all(exc)
                        return
                if done():
                    return
                try:
                    if not block and not await conn.can_read():
                        return
                    error: BaseException | None = None
                    reply: Any = None
                    try:
                        # Not disconnect_on_error: after a cancelled read the replies
                        # still come, and a new connection would send commands again.
                        reply = await conn.read_response(disconnect_on_error=False)
                    except rexc.ResponseError as exc:
                        error = exc
                except CONN_ERRORS:
                    await conn.disconnect(nowait=True)
                    continue
                attempts = 0
                sent = self._pending.popleft()
                script = None
                if error is not None and str(error).startswith("NOSCRIPT"):
                    script = self._script_of(sent.command)
                if script is not None:
                    load = _Sent(resp(b"SCRIPT", b"LOAD", script), "", None)
                    self._pending.extend((load, sent))
                    with contextlib.suppress(*CONN_ERRORS):
                        await conn.send_packed_command(
                            [load.command, sent.command], check_health=False
                        )
                elif sent.what or sent.future is not None:
                    self._finish(sent, reply, error)

    def _finish(self, sent: _Sent, reply: Any, error: BaseException | None) -> None:
        if sent.future is None:
            if error is not None:
                logger.error("%s failed after its caller moved on: %s", sent.what, error)
                self._lost.append((sent.what, error))
        elif not sent.future.done():
            if error is None:
                sent.future.set_result(reply)
            else:
                sent.future.set_exception(error)

    async def _reconnect(self) -> AbstractConnection:
        """A new connection; with ``resend``, the scripts loaded and every command still
        without a reply written again, in order; without, those fail."""
        old, self._conn = self._conn, None
        if old is not None:
            await old.disconnect(nowait=True)
            if not self._resend:
                self._fail_all(rexc.ConnectionError("connection to Redis lost"))
                if not self._pending:
                    raise rexc.ConnectionError("connection to Redis lost")
        pool = self._client.connection_pool
        conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        loads = [_Sent(resp(b"SCRIPT", b"LOAD", body), "", None) for body in self._scripts.values()]
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            self._pending.extendleft(reversed(loads))
            await conn.send_packed_command([s.command for s in self._pending], check_health=False)
        except BaseException:
            for load in loads:
                if self._pending and self._pending[0] is load:
                    self._pending.popleft()
            await conn.disconnect(nowait=True)
            raise
        self._conn = conn
        return conn

    def _fail_all(self, exc: BaseException) -> None:
        while self._pending:
            sent = self._pending.popleft()
            if sent.what or sent.future is not None:
                self._finish(sent, None, rexc.ConnectionError(str(exc)))
