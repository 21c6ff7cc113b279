"""A real worker process driven through the public API, as a Celery user would drive one."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path

import pytest

from celeriac import Celery, TimeLimitExceeded, group, states
from celeriac.result import AsyncResult

from . import tasks
from .conftest import WorkerFactory, queue_size, wait_until


def utc(value: dt.datetime | None) -> dt.datetime:
    assert value is not None, "the result has no date_done"
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def test_add_and_hello(worker: WorkerFactory) -> None:
    worker()
    assert tasks.add.delay(2, 2).get(timeout=10) == 4
    assert tasks.hello.s("haha").delay().get(timeout=10) == "hello haha"
    r = tasks.add.delay("chris", "kuan")
    assert r.get(timeout=10) == "chriskuan"
    assert r.state == states.SUCCESS
    assert r.successful()


def test_signature_with_countdown_is_not_run_early(worker: WorkerFactory) -> None:
    worker()
    countdown = 2.0
    sent = dt.datetime.now(dt.UTC)
    start = time.monotonic()
    r = tasks.hello.signature(("haha",), countdown=countdown).delay()
    seen = []
    while time.monotonic() - start < countdown * 0.75:
        seen.append(r.state)
        time.sleep(0.05)
    assert seen and set(seen) == {states.PENDING}, seen
    assert r.get(timeout=15) == "hello haha"
    waited = (utc(r.date_done) - sent).total_seconds()
    assert waited >= countdown - 0.2, f"ran {waited:.2f} s after sending, before its countdown"


def test_task_routes_send_each_task_to_its_queue(worker: WorkerFactory, app: Celery) -> None:
    w1 = worker(queues="queue1")
    greeting = tasks.hello.delay("queue2")
    total = tasks.add.delay(1, 2)
    assert total.get(timeout=10) == 3
    # queue1's worker never takes the queue2 message: it stays queued and pending.
    assert queue_size(app, "queue2") == 1
    assert greeting.state == states.PENDING
    assert total.id in w1.log() and greeting.id not in w1.log()
    w2 = worker(queues="queue2")
    assert greeting.get(timeout=10) == "hello queue2"
    assert greeting.id in w2.log()
    assert queue_size(app, "queue2") == 0


def test_higher_priority_runs_first(worker: WorkerFactory, tmp_path: Path) -> None:
    out = str(tmp_path / "order.txt")
    # Queue everything before a worker exists, so the broker alone decides the order.
    low = [tasks.record.apply_async((out, f"low{i}"), priority=0) for i in range(4)]
    high = [tasks.record.apply_async((out, f"high{i}"), priority=9) for i in range(4)]
    worker("--prefetch-multiplier", "1", concurrency=1)
    for r in [*low, *high]:
        r.get(timeout=20)
    order = tasks.lines(out)
    assert sorted(order[:4]) == [f"high{i}" for i in range(4)], order
    assert order[4:] == [f"low{i}" for i in range(4)], order


def test_retry_then_succeed(worker: WorkerFactory, tmp_path: Path) -> None:
    worker()
    log = str(tmp_path / "attempts.txt")
    r = tasks.flaky.delay(log)
    assert r.get(timeout=20) == 2
    assert tasks.lines(log) == ["attempt 0", "attempt 1", "attempt 2"]
    assert r.state == states.SUCCESS


def test_autoretry_exhausted_fails_with_original_exception(
    worker: WorkerFactory, tmp_path: Path
) -> None:
    worker()
    log = str(tmp_path / "attempts.txt")
    r = tasks.always_key_error.delay(log)
    with pytest.raises(KeyError, match="attempt 2"):
        r.get(timeout=20)
    assert r.state == states.FAILURE
    assert tasks.lines(log) == ["attempt 0", "attempt 1", "attempt 2"]


@pytest.mark.parametrize(
    ("kind", "exc_type"),
    [("value", ValueError), ("zero", ZeroDivisionError), ("custom", tasks.CustomError)],
)
def test_exception_comes_back_with_its_type(
    worker: WorkerFactory, kind: str, exc_type: type[Exception]
) -> None:
    worker()
    r = tasks.fail.delay(kind, f"{kind} went wrong")
    with pytest.raises(exc_type, match=f"{kind} went wrong"):
        r.get(timeout=10)
    assert r.failed()
    assert isinstance(r.result, exc_type)
    assert r.traceback and "went wrong" in r.traceback
    # propagate=False hands the exception back instead of raising it.
    assert isinstance(r.get(timeout=5, propagate=False), exc_type)


def test_ignore_result_stores_nothing(worker: WorkerFactory, tmp_path: Path) -> None:
    worker(concurrency=1)
    log = str(tmp_path / "ran.txt")
    ignored = tasks.ignored.delay(log)
    after = tasks.noop.delay()  # runs after `ignored` on the only pool slot
    after.get(timeout=10)
    assert tasks.lines(log) == ["ran"]
    assert ignored.state == states.PENDING


def test_track_started_reports_started(worker: WorkerFactory, tmp_path: Path) -> None:
    worker()
    release = tmp_path / "release"
    r = tasks.held.delay(str(release))
    wait_until(lambda: r.state == states.STARTED, what="the STARTED state")
    release.touch()
    assert r.get(timeout=10) == "released"


def test_soft_time_limit_is_raised_inside_the_task(worker: WorkerFactory) -> None:
    worker()
    assert tasks.soft_limited.delay().get(timeout=20) == "soft limit caught"


def test_hard_time_limit_fails_the_task_and_the_worker_goes_on(worker: WorkerFactory) -> None:
    w = worker()
    r = tasks.hard_limited.delay()
    with pytest.raises(TimeLimitExceeded):
        r.get(timeout=30)
    assert r.state == states.FAILURE
    assert w.alive()
    assert group(tasks.add.s(i, i) for i in range(8))().get(timeout=20) == [2 * i for i in range(8)]


def test_get_inside_a_task_raises_runtime_error(worker: WorkerFactory) -> None:
    worker()
    text = tasks.get_inside.delay().get(timeout=10)
    assert text.startswith("RuntimeError: Never call result.get() within a task"), text


@pytest.mark.parametrize("pool", ["prefork", "asyncio"])
def test_async_def_task(worker: WorkerFactory, pool: str) -> None:
    worker(pool=pool)
    results = [tasks.async_add.delay(i, i) for i in range(5)]
    assert [r.get(timeout=10) for r in results] == [2 * i for i in range(5)]


@pytest.mark.parametrize("pool", ["threads", "solo", "asyncio"])
def test_other_pools_run_tasks(worker: WorkerFactory, pool: str, tmp_path: Path) -> None:
    worker(pool=pool)
    assert tasks.add.delay(2, 2).get(timeout=10) == 4
    assert tasks.hello.delay(pool).get(timeout=10) == f"hello {pool}"
    with pytest.raises(ValueError, match="nope"):
        tasks.fail.delay("value", "nope").get(timeout=10)
    log = str(tmp_path / "attempts.txt")
    assert tasks.flaky.delay(log).get(timeout=20) == 2


def test_rate_limit_slows_tasks_down(worker: WorkerFactory, tmp_path: Path) -> None:
    worker()
    log = str(tmp_path / "times.txt")
    results = [tasks.limited.delay(log, str(i)) for i in range(10)]
    for r in results:
        r.get(timeout=30)
    times = sorted(float(line.split()[1]) for line in tasks.lines(log))
    assert len(times) == 10
    assert times[-1] - times[0] >= 1.4, f"10 tasks at 5/s ran within {times[-1] - times[0]:.2f} s"


def test_revoke_a_countdown_task(worker: WorkerFactory, tmp_path: Path) -> None:
    worker()
    log = str(tmp_path / "ran.txt")
    r = tasks.record.apply_async((log, "ran"), countdown=1.5)
    r.revoke()
    wait_until(lambda: r.state == states.REVOKED, timeout=20, what="REVOKED")
    # Later work on the same queue runs; the revoked call never did.
    assert tasks.record.delay(log, "later").get(timeout=10) == "later"
    assert tasks.lines(log) == ["later"]


def test_expires_in_the_past_is_revoked(worker: WorkerFactory, tmp_path: Path) -> None:
    worker()
    log = str(tmp_path / "ran.txt")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    r = tasks.record.apply_async((log, "ran"), expires=past)
    wait_until(lambda: r.state == states.REVOKED, timeout=20, what="REVOKED")
    assert tasks.lines(log) == []


def test_control_ping_and_inspect_active(
    worker: WorkerFactory, app: Celery, tmp_path: Path
) -> None:
    w = worker()
    assert {w.nodename: {"ok": "pong"}} in app.control.ping(timeout=1)
    # With a destination the reply count is known, so this returns on the first reply.
    assert app.control.ping([w.nodename], timeout=5) == [{w.nodename: {"ok": "pong"}}]
    release = tmp_path / "release"
    started = tmp_path / "started"
    r = tasks.held.delay(str(release), str(started))
    wait_until(lambda: tasks.lines(started), what="the held task to start")
    try:
        active = app.control.inspect([w.nodename], timeout=5).active()
        assert active is not None and w.nodename in active, active
        running = active[w.nodename]
        assert [t["id"] for t in running] == [r.id], running
        assert running[0]["name"] == "tests.e2e.tasks.held"
    finally:
        release.touch()
    assert r.get(timeout=10) == "released"
    wait_until(
        lambda: (app.control.inspect([w.nodename], timeout=5).active() or {}).get(w.nodename)
        == [],
        what="active() to be empty after the task",
    )


def test_unknown_result_is_pending(worker: WorkerFactory, app: Celery) -> None:
    worker()
    r = AsyncResult(str(uuid.uuid4()), app=app)
    assert r.state == states.PENDING
    assert not r.ready()
