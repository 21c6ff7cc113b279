"""RabbitMQ broker (AMQP 0-9-1 through aio-pika/aiormq): native routing, priorities, acks.

URL: ``amqp://user:password@host:5672/vhost`` (Celery's ``//`` means vhost ``/``),
``amqps://`` and ``pyamqp://`` (same as ``amqp://``); a bare ``amqp://`` is
``guest:guest@localhost``. Options: ``retry_timeout`` (20 s: how long a call waits for a
lost connection to come back before TransportError), ``connect_timeout`` (10 s),
``reconnect_interval`` (1 s).

Broker objects, all in the URL's vhost:

================================  ========  ================================================
name                              kind      content
================================  ========  ================================================
``<queue>``                       queue     durable, ``x-max-priority`` = the spec's
                                            ``max_priority`` or 9 (none on quorum/stream
                                            queues), bound to its exchange. Messages are
                                            Celery's: protocol-v2 headers as AMQP headers,
                                            the body bytes, properties correlation_id,
                                            reply_to, content_type/encoding, delivery_mode,
                                            priority, so Celery workers consume them.
``<queue>.dead``                  queue     ordinary queue: a copy of each message rejected
                                            without requeue, with ``x-dead-reason``
``celeriac.delay.NN`` (31..00)    exchange  topic; level NN of the delay cascade
``celeriac.delay.due``            exchange  topic; end of the cascade
``celeriac.delay.<queue>.NN``     queue     ``x-message-ttl`` 2^NN ms; dead-letters to
                                            exchange NN-1 (``due`` after 00)
``celeriac.delay.<queue>.due``    queue     bound to ``due`` by ``#.<tag>``; TTL 0: at
                                            once dead-letters through exchange ``""`` to
                                            ``<queue>``, so a deleted and re-declared
                                            queue still gets its delayed messages
``celeriac.lock.<name>``          queue     exclusive: exists while ``try_lock`` is held
``celeriac.bc.<channel>``         exchange  fanout; each subscriber binds an exclusive
                                            auto-delete server-named queue
================================  ========  ================================================

**Delay** (``not_before``) is kept by the broker in binary levels (kombu's native delayed
delivery scheme, per queue). The routing key is the delay in ms as 32 binary digits (bit
31 first), then ``<tag>`` (16 hex digits of the queue name's blake2b). Exchange NN routes
a message whose bit NN is 1 to ``celeriac.delay.<queue>.NN`` and one whose bit is 0 on to
exchange NN-1. A level queue's messages all share one TTL, so they expire in arrival
order: no head-of-line blocking, which a single queue with a per-message ``expiration``
has (RabbitMQ only expires a queue's head, so a long delay holds up shorter ones behind
it). The chains are per queue, unlike kombu's shared levels, so ``size`` and ``purge``
count and drop a queue's delayed messages; a chain is made on a queue's first delayed
message and stays. A delay to a named exchange (whose queues a producer cannot know) or
beyond 2^32 ms (49.7 days) is published now (or after the maximum) with the header
``x-celeriac-not-before`` (unix ms); a celeriac consumer that receives it early parks it
in its queue's chain (publish, then ack) instead of yielding it, and a Celery worker
honours the ``eta`` header.

**Leases** are unacked deliveries on the consumer's channel: closing the channel, or
losing the connection, returns them and RabbitMQ flags them redelivered. Prefetch is
``basic.qos`` per consumer (RabbitMQ applies a change only to consumers started after
it, so ``set_prefetch`` re-subscribes), plus a client-side cap: at most ``prefetch``
deliveries are handed out unsettled across all queues (with several queues, up to
``prefetch`` per queue may wait unacked in the consumer's buffer).

**Publishing** uses publisher confirms and ``mandatory``: a call returns once RabbitMQ
has the message, and an unroutable one raises TransportError (``publish_many`` is not
atomic: earlier messages of the batch stay published). Publishing on exchange ``""`` to
a queue that does not exist declares it first, as Celery does.

**Celery on the same vhost**: Celery declares queues without ``x-max-priority`` and
RabbitMQ refuses a re-declaration with other arguments, so set Celery's
``task_queue_max_priority = 9`` (the error names the queue if they differ).

Header floats travel as AMQP 32-bit floats (pamqp's encoding): about 7 significant digits.

**try_lock** holds the exclusive queue ``celeriac.lock.<name>`` on this connection; the
owner's timer deletes it after ``ttl`` unless renewed, and RabbitMQ deletes it when the
connection dies, so a dead leader's lock goes at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from functools import partial
from typing import Any, ClassVar

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aiormq import exceptions as aexc
from aiormq.abc import AbstractChannel, AbstractConnection
from pamqp import commands as spec

from ._amqp_common import (
    BROADCAST,
    CONN_ERRORS,
    DUE,
    LEVELS,
    LISTEN_ERRORS,
    LOCK,
    T,
    _Held,
    _pattern,
    _properties,
    _reason,
    _Send,
    amqp_url,
    delay_key,
    delay_queue,
    delay_queues,
    exchange_name,
    exit_queue,
    queue_arguments,
    queue_tag,
)
from ._amqp_consumer import AMQPConsumer, _Subscriber
from .base import (
    MAX_PRIORITY,
    Consumer,
    Features,
    Outgoing,
    QueueSpec,
    Transport,
    TransportError,
)

__all__ = ["AMQPConsumer", "AMQPTransport", "delay_queues"]

logger = logging.getLogger(__name__)


class AMQPTransport(Transport):
    """One robust connection; short-lived work on two shared channels (admin, publish)."""

    schemes: ClassVar[tuple[str, ...]] = ("amqp", "amqps", "pyamqp")
    features: ClassVar[Features] = Features(native_routing=True, push_delivery=True)

    def __init__(
        self,
        url: str = "amqp://guest:guest@localhost:5672//",
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(url, options)
        self.retry_timeout = float(self.options.get("retry_timeout", 20.0))
        self.connect_timeout = float(self.options.get("connect_timeout", 10.0))
        self.reconnect_interval = float(self.options.get("reconnect_interval", 1.0))
        self._conn: AbstractRobustConnection | None = None
        self._channels: dict[str, AbstractChannel] = {}
        self._conn_lock = asyncio.Lock()
        self._chan_lock = asyncio.Lock()
        self._known: set[str] = set()  # queues known to exist
        self._chains: set[str] = set()  # queues whose delay chain exists
        self._exchanges: set[str] = set()
        self._topology = False
        self._locks: dict[str, _Held] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.closed = False  # set by close(); connect() opens again

    # -- connection and channels --------------------------------------------------------

    async def connect(self) -> None:
        self.closed = False
        await self._connection()

    async def _connection(self) -> AbstractRobustConnection:
        if self._conn is not None and not self._conn.is_closed:
            return self._conn
        if self.closed:
            raise TransportError(f"the RabbitMQ transport for {self.describe()} is closed")
        async with self._conn_lock:
            if self._conn is None or self._conn.is_closed:
                try:
                    conn = await aio_pika.connect_robust(
                        amqp_url(self.url),
                        timeout=self.connect_timeout,
                        reconnect_interval=self.reconnect_interval,
                        client_properties={"connection_name": "celeriac"},
                    )
                except (aexc.AMQPError, ConnectionError, OSError, TimeoutError) as exc:
                    raise TransportError(
                        f"cannot reach RabbitMQ at {self.describe()}: {_reason(exc)}"
                    ) from exc
                conn.reconnect_callbacks.add(self._reconnected)
                self._conn = conn
        return self._conn

    def _reconnected(self, *_: Any) -> None:
        logger.info("reconnected to RabbitMQ at %s", self.describe())

    async def _underlay(self) -> AbstractConnection:
        """The current aiormq connection, waiting up to ``retry_timeout`` for a reconnect."""
        conn = await self._connection()
        try:
            await asyncio.wait_for(conn.ready(), self.retry_timeout)
        except TimeoutError:
            raise TransportError(
                f"RabbitMQ at {self.describe()} has been unreachable for {self.retry_timeout:g} s"
            ) from None
        if conn.transport is None:
            raise ConnectionError("connection is being re-established")
        return conn.transport.connection

    async def open_channel(self, *, confirms: bool = False) -> AbstractChannel:
        under = await self._underlay()
        try:
            ch: AbstractChannel = await under.channel(
                publisher_confirms=confirms, on_return_raises=confirms
            )
        except RuntimeError as exc:  # aiormq: the connection closed meanwhile
            raise ConnectionError(str(exc)) from exc
        return ch

    async def _channel(self, slot: str) -> AbstractChannel:
        ch = self._channels.get(slot)
        if ch is None or ch.is_closed:
            async with self._chan_lock:
                ch = self._channels.get(slot)
                if ch is None or ch.is_closed:
                    ch = await self.open_channel(confirms=slot == "pub")
                    self._channels[slot] = ch
        return ch

    async def _admin(self, op: Callable[[AbstractChannel], Awaitable[T]]) -> T:
        """Run ``op`` on the admin channel, retrying through a reconnect. A broker error
        closes that channel (the next call opens another) and reaches ``op``'s caller."""
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.05
        while True:
            try:
                return await op(await self._channel("admin"))
            except CONN_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise TransportError(
                        f"RabbitMQ at {self.describe()} is unavailable: {_reason(exc)}"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def close(self) -> None:
        self.closed = True
        for held in self._locks.values():
            if held.timer is not None:
                held.timer.cancel()
        self._locks.clear()
        for task in list(self._background):
            task.cancel()
        conn, self._conn = self._conn, None
        self._channels.clear()
        if conn is not None:
            with suppress(*LISTEN_ERRORS):
                await conn.close()

    # -- declarations ---------------------------------------------------------------------

    async def declare(self, queues: Sequence[QueueSpec]) -> None:
        for queue in queues:
            try:
                await self._admin(partial(self._declare, queue=queue))
            except aexc.AMQPError as exc:
                raise TransportError(
                    f"cannot declare queue {queue.name!r} on exchange "
                    f"{queue.exchange!r}: {_reason(exc)}"
                ) from exc
            self._known.add(queue.name)

    async def _declare(self, ch: AbstractChannel, queue: QueueSpec) -> None:
        q = queue
        if q.exchange:
            try:
                await ch.exchange_declare(
                    q.exchange,
                    exchange_type=q.exchange_type,
                    durable=True,
                    passive=q.exchange.startswith("amq."),
                )
            except aexc.ChannelPreconditionFailed as exc:
                raise TransportError(
                    f"exchange {q.exchange!r} already exists with another type or durability "
                    f"than {q.exchange_type}, durable ({_reason(exc)})"
                ) from None
        args = queue_arguments(q)
        try:
            await ch.queue_declare(
                q.name, durable=q.durable, auto_delete=q.auto_delete, arguments=args
            )
        except aexc.ChannelPreconditionFailed as exc:
            raise TransportError(
                f"queue {q.name!r} already exists with other settings than durable={q.durable}, "
                f"auto_delete={q.auto_delete}, arguments={args!r} ({_reason(exc)}); delete it or "
                f"declare it alike everywhere (Celery: task_queue_max_priority = 9)"
            ) from None
        except aexc.ChannelLockedResource as exc:
            raise TransportError(
                f"queue {q.name!r} is another connection's exclusive queue ({_reason(exc)})"
            ) from None
        if q.exchange:
            await ch.queue_bind(q.name, q.exchange, routing_key=q.routing_key)

    async def _ensure_queue(self, name: str) -> None:
        """Exchange ``""`` always routes: declare a queue the first time it is named."""
        if name in self._known or not name or name.startswith("amq."):
            return

        async def op(ch: AbstractChannel) -> None:
            with suppress(
                aexc.ChannelPreconditionFailed,
                aexc.ChannelLockedResource,
                aexc.ChannelAccessRefused,
            ):  # it exists, as someone else declared it
                await ch.queue_declare(
                    name, durable=True, arguments={"x-max-priority": MAX_PRIORITY}
                )

        await self._admin(op)
        self._known.add(name)

    async def _ensure_chain(self, queue: str) -> None:
        if queue in self._chains:
            return
        if not self._topology:
            await self._admin(self._declare_topology)
            self._topology = True
        tag = queue_tag(queue)

        async def op(ch: AbstractChannel) -> None:
            for k in range(LEVELS):  # pipelined; the last bind waits for them all
                name = delay_queue(queue, k)
                await ch.queue_declare(
                    name,
                    durable=True,
                    nowait=True,
                    arguments={
                        "x-message-ttl": 2**k,
                        "x-dead-letter-exchange": exchange_name(k - 1),
                    },
                )
                await ch.queue_bind(
                    name, exchange_name(k), _pattern(k, "1", "*." * k + tag), nowait=True
                )
            await ch.queue_declare(
                exit_queue(queue),
                durable=True,
                nowait=True,
                arguments={
                    "x-message-ttl": 0,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": queue,
                },
            )
            await ch.queue_bind(exit_queue(queue), DUE, "#." + tag)

        await self._admin(op)
        self._chains.add(queue)

    @staticmethod
    async def _declare_topology(ch: AbstractChannel) -> None:
        await ch.exchange_declare(DUE, exchange_type="topic", durable=True, nowait=True)
        for k in range(LEVELS):
            await ch.exchange_declare(
                exchange_name(k), exchange_type="topic", durable=True, nowait=True
            )
            await ch.exchange_bind(
                exchange_name(k - 1), exchange_name(k), _pattern(k, "0", "#"), nowait=True
            )
        await ch.exchange_declare(DUE, exchange_type="topic", durable=True)  # waits for all

    async def _has_chain(self, queue: str) -> bool:
        if queue not in self._chains and await self._count(delay_queue(queue, 0)) is not None:
            self._chains.add(queue)
        return queue in self._chains

    # -- publishing ----------------------------------------------------------------------

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        sends = [await self._prepare(item) for item in items]
        await self._send_all(sends)

    async def _prepare(self, item: Outgoing) -> _Send:
        exchange, key, env = item.exchange, item.routing_key, item.envelope
        delay_ms = 0
        if item.not_before is not None:
            delay_ms = math.ceil((item.not_before - time.time()) * 1000)
        if not exchange:
            await self._ensure_queue(key)
        props = _properties(env, item.not_before if delay_ms > 0 else None)
        if delay_ms > 0 and not exchange:
            try:
                await self._ensure_chain(key)
            except aexc.AMQPError as exc:
                raise TransportError(
                    f"cannot set up delayed delivery to queue {key!r}: {_reason(exc)}"
                ) from exc
            exchange, key = exchange_name(LEVELS - 1), delay_key(delay_ms, key)
        return _Send(item, exchange, key, env.body, props)

    async def _send_all(self, sends: list[_Send]) -> None:
        """Pipeline the publishes on one confirming channel; resend what a lost connection
        left unconfirmed (at-least-once) until ``retry_timeout``."""
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.05
        while sends:
            ch: AbstractChannel | None = None
            try:
                ch = await self._channel("pub")
            except CONN_ERRORS as exc:
                results: list[Any] = [exc] * len(sends)
            else:
                results = await asyncio.gather(
                    *(
                        ch.basic_publish(
                            s.body,
                            exchange=s.exchange,
                            routing_key=s.routing_key,
                            properties=s.properties,
                            mandatory=s.mandatory,
                        )
                        for s in sends
                    ),
                    return_exceptions=True,
                )
            retry = []
            for send, result in zip(sends, results, strict=True):
                if isinstance(result, CONN_ERRORS) or (
                    isinstance(result, asyncio.CancelledError) and ch and ch.is_closed
                ):
                    retry.append(send)
                elif isinstance(result, BaseException):
                    raise self._publish_error(send, result)
            if retry and time.monotonic() + delay > deadline:
                raise TransportError(
                    f"publishing to RabbitMQ at {self.describe()} failed: "
                    f"the connection did not come back in time"
                )
            if retry:
                logger.warning(
                    "RabbitMQ connection lost while publishing; resending %d unconfirmed messages",
                    len(retry),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            sends = retry

    def _publish_error(self, send: _Send, exc: BaseException) -> BaseException:
        item = send.item
        exchange = item.exchange if item else send.exchange
        key = item.routing_key if item else send.routing_key
        if isinstance(exc, aexc.PublishError):
            self._known.discard(key)  # a queue we thought existed may have been deleted
            return TransportError(
                f"unroutable message: exchange {exchange!r} has no queue "
                f"bound for routing key {key!r} ({_reason(exc)})"
            )
        if isinstance(exc, aexc.ChannelNotFoundEntity):
            self._exchanges.discard(exchange)
            return TransportError(
                f"cannot publish to exchange {exchange!r} with routing key {key!r}: {_reason(exc)}"
            )
        if isinstance(exc, aexc.AMQPError):
            return TransportError(
                f"RabbitMQ refused a message for exchange {exchange!r}, routing key {key!r}: {exc}"
            )
        if isinstance(exc, TypeError):
            return TransportError(f"message headers cannot be encoded for AMQP: {exc}")
        return exc

    # -- queues ---------------------------------------------------------------------------

    def consumer(
        self, queues: Sequence[QueueSpec], *, prefetch: int, consumer_id: str
    ) -> AbstractAsyncContextManager[Consumer]:
        return self._consume(queues, prefetch, consumer_id)

    @asynccontextmanager
    async def _consume(
        self, queues: Sequence[QueueSpec], prefetch: int, consumer_id: str
    ) -> AsyncIterator[Consumer]:
        consumer = AMQPConsumer(self, list(queues), prefetch, consumer_id)
        await consumer.start()
        try:
            yield consumer
        finally:
            await consumer.stop()

    async def _count(self, name: str, *, purge: bool = False) -> int | None:
        """Ready messages in ``name`` (purged first if asked); None if there is no such
        queue. Unacked ones belong to their consumer and are neither counted nor purged."""

        async def op(ch: AbstractChannel) -> int | None:
            try:
                ok = await (ch.queue_purge(name) if purge else ch.queue_declare(name, passive=True))
            except (aexc.ChannelNotFoundEntity, aexc.ChannelLockedResource):
                return None
            return int(ok.message_count or 0)

        return await self._admin(op)

    async def size(self, queue: str, *, purge: bool = False) -> int:
        """Ready plus delayed messages."""
        names = [queue, *(delay_queues(queue) if await self._has_chain(queue) else [])]
        return sum([await self._count(n, purge=purge) or 0 for n in names])

    async def purge(self, queue: str) -> int:
        return await self.size(queue, purge=True)

    # -- broadcast ------------------------------------------------------------------------

    async def _ensure_fanout(self, exchange: str) -> None:
        if exchange not in self._exchanges:
            await self._admin(
                lambda ch: ch.exchange_declare(exchange, exchange_type="fanout", durable=True)
            )
            self._exchanges.add(exchange)

    async def broadcast(self, channel: str, payload: bytes) -> None:
        exchange = BROADCAST + channel
        await self._ensure_fanout(exchange)
        props = spec.Basic.Properties(delivery_mode=1, content_type="application/octet-stream")
        await self._send_all([_Send(None, exchange, "", payload, props, mandatory=False)])

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._subscribe(channel)

    @asynccontextmanager
    async def _subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        sub = _Subscriber(self, BROADCAST + channel)
        await sub.start()
        try:
            yield sub.payloads()
        finally:
            await sub.stop()

    # -- locks ----------------------------------------------------------------------------

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        queue = LOCK + name
        under = await self._underlay()
        now = time.monotonic()
        held = self._locks.get(name)
        if held is not None and (held.connection is not under or held.expires <= now):
            self._drop_lock(name)  # expired, or lost with an old connection
            held = None
        if held is not None and held.owner != owner:
            return False

        async def op(ch: AbstractChannel) -> bool:
            try:
                await ch.queue_declare(queue, exclusive=True)
            except aexc.ChannelLockedResource:
                return False  # another connection holds it
            return True

        if not await self._admin(op):
            self._drop_lock(name)
            return False
        self._drop_lock(name)
        entry = _Held(owner, now + ttl, under)
        entry.timer = asyncio.get_running_loop().call_later(ttl, self._expire, name, entry)
        self._locks[name] = entry
        return True

    def _drop_lock(self, name: str) -> None:
        held = self._locks.pop(name, None)
        if held is not None and held.timer is not None:
            held.timer.cancel()

    def _expire(self, name: str, entry: _Held) -> None:
        if self._locks.get(name) is not entry:
            return
        del self._locks[name]

        async def unlock() -> None:
            if name not in self._locks:  # not re-taken meanwhile by an owner on this connection
                with suppress(*LISTEN_ERRORS):
                    await self._admin(lambda ch: ch.queue_delete(LOCK + name))

        task = asyncio.get_running_loop().create_task(unlock())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
