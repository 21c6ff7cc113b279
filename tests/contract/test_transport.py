"""One contract suite for every broker transport (memory, sqlite, redis db 15).

Each test runs its own loop with ``asyncio.run``. A background task pumps a consumer
into an asyncio.Queue, so "nothing arrives within t" is a bounded wait on that queue
rather than a sleep used for synchronisation. SQLite-only tests at the end drive real
OS processes on one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from celeriac.exceptions import TransportError
from celeriac.transport import create_transport
from celeriac.transport._bindings import match
from celeriac.transport.base import (
    Consumer,
    Delivery,
    Envelope,
    Outgoing,
    QueueSpec,
    Transport,
    pack,
    unpack,
)
from celeriac.transport.sqlite import path_of

from .conftest import Broker

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
QUIET = 0.3  # how long "nothing else arrives" is watched for


# -- helpers --------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run on a fresh loop; a body that outlives ``timeout`` fails even if it then
    swallows the cancellation (``asyncio.wait_for`` would report that as success)."""

    async def guarded() -> T:
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            raise AssertionError(f"test body did not finish within {timeout}s")
        return task.result()

    return asyncio.run(guarded())


@contextlib.asynccontextmanager
async def opened(broker: Broker) -> AsyncIterator[Transport]:
    transport = create_transport(broker.url, broker.options)
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.close()


def out(
    body: bytes | str,
    queue: str = "q",
    *,
    priority: int | None = None,
    exchange: str = "",
    not_before: float | None = None,
) -> Outgoing:
    data = body.encode() if isinstance(body, str) else body
    env = Envelope(
        data,
        {"id": data.decode(errors="replace"), "task": "t.x"},
        "application/json",
        priority=priority,
    )
    return Outgoing(env, exchange, queue, not_before)


