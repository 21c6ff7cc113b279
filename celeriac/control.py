"""Client side of remote control: ``app.control`` and ``app.control.inspect()``.

Requests and replies ride on the transport's broadcast channel, so ``inspect``,
``control`` and ``status`` work on every broker, the embedded one included.

Wire format (orjson bytes):

* request on channel ``celeriac.pidbox``::

    {"method": str, "arguments": {...}, "destination": [node, ...] | null,
     "pattern": str | null, "matcher": "glob" | "pcre" | null, "ticket": uuid,
     "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": oid} | null,
     "expires": unix time | null}

  ``reply_to`` is null when no reply is wanted (Celery's fire-and-forget revoke).
* reply on channel ``celeriac.reply.<oid>``: ``{"ticket": uuid, "node": {nodename: result}}``.

The client subscribes to its reply channel *before* it broadcasts, so a fast worker's
reply cannot be missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from .exceptions import TransportError

__all__ = [
    "PIDBOX_CHANNEL",
    "REPLY_EXCHANGE",
    "Control",
    "Inspect",
    "decode",
    "encode",
    "reply_channel",
]

logger = logging.getLogger(__name__)

PIDBOX_CHANNEL = "celeriac.pidbox"
REPLY_EXCHANGE = "reply.celery.pidbox"
REPLY_PREFIX = "celeriac.reply."

Reply = dict[str, Any]
Callback = Callable[[Reply], None]


def reply_channel(oid: str) -> str:
    return REPLY_PREFIX + oid


def _default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=str)
    return repr(obj)


def encode(obj: Any) -> bytes:
    """JSON for the mailbox; anything orjson cannot encode travels as its repr."""
    return orjson.dumps(obj, default=_default, option=orjson.OPT_NON_STR_KEYS)


def decode(data: bytes | str) -> Any:
    return orjson.loads(data)


def _nodes(destination: str | Sequence[str] | None) -> list[str] | None:
    if destination is None:
        return None
    if isinstance(destination, str):
        return [destination]
    return list(destination)


def _flatten(replies: list[Reply]) -> dict[str, Any] | None:
    """Celery returns None, not ``{}``, when nobody answered."""
    if not replies:
        return None
    merged: dict[str, Any] = {}
    for reply in replies:
        merged.update(reply)
    return merged


class Control:
    """Broadcast commands to workers and gather their replies (Celery's ``app.control``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        # One reply address per client, as Celery's thread oid; tickets tell requests apart.
        self.oid = uuid.uuid4().hex

    async def _transport(self) -> Any:
        conn = await self.app.connection_for_current_loop()
        return conn.transport

    async def abroadcast(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        destination: str | Sequence[str] | None = None,
        reply: bool = False,
        timeout: float = 1.0,
        limit: int | None = None,
        callback: Callback | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
    ) -> list[Reply]:
        """Send ``command``; with ``reply`` wait up to ``timeout`` for ``limit`` replies."""
        nodes = _nodes(destination)
        ticket = str(uuid.uuid4())
        request = {
            "method": command,
            "arguments": dict(arguments or {}),
            "destination": nodes,
            "pattern": pattern,
            "matcher": matcher,
            "ticket": ticket,
            "reply_to": {"exchange": REPLY_EXCHANGE, "routing_key": self.oid} if reply else None,
            "expires": time.time() + timeout if reply else None,
        }
        transport = await self._transport()
        payload = encode(request)
        if not reply:
            await transport.broadcast(PIDBOX_CHANNEL, payload)
            return []
        if limit is None and nodes:
            limit = len(nodes)
        replies: list[Reply] = []
        async with transport.subscribe(reply_channel(self.oid)) as stream:
            await transport.broadcast(PIDBOX_CHANNEL, payload)
            try:
                async with asyncio.timeout(timeout):
                    async for raw in stream:
                        body = self._accept(raw, ticket)
                        if body is None:
                            continue
                        replies.append(body)
                        if callback is not None:
                            callback(body)
                        if limit and len(replies) >= limit:
                            break
            except TimeoutError:
                pass
        return replies

    @staticmethod
    def _accept(raw: bytes, ticket: str) -> Reply | None:
        try:
            msg = decode(raw)
        except orjson.JSONDecodeError:
            logger.warning("Ignoring a remote-control reply that is not JSON: %r", raw[:200])
            return None
        if not isinstance(msg, dict) or msg.get("ticket") != ticket:
            return None
        node = msg.get("node")
        return node if isinstance(node, dict) else None

    def broadcast(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        destination: str | Sequence[str] | None = None,
        reply: bool = False,
        timeout: float = 1.0,
        limit: int | None = None,
        callback: Callback | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
    ) -> list[Reply]:
        result: list[Reply] = self.app.portal.run(
            self.abroadcast(
                command,
                arguments,
                destination,
                reply=reply,
                timeout=timeout,
                limit=limit,
                callback=callback,
                pattern=pattern,
                matcher=matcher,
            )
        )
        return result

    def inspect(
        self,
        destination: str | Sequence[str] | None = None,
        timeout: float = 1.0,
        callback: Callback | None = None,
        limit: int | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
    ) -> Inspect:
        return Inspect(
            self,
            destination=destination,
            timeout=timeout,
            callback=callback,
            limit=limit,
            pattern=pattern,
            matcher=matcher,
        )

    # -- Celery's named commands; ``kwargs`` are broadcast() options (reply, timeout...) --

    def ping(
        self, destination: str | Sequence[str] | None = None, timeout: float = 1.0, **kwargs: Any
    ) -> list[Reply]:
        return self.broadcast("ping", {}, destination, reply=True, timeout=timeout, **kwargs)

    def revoke(
        self,
        task_id: str | Sequence[str],
        destination: str | Sequence[str] | None = None,
        terminate: bool = False,
        signal: str = "SIGTERM",
        **kwargs: Any,
    ) -> list[Reply]:
        arguments = {"task_id": task_id, "terminate": terminate, "signal": signal}
        return self.broadcast("revoke", arguments, destination, **kwargs)

    def terminate(
        self,
        task_id: str | Sequence[str],
        destination: str | Sequence[str] | None = None,
        signal: str = "SIGTERM",
        **kwargs: Any,
    ) -> list[Reply]:
        return self.revoke(task_id, destination, terminate=True, signal=signal, **kwargs)

    def rate_limit(
        self,
        task_name: str,
        rate_limit: str | int | float | None,
        destination: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[Reply]:
        arguments = {"task_name": task_name, "rate_limit": rate_limit}
        return self.broadcast("rate_limit", arguments, destination, **kwargs)

    def time_limit(
        self,
        task_name: str,
        soft: float | None = None,
        hard: float | None = None,
        destination: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[Reply]:
        arguments = {"task_name": task_name, "soft": soft, "hard": hard}
        return self.broadcast("time_limit", arguments, destination, **kwargs)

    def add_consumer(
        self,
        queue: str,
        exchange: str | None = None,
        exchange_type: str = "direct",
        routing_key: str | None = None,
        options: dict[str, Any] | None = None,
        destination: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[Reply]:
        arguments = {
            "queue": queue,
            "exchange": exchange,
            "exchange_type": exchange_type,
            "routing_key": routing_key,
            **(options or {}),
        }
        return self.broadcast("add_consumer", arguments, destination, **kwargs)

    def cancel_consumer(
        self, queue: str, destination: str | Sequence[str] | None = None, **kwargs: Any
    ) -> list[Reply]:
        return self.broadcast("cancel_consumer", {"queue": queue}, destination, **kwargs)

    def enable_events(
        self, destination: str | Sequence[str] | None = None, **kwargs: Any
    ) -> list[Reply]:
        return self.broadcast("enable_events", {}, destination, **kwargs)

    def disable_events(
        self, destination: str | Sequence[str] | None = None, **kwargs: Any
    ) -> list[Reply]:
        return self.broadcast("disable_events", {}, destination, **kwargs)

    def pool_grow(
        self, n: int = 1, destination: str | Sequence[str] | None = None, **kwargs: Any
    ) -> list[Reply]:
        return self.broadcast("pool_grow", {"n": n}, destination, **kwargs)

    def pool_shrink(
        self, n: int = 1, destination: str | Sequence[str] | None = None, **kwargs: Any
    ) -> list[Reply]:
        return self.broadcast("pool_shrink", {"n": n}, destination, **kwargs)

    def autoscale(
        self, max: int, min: int, destination: str | Sequence[str] | None = None, **kwargs: Any
    ) -> list[Reply]:
        return self.broadcast("autoscale", {"max": max, "min": min}, destination, **kwargs)

    def shutdown(
        self, destination: str | Sequence[str] | None = None, **kwargs: Any
    ) -> list[Reply]:
        return self.broadcast("shutdown", {}, destination, **kwargs)

    def heartbeat(
        self, destination: str | Sequence[str] | None = None, **kwargs: Any
    ) -> list[Reply]:
        return self.broadcast("heartbeat", {}, destination, **kwargs)

    # -- purge works on the queues, not the workers --

    async def apurge(self, queues: Iterable[str] | None = None) -> int:
        """Delete waiting messages from ``queues`` (default: the app's declared queues)."""
        names = list(queues) if queues is not None else self._declared_queue_names()
        transport = await self._transport()
        total = 0
        for name in names:
            try:
                total += await transport.purge(name)
            except TransportError as exc:
                # A queue nobody declared yet has nothing to purge (Celery ignores it too).
                logger.debug("Could not purge queue %r: %s", name, exc)
        return total

    def purge(self, queues: Iterable[str] | None = None) -> int:
        result: int = self.app.portal.run(self.apurge(queues))
        return result

    discard_all = purge

    def _declared_queue_names(self) -> list[str]:
        return [queue.name for queue in self.app.router.declared_queues()]


class Inspect:
    """Ask workers about their state; each method returns ``{node: reply}`` or None."""

    def __init__(
        self,
        control: Control,
        destination: str | Sequence[str] | None = None,
        timeout: float = 1.0,
        callback: Callback | None = None,
        limit: int | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
    ) -> None:
        self.control = control
        self.destination = _nodes(destination)
        self.timeout = timeout
        self.callback = callback
        self.limit = limit
        self.pattern = pattern
        self.matcher = matcher

    async def arequest(self, command: str, **arguments: Any) -> dict[str, Any] | None:
        replies = await self.control.abroadcast(
            command,
            arguments,
            self.destination,
            reply=True,
            timeout=self.timeout,
            limit=self.limit,
            callback=self.callback,
            pattern=self.pattern,
            matcher=self.matcher,
        )
        return _flatten(replies)

    def _request(self, command: str, **arguments: Any) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.control.app.portal.run(
            self.arequest(command, **arguments)
        )
        return result

    def active(self, safe: bool | None = None) -> dict[str, Any] | None:
        return self._request("active", safe=safe)

    def reserved(self, safe: bool | None = None) -> dict[str, Any] | None:
        return self._request("reserved", safe=safe)

    def scheduled(self, safe: bool | None = None) -> dict[str, Any] | None:
        return self._request("scheduled", safe=safe)

    def revoked(self) -> dict[str, Any] | None:
        return self._request("revoked")

    def registered(self, *taskinfoitems: str) -> dict[str, Any] | None:
        return self._request("registered", taskinfoitems=list(taskinfoitems) or None)

    registered_tasks = registered

    def stats(self) -> dict[str, Any] | None:
        return self._request("stats")

    def active_queues(self) -> dict[str, Any] | None:
        return self._request("active_queues")

    def ping(self) -> dict[str, Any] | None:
        return self._request("ping")

    def query_task(self, *ids: str | Sequence[str]) -> dict[str, Any] | None:
        # Celery accepts query_task(id1, id2) and query_task([id1, id2]).
        flat: list[str] = []
        for item in ids:
            flat.extend([item] if isinstance(item, str) else item)
        return self._request("query_task", ids=flat)

    def conf(self, with_defaults: bool = False) -> dict[str, Any] | None:
        return self._request("conf", with_defaults=with_defaults)

    def report(self) -> dict[str, Any] | None:
        return self._request("report")

    def clock(self) -> dict[str, Any] | None:
        return self._request("clock")
