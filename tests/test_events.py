"""Events: dispatcher -> broadcast channel -> receiver, over memory, SQLite and Redis;
the cluster State, the dump format, the live view and ``celeriac events`` itself."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from celeriac.app import Celery
from celeriac.cli import main
from celeriac.events import EventDispatcher, EventReceiver, Events, Heart, State, group_from
from celeriac.events.dumper import Dumper, humanize_type
from celeriac.events.state import TaskState
from celeriac.events.top import atop, render
from celeriac.transport import memory

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/13"


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)")
    pytest.skip(reason)


def _redis_up() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    finally:
        client.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        url = f"memory://events-{uuid.uuid4().hex}"
        yield url
        memory.reset(url)
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.sqlite'}"
    else:
        _redis_up()
        yield REDIS_URL


def make_app(url: str) -> Celery:
    return Celery("t", broker=url, set_as_current=False)


@pytest.fixture
def channel() -> str:
    """A channel of the test's own, so parallel runs on one Redis never cross."""
    return f"celeriac.events.test-{uuid.uuid4().hex}"


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def collect(
    app: Celery, channel: str, send: Callable[[EventDispatcher], None], want: int, **kw: Any
) -> list[dict[str, Any]]:
    """Subscribe, then send through a dispatcher on the same app until ``want`` arrive."""
    conns = await app.connection_for_current_loop()
    dispatcher = EventDispatcher(conns.transport, "celery@test", channel=channel, **kw)
    receiver = EventReceiver(app, channel=channel)
    got: list[dict[str, Any]] = []
    async with receiver.stream() as events:
        send(dispatcher)
        async with asyncio.timeout(10):
            async for event in events:
                got.append(event)
                if len(got) >= want:
                    break
    await dispatcher.close()
    return got


# -- dispatcher and receiver over real brokers ------------------------------------------


def test_events_round_trip_with_celery_fields(broker_url: str, channel: str) -> None:
    app = make_app(broker_url)

    def send(d: EventDispatcher) -> None:
        d.send("task-received", uuid="id-1", name="vege.add", args="(2, 2)", kwargs="{}")
        d.send("task-succeeded", uuid="id-1", result="4", runtime=0.01)

    async def main() -> list[dict[str, Any]]:
        try:
            return await collect(app, channel, send, 2)
        finally:
            await app.aclose()

    received, succeeded = asyncio.run(main())
    assert received["type"] == "task-received" and received["name"] == "vege.add"
    assert succeeded["type"] == "task-succeeded" and succeeded["result"] == "4"
    for event in (received, succeeded):
        assert event["hostname"] == "celery@test"
        assert event["pid"] == os.getpid()
        assert isinstance(event["timestamp"], float)
        assert isinstance(event["utcoffset"], int)
        assert "local_received" in event
    assert succeeded["clock"] > received["clock"]  # Lamport clock moves forward


def test_events_sent_in_one_tick_share_one_broadcast(channel: str) -> None:
    url = f"memory://events-{uuid.uuid4().hex}"

    async def main() -> list[bytes]:
        app = make_app(url)
        conns = await app.connection_for_current_loop()
        transport = conns.transport
        dispatcher = EventDispatcher(transport, "celery@test", channel=channel, buffer_limit=4)
        payloads: list[bytes] = []
        async with transport.subscribe(channel) as stream:
            for i in range(6):
                dispatcher.send("task-started", uuid=f"id-{i}")
            async with asyncio.timeout(10):
                async for raw in stream:
                    payloads.append(raw)
                    if sum(len(orjson.loads(p)) for p in payloads) >= 6:
                        break
        await dispatcher.close()
        await app.aclose()
        return payloads

    try:
        payloads = asyncio.run(main())
    finally:
        memory.reset(url)
    batches = [orjson.loads(p) for p in payloads]
    assert [len(b) for b in batches] == [4, 2]  # one tick, split at buffer_limit
    assert [e["uuid"] for b in batches for e in b] == [f"id-{i}" for i in range(6)]


def test_task_events_toggle_while_worker_events_keep_flowing(channel: str) -> None:
    url = f"memory://events-{uuid.uuid4().hex}"
    app = make_app(url)

    def send(d: EventDispatcher) -> None:
        d.send("task-started", uuid="dropped")  # task events off: nothing sent
        d.send("worker-heartbeat", freq=2.0)
        d.task_events = True  # what enable_events does
        d.send("task-started", uuid="kept")
        d.task_events = False  # and disable_events works too (Celery's -E quirk is gone)
        d.send("task-started", uuid="dropped-again")
        d.send("worker-offline", freq=2.0)

    async def main() -> list[dict[str, Any]]:
        try:
            return await collect(app, channel, send, 3, task_events=False)
        finally:
            await app.aclose()

    try:
        got = asyncio.run(main())
    finally:
        memory.reset(url)
    assert [(e["type"], e.get("uuid")) for e in got] == [
        ("worker-heartbeat", None),
        ("task-started", "kept"),
        ("worker-offline", None),
    ]


