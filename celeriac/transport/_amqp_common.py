"""Names, headers and message helpers shared by the RabbitMQ transport and its consumers.

The broker layout is described in ``celeriac/transport/amqp.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiormq import exceptions as aexc
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from .base import (
    MAX_PRIORITY,
    Envelope,
    Outgoing,
    QueueSpec,
    TransportError,
    clamp_priority,
)

logger = logging.getLogger("celeriac.transport.amqp")

T = TypeVar("T")

LEVELS = 32
MAX_DELAY_MS = 2**LEVELS - 1
DELAY = "celeriac.delay."
DUE = "celeriac.delay.due"
LOCK = "celeriac.lock."
BROADCAST = "celeriac.bc."
NOT_BEFORE = "x-celeriac-not-before"
# RabbitMQ's dead-lettering history. Dropped from messages that went through our delay
# chain: a copy re-published with it would look like a dead-letter cycle and be dropped.
DEATH = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)
CONN_ERRORS = (aexc.AMQPConnectionError, aexc.ChannelInvalidStateError, ConnectionError, OSError)
LISTEN_ERRORS = (*CONN_ERRORS, aexc.AMQPError, TransportError)


# -- names and encodings ------------------------------------------------------------------


def exchange_name(level: int) -> str:
    """Delay exchange of ``level``; level -1 is the end of the cascade."""
    return f"{DELAY}{level:02d}" if level >= 0 else DUE


def delay_queue(queue: str, level: int) -> str:
    return f"{DELAY}{queue}.{level:02d}"


def exit_queue(queue: str) -> str:
    return f"{DELAY}{queue}.due"


def delay_queues(queue: str) -> list[str]:
    """Every queue of ``queue``'s delay chain (they exist once it had a delayed message)."""
    return [*(delay_queue(queue, k) for k in range(LEVELS)), exit_queue(queue)]


def queue_tag(queue: str) -> str:
    return hashlib.blake2b(queue.encode(), digest_size=8).hexdigest()


def delay_key(delay_ms: int, queue: str) -> str:
    bits = format(min(max(delay_ms, 0), MAX_DELAY_MS), f"0{LEVELS}b")
    return ".".join(bits) + "." + queue_tag(queue)


def _pattern(level: int, bit: str, tail: str) -> str:
    """Topic pattern matching ``bit`` at ``level``'s position of a delay key."""
    return "*." * (LEVELS - 1 - level) + bit + "." + tail


def queue_arguments(queue: QueueSpec) -> dict[str, Any]:
    args = dict(queue.arguments)
    if args.get("x-queue-type", "classic") == "classic":
        args.setdefault(
            "x-max-priority", MAX_PRIORITY if queue.max_priority is None else queue.max_priority
        )
    return args


def amqp_url(url: str) -> str:
    """Celery's URL forms to the ``amqp(s)://`` that aio-pika takes."""
    scheme, _, rest = url.partition("://")
    if not rest or rest[0] in "/?":
        rest = "guest:guest@localhost" + rest
    return ("amqps" if scheme.lower() == "amqps" else "amqp") + "://" + rest


def _table(value: Any) -> Any:
    """AMQP tables take lists and dicts, not tuples (Celery's ``timelimit`` is one)."""
    if isinstance(value, Mapping):
        return {str(k): _table(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_table(v) for v in value]
    return value


def _properties(env: Envelope, not_before: float | None) -> spec.Basic.Properties:
    headers = _table(env.headers)
    if not_before is not None:
        headers[NOT_BEFORE] = int(not_before * 1000)  # ms: AMQP floats are 32-bit
        for key in DEATH:
            headers.pop(key, None)
    return spec.Basic.Properties(
        content_type=env.content_type,
        content_encoding=env.content_encoding,
        headers=headers,
        delivery_mode=2 if env.persistent else 1,
        priority=clamp_priority(env.priority),
        correlation_id=env.correlation_id,
        reply_to=env.reply_to,
    )


def _envelope(msg: DeliveredMessage) -> Envelope:
    p = msg.header.properties
    headers = dict(p.headers or {})
    if headers.pop(NOT_BEFORE, None) is not None:
        for key in DEATH:
            headers.pop(key, None)
    return Envelope(
        body=msg.body,
        headers=headers,
        content_type=p.content_type or "application/json",
        content_encoding=p.content_encoding or "utf-8",
        priority=p.priority,
        correlation_id=p.correlation_id,
        reply_to=p.reply_to or None,
        persistent=p.delivery_mode != 1,
    )


def _not_before(msg: DeliveredMessage) -> float | None:
    value = (msg.header.properties.headers or {}).get(NOT_BEFORE)
    return value / 1000 if isinstance(value, int) else None


def _reason(exc: BaseException) -> str:
    return " ".join(str(a) for a in exc.args) or type(exc).__name__


@dataclass(slots=True)
class _Send:
    item: Outgoing | None  # None for broadcasts
    exchange: str
    routing_key: str
    body: bytes
    properties: spec.Basic.Properties
    mandatory: bool = True


@dataclass(eq=False, slots=True)
class _Held:
    owner: str
    expires: float
    connection: object
    timer: asyncio.TimerHandle | None = None
