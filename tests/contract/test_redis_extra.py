"""Redis-only broker checks: kombu wire layout, leases versus ETAs, dead consumers and
killed connections. Real Redis db 13, flushed before each test."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from celeriac.exceptions import TransportError
from celeriac.transport.base import Consumer, Delivery, Envelope, Outgoing, QueueSpec, unpack

T = TypeVar("T")
URL = "redis://127.0.0.1:6379/13"
ROOT = Path(__file__).resolve().parents[2]
SEP = "\x06\x16"
CELERY = QueueSpec("celery", "celery", "direct", "celery")


@pytest.fixture(autouse=True)
def redis_db13() -> Iterator[None]:
    try:
        import redis

        from celeriac.transport import redis as _  # noqa: F401
    except ImportError as exc:
        _unavailable(f"the Redis transport cannot be imported: {exc}")
    client = redis.Redis.from_url(URL, socket_connect_timeout=1)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        client.close()
        _unavailable(f"Redis is not reachable at {URL}: {exc}")
    try:
        yield
    finally:
        client.flushdb()
        client.close()


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)")
    pytest.skip(reason)


def run(fn: Callable[[Any], Awaitable[T]], **options: Any) -> T:
    """Run ``fn(transport)`` on a fresh loop with a connected Redis transport."""
    from celeriac.transport.redis import RedisTransport

    async def main() -> T:
        transport = RedisTransport(URL, options)
        await transport.connect()
        try:
            return await fn(transport)
        finally:
            await transport.close()

    return asyncio.run(main())


def task_env(n: int = 0, priority: int | None = None) -> Envelope:
    tid = str(uuid.uuid4())
    return Envelope(json.dumps([[n], {}, {}]).encode(), {"task": "t.add", "id": tid},
                    "application/json", priority=priority, correlation_id=tid)


def number(d: Delivery) -> int:
    return int(json.loads(d.envelope.body)[0][0])


async def take(consumer: Consumer, n: int, timeout: float = 10.0) -> list[Delivery]:
    """The next ``n`` deliveries, acked."""
    got: list[Delivery] = []

    async def pull() -> None:
        async for d in consumer:
            got.append(d)
            await consumer.ack(d)
            if len(got) == n:
                return

    await asyncio.wait_for(pull(), timeout)
    return got


async def nothing_for(consumer: Consumer, seconds: float) -> None:
    """Assert no delivery arrives within ``seconds`` (an observation window, not a sync)."""
    it = aiter(consumer)
    try:
        d = await asyncio.wait_for(anext(it), seconds)
    except TimeoutError:
        return
    pytest.fail(f"unexpected delivery {d}")


def consume(t: Any, prefetch: int = 10, **kw: Any) -> AbstractAsyncContextManager[Consumer]:
    c: AbstractAsyncContextManager[Consumer] = t.consumer(
        [kw.get("queue", CELERY)], prefetch=prefetch, consumer_id=kw.get("cid", "test@host"))
    return c


# -- kombu wire layout ----------------------------------------------------------------


def test_kombu_layout_on_the_wire() -> None:
    async def body(t: Any) -> None:
        await t.declare([CELERY, QueueSpec("ev", "events", "topic", "task.*")])
        await t.publish(Outgoing(task_env(1), "", "celery"))
        await t.publish(Outgoing(task_env(2, priority=9), "celery", "celery"))
        await t.publish(Outgoing(task_env(3, priority=4), "", "celery"))
        r = t.client
        raw = await r.lrange("celery", 0, -1)
        assert len(raw) == 1
        doc = json.loads(raw[0])
        assert set(doc) == {"body", "content-encoding", "content-type", "headers", "properties"}
        props = doc["properties"]
        assert props["body_encoding"] == "base64"
        assert props["delivery_info"] == {"exchange": "", "routing_key": "celery"}
        assert props["priority"] == 0 and props["delivery_mode"] == 2
        assert json.loads(base64.b64decode(doc["body"])) == [[1], {}, {}]
        assert doc["headers"]["task"] == "t.add"
        assert await r.llen(f"celery{SEP}9") == 1  # kombu's buckets: 9 stays 9, 4 -> 3
        assert await r.llen(f"celery{SEP}3") == 1
        assert await r.smembers("_kombu.binding.celery") == {f"celery{SEP}{SEP}celery".encode()}
        (member,) = await r.smembers("_kombu.binding.events")
        rk, pattern, queue = member.decode().split(SEP)
        assert (rk, queue) == ("task.*", "ev") and pattern.startswith("^task")
        assert await t.size("celery") == 3
        async with consume(t) as c:  # ours: higher priority first
            assert [number(d) for d in await take(c, 3)] == [2, 3, 1]

    run(body)


def test_hand_written_kombu_message_is_consumed() -> None:
    """What a Celery 5 client LPUSHes (json.dumps with its default spaces)."""
    tid = str(uuid.uuid4())
    msg = {
        "body": base64.b64encode(b'[[2, 2], {}, {"callbacks": null}]').decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "tasks.add", "id": tid, "eta": None,
                    "retries": 0, "timelimit": [None, None], "argsrepr": "(2, 2)"},
        "properties": {"correlation_id": tid, "reply_to": "oid-1", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": "celery"},
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4())},
    }

    async def body(t: Any) -> None:
        await t.client.lpush("celery", json.dumps(msg))
        async with consume(t) as c:
            (d,) = await take(c, 1)
        assert d.envelope.body == b'[[2, 2], {}, {"callbacks": null}]'
        assert d.envelope.headers["task"] == "tasks.add"
        assert d.envelope.headers["timelimit"] == [None, None]
        assert d.envelope.correlation_id == tid and d.envelope.reply_to == "oid-1"
        assert (d.queue, d.exchange, d.routing_key, d.redelivered) == ("celery", "", "celery",
                                                                      False)
        assert await t.size("celery") == 0

    run(body)


def test_redelivered_flag_survives_kombu_spacing() -> None:
    """Returned messages are flagged in Lua by editing the JSON text; check both styles."""
    spaced = json.dumps({"body": "", "content-type": "text/plain", "headers": {},
                         "properties": {"body_encoding": "base64"}})
    compact = json.dumps({"body": "", "headers": {"a": 1}, "properties": {}},
                         separators=(",", ":"))

    async def body(t: Any) -> None:
        await t.client.lpush("celery", spaced, compact)
        async with consume(t) as c:
            it = aiter(c)
            first, second = await anext(it), await anext(it)
            assert not first.redelivered and not second.redelivered
        async with consume(t) as c:
            again = await take(c, 2)
        assert all(d.redelivered for d in again)
        assert again[1].envelope.headers == {"a": 1, "redelivered": True}

    run(body)


def test_unroutable_named_exchange_raises() -> None:
    async def body(t: Any) -> None:
        with pytest.raises(TransportError, match="no queue is bound"):
            await t.publish(Outgoing(task_env(), "nowhere", "x"))
        await t.declare([QueueSpec("ev", "events", "topic", "task.#")])
        await t.publish(Outgoing(task_env(), "events", "task.a.b"))
        assert await t.size("ev") == 1

    run(body)


def test_garbage_is_dead_lettered_and_consumer_continues(caplog: pytest.LogCaptureFixture) -> None:
    async def body(t: Any) -> None:
        await t.client.lpush("celery", b"\xffnot json")
        await t.publish(Outgoing(task_env(7), "", "celery"))
        async with consume(t) as c:
            (d,) = await take(c, 1)
        assert number(d) == 7
        (raw,) = await t.client.lrange("celery.dead", 0, -1)
        env, _, _, _ = unpack(raw)
        assert env.body == b"\xffnot json"
        assert "not JSON" in env.headers["x-dead-reason"]

    with caplog.at_level(logging.ERROR, "celeriac.transport.redis"):
        run(body)
    assert sum("undecodable" in r.getMessage() for r in caplog.records) == 1


# -- leases versus delays ---------------------------------------------------------------


def test_eta_longer_than_lease_is_delivered_exactly_once() -> None:
    async def body(t: Any) -> None:
        due = time.time() + 3.0
        await t.publish(Outgoing(task_env(1), "", "celery", not_before=due))
        assert await t.size("celery") == 1  # counted while delayed
        async with consume(t, cid="a") as a, consume(t, cid="b") as b:
            await asyncio.gather(nothing_for(a, 1.5), nothing_for(b, 1.5))  # > 1 lease
            assert not await t.client.keys("celeriac.inflight.*")  # held by Redis, not us
            assert await t.client.zcard("celeriac.delayed.celery") == 1
            got = await take(a, 1, timeout=15)
            assert time.time() >= due
            assert not got[0].redelivered
            await asyncio.gather(nothing_for(a, 2.5), nothing_for(b, 2.5))  # > 2 leases
        assert await t.size("celery") == 0

    run(body, lease_timeout=1.0, heartbeat_interval=0.2)


def test_consumer_that_stops_heartbeating_loses_its_leases_exactly_once() -> None:
    async def body(t: Any) -> None:
        await t.publish_many([Outgoing(task_env(i), "", "celery") for i in range(3)])
        async with consume(t, prefetch=3, cid="dead") as a:
            it = aiter(a)
            held = [await anext(it) for _ in range(3)]
            a._beat_task.cancel()  # type: ignore[attr-defined]  # it stops heartbeating
            async with consume(t, cid="alive") as b:
                back = await take(b, 3, timeout=15)
                assert sorted(map(number, back)) == [0, 1, 2]
                assert all(d.redelivered for d in back)
                await a.ack(held[0])  # too late: a no-op with a warning
                await nothing_for(b, 1.5)
            assert not await t.client.exists(a.inflight)  # type: ignore[attr-defined]
        assert await t.size("celery") == 0
        assert await t.client.zcard("celeriac.heartbeats") == 0

    run(body, lease_timeout=1.0, heartbeat_interval=0.2)


CRASHER = """
import asyncio, sys
from celeriac.transport.base import QueueSpec
from celeriac.transport.redis import RedisTransport

