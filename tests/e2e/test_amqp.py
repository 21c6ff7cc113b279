"""The tutorial's core scenarios on RabbitMQ (``amqp://``), with results in Redis.

Overrides the ``broker`` and ``app`` fixtures of conftest.py; everything else (real worker
processes started through the CLI) is shared with the SQLite and Redis runs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from celeriac import Celery, chain, chord, group

from . import tasks
from .conftest import Broker, WorkerFactory, wait_until

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
BACKEND_URL = "redis://127.0.0.1:6379/7"
QUEUES = ("celery", "queue1", "queue2")


@dataclass(frozen=True)
class AMQPBroker(Broker):
    backend: str = BACKEND_URL

    @property
    def env(self) -> dict[str, str]:
        return {"CELERIAC_BROKER_URL": self.url, "CELERIAC_RESULT_BACKEND": self.backend}


def _servers_up() -> None:
    try:
        import aio_pika  # noqa: F401
        import redis

        redis.Redis.from_url(BACKEND_URL, socket_connect_timeout=1).ping()
        asyncio.run(_probe())
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"RabbitMQ/Redis needed under CI but not usable: {exc!r}")
        pytest.skip(f"RabbitMQ/Redis not usable: {exc!r}")


async def _probe() -> None:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL, timeout=3)
    await conn.close()


async def _purge() -> None:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL)
    try:
        channel = await conn.channel()
        for name in QUEUES:
            for queue in (name, f"{name}.dead"):
                await channel.queue_delete(queue)
    finally:
        await conn.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    _servers_up()
    import redis

    client = redis.Redis.from_url(BACKEND_URL)
    asyncio.run(_purge())
    client.flushdb()
    try:
        yield AMQPBroker("amqp", AMQP_URL, tmp_path)
    finally:
        asyncio.run(_purge())
        client.flushdb()
        client.close()


@pytest.fixture
def app(broker: Broker) -> Iterator[Celery]:
    tasks.app.close()
    tasks.app.conf.broker_url = AMQP_URL
    tasks.app.conf.result_backend = BACKEND_URL
    try:
        yield tasks.app
    finally:
        tasks.app.close()


def test_tutorial_calls_routing_and_workflows(worker: WorkerFactory, app: Celery) -> None:
    worker()
    assert tasks.add.delay(2, 2).get(timeout=20) == 4
    assert tasks.hello.s("haha").delay().get(timeout=20) == "hello haha"
    assert group(tasks.add.s(i, i) for i in range(10))().get(timeout=20) == [
        2 * i for i in range(10)
    ]
    assert chain(tasks.add.s("chris", "kuan") | tasks.hello.s())().get(timeout=20) == (
        "hello chriskuan"
    )
    res = chord((tasks.add.s(i, i) for i in range(20)), tasks.tsum.s())()
    assert res.get(timeout=30) == sum(2 * i for i in range(20))
    assert app.control.ping(timeout=2.0), "the worker did not answer ping over RabbitMQ"


def test_countdown_is_held_by_the_broker(worker: WorkerFactory, app: Celery) -> None:
    worker()
    sent = time.time()
    res = tasks.hello.apply_async(("later",), countdown=2)
    assert res.get(timeout=30) == "hello later"
    assert res.date_done is not None and res.date_done.timestamp() >= sent + 1.8


def test_killed_worker_task_runs_on_another_worker(
    worker: WorkerFactory, app: Celery, tmp_path: Path
) -> None:
    log, release = str(tmp_path / "log.txt"), tmp_path / "release"
    doomed = worker(concurrency=1)
    r = tasks.late_held.delay(log, str(release))
    first = wait_until(lambda: tasks.lines(log), what="the task to start on the first worker")
    doomed.kill()
    worker(concurrency=1)
    second = wait_until(lambda: tasks.lines(log)[1:], timeout=45, what="the task to run again")
    assert second[0].startswith("start ") and second[0] != first[0]
    release.touch()
    assert r.get(timeout=30) == "released"


def test_rpc_results_over_rabbitmq(worker: WorkerFactory, app: Celery) -> None:
    """Celery's usual RabbitMQ pairing: ``backend='rpc://'``."""
    app.close()
    app.conf.result_backend = "rpc://"
    worker(env={"CELERIAC_RESULT_BACKEND": "rpc://"})
    assert tasks.add.delay(2, 2).get(timeout=20) == 4
    assert chain(tasks.add.s("chris", "kuan") | tasks.hello.s())().get(timeout=20) == (
        "hello chriskuan"
    )