class Reader:
    """Pumps a consumer into a queue so tests can wait with timeouts."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self._items: asyncio.Queue[Delivery] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        async for delivery in self.consumer:
            self._items.put_nowait(delivery)

    async def get(self, timeout: float = 10.0) -> Delivery:
        getter = asyncio.ensure_future(self._items.get())
        done, _ = await asyncio.wait(
            {getter, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if getter in done:
            return getter.result()
        getter.cancel()
        if self._task in done:
            self._task.result()
            raise AssertionError("the consumer stopped iterating")
        raise AssertionError(f"no delivery within {timeout}s")

    async def bodies(self, n: int, *, ack: bool = True) -> list[bytes]:
        got = []
        for _ in range(n):
            d = await self.get()
            got.append(d.envelope.body)
            if ack:
                await self.consumer.ack(d)
        return got

    async def nothing_within(self, seconds: float = QUIET) -> None:
        with contextlib.suppress(TimeoutError):
            d = await asyncio.wait_for(self._items.get(), seconds)
            raise AssertionError(f"unexpected delivery {d.envelope.body!r} from {d.queue!r}")

    async def stop(self) -> None:
        """Cancel the pump, as a worker does at shutdown; iteration must end promptly."""
        self._task.cancel()
        done, _ = await asyncio.wait({self._task}, timeout=5)
        assert done, "cancelling a task blocked in `async for` over the consumer did not end it"
        if not self._task.cancelled() and self._task.exception() is not None:
            raise self._task.exception()  # type: ignore[misc]


@contextlib.asynccontextmanager
async def reading(
    transport: Transport, queues: Sequence[str | QueueSpec], *, prefetch: int = 10, cid: str = "c1"
) -> AsyncIterator[Reader]:
    specs = [q if isinstance(q, QueueSpec) else QueueSpec(q) for q in queues]
    async with transport.consumer(specs, prefetch=prefetch, consumer_id=cid) as consumer:
        reader = Reader(consumer)
        try:
            yield reader
        finally:
            await reader.stop()


# -- pure logic -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "key", "rkey", "expected"),
    [
        ("direct", "a.b", "a.b", True),
        ("direct", "a.b", "a.c", False),
        ("fanout", "x", "anything", True),
        ("topic", "a.*", "a.b", True),
        ("topic", "a.*", "a", False),
        ("topic", "a.*", "a.b.c", False),
        ("topic", "a.#", "a", True),
        ("topic", "a.#", "a.b.c", True),
        ("topic", "#", "", True),
        ("topic", "#.c", "a.b.c", True),
        ("topic", "a.#.c", "a.c", True),
        ("topic", "a.#.c", "a.b.x.c", True),
        ("topic", "a.#.c", "a.b.x", False),
        ("topic", "*.b.#", "a.b", True),
        ("topic", "*.b.#", "b", False),
    ],
)
def test_binding_match(kind: str, key: str, rkey: str, expected: bool) -> None:
    assert match(kind, key, rkey) is expected


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite://", os.path.abspath("celeriac.sqlite")),
        ("sqlite:///rel/dir/b.sqlite", os.path.abspath("rel/dir/b.sqlite")),
        ("sqlite:////abs/b.sqlite", "/abs/b.sqlite"),
        ("sqlite:////abs/b.sqlite?lease_timeout=3", "/abs/b.sqlite"),
    ],
)
def test_sqlite_url_to_path(url: str, path: str) -> None:
    assert path_of(url) == path


# -- the contract -----------------------------------------------------------------------


def test_publish_consume_ack(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t:
            await t.declare([QueueSpec("q")])
            await t.publish(out("one"))
            assert await t.size("q") == 1
            async with reading(t, ["q"]) as r:
                d = await r.get()
                assert d.envelope.body == b"one"
                assert d.envelope.headers["id"] == "one"
                assert d.envelope.content_type == "application/json"
                assert (d.queue, d.exchange, d.routing_key) == ("q", "", "q")
                assert d.redelivered is False
                await r.consumer.ack(d)
                await r.nothing_within()
            async with reading(t, ["q"], cid="c2") as r:
                await r.nothing_within()
            assert await t.size("q") == 0

    run(main())


def test_fifo_within_a_priority(broker: Broker) -> None:
    bodies = [f"m{i:03}".encode() for i in range(60)]

    async def main() -> None:
        async with opened(broker) as t:
            for b in bodies[:30]:
                await t.publish(out(b))
            await t.publish_many([out(b) for b in bodies[30:]])
            async with reading(t, ["q"], prefetch=7) as r:
                assert await r.bodies(60) == bodies

    run(main())


def test_priority_higher_first(broker: Broker) -> None:
    # 0/3/6/9 are distinct on every broker (Redis keeps kombu's four priority buckets).
    prios = [0, 6, 9, 3, 9, 0, 6, 3]

    async def main() -> None:
        async with opened(broker) as t:
            await t.publish_many([out(f"{i}", priority=p) for i, p in enumerate(prios)])
            expected = [
                f"{i}".encode() for i, _ in sorted(enumerate(prios), key=lambda ip: (-ip[1], ip[0]))
            ]
            async with reading(t, ["q"], prefetch=100) as r:
                assert await r.bodies(len(prios)) == expected

    run(main())


def test_priority_every_level(broker: Broker) -> None:
    if broker.kind == "redis":
        pytest.skip("Redis orders kombu's buckets 9/6/3/0, FIFO inside a bucket")
    prios = [1, 4, 7, 2, 5, 8, 0, 3, 6, 9, 5, 1]

    async def main() -> None:
        async with opened(broker) as t:
            await t.publish_many([out(f"{i}", priority=p) for i, p in enumerate(prios)])
            expected = [
                f"{i}".encode() for i, _ in sorted(enumerate(prios), key=lambda ip: (-ip[1], ip[0]))
            ]
            async with reading(t, ["q"], prefetch=0) as r:
                assert await r.bodies(len(prios)) == expected

    run(main())


def test_not_before_is_never_early(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t:
            due = time.time() + 0.8
            await t.publish(out("later", not_before=due))
            await t.publish(out("now"))
            assert await t.size("q") == 2
            async with reading(t, ["q"]) as r:
                assert (await r.get()).envelope.body == b"now"
                d = await r.get(timeout=10)
                # a few ms of slack: Redis compares against its own clock
                assert time.time() >= due - 0.005
                assert d.envelope.body == b"later"
                await r.consumer.ack(d)

    run(main())


def test_reject_requeue_flags_redelivered(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t:
            await t.publish(out("again"))
            async with reading(t, ["q"]) as r:
                d = await r.get()
                assert not d.redelivered
                await r.consumer.reject(d, requeue=True)
                d2 = await r.get()
                assert d2.envelope.body == b"again" and d2.redelivered
                await r.consumer.ack(d2)
                await r.nothing_within()
            assert await t.size("q.dead") == 0

    run(main())


def test_reject_without_requeue_dead_letters(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t:
            await t.publish(out("poison"))
            async with reading(t, ["q"]) as r:
                await r.consumer.reject(await r.get(), requeue=False, reason="bad input")
                await r.nothing_within()
            assert await t.size("q") == 0
            assert await t.size("q.dead") == 1
            async with reading(t, ["q.dead"]) as r:
                d = await r.get()
                assert d.envelope.body == b"poison"
                assert d.envelope.headers["x-dead-reason"] == "bad input"
                assert d.envelope.headers["id"] == "poison"
                await r.consumer.ack(d)
            assert await t.purge("q.dead") == 0

    run(main())


def test_leaving_the_consumer_returns_unacked(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t:
            await t.publish_many([out("a"), out("b")])
            async with reading(t, ["q"], prefetch=10) as r:
                first = await r.get()
                second = await r.get()
                await r.consumer.ack(first)
                assert not second.redelivered
            assert await t.size("q") == 1
            async with reading(t, ["q"], cid="c2") as r:
                d = await r.get()
                assert d.envelope.body == b"b" and d.redelivered
                await r.consumer.ack(d)

    run(main())


def test_prefetch_window(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t:
            await t.publish_many([out(f"{i}") for i in range(5)])
            async with reading(t, ["q"], prefetch=2) as r:
                a, b = await r.get(), await r.get()
                await r.nothing_within()
                await r.consumer.ack(a)
                c = await r.get()
                await r.nothing_within()
                assert [x.envelope.body for x in (a, b, c)] == [b"0", b"1", b"2"]
                assert await t.size("q") == 2

    run(main())


def test_set_prefetch(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t:
            await t.publish_many([out(f"{i}") for i in range(6)])
            async with reading(t, ["q"], prefetch=1) as r:
                assert await r.bodies(1, ack=False) == [b"0"]
                await r.nothing_within()
                await r.consumer.set_prefetch(3)
                assert await r.bodies(2, ack=False) == [b"1", b"2"]
                await r.nothing_within()
                await r.consumer.set_prefetch(0)  # unlimited
                assert await r.bodies(3, ack=False) == [b"3", b"4", b"5"]

    run(main())


def test_add_and_cancel_queue(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t, reading(t, ["a"]) as r:
            await t.publish(out("for-b", "b"))
            await r.nothing_within()
            await r.consumer.add_queue(QueueSpec("b"))
            assert [q.name for q in r.consumer.queues] == ["a", "b"]
            assert await r.bodies(1) == [b"for-b"]
            await r.consumer.cancel_queue("a")
            assert [q.name for q in r.consumer.queues] == ["b"]
            await t.publish(out("for-a", "a"))
            await r.nothing_within()
            assert await t.size("a") == 1
            await t.publish(out("b2", "b"))
            assert await r.bodies(1) == [b"b2"]

    run(main())


def test_publish_many_and_sizes(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t:
            await t.publish_many([out(f"{i}", "q1" if i % 3 else "q2") for i in range(12)])
            assert await t.size("q1") == 8
            assert await t.size("q2") == 4
            assert await t.size("never-used") == 0
            async with reading(t, ["q2"]) as r:
                assert await r.bodies(4) == [b"0", b"3", b"6", b"9"]

    run(main())


def test_purge_and_size_skip_leased(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t:
            await t.publish_many([out("1"), out("2"), out("3")])
            await t.publish(out("later", not_before=time.time() + 60))
            assert await t.size("q") == 4  # ready + delayed
            async with reading(t, ["q"], prefetch=1) as r:
                held = await r.get()
                assert await t.size("q") == 3  # leased ones belong to the consumer
                assert await t.purge("q") == 3
                assert await t.size("q") == 0
                await r.consumer.ack(held)
                await r.nothing_within()
            assert await t.size("q") == 0
            assert await t.purge("q") == 0

    run(main())


def test_bindings_direct_topic_fanout(broker: Broker) -> None:
    specs = [
        QueueSpec("d1", "dx", "direct", "k1"),
        QueueSpec("d2", "dx", "direct", "k2"),
        QueueSpec("d3", "dx", "direct", "k1"),
        QueueSpec("t1", "tx", "topic", "a.*"),
        QueueSpec("t2", "tx", "topic", "a.#"),
        QueueSpec("t3", "tx", "topic", "#.c"),
        QueueSpec("f1", "fx", "fanout", ""),
        QueueSpec("f2", "fx", "fanout", "ignored"),
    ]

    async def main() -> None:
        async with opened(broker) as t:
            await t.declare(specs)
        # A fresh connection: bindings live in the broker, not in the declaring client.
        async with opened(broker) as t:
            await t.publish(out("x", "k1", exchange="dx"))
            await t.publish(out("x", "k2", exchange="dx"))
            for key in ("a.b", "a", "a.b.c", "x.c"):
                await t.publish(out(key, key, exchange="tx"))
            await t.publish(out("x", "whatever", exchange="fx"))
            sizes = {s.name: await t.size(s.name) for s in specs}
            assert sizes == {"d1": 1, "d2": 1, "d3": 1, "t1": 1, "t2": 3, "t3": 2, "f1": 1, "f2": 1}
            async with reading(t, ["t3"]) as r:
                assert await r.bodies(2) == [b"a.b.c", b"x.c"]
            async with reading(t, ["d3"]) as r:
                d = await r.get()
                assert (d.exchange, d.routing_key, d.queue) == ("dx", "k1", "d3")
                await r.consumer.ack(d)

    run(main())


def test_unroutable_publish_raises(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t:
            await t.declare([QueueSpec("d1", "dx", "direct", "k1")])
            with pytest.raises(TransportError) as err:
                await t.publish(out("lost?", "nope", exchange="dx"))
            assert "dx" in str(err.value) and "nope" in str(err.value)
            with pytest.raises(TransportError, match="ghost"):
                await t.publish(out("lost?", "k1", exchange="ghost"))
            if broker.kind not in ("redis", "amqp"):  # memory and sqlite check the batch first
                with pytest.raises(TransportError):
                    await t.publish_many(
                        [out("ok", "k1", exchange="dx"), out("bad", "k9", exchange="dx")]
                    )
                assert await t.size("d1") == 0
            await t.publish(out("implicit", "brand-new-queue"))  # "" always routes
            assert await t.size("brand-new-queue") == 1

    run(main())


def test_broadcast_and_subscribe(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as listener, opened(broker) as sender:
            await sender.broadcast("ch", b"before")
            async with listener.subscribe("ch") as sub:
                it = aiter(sub)
                for i in range(3):
                    await sender.broadcast("ch", f"p{i}".encode())
                    await sender.broadcast("other", b"not for us")
                got = [await asyncio.wait_for(anext(it), 10) for _ in range(3)]
                assert got == [b"p0", b"p1", b"p2"]
                extra = asyncio.ensure_future(anext(it))
                done, _ = await asyncio.wait({extra}, timeout=QUIET)
                extra.cancel()
                assert not done, "a payload from another channel or from before subscribing"

    run(main())


def test_try_lock_exclusive_and_expiring(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as a, opened(broker) as b:
            assert await a.try_lock("beat", "A", 0.5)
            assert not await b.try_lock("beat", "B", 0.5)
            assert await a.try_lock("beat", "A", 0.5)  # renew
            assert await b.try_lock("other", "B", 0.5)  # names are independent
            deadline = time.monotonic() + 10
            while not await b.try_lock("beat", "B", 30):
                assert time.monotonic() < deadline, "the lock never expired"
                await asyncio.sleep(0.05)
            assert not await a.try_lock("beat", "A", 30)

    run(main())


def test_live_lease_is_never_handed_to_another_consumer(broker: Broker) -> None:
    async def main() -> None:
        async with opened(broker) as t1, opened(broker) as t2:
            await t1.publish(out("mine"))
            async with reading(t1, ["q"], prefetch=1, cid="w1") as r1:
                held = await r1.get()
                async with reading(t2, ["q"], prefetch=1, cid="w2") as r2:
                    # watch past the lease timeout: heartbeats must keep the lease
                    await r2.nothing_within(broker.lease_timeout + 1.0)
                    await r1.consumer.ack(held)
                    await t1.publish(out("next"))
                    d = await asyncio.wait_for(next_of(r1, r2), 10)
                    assert d.envelope.body == b"next" and not d.redelivered

    run(main())


async def next_of(*readers: Reader) -> Delivery:
    tasks = [asyncio.ensure_future(r.get()) for r in readers]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for p in pending:
        p.cancel()
    return done.pop().result()


def test_producer_on_another_threads_loop(broker: Broker) -> None:
    """A sync producer thread runs its own loop; the worker loop must still be woken."""

    def produce() -> None:
        async def send() -> None:
            async with opened(broker) as t:
                await t.publish(out("from-thread"))

        asyncio.run(send())

    async def main() -> None:
        async with opened(broker) as t:
            await t.declare([QueueSpec("q")])
            async with reading(t, ["q"]) as r:
                await r.nothing_within(0.1)  # the consumer is idle and waiting
                thread = threading.Thread(target=produce)
                thread.start()
                await asyncio.to_thread(thread.join, 30)
                assert await r.bodies(1) == [b"from-thread"]

    run(main())


# -- sqlite only: several processes on one file ---------------------------------------

CHILD = r"""
import asyncio, sys
from celeriac.transport import create_transport
from celeriac.transport.base import QueueSpec

