"""Beat on real brokers: one send per due time with several beats, handover, CLI, signals."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery
from celeriac.beat import (
    PersistentScheduler,
    ScheduleEntry,
    Scheduler,
    add_periodic_task,
    embedded_beat,
    scheduler_class,
)
from celeriac.exceptions import ImproperlyConfigured
from celeriac.schedules import crontab, schedule
from celeriac.signals import Signal, send_app_configured

REDIS_URL = "redis://127.0.0.1:6379/11"  # 12-15 are flushed by other suites
INTERVAL = 0.2


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)")
    pytest.skip(reason)


@dataclass
class Broker:
    url: str
    queue: str
    namespace: str  # leader lock / claim names, unique per test


@pytest.fixture(params=["memory", "sqlite", "redis"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    tag = uuid.uuid4().hex[:10]
    queue, namespace = f"beat-{tag}", f"celeriac.beat.{tag}"
    if request.param == "memory":
        from celeriac.transport import memory

        url = f"memory://beat-{tag}"
        yield Broker(url, queue, namespace)
        memory.reset(url)
    elif request.param == "sqlite":
        yield Broker(f"sqlite:///{tmp_path / 'beat.sqlite'}", queue, namespace)
    else:
        try:
            importlib.import_module("celeriac.transport.redis")
            import redis
        except ImportError as exc:
            unavailable(f"the Redis transport cannot be imported: {exc}")
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        try:
            client.ping()
        except redis.exceptions.ConnectionError as exc:
            client.close()
            unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
        try:
            yield Broker(REDIS_URL, queue, namespace)
        finally:
            for key in client.scan_iter(f"*{tag}*"):
                client.delete(key)
            client.close()


def make_app(broker: Broker, **schedule_entries: Any) -> Celery:
    app = Celery("beattest", broker=broker.url, set_as_current=False)
    app.conf.task_default_queue = broker.queue
    app.conf.beat_schedule = dict(schedule_entries)
    return app


class Recorder(Scheduler):
    """A scheduler that also notes (owner, entry, due time) for every send it makes."""

    sent: list[tuple[str, str, dt.datetime]]

    async def apply_entry(self, entry: ScheduleEntry, due: dt.datetime) -> Any:
        result = await super().apply_entry(entry, due)
        self.sent.append((self.owner, entry.name, due))
        return result


def recorder(app: Celery, broker: Broker, log: list[Any], **kw: Any) -> Recorder:
    kw.setdefault("lock_ttl", 2.0)
    sched = Recorder(app, lock_name=broker.namespace, **kw)
    sched.sent = log
    return sched


async def poll(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def queue_size(app: Celery, queue: str) -> int:
    conns = await app.connection_for_current_loop()
    return await conns.transport.size(queue)


def every(seconds: float, task: str = "beattest.tick") -> dict[str, Any]:
    return {"task": task, "schedule": seconds}


class Running:
    """A scheduler's run() as a task on this loop, with its own stop event."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(sched.run(self.stop))

    async def halt(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


def check_unique_on_grid(log: list[tuple[str, str, dt.datetime]]) -> None:
    dues = [due for _, _, due in log]
    assert len(dues) == len(set(dues)), f"a due time was sent twice: {sorted(dues)}"
    step = int(INTERVAL * 1_000_000)
    for due in dues:
        assert int(due.timestamp() * 1_000_000 + 0.5) % step == 0, due


# -- several beats -------------------------------------------------------------------------


def test_two_beats_send_each_due_time_once_and_hand_over(broker: Broker) -> None:
    async def main() -> None:
        log: list[tuple[str, str, dt.datetime]] = []
        app_a = make_app(broker, tick=every(INTERVAL))
        app_b = make_app(broker, tick=every(INTERVAL))
        a = Running(recorder(app_a, broker, log))
        await poll(lambda: a.sched.is_leader, what="the first beat to lead")
        b = Running(recorder(app_b, broker, log))
        try:
            await poll(lambda: len(log) >= 6, what="six sends")
            assert {owner for owner, _, _ in log} == {a.sched.owner}
            assert not b.sched.is_leader
            await a.halt()  # releases the leader lock
            handed = len(log)
            await poll(lambda: len(log) >= handed + 3, what="sends by the standby")
        finally:
            await a.halt()
            await b.halt()
        check_unique_on_grid(log)
        last_a = max(due for owner, _, due in log if owner == a.sched.owner)
        after = [due for owner, _, due in log if owner == b.sched.owner]
        assert after and min(after) > last_a
        assert await queue_size(app_a, broker.queue) == len(log)
        await app_a.aclose()
        await app_b.aclose()

    asyncio.run(main())


def test_claims_alone_prevent_duplicates_when_two_beats_both_lead(broker: Broker) -> None:
    """Split brain (e.g. a paused leader whose lock expired): the per-due-time claim holds."""

    async def main() -> None:
        log: list[tuple[str, str, dt.datetime]] = []
        app_a = make_app(broker, tick=every(INTERVAL))
        app_b = make_app(broker, tick=every(INTERVAL))
        sched_a, sched_b = recorder(app_a, broker, log), recorder(app_b, broker, log)
        sched_b.lock_name += ".elsewhere"  # its own leader lock, the same claims
        a, b = Running(sched_a), Running(sched_b)
        try:
            await poll(lambda: a.sched.is_leader and b.sched.is_leader, what="two leaders")
            await poll(lambda: len(log) >= 6, what="six sends")
        finally:
            await a.halt()
            await b.halt()
        check_unique_on_grid(log)
        assert await queue_size(app_a, broker.queue) == len(log)
        await app_a.aclose()
        await app_b.aclose()

    asyncio.run(main())


@pytest.fixture
def memory_broker() -> Iterator[Broker]:
    from celeriac.transport import memory

    tag = uuid.uuid4().hex[:10]
    url = f"memory://beat-{tag}"
    yield Broker(url, f"beat-{tag}", f"celeriac.beat.{tag}")
    memory.reset(url)


def test_new_leader_does_not_refire_a_claimed_crontab_run(memory_broker: Broker) -> None:
    async def main() -> None:
        log: list[tuple[str, str, dt.datetime]] = []
        entry = {"task": "beattest.tick", "schedule": crontab()}
        app_a, app_b = make_app(memory_broker, m=entry), make_app(memory_broker, m=entry)
        a = recorder(app_a, memory_broker, log, catch_up=120.0)
        b = recorder(app_b, memory_broker, log, catch_up=120.0)
        ta = (await app_a.connection_for_current_loop()).transport
        tb = (await app_b.connection_for_current_loop()).transport
        await a.tick(ta)  # leads; this minute's run is within catch_up, so it is sent
        assert len(log) == 1 and a.is_leader
        await a.close(ta)
        await b.tick(tb)  # takes over, looks back 120 s and finds the run claimed
        assert b.is_leader
        dues = [due for _, _, due in log]
        assert len(dues) == len(set(dues))
        assert all(owner == a.owner for owner, _, _ in log) or len(log) == 2  # minute rolled

    asyncio.run(main())


def test_celery_style_schedule_without_next_after(memory_broker: Broker) -> None:
    class Once:
        """Only Celery's is_due: due the first time it is asked."""

        def __init__(self) -> None:
            self.calls = 0

        def is_due(self, last_run_at: dt.datetime) -> tuple[bool, float]:
            self.calls += 1
            return (self.calls == 1, 5.0)

    async def main() -> None:
        log: list[tuple[str, str, dt.datetime]] = []
        app = make_app(memory_broker, once={"task": "beattest.tick", "schedule": Once()})
        sched = recorder(app, memory_broker, log)
        transport = (await app.connection_for_current_loop()).transport
        assert await sched.tick(transport) == pytest.approx(sched.renew_interval)
        await sched.tick(transport)
        assert [name for _, name, _ in log] == ["once"]
        assert await queue_size(app, memory_broker.queue) == 1

    asyncio.run(main())


def test_embedded_beat_sends_logs_and_releases_the_lock(
    memory_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celeriac.beat")

    async def main() -> None:
        app = make_app(memory_broker, tick=every(INTERVAL))
        stop = asyncio.Event()
        task = asyncio.create_task(
            embedded_beat(app, stop, lock_name=memory_broker.namespace, lock_ttl=5.0)
        )
        size = 0

        async def enough() -> None:
            nonlocal size
            while (size := await queue_size(app, memory_broker.queue)) < 2:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(enough(), 10)
        stop.set()
        await asyncio.wait_for(task, 10)
        transport = (await app.connection_for_current_loop()).transport
        # released on stop: another beat can lead at once, without waiting 5 s
        assert await transport.try_lock(memory_broker.namespace, "someone-else", 1.0)

    asyncio.run(main())
    assert "Scheduler: Sending due task tick (beattest.tick)" in caplog.text


# -- entries ------------------------------------------------------------------------------------


def test_entries_from_settings_and_add_periodic_task_via_on_after_configure() -> None:
    app = Celery("entries", broker="memory://", set_as_current=False)
    app.conf.beat_schedule = {
        "cfg": {
            "task": "entries.add",
            "schedule": dt.timedelta(seconds=30),
            "args": (1, 2),
            "options": {"queue": "q1"},
        }
    }
    # What app.py provides: a Signal, so Celery's decorator works unchanged.
    app.on_after_configure = Signal(name="on_after_configure")  # type: ignore[assignment]

    @app.task(name="entries.add")  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    @app.on_after_configure.connect  # type: ignore[attr-defined, untyped-decorator]
    def setup_periodic_tasks(sender: Celery, **kwargs: Any) -> None:
        add_periodic_task(sender, 10.0, add.s(2, 2), name="add every 10")
        add_periodic_task(sender, crontab(minute=0), add.s(1), kwargs={"y": 5}, expires=30)

    sched = Scheduler(app, lock_ttl=1.0)
    assert set(sched.schedule) == {"cfg", "add every 10", "entries.add(1, y=5)"}
    ten = sched.schedule["add every 10"]
    assert (ten.task, ten.args, ten.schedule) == ("entries.add", (2, 2), schedule(10.0))
    hourly = sched.schedule["entries.add(1, y=5)"]
    assert hourly.kwargs == {"y": 5} and hourly.options == {"expires": 30}
    assert isinstance(hourly.schedule, crontab) and hourly.schedule.app is app
    assert sched.schedule["cfg"].options == {"queue": "q1"}
    send_app_configured(app)  # idempotent: the handler ran once
    assert len(sched.schedule) == 3

    app.conf.beat_schedule["late"] = {"task": "entries.add", "schedule": 5}
    del app.conf.beat_schedule["cfg"]
    sched.sync_entries()
    assert "late" in sched.schedule and "cfg" not in sched.schedule


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"schedule": 5}, "missing 'task'"),
        ({"task": "t", "schedule": "soon"}, "'schedule' must be"),
        ({"task": "t", "schedule": 5, "every": 1}, "unknown key"),
        ({"task": "t", "schedule": -1}, "positive"),
    ],
)
def test_bad_entries_name_the_entry(entry: dict[str, Any], message: str) -> None:
    app = Celery("bad", broker="memory://", set_as_current=False)
    app.conf.beat_schedule = {"nightly": entry}
    with pytest.raises(ImproperlyConfigured, match=rf"beat_schedule\['nightly'\].*{message}"):
        Scheduler(app)


