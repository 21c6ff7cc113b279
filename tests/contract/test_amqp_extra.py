"""RabbitMQ-only checks beyond the shared contract: Celery's wire shape on AMQP (read and
written with raw aio-pika), broker-held delays without head-of-line blocking, priority
queues, re-declaration conflicts, parked early messages, lock release and reconnects.

Every test uses its own uuid-suffixed queue and exchange names and deletes them after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest

from celeriac.exceptions import TransportError
from celeriac.protocol import build_task_message, decode_body
from celeriac.transport.amqp import AMQPTransport, amqp_url, delay_key, delay_queues
from celeriac.transport.base import Outgoing, QueueSpec

from .conftest import AMQP_BROKER_URL, unavailable
from .test_transport import out, reading, run

URL = AMQP_BROKER_URL


class Names:
    """Unique names for one test, remembered so they can all be deleted."""

    def __init__(self) -> None:
        self.suffix = uuid.uuid4().hex[:10]
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def q(self, base: str = "q") -> str:
        name = f"{base}-{self.suffix}"
        self.queues.append(name)
        return name

    def x(self, base: str = "x") -> str:
        name = f"{base}-{self.suffix}"
        self.exchanges.append(name)
        return name


async def _cleanup(names: Names) -> None:
    conn = await aiormq.connect(URL)
    ch = await conn.channel()
    for name in (n for q in names.queues for n in (q, q + ".dead")):
        for queue in (name, *delay_queues(name)):
            await ch.queue_delete(queue, nowait=True)
    for exchange in names.exchanges:
        await ch.exchange_delete(exchange, nowait=True)
    await ch.basic_qos(prefetch_count=0)  # a round trip: the deletes above are done
    await conn.close()


@pytest.fixture
def names() -> Iterator[Names]:
    async def ping() -> None:
        conn = await aiormq.connect(URL)
        await conn.close()

    try:
        asyncio.run(asyncio.wait_for(ping(), 10))
    except (OSError, ConnectionError, TimeoutError) as exc:
        unavailable(f"RabbitMQ is not reachable at {URL}: {exc}")
    n = Names()
    yield n
    asyncio.run(_cleanup(n))


@contextlib.asynccontextmanager
async def raw() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    conn = await aio_pika.connect(URL)
    try:
        yield await conn.channel()
    finally:
        await conn.close()


def transport(**options: float) -> AMQPTransport:
    return AMQPTransport(URL, options)


# -- pure ---------------------------------------------------------------------------------


def test_url_forms() -> None:
    assert amqp_url("pyamqp://u:p@127.0.0.1:5672//") == "amqp://u:p@127.0.0.1:5672//"
    assert amqp_url("amqps://u:p@h/v") == "amqps://u:p@h/v"
    assert amqp_url("amqp://") == "amqp://guest:guest@localhost"
    assert amqp_url("amqp:////") == "amqp://guest:guest@localhost//"


def test_delay_key_is_binary_ms_then_queue_tag() -> None:
    words = delay_key(5, "q").split(".")
    assert len(words) == 33 and words[:29] == ["0"] * 29 and words[29:32] == ["1", "0", "1"]
    assert words[32] == delay_key(9, "q").split(".")[32] != delay_key(5, "r").split(".")[32]
    assert delay_key(2**40, "q").split(".")[:32] == ["1"] * 32  # capped; re-parked on arrival


# -- Celery's wire shape ------------------------------------------------------------------


def test_published_message_carries_celery_properties(names: Names) -> None:
    q = names.q()
    tid = str(uuid.uuid4())
    env = build_task_message(name="proj.tasks.add", task_id=tid, args=(2, 2), kwargs={},
                             priority=5, time_limit=30, reply_to="reply-oid")

    async def main() -> None:
        async with opened_t() as t:
            await t.publish(Outgoing(env, "", q))
        async with raw() as ch:
            queue = await ch.declare_queue(q, passive=True)
            msg = await queue.get(timeout=5)
            assert msg is not None
            await msg.ack()
        assert msg.body == env.body
        assert json.loads(msg.body) == [[2, 2], {}, {"callbacks": None, "errbacks": None,
                                                    "chain": None, "chord": None}]
        assert (msg.correlation_id, msg.reply_to) == (tid, "reply-oid")
        assert (msg.content_type, msg.content_encoding) == ("application/json", "utf-8")
        assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert msg.priority == 5
        h = msg.headers
        assert (h["lang"], h["task"], h["id"], h["root_id"]) == ("py", "proj.tasks.add", tid, tid)
        assert h["timelimit"] == [30, None] and h["eta"] is None and h["stamps"] == {}
        assert h["argsrepr"] == "(2, 2)" and h["retries"] == 0 and h["ignore_result"] is False
        assert msg.routing_key == q and msg.exchange == ""

    run(main())


def test_raw_celery_message_is_consumed(names: Names) -> None:
    q = names.q()
    tid = str(uuid.uuid4())
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    headers: dict[str, Any] = {
        "lang": "py", "task": "proj.tasks.add", "id": tid, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": tid, "parent_id": None, "argsrepr": "(1, 2)",
        "kwargsrepr": "{'x': 3}", "origin": "gen42@host", "ignore_result": False,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}

    async def main() -> None:
        async with opened_t() as t:
            await t.declare([QueueSpec(q)])  # as a worker does at start
            async with raw() as ch:
                await ch.default_exchange.publish(aio_pika.Message(
                    json.dumps([[1, 2], {"x": 3}, embed]).encode(), headers=headers,
                    content_type="application/json", content_encoding="utf-8",
                    correlation_id=tid, reply_to="", priority=0,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=q)
            async with reading(t, [q]) as r:
                d = await r.get()
                env = d.envelope
                assert dict(env.headers) == headers
                assert decode_body(env, None) == ([1, 2], {"x": 3}, embed)
                assert (env.correlation_id, env.reply_to, env.persistent) == (tid, None, True)
                assert (d.queue, d.exchange, d.routing_key, d.redelivered) == (q, "", q, False)
                await r.consumer.ack(d)
                await r.nothing_within()
            assert await t.size(q) == 0

    run(main())


# -- a real Celery on the same vhost ---------------------------------------------------------

CELERY_APP = """
from pathlib import Path
from celery import Celery

