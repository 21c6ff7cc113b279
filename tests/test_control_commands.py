"""Remote control: the worker-side registry and handlers, and the client over real brokers.

Handlers are driven through ``dispatch`` with a small in-test worker (a plain object that
implements ``ControlTarget``); the round trips run ``commands.serve`` on its own thread
and event loop against memory, sqlite and Redis, the way a worker and a CLI do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from celeriac.app import Celery
from celeriac.cli import main
from celeriac.control import Control
from celeriac.worker import commands
from celeriac.worker.commands import (
    COMMANDS,
    control_command,
    dispatch,
    inspect_command,
    serve,
)

REDIS_URL = "redis://127.0.0.1:6379/14"


class Worker:
    """A ControlTarget with visible state, standing in for WorkController's bookkeeping."""

    def __init__(self, app: Any, hostname: str = "celery@test") -> None:
        self.hostname = hostname
        self.app = app
        self.revoked: set[str] = set()
        self.events_enabled = False
        self.active = [{"id": "a1", "name": "t.add", "args": [1, 2], "kwargs": {}}]
        self.reserved = [{"id": "r1", "name": "t.add", "args": [], "kwargs": {}}]
        self.scheduled = [
            {"eta": "2030-01-01T00:00:00", "priority": 0, "request": {"id": "s1", "name": "t.add"}}
        ]
        self.queues: list[dict[str, Any]] = [
            {
                "name": "celery",
                "exchange": {"name": "celery", "type": "direct"},
                "routing_key": "celery",
            }
        ]
        self.rate_limits: dict[str, str | None] = {}
        self.time_limits: dict[str, tuple[float | None, float | None]] = {}
        self.pool_size = 2
        self.autoscale_range: tuple[int, int] | None = None
        self.terminated: list[tuple[str, str]] = []
        self.stopping = False
        self._clock = 41

    def active_requests(self) -> list[dict[str, Any]]:
        return list(self.active)

    def reserved_requests(self) -> list[dict[str, Any]]:
        return list(self.reserved)

    def scheduled_requests(self) -> list[dict[str, Any]]:
        return list(self.scheduled)

    def stats(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "pool": {"max-concurrency": self.pool_size}}

    def active_queues(self) -> list[dict[str, Any]]:
        return list(self.queues)

    async def add_consumer(
        self, queue: str, exchange: str | None, exchange_type: str, routing_key: str | None
    ) -> None:
        await asyncio.sleep(0)
        self.queues.append(
            {
                "name": queue,
                "exchange": {"name": exchange, "type": exchange_type},
                "routing_key": routing_key,
            }
        )

    async def cancel_consumer(self, queue: str) -> None:
        self.queues = [q for q in self.queues if q["name"] != queue]

    def revoke(self, ids: list[str], terminate: bool, signal: str) -> None:
        self.revoked.update(ids)
        if terminate:
            self.terminated.extend((i, signal) for i in ids)

    def set_rate_limit(self, task_name: str, rate: str | None) -> None:
        self.rate_limits[task_name] = rate

    def set_time_limit(self, task_name: str, soft: float | None, hard: float | None) -> None:
        self.time_limits[task_name] = (soft, hard)

    def pool_grow(self, n: int) -> None:
        self.pool_size += n

    def pool_shrink(self, n: int) -> None:
        self.pool_size -= n

    def autoscale(self, max: int, min: int) -> None:
        if self.autoscale_range is None:
            raise ValueError("Autoscale not enabled")
        self.autoscale_range = (max, min)

    def shutdown(self) -> None:
        self.stopping = True

    def enable_events(self) -> bool:
        changed = not self.events_enabled
        self.events_enabled = True
        return changed

    def disable_events(self) -> bool:
        changed = self.events_enabled
        self.events_enabled = False
        return changed

    def clock(self) -> int:
        return self._clock


def make_app(broker: str = "memory://", **settings: Any) -> Celery:
    app = Celery("t", broker=broker, set_as_current=False, **settings)

    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.slow", rate_limit="10/m")
    def slow() -> None:
        return None

    return app