def test_scheduler_class_resolution() -> None:
    app = Celery("cls", broker="memory://", set_as_current=False)
    assert scheduler_class(app) is PersistentScheduler
    assert scheduler_class(app, "celery.beat:PersistentScheduler") is PersistentScheduler
    assert scheduler_class(app, "celeriac.beat.Scheduler") is Scheduler
    with pytest.raises(ImproperlyConfigured, match="cannot be loaded"):
        scheduler_class(app, "nowhere.at_all:Scheduler")
    with pytest.raises(ImproperlyConfigured, match="not a celeriac scheduler"):
        scheduler_class(app, "celeriac.schedules:crontab")


# -- signals ----------------------------------------------------------------------------------


def test_signal_connect_forms_sender_filter_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    sig = Signal(name="demo")
    seen: list[tuple[str, Any]] = []

    @sig.connect
    def plain(sender: Any = None, **kw: Any) -> str:
        seen.append(("plain", sender))
        return "p"

    @sig.connect(sender="only-me")
    def picky(sender: Any = None, **kw: Any) -> str:
        seen.append(("picky", kw["value"]))
        return "k"

    def broken(sender: Any = None, **kw: Any) -> None:
        raise RuntimeError("boom")

    sig.connect(broken)
    sig.connect(plain)  # connecting twice does not call twice
    responses = sig.send(sender="someone", value=1)
    assert [r for _, r in responses][:1] == ["p"] and isinstance(responses[-1][1], RuntimeError)
    assert "Signal handler" in caplog.text and "boom" in caplog.text
    sig.send(sender="only-me", value=2)
    assert seen == [("plain", "someone"), ("plain", "only-me"), ("picky", 2)]
    assert sig.disconnect(broken) and not sig.disconnect(broken)
    assert sig.has_listeners() and len(sig.receivers) == 2