async def main():
    t = RedisTransport(sys.argv[1], {"lease_timeout": 60})
    async with t.consumer([QueueSpec("celery")], prefetch=2, consumer_id="crasher") as c:
        it = aiter(c)
        await anext(it); await anext(it)
        print("holding", flush=True)
        await asyncio.sleep(120)

asyncio.run(main())
"""


def test_killed_process_leases_return_without_waiting_for_the_lease() -> None:
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, URL], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    try:
        async def body(t: Any) -> None:
            await t.publish_many([Outgoing(task_env(i), "", "celery") for i in range(2)])
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line.strip() == "holding"
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            async with consume(t, cid="survivor") as c:
                back = await take(c, 2, timeout=20)  # lease is 60 s: the pid check did it
            assert sorted(map(number, back)) == [0, 1] and all(d.redelivered for d in back)

        run(body, lease_timeout=60, reap_interval=0.3, heartbeat_interval=0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- connection loss ------------------------------------------------------------------


async def kill_clients(t: Any, name: str) -> int:
    ids = [c["id"] for c in await t.client.client_list() if c.get("name") == name]
    for cid in ids:
        await t.client.client_kill_filter(_id=cid)
    return len(ids)


def test_client_kill_mid_consume_loses_and_duplicates_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    total = 300

    async def body(t: Any) -> None:
        seen: list[int] = []
        async with consume(t, prefetch=20, cid="victim") as c:

            async def produce() -> None:
                for i in range(total):
                    await t.publish(Outgoing(task_env(i), "", "celery"))
                    if i % 10 == 0:
                        await asyncio.sleep(0.005)

            async def consume_all() -> None:
                kills = 0
                async for d in c:
                    seen.append(number(d))
                    if len(seen) % 60 == 30:
                        kills += await kill_clients(t, c.client_name)  # type: ignore[attr-defined]
                    await c.ack(d)
                    if len(seen) == total:
                        break
                assert kills >= 4

            await asyncio.wait_for(asyncio.gather(produce(), consume_all()), 60)
            await nothing_for(c, 0.5)
        assert sorted(seen) == list(range(total))  # no loss, no duplicate
        assert await t.size("celery") == 0
        assert not await t.client.keys("celeriac.inflight.*")

    with caplog.at_level(logging.INFO, "celeriac.transport.redis"):
        run(body)
    assert any("lost Redis" in r.getMessage() for r in caplog.records)
    assert any("reconnected" in r.getMessage() for r in caplog.records)


def test_broadcast_and_lock() -> None:
    async def body(t: Any) -> None:
        async with t.subscribe("events") as sub:
            await t.broadcast("events", b"one")
            got = await asyncio.wait_for(anext(aiter(sub)), 5)
            assert got == b"one"
        assert await t.try_lock("beat", "a", 5)
        assert not await t.try_lock("beat", "b", 5)
        assert await t.try_lock("beat", "a", 5)

    run(body)


def test_iteration_cancelled_at_random_points_loses_and_duplicates_nothing() -> None:
    """A worker may cancel its consume loop at any await, even mid-fetch: what that fetch
    leased comes back on the next one, and redis-py must not swallow the cancellation."""
    total = 200

    async def body(t: Any) -> None:
        await t.publish_many([Outgoing(task_env(i), "", "celery") for i in range(total)])
        seen: list[int] = []
        async with consume(t, prefetch=7) as c:

            async def pump() -> None:
                async for d in c:
                    seen.append(number(d))
                    await c.ack(d)

            rounds = 0
            while len(seen) < total:
                rounds += 1
                task = asyncio.ensure_future(pump())
                await asyncio.sleep(0.0005 * (rounds % 7))
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=5)
                assert done, "cancelling the consume loop did not stop it"
                assert rounds < 5000
        assert sorted(seen) == list(range(total))
        assert await t.size("celery") == 0

    run(body)


def test_backend_uses_celery_keys_and_publishes_on_them() -> None:
    from celeriac.backends.base import ResultMeta
    from celeriac.backends.redis import RedisBackend

    async def main() -> None:
        import redis.asyncio as aredis

        backend = RedisBackend(URL)
        raw = aredis.Redis.from_url(URL)
        ps = raw.pubsub()
        try:
            await backend.connect()
            tid = str(uuid.uuid4())
            key = f"celery-task-meta-{tid}"
            await ps.subscribe(key)
            assert (await ps.get_message(timeout=5))["type"] == "subscribe"
            await backend.store(ResultMeta(task_id=tid, status="SUCCESS", result=4), ttl=60)
            stored = await raw.get(key)
            assert isinstance(stored, bytes)
            doc = json.loads(stored)
            assert (doc["status"], doc["result"], doc["task_id"]) == ("SUCCESS", 4, tid)
            assert 0 < await raw.pttl(key) <= 60_000
            msg = await ps.get_message(timeout=5)
            assert msg is not None and msg["data"] == stored  # what Celery clients wait on
            ranks = [await backend._add_member("j", m, None) for m in ("a", "b", "a", "c")]
            assert ranks == [1, 2, 1, 3]
        finally:
            await ps.aclose()  # type: ignore[no-untyped-call]
            await raw.aclose()
            await backend.close()

    asyncio.run(main())