async def main(url, mode):
    t = create_transport(url, {"heartbeat_interval": 0.2})
    await t.connect()
    async with t.consumer([QueueSpec("work")], prefetch=1, consumer_id=mode) as c:
        print("ready", flush=True)
        async for d in c:
            if mode == "hold":
                print("got", d.envelope.body.decode(), flush=True)
                await asyncio.Event().wait()
            if d.envelope.body == b"stop":
                await c.ack(d)
                break
            print(d.envelope.body.decode(), flush=True)
            await c.ack(d)
    await t.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def child(broker: Broker, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, broker.url, mode],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sqlite_two_processes_never_share_a_message(sqlite_broker: Broker) -> None:
    procs = [child(sqlite_broker, "drain"), child(sqlite_broker, "drain")]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready", p.stderr
        n = 400

        async def publish() -> None:
            async with opened(sqlite_broker) as t:
                await t.publish_many([out(f"m{i}", "work", priority=5) for i in range(n)])
                await t.publish_many([out("stop", "work", priority=0)] * 2)

        run(publish())
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    seen = [line for stdout, _ in outputs for line in stdout.split()]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert sorted(seen) == sorted(f"m{i}" for i in range(n))
    assert len(seen) == len(set(seen)) == n

    async def left() -> int:
        async with opened(sqlite_broker) as t:
            return await t.size("work")

    assert run(left()) == 0