def test_weak_receivers_go_away() -> None:
    sig = Signal()

    class Handler:
        def __call__(self, **kw: Any) -> None:
            return None

    sig.connect(Handler(), weak=True)
    assert sig.receivers == []


# -- the command -------------------------------------------------------------------------------


def test_cli_beat_runs_until_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "broker.sqlite"
    (tmp_path / "beatproj.py").write_text(
        "from celeriac import Celery\n"
        f"app = Celery('beatproj', broker='sqlite:///{db}')\n"
        "app.conf.beat_schedule = {'tick': {'task': 'beatproj.tick', 'schedule': 0.2}}\n"
    )
    logfile, pidfile = tmp_path / "beat.log", tmp_path / "beat.pid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celeriac", "-A", "beatproj", "beat", "-l", "info",
         "-f", str(logfile), "--pidfile", str(pidfile), "-s", str(tmp_path / "ignored")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while "Sending due task tick" not in (logfile.read_text() if logfile.exists() else ""):
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "beat sent nothing within 30 s"
            time.sleep(0.05)
        assert pidfile.read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "celeriac beat" in err.decode()
    assert not pidfile.exists()
    assert "Shutting down (SIGTERM)" in logfile.read_text()

    async def count() -> int:
        app = Celery("count", broker=f"sqlite:///{db}", set_as_current=False)
        try:
            return await queue_size(app, "celery")
        finally:
            await app.aclose()

    assert asyncio.run(count()) >= 1