def test_disabled_dispatcher_does_no_work() -> None:
    async def main() -> None:
        transport = memory.MemoryTransport(f"memory://events-{uuid.uuid4().hex}")
        dispatcher = EventDispatcher(transport, "celery@test", enabled=False)
        for _ in range(100):
            dispatcher.send("worker-heartbeat", freq=2.0)
        assert dispatcher._buffer == [] and dispatcher._flusher is None
        await dispatcher.flush()
        assert dispatcher.sent == 0
        assert dispatcher.clock.value == 0  # not even the clock moved

    asyncio.run(main())


def test_send_from_another_thread_is_flushed_on_the_loop(channel: str) -> None:
    url = f"memory://events-{uuid.uuid4().hex}"
    app = make_app(url)

    def send(d: EventDispatcher) -> None:
        thread = threading.Thread(target=d.send, args=("task-started",), kwargs={"uuid": "t"})
        thread.start()
        thread.join()

    async def main() -> list[dict[str, Any]]:
        try:
            return await collect(app, channel, send, 1)
        finally:
            await app.aclose()

    try:
        (event,) = asyncio.run(main())
    finally:
        memory.reset(url)
    assert event["uuid"] == "t"


def test_heart_sends_online_heartbeats_and_offline(channel: str) -> None:
    url = f"memory://events-{uuid.uuid4().hex}"

    async def main() -> list[dict[str, Any]]:
        app = make_app(url)
        conns = await app.connection_for_current_loop()
        dispatcher = EventDispatcher(conns.transport, "celery@w1", channel=channel)
        heart = Heart(dispatcher, interval=0.05, info=lambda: {"active": 1, "processed": 7})
        got: list[dict[str, Any]] = []
        async with EventReceiver(app, channel=channel).stream() as events:

            async def read() -> None:
                async for event in events:
                    got.append(event)

            reader = asyncio.create_task(read())
            await heart.start()
            await until(lambda: sum(e["type"] == "worker-heartbeat" for e in got) >= 2)
            await heart.stop()
            await until(lambda: got[-1]["type"] == "worker-offline")
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await app.aclose()
        return got

    try:
        got = asyncio.run(main())
    finally:
        memory.reset(url)
    assert got[0]["type"] == "worker-online"
    beat = next(e for e in got if e["type"] == "worker-heartbeat")
    assert beat["freq"] == 0.05 and beat["active"] == 1 and beat["processed"] == 7
    assert beat["sw_ident"] == "py-celeriac" and beat["sw_sys"]
    assert len(beat["loadavg"]) == 3
    state = State()
    for event in got[:-1]:
        state.event(event)
    assert [w.hostname for w in state.alive_workers()] == ["celery@w1"]
    state.event(got[-1])
    assert state.alive_workers() == []


def test_sync_capture_feeds_handlers_until_limit_or_timeout(channel: str) -> None:
    url = f"memory://events-{uuid.uuid4().hex}"
    app = make_app(url)
    stop = threading.Event()

    def producer() -> None:
        async def run() -> None:
            conns = await app.connection_for_current_loop()
            dispatcher = EventDispatcher(conns.transport, "celery@p", channel=channel)
            while not stop.is_set():  # a receiver sees only what is sent after it subscribed
                dispatcher.send("task-failed", uuid="x", exception="KeyError()")
                dispatcher.send("worker-heartbeat", freq=2.0)
                await asyncio.sleep(0.02)
            await dispatcher.close()
            await app.aclose()

        asyncio.run(run())

    failed: list[dict[str, Any]] = []
    other: list[str] = []
    receiver = Events(app).Receiver(
        None, handlers={"task-failed": failed.append, "*": lambda e: other.append(e["type"])}
    )
    receiver.channel = channel
    thread = threading.Thread(target=producer)
    thread.start()
    try:
        assert receiver.capture(limit=4, timeout=10, wakeup=False) == 4
    finally:
        stop.set()
        thread.join()
    assert failed and all(e["exception"] == "KeyError()" for e in failed)
    assert set(other) == {"worker-heartbeat"}
    assert len(failed) + len(other) == 4
    started = time.monotonic()
    assert receiver.capture(timeout=0.2, wakeup=False) == 0  # nobody sends: times out
    assert time.monotonic() - started >= 0.2
    app.close()
    memory.reset(url)


