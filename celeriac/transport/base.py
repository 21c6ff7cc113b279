"""The broker contract: what every transport does, and the value types it moves.

Semantic rules every implementation keeps (the contract suite in
``tests/contract/test_transport.py`` checks each one on every broker):

* **Priority** is 0-9 within a queue, higher first, FIFO within one priority.
* **Delay**: a message with ``not_before`` is never delivered before that time; the
  broker holds it, so no worker sits on an unacked message waiting for its ETA.
* **Leases**: a delivery belongs to its consumer until acked or rejected. Leaving the
  consumer context, or the consumer dying (heartbeat stale, or its pid gone on this
  host), returns unacked deliveries to their queue, flagged ``redelivered``.
* **Dead letters**: ``reject(requeue=False)`` and stored messages that cannot be
  unpacked go to the ordinary queue ``<queue>.dead`` with the reason in the
  ``x-dead-reason`` header, so size/purge/consume work on it unchanged.
* **Routing**: bindings are stored in the broker at ``declare`` time; exchange ``""``
  routes straight to the queue named by the routing key.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import orjson

from ..exceptions import TransportError

__all__ = [
    "Consumer",
    "Delivery",
    "Envelope",
    "Features",
    "Outgoing",
    "QueueSpec",
    "Transport",
    "TransportError",
    "dead_letter_name",
    "pack",
    "unpack",
]

DEAD_SUFFIX = ".dead"
MAX_PRIORITY = 9


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message as every broker sees it: opaque body plus Celery protocol headers."""

    body: bytes
    headers: Mapping[str, Any]
    content_type: str
    content_encoding: str = "utf-8"
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    persistent: bool = True


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message on its way to an exchange; ``not_before`` is unix time kept by the broker."""

    envelope: Envelope
    exchange: str
    routing_key: str
    not_before: float | None = None


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    exchange: str = ""
    exchange_type: Literal["direct", "topic", "fanout"] = "direct"
    routing_key: str = ""
    durable: bool = True
    auto_delete: bool = False
    max_priority: int | None = None
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    envelope: Envelope
    queue: str
    exchange: str
    routing_key: str
    redelivered: bool
    tag: object


@dataclass(frozen=True, slots=True)
class Features:
    native_routing: bool = False
    native_priority: bool = True
    push_delivery: bool = False
    cross_process: bool = True


def dead_letter_name(queue: str) -> str:
    return queue + DEAD_SUFFIX


def clamp_priority(priority: int | None) -> int:
    if priority is None:
        return 0
    return max(0, min(MAX_PRIORITY, int(priority)))


# -- the stored form: kombu's JSON envelope, so Celery tools can read our queues --


def pack(env: Envelope, exchange: str, routing_key: str, *, redelivered: bool = False) -> bytes:
    """Serialise an envelope the way kombu stores it on Redis (body base64)."""
    headers = dict(env.headers)
    if redelivered:
        headers["redelivered"] = True
    doc = {
        "body": base64.b64encode(env.body).decode("ascii"),
        "content-encoding": env.content_encoding,
        "content-type": env.content_type,
        "headers": headers,
        "properties": {
            "correlation_id": env.correlation_id,
            "reply_to": env.reply_to,
            "delivery_mode": 2 if env.persistent else 1,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": clamp_priority(env.priority),
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return orjson.dumps(doc)


def unpack(data: bytes | str) -> tuple[Envelope, str, str, bool]:
    """Inverse of :func:`pack`: ``(envelope, exchange, routing_key, redelivered)``.

    Raises ValueError naming what is wrong, so callers can dead-letter the raw bytes.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"stored message is not JSON: {exc}") from None
    if not isinstance(doc, dict) or "body" not in doc:
        raise ValueError("stored message is not a kombu envelope (no 'body')")
    props = doc.get("properties") or {}
    headers = doc.get("headers") or {}
    if not isinstance(props, dict) or not isinstance(headers, dict):
        raise ValueError("stored message has malformed 'properties' or 'headers'")
    body = doc["body"]
    if props.get("body_encoding") == "base64":
        try:
            raw = base64.b64decode(body)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"stored message body is not base64: {exc}") from None
    else:
        raw = body.encode() if isinstance(body, str) else bytes(body)
    info = props.get("delivery_info") or {}
    env = Envelope(
        body=raw,
        headers=headers,
        content_type=doc.get("content-type") or "application/json",
        content_encoding=doc.get("content-encoding") or "utf-8",
        priority=props.get("priority"),
        correlation_id=props.get("correlation_id"),
        reply_to=props.get("reply_to"),
        persistent=props.get("delivery_mode", 2) != 1,
    )
    redelivered = bool(headers.get("redelivered") or info.get("redelivered"))
    return env, info.get("exchange", ""), info.get("routing_key", ""), redelivered


def with_dead_reason(env: Envelope, reason: str) -> Envelope:
    return replace(env, headers={**env.headers, "x-dead-reason": reason})


# -- the contracts ------------------------------------------------------------


class Consumer:
    """One per worker: yields deliveries, owns prefetch, leases and heartbeats."""

    def __aiter__(self) -> AsyncIterator[Delivery]:
        raise NotImplementedError

    async def ack(self, delivery: Delivery) -> None:
        raise NotImplementedError

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        raise NotImplementedError

    async def set_prefetch(self, count: int) -> None:
        """Change how many unacked deliveries may be outstanding; 0 means unlimited."""
        raise NotImplementedError

    async def add_queue(self, queue: QueueSpec) -> None:
        raise NotImplementedError

    async def cancel_queue(self, name: str) -> None:
        raise NotImplementedError

    @property
    def queues(self) -> list[QueueSpec]:
        raise NotImplementedError


class Transport:
    """A broker connection owned by one event loop."""

    schemes: ClassVar[tuple[str, ...]] = ()
    features: ClassVar[Features] = Features()

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.options = dict(options or {})

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def declare(self, queues: Sequence[QueueSpec]) -> None:
        raise NotImplementedError

    async def publish(self, item: Outgoing) -> None:
        await self.publish_many([item])

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        raise NotImplementedError

    def consumer(
        self, queues: Sequence[QueueSpec], *, prefetch: int, consumer_id: str
    ) -> AbstractAsyncContextManager[Consumer]:
        raise NotImplementedError

    async def purge(self, queue: str) -> int:
        raise NotImplementedError

    async def size(self, queue: str) -> int:
        raise NotImplementedError

    async def broadcast(self, channel: str, payload: bytes) -> None:
        raise NotImplementedError

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Receive every payload broadcast on ``channel`` from the moment this is entered."""
        raise NotImplementedError

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew a named lock for ``ttl`` seconds; true while ``owner`` holds it."""
        raise NotImplementedError

    def describe(self) -> str:
        """The URL with any password hidden, for banners and logs."""
        return redact_url(self.url)


def redact_url(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:**@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


def unsupported(what: str, transport: str) -> TransportError:
    return TransportError(f"{transport} transport does not support {what}")
