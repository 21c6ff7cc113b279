"""Wire compatibility with real Celery (5.4+) on Redis, both ways.

Celery client -> celeriac worker, and celeriac client -> Celery worker, sharing Redis
database 8 for broker and results: plain calls, failures (the exception's type survives),
countdowns, chains, groups, chords and priorities. What is incompatible by design is
asserted too, so a change in it shows up here:

* a celeriac countdown/ETA is parked in celeriac's delayed zset; a Celery-only deployment
  never runs it unless some celeriac consumer (on any queue) promotes it;
* a chord sent by a Celery client cannot be joined by celeriac workers (its body fails
  with ChordError instead of hanging);
* priorities on Redis: celeriac runs 9 first, kombu runs bucket 0 first.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import WorkerFactory, wait_until

pytestmark = pytest.mark.timeout(60)


def _order(path: Path, n: int) -> list[str]:
    """The tags ``interop.record`` wrote, once ``n`` of them are there."""
    wait_until(
        lambda: path.exists() and len(path.read_text().split()) >= n,
        15,
        what=f"{n} recorded tasks in {path}",
    )
    return path.read_text().split()


# -- Celery client -> celeriac worker ---------------------------------------------------


def test_celery_client_calls_run_on_celeriac_worker(
    celery_client: Any, celeriac_worker: WorkerFactory
) -> None:
    celeriac_worker()
    app = celery_client.app
    sent = app.send_task("interop.add", (2, 3))
    assert sent.get(timeout=10) == 5
    delayed = celery_client.add.delay(2, 3)
    assert delayed.get(timeout=10) == 5
    assert delayed.state == "SUCCESS"
    assert isinstance(delayed.date_done, dt.datetime)  # Celery parses our date_done


def test_celery_client_sees_celeriac_failure_as_its_type(
    celery_client: Any, celeriac_worker: WorkerFactory
) -> None:
    celeriac_worker()
    res = celery_client.fail.delay("boom")
    with pytest.raises(ValueError, match="boom"):
        res.get(timeout=10)
    assert res.state == "FAILURE"
    assert isinstance(res.result, ValueError)
    assert "ValueError: boom" in res.traceback


def test_celery_countdown_waits_on_celeriac_worker(
    celery_client: Any, celeriac_worker: WorkerFactory
) -> None:
    """Celery sends the message at once with an ``eta`` header; celeriac parks it in
    its broker until due instead of running it early or holding it unacked."""
    celeriac_worker()
    before = time.time()
    res = celery_client.now.apply_async(countdown=2)
    ran_at = res.get(timeout=10)
    assert ran_at >= before + 2 - 0.05  # not before the ETA (allowing clock rounding)


def test_celery_chain_runs_on_celeriac_worker(
    celery_client: Any, celeriac_worker: WorkerFactory
) -> None:
    """The rest of a Celery chain travels in the body's embed ``chain`` (reversed)."""
    celeriac_worker()
    add = celery_client.add
    res = (add.s(1, 2) | add.s(3))()
    assert res.get(timeout=10) == 6
    assert res.parent.get(timeout=10) == 3


def test_celery_group_runs_on_celeriac_worker(
    celery_client: Any, celeriac_worker: WorkerFactory
) -> None:
    from celery import group  # type: ignore[import-untyped]

    celeriac_worker()
    res = group(celery_client.add.s(i, i) for i in range(4))()
    assert res.get(timeout=10) == [0, 2, 4, 6]


def test_celery_chord_fails_loudly_on_celeriac_worker(
    celery_client: Any, celeriac_worker: WorkerFactory
) -> None:
    """Incompatible by design: a Celery client keeps the chord size in its backend and
    saves no group, so celeriac cannot join it; the body's result fails, not hangs."""
    from celery import chord

    from celeriac.exceptions import ChordError

    celeriac_worker()
    res = chord(celery_client.add.s(i, i) for i in range(3))(celery_client.tsum.s())
    with pytest.raises(ChordError, match="Celery client"):
        res.get(timeout=10)


# -- celeriac client -> Celery worker ---------------------------------------------------


def test_celeriac_client_calls_run_on_celery_worker(
    celeriac_client: Any, celery_worker: WorkerFactory
) -> None:
    celery_worker()
    assert celeriac_client.add.delay(2, 3).get(timeout=10) == 5
    assert celeriac_client.app.send_task("interop.add", (4, 5)).get(timeout=10) == 9


