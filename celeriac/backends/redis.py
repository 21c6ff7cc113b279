"""Result backend on Redis, in Celery's key layout so Celery clients read our results.

Storage layout (the URL's database):

=====================================  ====  ================================================
key                                    type  content
=====================================  ====  ================================================
``celery-task-meta-<task_id>``         str   task meta (``result_serializer``), SET with PX
                                             when a ttl is given, then PUBLISHed on the
                                             channel of the same name, as Celery does (one
                                             Lua call: a result is never seen half-stored)
``celery-taskset-meta-<group_id>``     str   ``{"result": [[gid, null], [[[id, null], null],
                                             ...]]}``
``celery-taskset-meta-<gid>.j``        zset  chord join: header task id -> 1-based rank in
                                             arrival order (``.j.claim``: who completed it)
``celery-taskset-meta-<gid>.s``        str   the group's size, written with the group: Celery's
                                             chord size key (a Celery worker joins a chord
                                             only when it exists; ours do not read it)
=====================================  ====  ================================================

``wait`` is fed by those PUBLISHes: one shared pub/sub connection per backend instance
subscribes to the channels of the keys being waited on. Only once Redis has confirmed
the subscription are the keys read (MGET), so a result stored in between is never
missed; after that each result arrives in its PUBLISH, which carries the document, so
it costs no read.
Celery's own chord join on Redis uses ``.j`` as a zset of encoded results scored by group
index; the two formats do not mix, so one chord must be run by one kind of worker: a
chord sent by celeriac runs on Celery workers (they find ``.s`` and the saved group), but
one sent by a Celery client cannot be joined by ours (it saves no group to list members).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript

from ..exceptions import BackendError
from .base import GROUP_PREFIX, TASK_PREFIX, KeyValueBackend, ResultMeta

__all__ = ["RedisBackend"]

logger = logging.getLogger(__name__)

CONN_ERRORS = (rexc.ConnectionError, rexc.TimeoutError, OSError)
SIZE_SUFFIX = ".s"  # Celery's chord size key, see the module docstring

# KEYS[1]: a result key. ARGV: value, ttl in ms ('' = no expiry).
_STORE = """
if ARGV[2] == '' then redis.call('SET', KEYS[1], ARGV[1])
else redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
redis.call('PUBLISH', KEYS[1], ARGV[1])
"""

# KEYS[1]: the join zset. ARGV: member, ttl in ms ('' = keep). Returns the member's rank.
_ADD_MEMBER = """
local r = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not r then
  r = redis.call('ZCARD', KEYS[1]) + 1
  redis.call('ZADD', KEYS[1], r, ARGV[1])