def test_junk_payloads_are_skipped(channel: str) -> None:
    url = f"memory://events-{uuid.uuid4().hex}"
    app = make_app(url)

    async def main() -> list[dict[str, Any]]:
        conns = await app.connection_for_current_loop()
        got: list[dict[str, Any]] = []
        async with EventReceiver(app, channel=channel).stream() as events:
            for payload in (b"not json", b'{"no": "type"}', b'[1, {"type": "worker-online"}]'):
                await conns.transport.broadcast(channel, payload)
            async with asyncio.timeout(10):
                async for event in events:
                    got.append(event)
                    break
        await app.aclose()
        return got

    try:
        got = asyncio.run(main())
    finally:
        memory.reset(url)
    assert [e["type"] for e in got] == ["worker-online"]


# -- State ----------------------------------------------------------------------------


def ev(type: str, **fields: Any) -> dict[str, Any]:
    return {"type": type, "hostname": "celery@a", "timestamp": time.time(), **fields}


def test_state_follows_a_task_and_merges_late_events() -> None:
    state = State()
    state.event(ev("task-received", uuid="u", name="vege.add", args="(1, 2)", kwargs="{}"))
    assert state.tasks["u"].state == "RECEIVED"
    state.event(ev("task-succeeded", uuid="u", result="3", runtime=0.5))
    state.event(ev("task-started", uuid="u"))  # arrives late: fills in, does not go back
    task = state.tasks["u"]
    assert (task.state, task.name, task.result, task.runtime) == ("SUCCESS", "vege.add", "3", 0.5)
    assert task.started is not None and task.succeeded is not None and task.ready


def test_state_retry_cycle_and_custom_fields() -> None:
    task = TaskState("u")
    for type in ("task-received", "task-started", "task-retried", "task-received"):
        task.update(type, ev(type, uuid="u", exception="Boom()" if "retried" in type else None))
    assert task.state == "RECEIVED" and task.retried is not None
    task.update("task-custom", ev("task-custom", uuid="u", progress=50))
    assert task.extra["progress"] == 50


def test_state_is_bounded_and_orders_tasks_by_last_update() -> None:
    state = State(max_tasks_in_memory=3)
    for i in range(5):
        state.event(ev("task-received", uuid=f"u{i}", name="t"))
    assert list(state.tasks) == ["u2", "u3", "u4"] and state.task_count == 5
    state.event(ev("task-started", uuid="u2"))
    assert [t.uuid for t in state.tasks_by_time()] == ["u2", "u4", "u3"]
    assert [t.uuid for t in state.tasks_by_time(limit=1)] == ["u2"]
    state.event({"type": "task-started"})  # no uuid: ignored, not an error
    state.event({"hello": "world"})
    assert state.event_count == 8


def test_worker_alive_window_is_twice_the_heartbeat_frequency() -> None:
    state = State()
    state.event(ev("worker-heartbeat", freq=2.0, local_received=1000.0, active=2))
    worker = state.workers["celery@a"]
    assert worker.active == 2
    assert worker.alive_at(1003.9) and not worker.alive_at(1004.1)


# -- dump format and live view -----------------------------------------------------------


def test_dumper_prints_celery_style_lines() -> None:
    out = io.StringIO()
    dumper = Dumper(out)
    dumper.on_event(
        ev(
            "task-received",
            uuid="u1",
            name="vege.add",
            args="(2, 2)",
            kwargs="{}",
            retries=0,
            pid=1,
            clock=3,
            utcoffset=0,
        )
    )
    dumper.on_event(ev("task-succeeded", uuid="u1", result="4", runtime=0.25, pid=1))
    dumper.on_event(ev("task-failed", uuid="unknown", exception="KeyError('x')"))
    dumper.on_event(ev("worker-heartbeat", freq=2.0, active=0))
    received, succeeded, failed, beat = out.getvalue().splitlines()
    assert received.startswith("celery@a [20") and "] task received: " in received
    assert received.endswith("vege.add(u1) args=(2, 2) kwargs={} retries=0")
    assert succeeded.endswith(
        "task succeeded: vege.add(u1) args=(2, 2) kwargs={} result=4, runtime=0.25"
    )
    assert failed.endswith("task failed: (unknown) exception=KeyError('x')")
    assert beat.endswith("] heartbeat: active=0, freq=2.0")
    assert humanize_type("worker-online") == "started" and group_from("task-sent") == "task"


def test_render_shows_workers_and_recent_tasks() -> None:
    state = State()
    now = time.time()
    state.event(ev("worker-heartbeat", freq=2.0, local_received=now, loadavg=[0.1, 0.2, 0.3]))
    state.event({**ev("worker-offline"), "hostname": "celery@gone"})
    state.event(ev("task-received", uuid="u1", name="vege.add", args="(1, 1)", kwargs="{}"))
    state.event(ev("task-failed", uuid="u2", exception="ValueError('bad')"))
    screen = render(state, width=120, height=30, now=now)
    assert "workers: 1 online / 2 seen" in screen
    assert "celery@a" in screen and "online" in screen and "celery@gone" in screen
    assert "OFFLINE" in screen and "0.10 0.20 0.30" in screen
    lines = screen.splitlines()
    assert lines.index(next(x for x in lines if " u2 " in x)) < lines.index(
        next(x for x in lines if " u1 " in x)
    )
    assert "ValueError('bad')" in screen and "args=(1, 1)" in screen
    assert all(len(line) <= 40 for line in render(state, width=40).splitlines())
    assert "no task events yet" in render(State())