def test_sqlite_killed_consumer_leases_come_back(sqlite_broker: Broker) -> None:
    broker = Broker("sqlite", sqlite_broker.url, {"lease_timeout": 60, "heartbeat_interval": 0.2})

    async def publish() -> None:
        async with opened(broker) as t:
            await t.publish(out("orphan", "work"))

    run(publish())
    proc = child(broker, "hold")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert proc.stdout.readline().strip() == "got orphan"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()  # reaps it, so its pid is really gone

    async def recover() -> None:
        async with opened(broker) as t:
            assert await t.size("work") == 0  # still leased by the dead pid
            async with reading(t, ["work"]) as r:
                # lease_timeout is 60 s: only the "pid gone" rule can bring it back
                d = await r.get(timeout=15)
                assert d.envelope.body == b"orphan" and d.redelivered
                await r.consumer.ack(d)

    run(recover())


def test_sqlite_stale_heartbeat_from_another_host_is_reaped(sqlite_broker: Broker) -> None:
    async def main() -> None:
        async with opened(sqlite_broker) as t:
            await t.publish(out("stuck"))
            db = sqlite3.connect(path_of(sqlite_broker.url))
            with db:
                db.execute(
                    "INSERT INTO consumers VALUES ('ghost:1:x', 1, 'elsewhere', ?)",
                    (time.time() - 100,),
                )
                db.execute("UPDATE messages SET owner = 'ghost:1:x'")
            db.close()
            assert await t.size("q") == 0
            async with reading(t, ["q"]) as r:
                d = await r.get(timeout=15)
                assert d.envelope.body == b"stuck" and d.redelivered
                await r.consumer.ack(d)
        db = sqlite3.connect(path_of(sqlite_broker.url))
        try:
            assert db.execute("SELECT COUNT(*) FROM consumers").fetchone() == (0,)
        finally:
            db.close()

    run(main())