end
if ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return tonumber(r)
"""


def _redis_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    if scheme.lower() == "redis+socket":
        return "unix://" + rest.replace("virtual_host=", "db=")
    return url


class RedisBackend(KeyValueBackend):
    """Celery-compatible results on Redis with pub/sub wake-ups."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0",
                 options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self._client_: Redis | None = None
        self._add: AsyncScript | None = None
        self._store: AsyncScript | None = None
        self._hub: _Hub | None = None

    @property
    def client(self) -> Redis:
        if self._client_ is None:
            self._client_ = Redis.from_url(
                _redis_url(self.url),
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
                socket_keepalive=True,
                socket_connect_timeout=float(self.options.get("socket_connect_timeout", 5.0)),
                socket_timeout=self.options.get("socket_timeout"),  # see the transport's docs
            )
            self._add = AsyncScript(self._client_, _ADD_MEMBER)
            self._store = AsyncScript(self._client_, _STORE)
        return self._client_

    async def connect(self) -> None:
        async with self._errors("connect"):
            await self.client.ping()

    async def close(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            await hub.close()
        client, self._client_ = self._client_, None
        if client is not None:
            with suppress(*CONN_ERRORS):
                await client.aclose()

    @asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except rexc.RedisError as exc:
            raise BackendError(f"Redis result backend {what} failed: {exc}") from exc

    # -- the six primitives ----------------------------------------------------------

    async def _get(self, key: str) -> bytes | None:
        async with self._errors("get"):
            value: bytes | None = await self.client.get(key)  # type: ignore[assignment]
        return value

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        async with self._errors("mget"):
            values: list[bytes | None] = await self.client.mget(keys)  # type: ignore[assignment]
        return values

    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        """SET (PX ttl) then PUBLISH on the key's channel: one script, one round trip."""
        client = self.client
        assert self._store is not None
        px = "" if ttl is None else max(1, int(ttl * 1000))
        async with self._errors("store"):
            await self._store(keys=[key], args=[value, px], client=client)

    async def _delete(self, *keys: str) -> None:
        if keys:
            async with self._errors("delete"):
                await self.client.delete(*keys)

    async def _add_member(self, key: str, member: str, ttl: float | None) -> int:
        """The member's 1-based rank: the set's size after adding a new member; a member
        added again gets its first rank back (see ``KeyValueBackend.chord_join``)."""
        client = self.client
        assert self._add is not None
        px = "" if ttl is None else max(1, int(ttl * 1000))
        async with self._errors("chord join"):
            return int(await self._add(keys=[key], args=[member, px], client=client))

    # -- Celery's chord size key ---------------------------------------------------

    async def save_group(
        self, group_id: str, task_ids: Sequence[str], *, ttl: float | None
    ) -> None:
        await super().save_group(group_id, task_ids, ttl=ttl)
        px = None if ttl is None else max(1, int(ttl * 1000))
        async with self._errors("save group"):
            await self.client.set(GROUP_PREFIX + group_id + SIZE_SUFFIX, len(task_ids), px=px)

    async def forget_group(self, group_id: str) -> None:
        await super().forget_group(group_id)
        await self._delete(GROUP_PREFIX + group_id + SIZE_SUFFIX)

    async def wait(
        self, task_ids: Sequence[str], *, timeout: float | None
    ) -> AsyncGenerator[ResultMeta, None]:
        """Subscribe, then read what is stored, then take results from the PUBLISHes.

        A PUBLISH carries the stored document (``_STORE``), so a result that arrives
        costs no read; a hint without one (after a resubscribe) is read with GET. A
        second read of everything still pending every second covers a lost message.
        """
        pending = {TASK_PREFIX + t: t for t in dict.fromkeys(task_ids)}
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._hub is None:
            self._hub = _Hub(self.client)
        async with self._hub.watch(list(pending)) as inbox:
            reread = True
            while pending:
                if reread:
                    found = await self.get_many(list(pending.values()))
                    for key, tid in list(pending.items()):
                        meta = found.get(tid)
                        if meta is not None and meta.ready:
                            del pending[key]
                            yield meta
                    if not pending:
                        return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{len(pending)} result(s) not ready in time")
                try:
                    async with asyncio.timeout(1.0 if left is None else min(left, 1.0)):
                        key, data = await inbox.get()
                except TimeoutError:
                    reread = True
                    continue
                reread = False
                waited = pending.get(key)
                if waited is None:
                    continue
                meta = None
                if data is not None:
                    with suppress(Exception):  # not a meta document: read it instead
                        meta = self._meta(waited, data)
                if meta is None:
                    meta = await self.get(waited)
                if meta is not None and meta.ready:
                    del pending[key]
                    yield meta


class _Hub:
    """One pub/sub connection shared by every ``wait`` on this backend instance."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.ps: PubSub | None = None
        self.watchers: dict[str, set[asyncio.Queue[tuple[str, bytes | None]]]] = {}
        self.confirming: dict[str, list[asyncio.Future[None]]] = {}
        self.reader: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def watch(
        self, keys: list[str]
    ) -> AsyncIterator[asyncio.Queue[tuple[str, bytes | None]]]:
        """A queue of ``(key, published data)``, once the subscriptions hold; ``data`` is
        None for a hint that the key may have changed."""
        queue: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue()
        new = [k for k in keys if k not in self.watchers]
        for k in keys:
            self.watchers.setdefault(k, set()).add(queue)
        try:
            others = [f for k in keys if k not in new for f in self.confirming.get(k, [])]
            if new:
                await self._subscribe(new)
            if others:
                await asyncio.wait(others, timeout=5.0)
            yield queue
        finally:
            gone = []
            for k in keys:
                qs = self.watchers.get(k)
                if qs is not None:
                    qs.discard(queue)
                    if not qs:
                        del self.watchers[k]
                        gone.append(k)
            if gone and self.ps is not None:
                with suppress(*CONN_ERRORS):
                    await self.ps.unsubscribe(*gone)
    async def _subscribe(self, channels: list[str]) -> None:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in channels]
        for ch, fut in zip(channels, futures, strict=True):
            self.confirming.setdefault(ch, []).append(fut)
        try:
            if self.ps is None:
                self.ps = self.client.pubsub()
            await self.ps.subscribe(*channels)
            if self.reader is None or self.reader.done():
                self.reader = loop.create_task(self._read())
            await asyncio.wait(futures, timeout=5.0)  # on timeout, the base polls anyway
        except CONN_ERRORS as exc:
            logger.warning("result pub/sub subscribe failed (%s); waiting by polling", exc)
        finally:
            for ch, fut in zip(channels, futures, strict=True):
                waiting = self.confirming.get(ch, [])
                if fut in waiting:
                    waiting.remove(fut)
                if not waiting:
                    self.confirming.pop(ch, None)

    async def _read(self) -> None:
        delay = 0.1
        while self.ps is not None:
            try:
                msg = await self.ps.get_message(timeout=None)
            except CONN_ERRORS as exc:
                logger.warning("result pub/sub connection lost (%s); resubscribing", exc)
                while True:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    try:
                        await self._resubscribe()
                        break
                    except CONN_ERRORS:
                        continue
                continue
            delay = 0.1
            if msg is None:
                continue
            channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else ""
            if msg["type"] == "message":
                data = msg["data"] if isinstance(msg["data"], bytes) else None
                for q in self.watchers.get(channel, ()):
                    q.put_nowait((channel, data))
            elif msg["type"] == "subscribe":
                for fut in self.confirming.pop(channel, []):
                    if not fut.done():
                        fut.set_result(None)

    async def _resubscribe(self) -> None:
        """A fresh connection for every watched channel; hint all, as messages were lost."""
        old, self.ps = self.ps, None
        if old is not None:
            with suppress(*CONN_ERRORS):
                await old.aclose()  # type: ignore[no-untyped-call]
        if not self.watchers:
            return  # the reader stops; the next watch starts afresh
        ps = self.client.pubsub()
        try:
            await ps.subscribe(*self.watchers)
        except BaseException:
            with suppress(*CONN_ERRORS):
                await ps.aclose()  # type: ignore[no-untyped-call]
            raise
        self.ps = ps
        for k, qs in self.watchers.items():
            for q in qs:
                q.put_nowait((k, None))

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.wait({self.reader})
        if self.ps is not None:
            with suppress(*CONN_ERRORS):
                await self.ps.aclose()  # type: ignore[no-untyped-call]
            self.ps = None