def test_live_view_redraws_with_arriving_events(channel: str) -> None:
    url = f"memory://events-{uuid.uuid4().hex}"

    async def main() -> str:
        app = make_app(url)
        out = io.StringIO()
        stop = asyncio.Event()
        conns = await app.connection_for_current_loop()
        dispatcher = EventDispatcher(conns.transport, "celery@live")
        view = asyncio.create_task(atop(app, frequency=0.02, out=out, clear=False, stop=stop))
        while "vege.mul" not in out.getvalue():  # the view subscribes on its own schedule
            assert not view.done()
            dispatcher.send("task-received", uuid="u9", name="vege.mul", args="()", kwargs="{}")
            dispatcher.send("worker-heartbeat", freq=2.0, active=1, processed=0)
            await asyncio.sleep(0.02)
        stop.set()
        state = await asyncio.wait_for(view, 10)
        assert "celery@live" in state.workers
        await app.aclose()
        return out.getvalue()

    try:
        text = asyncio.run(main())
    finally:
        memory.reset(url)
    assert "celery@live" in text and "RECEIVED" in text


# -- the command ---------------------------------------------------------------------------


def test_camera_is_refused_with_a_pointer() -> None:
    result = CliRunner().invoke(main, ["-b", "memory://", "events", "-c", "myapp.Camera"])
    assert result.exit_code == 2
    assert "not supported" in result.output and "--dump" in result.output


def test_bad_loglevel_and_frequency_are_usage_errors() -> None:
    assert CliRunner().invoke(main, ["events", "-l", "LOUD"]).exit_code == 2
    assert CliRunner().invoke(main, ["events", "-F", "0"]).exit_code == 2


def _spawn(tmp_path: Path, url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "celeriac", "-b", url, "events", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _feed_until(proc: subprocess.Popen[str], url: str, marker: str) -> list[str]:
    """Send events from this process until the child prints ``marker``; return its lines."""
    lines: list[str] = []
    seen = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if marker in line:
                seen.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()

    async def feed() -> None:
        app = make_app(url)
        conns = await app.connection_for_current_loop()
        dispatcher = EventDispatcher(conns.transport, "celery@feeder")
        deadline = time.monotonic() + 30
        while not seen.is_set():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, f"no {marker!r} in {lines}"
            dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=0)
            dispatcher.send(
                "task-received", uuid="u-cli", name="vege.add", args="(2, 2)", kwargs="{}"
            )
            dispatcher.send("task-succeeded", uuid="u-cli", result="4", runtime=0.5)
            await asyncio.sleep(0.05)
        await dispatcher.close()
        await app.aclose()

    asyncio.run(feed())
    return lines


def _interrupt(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def test_events_dump_command_end_to_end(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    proc = _spawn(tmp_path, url, "--dump")
    try:
        lines = _feed_until(proc, url, "task succeeded")
    finally:
        code, err = _interrupt(proc)
    assert "-> evdump: starting capture..." in err
    assert code == 0, err
    line = next(x for x in lines if "task succeeded" in x)
    assert line.startswith("celery@feeder [")
    assert "vege.add(u-cli) args=(2, 2) kwargs={} result=4, runtime=0.5" in line
    assert any("] heartbeat: " in x for x in lines)


def test_events_live_view_command_end_to_end(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    proc = _spawn(tmp_path, url, "-F", "0.1")
    try:
        lines = _feed_until(proc, url, "vege.add")
    finally:
        code, err = _interrupt(proc)
    assert code == 0, err
    text = "\n".join(lines)
    assert "celery@feeder" in text and "u-cli" in text


def test_leaving_the_stream_while_a_reader_is_being_cancelled(channel: str) -> None:
    url = f"memory://events-{uuid.uuid4().hex}"

    async def main() -> None:
        app = make_app(url)
        async with EventReceiver(app, channel=channel).stream() as events:

            async def read() -> None:
                async for _ in events:
                    pass

            reader = asyncio.create_task(read())
            await asyncio.sleep(0)  # the reader is now inside the iterator
            reader.cancel()  # and is still unwinding when the block is left
        await asyncio.gather(reader, return_exceptions=True)
        assert isinstance(Events(app).State(), State)
        await app.aclose()

    try:
        asyncio.run(main())
    finally:
        memory.reset(url)