app = Celery("capp", broker={url!r}, set_as_current=False)
app.conf.update(task_default_queue={queue!r}, task_queue_max_priority=9,
                worker_enable_remote_control=False, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)

@app.task(name="capp.record")
def record(path, tag):
    with open(path, "a") as fh:
        fh.write(tag + "\\n")
"""


def celery_app(tmp_path: Path, q: str) -> Path:
    try:
        import celery  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        unavailable(f"the real celery package is not installed: {exc}")
    (tmp_path / "capp.py").write_text(CELERY_APP.format(url=URL, queue=q))
    return tmp_path


def test_celery_client_message_is_consumed(names: Names, tmp_path: Path) -> None:
    q = names.q()
    names.exchanges.append(q)  # Celery's default exchange is named after its queue
    sys.path.insert(0, str(celery_app(tmp_path, q)))
    try:
        import capp  # type: ignore[import-not-found]

        result = capp.app.send_task("capp.record", args=("/dev/null", "from-celery"),
                                    priority=4)
        capp.app.pool.force_close_all()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("capp", None)

    async def main() -> None:
        async with opened_t() as t, reading(t, [q]) as r:
            d = await r.get()
            assert d.envelope.headers["task"] == "capp.record"
            assert d.envelope.headers["id"] == d.envelope.correlation_id == result.id
            assert decode_body(d.envelope, None)[0] == ["/dev/null", "from-celery"]
            assert d.envelope.priority == 4 and (d.exchange, d.routing_key) == ("", q)
            await r.consumer.ack(d)

    run(main())


def test_celery_worker_runs_what_we_publish(names: Names, tmp_path: Path) -> None:
    q = names.q()
    names.exchanges.append(q)
    out_file = tmp_path / "ran.txt"
    log = tmp_path / "celery.log"
    env = {**os.environ, "PYTHONPATH": str(celery_app(tmp_path, q))}
    cmd = [str(Path(sys.executable).with_name("celery")), "-A", "capp", "worker", "-P", "solo",
           "-Q", q, "-n", f"w-{names.suffix}@localhost", "--without-gossip",
           "--without-mingle", "--without-heartbeat", "-l", "info", "-f", str(log)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "ready." in log.read_text()):
            assert proc.poll() is None, log.read_text() if log.exists() else "no log"
            assert time.monotonic() < deadline, "the Celery worker did not start"
            time.sleep(0.05)

        def message(tag: str, eta: float | None = None) -> Outgoing:
            import datetime as dt

            when = dt.datetime.fromtimestamp(eta, dt.UTC) if eta else None
            env = build_task_message(name="capp.record", task_id=str(uuid.uuid4()),
                                     args=(str(out_file), tag), kwargs={}, eta=when)
            return Outgoing(env, "", q, not_before=eta)

        async def publish() -> None:
            async with opened_t() as t:
                await t.declare([QueueSpec(q, q, "direct", q)])  # as Celery declared it
                await t.publish(message("later", time.time() + 1.0))
                await t.publish(message("now"))

        run(publish())
        deadline = time.monotonic() + 30
        while not (out_file.exists() and out_file.read_text().split() == ["now", "later"]):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.kill()  # its work is checked; Celery's own shutdown takes ~10 s on AMQP
        proc.wait(15)


# -- delays and priorities -------------------------------------------------------------------


def test_delays_do_not_block_each_other(names: Names) -> None:
    q = names.q()

    async def main() -> None:
        async with opened_t() as t, reading(t, [q]) as r:
            long_due = time.time() + 3.0
            await t.publish(out("long", q, not_before=long_due))  # also makes q's delay chain
            short_due = time.time() + 0.3
            await t.publish(out("short", q, not_before=short_due))
            assert await t.size(q) == 2  # both held by the broker, counted
            first = await r.get()
            arrived = time.time()
            assert first.envelope.body == b"short"
            assert short_due <= arrived < long_due - 1.0, "the short delay waited for the long"
            assert (first.exchange, first.routing_key) == ("", q)
            assert "x-death" not in first.envelope.headers
            await r.consumer.ack(first)
            second = await r.get()
            assert second.envelope.body == b"long" and time.time() >= long_due
            await r.consumer.ack(second)

    run(main())


def test_queue_has_max_priority_and_orders_0_to_9(names: Names) -> None:
    q = names.q()
    prios = [p for _ in range(2) for p in (3, 0, 9, 5, 1, 7, 2, 8, 4, 6)]

    async def main() -> None:
        async with opened_t() as t:
            await t.declare([QueueSpec(q)])
            await t.publish_many([out(f"{i}", q, priority=p) for i, p in enumerate(prios)])
        async with raw() as ch:  # an equal re-declaration is accepted, another refused
            survived = await ch.declare_queue(q, durable=True, arguments={"x-max-priority": 9})
            assert survived.declaration_result.message_count == len(prios)
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            async with raw() as ch:
                await ch.declare_queue(q, durable=True)
        expected = [f"{i}".encode() for i, _ in sorted(enumerate(prios), key=lambda x: -x[1])]
        async with opened_t() as t, reading(t, [q], prefetch=0) as r:
            assert await r.bodies(len(prios)) == expected

    run(main())


def test_declare_conflict_is_a_clear_error_and_publishing_still_works(names: Names) -> None:
    q = names.q()

    async def main() -> None:
        async with raw() as ch:  # as Celery declares it: no x-max-priority
            await ch.declare_queue(q, durable=True)
        async with opened_t() as t:
            with pytest.raises(TransportError, match="task_queue_max_priority") as err:
                await t.declare([QueueSpec(q)])
            assert q in str(err.value) and "x-max-priority" in str(err.value)
            await t.publish(out("still-routed", q))
            assert await t.size(q) == 1

    run(main())


def test_delay_through_a_named_exchange_is_parked_not_delivered_early(names: Names) -> None:
    q, x = names.q(), names.x()

    async def main() -> None:
        async with opened_t() as t:
            await t.declare([QueueSpec(q, x, "topic", "a.#")])
            async with reading(t, [q]) as r:
                due = time.time() + 0.6
                await t.publish(out("topic-late", "a.b", exchange=x, not_before=due))
                d = await r.get()
                assert time.time() >= due and d.envelope.body == b"topic-late"
                assert "x-celeriac-not-before" not in d.envelope.headers
                await r.consumer.ack(d)

    run(main())


# -- locks and reconnects --------------------------------------------------------------------


def test_lock_goes_with_its_connection(names: Names) -> None:
    lock = f"beat-{names.suffix}"

    async def main() -> None:
        async with opened_t() as b:
            a = transport()
            await a.connect()
            assert await a.try_lock(lock, "A", 60)
            assert not await b.try_lock(lock, "B", 60)
            assert not await a.try_lock(lock, "B", 60)  # one owner, even on one connection
            await a.close()  # the leader dies: RabbitMQ drops its exclusive queue
            deadline = time.monotonic() + 10
            while not await b.try_lock(lock, "B", 60):
                assert time.monotonic() < deadline, "the lock outlived its connection"
                await asyncio.sleep(0.05)

    run(main())


def test_consumer_survives_a_lost_connection(names: Names) -> None:
    q = names.q()

    async def main() -> None:
        t = transport(reconnect_interval=0.1)
        await t.connect()
        try:
            await t.publish(out("held", q))
            async with reading(t, [q], prefetch=5) as r:
                before = await r.get()
                assert not before.redelivered
                await drop_connection(t)
                again = await r.get(timeout=20)
                assert again.envelope.body == b"held" and again.redelivered
                await r.consumer.ack(before)  # stale: logged and ignored
                await r.consumer.ack(again)
                await t.publish(out("after", q))
                assert await r.bodies(1) == [b"after"]
                await r.nothing_within()
        finally:
            await t.close()

    run(main())


def test_consumer_resubscribes_when_its_queue_is_deleted(names: Names) -> None:
    q = names.q()

    async def main() -> None:
        async with opened_t() as t, reading(t, [q]) as r:
            async with raw() as ch:
                await ch.queue_delete(q)  # RabbitMQ cancels the consumer
            deadline = time.monotonic() + 10
            while True:  # the consumer declares the queue again and consumes from it
                with contextlib.suppress(TransportError):
                    await t.publish(out("back", q))
                    break
                assert time.monotonic() < deadline
            assert await r.bodies(1) == [b"back"]

    run(main())


async def drop_connection(t: AMQPTransport) -> None:
    """Close the socket under the robust connection, as a network failure would."""
    conn = t._conn
    assert conn is not None and conn.transport is not None
    await conn.transport.connection.close(ConnectionError("simulated network failure"))


@contextlib.asynccontextmanager
async def opened_t() -> AsyncIterator[AMQPTransport]:
    t = transport()
    await t.connect()
    try:
        yield t
    finally:
        await t.close()