@pytest.fixture
def app() -> Celery:
    return make_app()


@pytest.fixture
def worker(app: Celery) -> Worker:
    return Worker(app)


def run(target: Any, method: str, **arguments: Any) -> Any:
    reply = asyncio.run(dispatch(target, {"method": method, "arguments": arguments}))
    assert reply is not None
    return reply[target.hostname]


# -- dispatch ---------------------------------------------------------------------------


def test_ping_replies_pong_keyed_by_hostname(worker: Worker) -> None:
    reply = asyncio.run(dispatch(worker, {"method": "ping", "arguments": {}}))
    assert reply == {"celery@test": {"ok": "pong"}}


def test_destination_and_patterns_select_nodes(worker: Worker) -> None:
    def ask(**request: Any) -> Any:
        return asyncio.run(dispatch(worker, {"method": "ping", **request}))

    assert ask(destination=["celery@other"]) is None
    assert ask(destination=["celery@other", "celery@test"]) is not None
    assert ask(destination=None) is not None
    assert ask(pattern="celery@t*") is not None
    assert ask(pattern="worker@*") is None
    assert ask(pattern=r"^celery@te", matcher="pcre") is not None
    assert ask(pattern=r"^worker", matcher="pcre") is None


def test_expired_requests_are_dropped(worker: Worker) -> None:
    assert asyncio.run(dispatch(worker, {"method": "ping", "expires": time.time() - 1})) is None
    assert asyncio.run(dispatch(worker, {"method": "ping", "expires": time.time() + 60}))


def test_unknown_command_and_bad_arguments_reply_errors(worker: Worker) -> None:
    assert run(worker, "no_such_thing") == {"error": "unknown command 'no_such_thing'"}
    reply = run(worker, "rate_limit")  # required arguments missing
    assert "TypeError" in reply["error"]


def test_inspect_state_commands(worker: Worker) -> None:
    assert run(worker, "active") == worker.active
    assert run(worker, "reserved") == worker.reserved
    assert run(worker, "scheduled") == worker.scheduled
    assert run(worker, "active_queues") == worker.queues
    assert run(worker, "stats")["pool"] == {"max-concurrency": 2}
    assert run(worker, "clock") == {"clock": 41}
    worker.revoked.update({"b", "a"})
    assert run(worker, "revoked") == ["a", "b"]
    assert run(worker, "dump_revoked") == ["a", "b"]  # Celery's alias


def test_registered_lists_user_tasks_sorted_with_set_attributes(worker: Worker) -> None:
    names = run(worker, "registered")
    assert names == ["t.add", "t.slow [rate_limit=10/m]"]
    assert run(worker, "registered", taskinfoitems=["nope"]) == ["t.add", "t.slow"]
    with_builtins = run(worker, "registered", builtins=True, taskinfoitems=["nope"])
    assert set(with_builtins) > {"t.add", "t.slow"}


def test_query_task_reports_state_and_request(worker: Worker) -> None:
    found = run(worker, "query_task", ids=["a1", "s1", "r1", "unknown"])
    assert found == {
        "a1": ["active", worker.active[0]],
        "r1": ["reserved", worker.reserved[0]],
        "s1": ["scheduled", worker.scheduled[0]["request"]],
    }
    assert run(worker, "query_task", ids="a1") == {"a1": ["active", worker.active[0]]}


def test_conf_hides_passwords_and_secrets() -> None:
    app = make_app(
        "redis://user:hunter2@127.0.0.1:6379/0",
        result_backend="redis://:s3cret@127.0.0.1:6379/1",
        broker_transport_options={"password": "topsecret", "visibility_timeout": 10},
    )
    conf = run(Worker(app), "conf", with_defaults=True)
    text = repr(conf)
    assert "hunter2" not in text and "s3cret" not in text and "topsecret" not in text
    assert conf["broker_url"] == "redis://user:**@127.0.0.1:6379/0"
    assert conf["broker_transport_options"]["visibility_timeout"] == 10


