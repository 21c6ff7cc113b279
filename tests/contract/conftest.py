"""Broker fixtures for the transport contract suite: memory, sqlite, Redis db 15, RabbitMQ.

A server that is down (or a transport module not written yet) fails the test under
``CI=true`` and skips it otherwise, as dramatiq's conftest does.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REDIS_BROKER_URL = "redis://127.0.0.1:6379/15"
AMQP_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
#: The queue and exchange names the suite uses: deleted (with delay chains and dead-letter
#: queues) before and after each RabbitMQ test, the way Redis db 15 is flushed.
AMQP_QUEUES = ("q", "a", "b", "q1", "q2", "never-used", "brand-new-queue", "work",
               "d1", "d2", "d3", "t1", "t2", "t3", "f1", "f2")
AMQP_EXCHANGES = ("dx", "tx", "fx", "ghost", "celeriac.bc.ch", "celeriac.bc.other")
#: Short leases so "a live consumer keeps its lease" is checked past the timeout.
LEASE_OPTIONS = {"lease_timeout": 1.5, "heartbeat_interval": 0.2}


@dataclass(frozen=True)
class Broker:
    kind: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def lease_timeout(self) -> float:
        return float(self.options.get("lease_timeout", 0.3))


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)")
    pytest.skip(reason)


def _redis_db15() -> Any:
    try:
        importlib.import_module("celeriac.transport.redis")
    except ImportError as exc:
        unavailable(f"celeriac.transport.redis cannot be imported: {exc}")
    import redis

    client = redis.Redis.from_url(REDIS_BROKER_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        client.close()
        unavailable(f"Redis is not reachable at {REDIS_BROKER_URL}: {exc}")
    return client


def _amqp_reset() -> None:
    try:
        amqp = importlib.import_module("celeriac.transport.amqp")
        import aiormq
    except ImportError as exc:
        unavailable(f"celeriac.transport.amqp cannot be imported: {exc}")

    async def reset() -> None:
        conn = await aiormq.connect(AMQP_BROKER_URL)
        ch = await conn.channel()
        for name in (n for q in AMQP_QUEUES for n in (q, q + ".dead")):
            for queue in (name, *amqp.delay_queues(name)):
                await ch.queue_delete(queue, nowait=True)
        for exchange in AMQP_EXCHANGES:
            await ch.exchange_delete(exchange, nowait=True)
        await ch.basic_qos(prefetch_count=0)  # a round trip: the deletes above are done
        await conn.close()

    try:
        asyncio.run(asyncio.wait_for(reset(), 30))
    except (OSError, ConnectionError) as exc:
        unavailable(f"RabbitMQ is not reachable at {AMQP_BROKER_URL}: {exc}")


@pytest.fixture(params=["memory", "sqlite", "redis", "amqp"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    kind = request.param
    if kind == "memory":
        from celeriac.transport import memory

        url = f"memory://contract-{uuid.uuid4().hex}"
        yield Broker(kind, url)
        memory.reset(url)
    elif kind == "sqlite":
        yield Broker(kind, f"sqlite:///{tmp_path / 'broker.sqlite'}", dict(LEASE_OPTIONS))
    elif kind == "amqp":
        _amqp_reset()
        try:
            yield Broker(kind, AMQP_BROKER_URL)
        finally:
            _amqp_reset()
    else:
        client = _redis_db15()
        client.flushdb()
        try:
            yield Broker(kind, REDIS_BROKER_URL, dict(LEASE_OPTIONS))
        finally:
            client.flushdb()
            client.close()


@pytest.fixture
def sqlite_broker(tmp_path: Path) -> Broker:
    return Broker("sqlite", f"sqlite:///{tmp_path / 'broker.sqlite'}", dict(LEASE_OPTIONS))