def test_sqlite_garbage_rows_are_dead_lettered(
    sqlite_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    garbage: list[object] = [b"\xde\xad\xbe\xef", '{"not": "kombu"}', 42]

    async def main() -> None:
        async with opened(sqlite_broker) as t:
            await t.publish(out("before"))
            db = sqlite3.connect(path_of(sqlite_broker.url))
            with db:
                db.executemany(
                    "INSERT INTO messages (queue, payload) VALUES ('q', ?)", [(g,) for g in garbage]
                )
            db.close()
            await t.publish(out("after"))
            async with reading(t, ["q"]) as r:
                assert await r.bodies(2) == [b"before", b"after"]
                await r.nothing_within()
            assert await t.size("q.dead") == 3
            async with reading(t, ["q.dead"]) as r:
                for raw in (b"\xde\xad\xbe\xef", b'{"not": "kombu"}', b"42"):
                    d = await r.get()
                    assert d.envelope.body == raw
                    assert d.envelope.content_type == "application/octet-stream"
                    assert d.envelope.headers["x-dead-reason"]
                    await r.consumer.ack(d)

    run(main())
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3


def test_sqlite_payload_is_the_kombu_envelope(sqlite_broker: Broker) -> None:
    """Rows hold base.pack() bytes, so tools reading the file see kombu's JSON."""

    async def main() -> None:
        async with opened(sqlite_broker) as t:
            await t.publish(out("hello", priority=7))
        db = sqlite3.connect(path_of(sqlite_broker.url))
        try:
            queue, prio, payload = db.execute(
                "SELECT queue, priority, payload FROM messages"
            ).fetchone()
        finally:
            db.close()
        env, exchange, rkey, _ = unpack(payload)
        assert (queue, prio, env.body, exchange, rkey) == ("q", 7, b"hello", "", "q")
        assert isinstance(pack(env, "", "q"), bytes)

    run(main())


def test_sqlite_claim_is_a_rowid_lookup_at_any_backlog(sqlite_broker: Broker) -> None:
    """The claim UPDATE must not walk messages_ready (O(backlog) per claim)."""
    from celeriac.transport.sqlite import claim_sql

    async def main() -> None:
        async with opened(sqlite_broker) as t:
            await t.publish_many([out(f"m{i}", "q" if i % 2 else "r") for i in range(4000)])

    run(main())
    db = sqlite3.connect(path_of(sqlite_broker.url))
    try:
        db.execute("ANALYZE")  # with statistics too, the plan must stay on the rowid
        for n_ids, n_queues in ((1, 1), (8, 1), (8, 2), (256, 2)):
            args = ("owner", *range(1, n_ids + 1), *["q", "r"][:n_queues])
            plan = db.execute("EXPLAIN QUERY PLAN " + claim_sql(n_ids, n_queues), args)
            details = " | ".join(row[3] for row in plan)
            assert "INTEGER PRIMARY KEY" in details and "messages_ready" not in details, details
    finally:
        db.close()


def test_sqlite_acks_ride_in_one_transaction_with_the_refill(sqlite_broker: Broker) -> None:
    """Acks of a tick and the claim that refills the freed slots commit together, and
    a claim within heartbeat_interval of the last beat does not rewrite the heartbeat."""
    broker = Broker("sqlite", sqlite_broker.url, {"lease_timeout": 60, "heartbeat_interval": 30})

    async def main() -> None:
        async with opened(broker) as t:
            await t.publish_many([out(f"m{i:02}") for i in range(40)])
            spec = [QueueSpec("q")]
            async with t.consumer(spec, prefetch=4, consumer_id="batcher") as consumer:
                statements: list[str] = []
                t._db().set_trace_callback(statements.append)  # type: ignore[attr-defined]
                it = aiter(consumer)
                got: list[bytes] = []
                for _ in range(10):
                    batch = [await anext(it) for _ in range(4)]
                    got += [d.envelope.body for d in batch]
                    await asyncio.gather(*(consumer.ack(d) for d in batch))
                    # ack() returned: the rows are gone for every other connection too
                    other = sqlite3.connect(path_of(broker.url))
                    try:
                        ids = [d.tag for d in batch]
                        marks = ",".join("?" * len(ids))
                        sql = f"SELECT count(*) FROM messages WHERE id IN ({marks})"
                        assert other.execute(sql, ids).fetchone() == (0,)
                    finally:
                        other.close()
                t._db().set_trace_callback(None)  # type: ignore[attr-defined]
            assert got == [f"m{i:02}".encode() for i in range(40)]
            assert await t.size("q") == 0
        txns: list[list[str]] = []
        for sql in statements:
            if sql.startswith("BEGIN"):
                txns.append([])
            elif txns and not sql.startswith("COMMIT"):
                txns[-1].append(sql)
        # one claim, then one transaction per group of four acks (the last refills nothing)
        assert len(txns) == 11, txns
        for txn in txns[1:]:
            deletes = [s for s in txn if s.startswith("DELETE FROM messages")]
            assert len(deletes) == 1 and deletes[0].count(",") == 3, txn
        assert all("NOT INDEXED" in " ".join(txn) for txn in txns[:10])
        assert not any("consumers" in s for txn in txns for s in txn)

    run(main())


def test_sqlite_refill_keeps_priority_and_not_before(sqlite_broker: Broker) -> None:
    async def main() -> None:
        async with opened(sqlite_broker) as t:
            due = time.time() + 0.6
            await t.publish_many(
                [
                    out("a", priority=0),
                    out("b", priority=0),
                    out("c", priority=9, not_before=due),
                    out("d", priority=5),
                ]
            )
            async with t.consumer([QueueSpec("q")], prefetch=1, consumer_id="c1") as consumer:
                it = aiter(consumer)
                order = []
                for _ in range(4):
                    d = await asyncio.wait_for(anext(it), 10)
                    order.append(d.envelope.body)
                    if d.envelope.body == b"c":
                        assert time.time() >= due
                    if d.envelope.body == b"a":
                        while time.time() < due:  # let c become due before the refill
                            await asyncio.sleep(0.02)
                    await consumer.ack(d)  # its transaction claims the next one
                assert order == [b"d", b"a", b"c", b"b"]

    run(main())