def test_report_is_text(worker: Worker) -> None:
    assert "celeriac" in run(worker, "report")["ok"]


def test_events_toggle_replies_as_celery(worker: Worker) -> None:
    assert run(worker, "enable_events") == {"ok": "task events enabled"}
    assert run(worker, "enable_events") == {"ok": "task events already enabled"}
    assert run(worker, "disable_events") == {"ok": "task events disabled"}
    assert run(worker, "disable_events") == {"ok": "task events already disabled"}


def test_rate_limit(worker: Worker) -> None:
    assert run(worker, "rate_limit", task_name="t.add", rate_limit="5/s") == {
        "ok": "new rate limit set successfully"
    }
    assert worker.rate_limits == {"t.add": "5/s"}
    assert run(worker, "rate_limit", task_name="t.add", rate_limit="0") == {
        "ok": "rate limit disabled successfully"
    }
    assert worker.rate_limits == {"t.add": None}
    assert run(worker, "rate_limit", task_name="nope", rate_limit="1/m") == {
        "error": "unknown task"
    }
    bad = run(worker, "rate_limit", task_name="t.add", rate_limit="fast")
    assert bad["error"].startswith("Invalid rate limit string")


def test_time_limit(worker: Worker) -> None:
    assert run(worker, "time_limit", task_name="t.add", soft=1, hard=2.5) == {
        "ok": "time limits set successfully"
    }
    assert worker.time_limits == {"t.add": (1.0, 2.5)}
    assert run(worker, "time_limit", task_name="nope", soft=1) == {"error": "unknown task"}


def test_consumers(worker: Worker) -> None:
    assert run(worker, "add_consumer", queue="images") == {"ok": "add consumer images"}
    assert worker.queues[-1] == {
        "name": "images",
        "exchange": {"name": None, "type": "direct"},
        "routing_key": None,
    }
    assert run(worker, "add_consumer", queue="images") == {"ok": "already consuming from images"}
    assert run(worker, "cancel_consumer", queue="images") == {
        "ok": "no longer consuming from images"
    }
    assert [q["name"] for q in worker.queues] == ["celery"]


def test_pool_and_autoscale(worker: Worker) -> None:
    assert run(worker, "pool_grow", n=3) == {"ok": "pool will grow"}
    assert run(worker, "pool_shrink") == {"ok": "pool will shrink"}
    assert worker.pool_size == 4
    assert run(worker, "autoscale", max=5, min=1) == {
        "error": "ValueError('Autoscale not enabled')"
    }
    worker.autoscale_range = (2, 1)
    assert run(worker, "autoscale", max=5, min=1) == {"ok": "autoscale now max=5 min=1"}
    assert worker.autoscale_range == (5, 1)


def test_revoke(worker: Worker) -> None:
    assert run(worker, "revoke", task_id="x1") == {"ok": "tasks x1 flagged as revoked"}
    assert run(worker, "revoke", task_id=["x2", "x3"], terminate=True, signal="kill") == {
        "ok": "tasks x2, x3 flagged as revoked"
    }
    assert worker.revoked == {"x1", "x2", "x3"}
    assert worker.terminated == [("x2", "SIGKILL"), ("x3", "SIGKILL")]
    run(worker, "revoke", task_id="x4", terminate=True, signal=int(signal.SIGINT))
    assert worker.terminated[-1] == ("x4", "SIGINT")
    assert "unknown signal" in run(worker, "revoke", task_id="x5", signal="SIGNOPE")["error"]


def test_shutdown_and_heartbeat(worker: Worker) -> None:
    assert run(worker, "shutdown") == {"ok": "shutdown"}
    assert worker.stopping
    assert "error" in run(worker, "heartbeat")
    beats: list[int] = []

    async def send_heartbeat() -> None:
        beats.append(1)

    worker.send_heartbeat = send_heartbeat  # type: ignore[attr-defined]
    assert run(worker, "heartbeat") == {"ok": "heartbeat sent"}
    assert beats == [1]


