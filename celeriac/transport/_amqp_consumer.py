"""RabbitMQ consumers: task queues (prefetch, acks, dead letters) and broadcast listeners.

See ``celeriac/transport/amqp.py`` for the layout and the delay scheme.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec

from ._amqp_common import (
    CONN_ERRORS,
    LISTEN_ERRORS,
    _envelope,
    _not_before,
)
from .base import (
    Consumer,
    Delivery,
    Outgoing,
    QueueSpec,
    TransportError,
    dead_letter_name,
    with_dead_reason,
)

if TYPE_CHECKING:
    from .amqp import AMQPTransport

logger = logging.getLogger("celeriac.transport.amqp")  # one name for the whole transport


@dataclass(eq=False, slots=True)
class _Receipt:
    channel: AbstractChannel
    delivery_tag: int


class _Listener:
    """Keeps one channel subscribed: opened by ``start``, re-opened after it is lost."""

    what = "listener"

    def __init__(self, transport: AMQPTransport) -> None:
        self._t = transport
        self._ch: AbstractChannel | None = None
        self._closed = False
        self._watcher: asyncio.Task[None] | None = None

    async def _setup(self, ch: AbstractChannel) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        await self._open()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _open(self) -> None:
        ch = await self._t.open_channel()
        self._ch = ch
        try:
            await self._setup(ch)
        except BaseException:
            with suppress(*LISTEN_ERRORS):
                await ch.close()
            raise

    async def _watch(self) -> None:
        while not self._closed:
            assert self._ch is not None
            await asyncio.wait([self._ch.closing])
            if self._closed:
                return
            if self._t.closed:
                self._ended()
                return
            logger.warning("%s lost its RabbitMQ channel; resubscribing", self.what)
            delay = 0.1
            while not self._closed and not self._t.closed:
                try:
                    await self._open()
                except LISTEN_ERRORS as exc:
                    logger.warning("%s: resubscribing failed (%s); retrying", self.what, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                else:
                    logger.info("%s resubscribed", self.what)
                    break

    def _ended(self) -> None:
        """End iteration: stopped, or the transport was closed under us."""

    async def stop(self) -> None:
        """Close the channel: RabbitMQ returns its unacked deliveries, flagged redelivered."""
        self._closed = True
        self._ended()
        if self._watcher is not None:
            self._watcher.cancel()
            with suppress(asyncio.CancelledError):
                await self._watcher
        if self._ch is not None and not self._ch.is_closed:
            with suppress(*LISTEN_ERRORS):
                await self._ch.close()


class _Subscriber(_Listener):
    what = "broadcast subscriber"

    def __init__(self, transport: AMQPTransport, exchange: str) -> None:
        super().__init__(transport)
        self.exchange = exchange
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()

    def _ended(self) -> None:
        self._inbox.put_nowait(None)

    async def _setup(self, ch: AbstractChannel) -> None:
        await ch.exchange_declare(self.exchange, exchange_type="fanout", durable=True)
        ok = await ch.queue_declare("", exclusive=True, auto_delete=True)
        assert ok.queue is not None
        await ch.queue_bind(ok.queue, self.exchange)

        async def on_message(msg: DeliveredMessage) -> None:
            self._inbox.put_nowait(msg.body)

        await ch.basic_consume(ok.queue, on_message, no_ack=True)

    async def payloads(self) -> AsyncIterator[bytes]:
        while (payload := await self._inbox.get()) is not None:
            yield payload


class AMQPConsumer(_Listener, Consumer):
    """basic.consume on one channel per consumer; deliveries are yielded in arrival order."""

    def __init__(
        self, transport: AMQPTransport, queues: list[QueueSpec], prefetch: int, consumer_id: str
    ) -> None:
        super().__init__(transport)
        self.what = f"consumer {consumer_id}"
        self.consumer_id = consumer_id
        self._queues = queues
        self._prefetch = max(0, prefetch)
        self._inbox: asyncio.Queue[tuple[DeliveredMessage, str] | None] = asyncio.Queue()
        self._tags: dict[str, str] = {}
        self._held: set[_Receipt] = set()
        self._room = asyncio.Event()

    @property
    def queues(self) -> list[QueueSpec]:
        return list(self._queues)

    async def _setup(self, ch: AbstractChannel) -> None:
        self._held.clear()  # deliveries of a lost channel are back in their queues
        self._tags = {}
        self._room.set()
        await ch.basic_qos(prefetch_count=self._prefetch)
        ch.on_consumer_cancel_callbacks.add(self._broker_cancelled)
        for queue in self._queues:
            await self._subscribe(ch, queue)

    def _broker_cancelled(self, frame: spec.Basic.Cancel) -> None:
        """RabbitMQ cancels a consumer whose queue was deleted: declare it and go on."""
        name = next((n for n, tag in self._tags.items() if tag == frame.consumer_tag), None)
        queue = next((q for q in self._queues if q.name == name), None)
        ch = self._ch
        if name is None or queue is None or ch is None:
            return
        del self._tags[name]
        logger.warning(
            "%s: RabbitMQ cancelled consuming from %r; subscribing again", self.what, name
        )

        async def again() -> None:
            try:
                await self._subscribe(ch, queue)
            except LISTEN_ERRORS as exc:
                logger.error("%s: could not consume from %r again: %s", self.what, name, exc)

        task = asyncio.get_running_loop().create_task(again())
        self._t._background.add(task)
        task.add_done_callback(self._t._background.discard)

    async def _subscribe(self, ch: AbstractChannel, queue: QueueSpec) -> None:
        await self._t.declare([queue])
        name = queue.name

        async def on_message(msg: DeliveredMessage) -> None:
            self._inbox.put_nowait((msg, name))

        tag = f"{self.consumer_id}:{name}:{secrets.token_hex(4)}"
        await ch.basic_consume(name, on_message, consumer_tag=tag)
        self._tags[name] = tag

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        while not self._closed and not self._t.closed:
            if self._prefetch and len(self._held) >= self._prefetch:
                self._room.clear()
                await self._room.wait()
                continue
            item = await self._inbox.get()
            if item is None:
                return  # stopped
            msg, queue = item
            if msg.channel is not self._ch or msg.channel.is_closed:
                continue  # its channel is gone, so RabbitMQ has put it back
            receipt = _Receipt(msg.channel, int(getattr(msg.delivery, "delivery_tag", 0)))
            due = _not_before(msg)
            if due is not None and due > time.time():
                await self._park(msg, queue, due, receipt)
                continue
            exchange, key = msg.exchange or "", msg.routing_key or ""
            self._held.add(receipt)
            yield Delivery(
                _envelope(msg),
                queue,
                exchange,
                key,
                bool(getattr(msg.delivery, "redelivered", False)),
                receipt,
            )

    def _ended(self) -> None:
        self._inbox.put_nowait(None)
        self._room.set()

    async def _park(self, msg: DeliveredMessage, queue: str, due: float, receipt: _Receipt) -> None:
        """Early (a named exchange's delay, or one beyond the chain): back to the broker."""
        try:
            await self._t.publish(Outgoing(_envelope(msg), "", queue, not_before=due))
        except TransportError as exc:
            logger.error("could not park an early message from %r (%s); requeued", queue, exc)
            await asyncio.sleep(1.0)
            with suppress(*CONN_ERRORS):
                await receipt.channel.basic_reject(receipt.delivery_tag, requeue=True)
            return
        with suppress(*CONN_ERRORS):
            await receipt.channel.basic_ack(receipt.delivery_tag)

    def _settle(self, delivery: Delivery) -> _Receipt | None:
        receipt = delivery.tag
        if not isinstance(receipt, _Receipt) or receipt not in self._held:
            if isinstance(receipt, _Receipt) and receipt.channel is not self._ch:
                logger.warning(
                    "%s: settling a delivery from a lost channel; RabbitMQ has "
                    "returned it and will deliver it again",
                    self.what,
                )
            return None
        self._held.discard(receipt)
        self._room.set()
        return receipt

    async def ack(self, delivery: Delivery) -> None:
        receipt = self._settle(delivery)
        if receipt is not None:
            try:
                await receipt.channel.basic_ack(receipt.delivery_tag)
            except CONN_ERRORS as exc:
                logger.warning(
                    "%s: ack lost with the connection (%s); the message will be delivered again",
                    self.what,
                    exc,
                )

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        receipt = self._settle(delivery)
        if receipt is None:
            return
        try:
            if not requeue:
                env = with_dead_reason(delivery.envelope, reason or "rejected")
                await self._t.publish(Outgoing(env, "", dead_letter_name(delivery.queue)))
                await receipt.channel.basic_ack(receipt.delivery_tag)
            else:
                await receipt.channel.basic_reject(receipt.delivery_tag, requeue=True)
        except CONN_ERRORS as exc:
            logger.warning(
                "%s: reject lost with the connection (%s); the message will be delivered again",
                self.what,
                exc,
            )

    async def set_prefetch(self, count: int) -> None:
        self._prefetch = max(0, count)
        self._room.set()
        ch = self._ch
        if ch is None or ch.is_closed:
            return  # applied when the channel is re-opened
        try:
            await ch.basic_qos(prefetch_count=self._prefetch)
            for queue in list(self._queues):
                old = self._tags.pop(queue.name, None)
                if old is not None:
                    await ch.basic_cancel(old)
                await self._subscribe(ch, queue)
        except CONN_ERRORS as exc:
            logger.warning(
                "%s: prefetch change interrupted (%s); applied on reconnect", self.what, exc
            )

    async def add_queue(self, queue: QueueSpec) -> None:
        if any(q.name == queue.name for q in self._queues):
            return
        self._queues.append(queue)
        ch = self._ch
        if ch is not None and not ch.is_closed:
            await self._subscribe(ch, queue)
        else:
            await self._t.declare([queue])

    async def cancel_queue(self, name: str) -> None:
        self._queues = [q for q in self._queues if q.name != name]
        tag = self._tags.pop(name, None)
        ch = self._ch
        if tag is not None and ch is not None and not ch.is_closed:
            with suppress(*CONN_ERRORS):
                await ch.basic_cancel(tag)