def test_celeriac_client_reraises_celery_failure_with_its_type(
    celeriac_client: Any, celery_worker: WorkerFactory
) -> None:
    celery_worker()
    res = celeriac_client.fail.delay("boom")
    with pytest.raises(ValueError, match="boom") as info:
        res.get(timeout=10)
    assert type(info.value) is ValueError
    assert res.state == "FAILURE"


def test_celeriac_canvas_runs_on_celery_worker(
    celeriac_client: Any, celery_worker: WorkerFactory
) -> None:
    """Chain, group and chord built by celeriac run on a Celery worker. The chord needs
    Celery's ``.s`` size key, which celeriac's Redis backend writes with the group."""
    from celeriac import chord, group

    celery_worker()
    add, tsum = celeriac_client.add, celeriac_client.tsum
    assert (add.s(1, 2) | add.s(3))().get(timeout=10) == 6
    assert group(add.s(i, i) for i in range(4))().get(timeout=10) == [0, 2, 4, 6]
    assert chord(add.s(i, i) for i in range(3))(tsum.s()).get(timeout=10) == 6


def test_celeriac_countdown_needs_a_celeriac_consumer(
    celeriac_client: Any,
    redis8: Any,
    celery_worker: WorkerFactory,
    celeriac_worker: WorkerFactory,
) -> None:
    """Incompatible by design: celeriac's broker keeps a future message in its delayed
    zset, and only a celeriac consumer moves it to the ready list when due. Any celeriac
    worker does, whatever queue it consumes; then the Celery worker runs it."""
    celery_worker()
    assert celeriac_client.add.delay(1, 1).get(timeout=10) == 2  # the Celery worker is live
    before = time.time()
    res = celeriac_client.now.apply_async(countdown=0.5)
    assert redis8.zcard("celeriac.delayed.celery") == 1
    # Observe well past the due time: nothing moves it to the list Celery reads.
    deadline = before + 2.0
    while time.time() < deadline:
        assert res.state == "PENDING"
        time.sleep(0.1)
    assert redis8.llen("celery") == 0
    assert redis8.zcard("celeriac.delayed.celery") == 1
    celeriac_worker("-Q", "interop.idle")  # a celeriac consumer on an unrelated queue
    ran_at = res.get(timeout=10)
    assert ran_at >= before + 2.0
    assert redis8.zcard("celeriac.delayed.celery") == 0


# -- the stored envelope ----------------------------------------------------------------


def test_both_clients_store_the_same_envelope_shape(
    celery_client: Any, celeriac_client: Any, redis8: Any
) -> None:
    """kombu's JSON envelope on the ``celery`` list: same keys, headers and body triple."""
    celery_client.add.delay(2, 3)
    celeriac_client.add.delay(2, 3)
    ours, theirs = (json.loads(m) for m in redis8.lrange("celery", 0, -1))  # LPUSH: newest
    assert ours.keys() == theirs.keys()
    assert ours["properties"].keys() == theirs["properties"].keys()
    assert ours["headers"].keys() == theirs["headers"].keys()
    for doc in (ours, theirs):
        assert doc["properties"]["delivery_info"] == {"exchange": "", "routing_key": "celery"}
        assert doc["properties"]["body_encoding"] == "base64"
        body = json.loads(base64.b64decode(doc["body"]))
        assert body[:2] == [[2, 3], {}]
        assert body[2].keys() == {"callbacks", "errbacks", "chain", "chord"}


# -- priorities ---------------------------------------------------------------------------


def _send_priorities(celery_client: Any, path: Path) -> None:
    """p0a, then p9, then p0b: FIFO alone would run p9 second."""
    for tag, priority in (("p0a", 0), ("p9", 9), ("p0b", 0)):
        celery_client.record.apply_async((str(path), tag), priority=priority)


def test_celery_priority_on_celeriac_worker_runs_nine_first(
    celery_client: Any, celeriac_worker: WorkerFactory, tmp_path: Path
) -> None:
    """celeriac's contract (and RabbitMQ's): higher first, FIFO within a bucket."""
    path = tmp_path / "order.txt"
    _send_priorities(celery_client, path)
    celeriac_worker("-c", "1")
    assert _order(path, 3) == ["p9", "p0a", "p0b"]


def test_celery_priority_on_celery_worker_runs_zero_first(
    celery_client: Any, celery_worker: WorkerFactory, tmp_path: Path
) -> None:
    """kombu on Redis pops bucket 0 first: the reverse of celeriac on the same keys."""
    path = tmp_path / "order.txt"
    _send_priorities(celery_client, path)
    celery_worker()
    assert _order(path, 3) == ["p0a", "p0b", "p9"]