@pytest.fixture
def registry() -> Iterator[None]:
    saved = dict(COMMANDS)
    aliases = dict(commands._ALIASES)
    yield
    COMMANDS.clear()
    COMMANDS.update(saved)
    commands._ALIASES.clear()
    commands._ALIASES.update(aliases)


@pytest.mark.usefixtures("registry")
def test_user_commands_register_like_celery(worker: Worker) -> None:
    @control_command(args=[("n", int)], signature="[N=1]")
    def increase_prefetch_count(target: Any, n: int = 1) -> dict[str, Any]:
        """Add N to the prefetch count."""
        return {"ok": f"prefetch +{n} on {target.hostname}"}

    @inspect_command
    async def current_prefetch_count(target: Any) -> int:
        return 7

    assert run(worker, "increase_prefetch_count", n=2) == {"ok": "prefetch +2 on celery@test"}
    assert run(worker, "current_prefetch_count") == 7
    cmd = COMMANDS["increase_prefetch_count"]
    assert (cmd.kind, cmd.help, cmd.signature) == (
        "control",
        "Add N to the prefetch count.",
        "[N=1]",
    )
    assert COMMANDS["current_prefetch_count"].kind == "inspect"


# -- round trips over real brokers --------------------------------------------------------


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        from celeriac.transport import memory

        url = f"memory://control-{uuid.uuid4().hex}"
        yield url
        memory.reset(url)
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.sqlite'}"
    else:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        try:
            client.ping()
        except redis.exceptions.ConnectionError as exc:
            client.close()
            unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
        client.close()
        yield REDIS_URL


@contextmanager
def serving(app: Celery, *targets: Worker) -> Iterator[None]:
    """Answer remote control for ``targets`` on a separate thread and loop, as a worker does."""
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["loop"] = asyncio.get_running_loop()
        box["stop"] = stop = asyncio.Event()
        conns = await app.connection_for_current_loop()
        readies = [asyncio.Event() for _ in targets]
        tasks = [
            asyncio.create_task(serve(t, conns.transport, ev.set))
            for t, ev in zip(targets, readies, strict=True)
        ]
        try:
            await asyncio.gather(*(ev.wait() for ev in readies))
            started.set()
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await app.aclose()

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            box["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=thread_main, name="control-server")
    thread.start()
    try:
        started.wait(30)
        assert "error" not in box, box.get("error")
        yield
    finally:
        if "loop" in box and "stop" in box:
            box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)
        app.close()
    assert "error" not in box, box.get("error")


def node(prefix: str = "celery") -> str:
    return f"{prefix}@{uuid.uuid4().hex[:12]}"


def test_ping_and_inspect_round_trip(broker_url: str) -> None:
    app = make_app(broker_url)
    w = Worker(app, node())
    with serving(app, w):
        control = Control(app)
        assert control.ping(destination=[w.hostname], timeout=10) == [{w.hostname: {"ok": "pong"}}]
        inspect = control.inspect(destination=[w.hostname], timeout=10)
        assert inspect.registered() == {w.hostname: ["t.add", "t.slow [rate_limit=10/m]"]}
        assert inspect.query_task("a1") == {w.hostname: {"a1": ["active", w.active[0]]}}
        assert inspect.clock() == {w.hostname: {"clock": 41}}


def test_control_commands_round_trip(broker_url: str) -> None:
    app = make_app(broker_url)
    w = Worker(app, node())
    with serving(app, w):
        control = Control(app)
        reply = control.rate_limit("t.add", "3/m", destination=[w.hostname], reply=True, timeout=10)
        assert reply == [{w.hostname: {"ok": "new rate limit set successfully"}}]
        assert w.rate_limits == {"t.add": "3/m"}
        # Fire and forget, as Celery's revoke: nothing comes back, the worker still acts.
        assert control.revoke("gone", destination=[w.hostname]) == []
        deadline = time.monotonic() + 10
        while "gone" not in w.revoked and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "gone" in w.revoked


def test_replies_from_several_nodes_and_limit(broker_url: str) -> None:
    app = make_app(broker_url)
    one, two = Worker(app, node("one")), Worker(app, node("two"))
    with serving(app, one, two):
        replies = Control(app).ping(destination=[one.hostname, two.hostname], timeout=10)
        assert sorted(next(iter(r)) for r in replies) == sorted([one.hostname, two.hostname])
        got = Control(app).broadcast(
            "ping", destination=[one.hostname, two.hostname], reply=True, timeout=10, limit=1
        )
        assert len(got) == 1


def test_nobody_answers(broker_url: str) -> None:
    app = make_app(broker_url)
    try:
        control = Control(app)
        assert control.ping(destination=[node()], timeout=0.2) == []
        assert control.inspect(destination=[node()], timeout=0.2).stats() is None
    finally:
        app.close()


def test_purge_empties_the_declared_queues(broker_url: str) -> None:
    queue = f"purge-{uuid.uuid4().hex[:8]}"
    app = make_app(broker_url, task_default_queue=queue)
    try:
        for _ in range(3):
            app.send_task("t.add", args=[1, 1])
        control = Control(app)
        assert control.purge() == 3
        assert control.purge() == 0
    finally:
        app.close()


# -- the CLI against a real broker ---------------------------------------------------------


def cli(app: Celery, *args: str) -> Any:
    return CliRunner().invoke(main, list(args), obj={"app": app})


def test_cli_status_inspect_control() -> None:
    url = f"memory://cli-{uuid.uuid4().hex}"
    app = make_app(url)
    w = Worker(app, "celery@cli-test")
    with serving(app, w):
        result = cli(app, "status", "-t", "10", "-d", w.hostname)
        assert result.exit_code == 0, result.output
        assert result.output == "-> celery@cli-test: OK\n\n1 node online.\n"

        result = cli(app, "inspect", "registered", "-t", "10", "-d", w.hostname)
        assert result.exit_code == 0, result.output
        assert "-> celery@cli-test: OK\n    * t.add\n    * t.slow [rate_limit=10/m]\n" in (
            result.output
        )

        result = cli(app, "inspect", "ping", "-j", "-t", "10", "-d", w.hostname)
        assert result.exit_code == 0, result.output
        assert result.output.strip() == '{"celery@cli-test":{"ok":"pong"}}'

        result = cli(app, "control", "rate_limit", "t.add", "7/s", "-t", "10", "-d", w.hostname)
        assert result.exit_code == 0, result.output
        assert "-> celery@cli-test: OK\n        new rate limit set successfully" in result.output
        assert w.rate_limits == {"t.add": "7/s"}

        result = cli(
            app,
            "control",
            "revoke",
            "--terminate",
            "--signal",
            "KILL",
            "x1",
            "x2",
            "-t",
            "10",
            "-d",
            w.hostname,
        )
        assert result.exit_code == 0, result.output
        assert w.terminated == [("x1", "SIGKILL"), ("x2", "SIGKILL")]

        result = cli(app, "control", "time_limit", "nope", "1", "-t", "10", "-d", w.hostname)
        assert "-> celery@cli-test: ERROR\n        unknown task" in result.output


def test_cli_no_nodes_exits_69() -> None:
    app = make_app(f"memory://cli-{uuid.uuid4().hex}")
    try:
        for args in (["status"], ["inspect", "active"], ["control", "enable_events"]):
            result = cli(app, *args, "-t", "0.2")
            assert result.exit_code == 69, result.output
            assert "Error: No nodes replied within time constraint" in result.output
    finally:
        app.close()


def test_cli_purge(tmp_path: Path) -> None:
    app = make_app(f"sqlite:///{tmp_path / 'b.sqlite'}")
    try:
        for _ in range(2):
            app.send_task("t.add", args=[1, 1])
        result = cli(app, "purge")  # no input: the confirmation aborts
        assert result.exit_code == 1 and "There is no undo" in result.output
        result = cli(app, "purge", "-f")
        assert result.exit_code == 0, result.output
        assert result.output == "Purged 2 messages from 1 known task queue.\n"
        assert cli(app, "purge", "-f").output == "No messages purged from 1 queue.\n"
    finally:
        app.close()
