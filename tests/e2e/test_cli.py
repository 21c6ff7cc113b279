"""The ``celeriac`` command line against real workers: status, inspect, call, result,
purge, control shutdown, and the tutorial's detached worker (``-D --pidfile=``)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celeriac import Celery

from . import tasks
from .conftest import ROOT, Broker, WorkerFactory, _start_time, queue_size, run_cli, wait_until


def test_status_and_inspect_ping(worker: WorkerFactory, broker: Broker) -> None:
    w1 = worker()
    w2 = worker(queues="queue2")
    status = run_cli(broker, "status", "--timeout", "2")
    assert status.returncode == 0, status.stderr
    assert w1.nodename in status.stdout and w2.nodename in status.stdout
    assert "2 nodes online." in status.stdout
    ping = run_cli(broker, "inspect", "ping", "--destination", w1.nodename, "--timeout", "5")
    assert ping.returncode == 0, ping.stderr
    assert w1.nodename in ping.stdout and "pong" in ping.stdout
    assert w2.nodename not in ping.stdout


def test_status_without_workers_fails(broker: Broker, app: Celery) -> None:
    status = run_cli(broker, "status", "--timeout", "0.5")
    assert status.returncode != 0
    assert "No nodes replied" in status.stdout + status.stderr


def test_call_and_result(worker: WorkerFactory, broker: Broker) -> None:
    worker()
    sent = run_cli(broker, "call", "tests.e2e.tasks.add", "--args", "[2, 3]")
    assert sent.returncode == 0, sent.stderr
    task_id = sent.stdout.strip()
    got = run_cli(broker, "result", task_id, "--timeout", "30")
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "5"

    failed = run_cli(
        broker, "call", "tests.e2e.tasks.fail", "--args", '["value", "broken on purpose"]'
    )
    got = run_cli(broker, "result", failed.stdout.strip(), "--timeout", "30")
    assert got.returncode == 1
    assert "ValueError: broken on purpose" in got.stderr
    trace = run_cli(broker, "result", failed.stdout.strip(), "--traceback")
    assert "broken on purpose" in trace.stdout


def test_call_with_kwargs_and_queue(worker: WorkerFactory, broker: Broker) -> None:
    w = worker(queues="queue2")
    sent = run_cli(
        broker, "call", "tests.e2e.tasks.hello", "--kwargs", '{"name": "cli"}', "--queue", "queue2"
    )
    assert sent.returncode == 0, sent.stderr
    task_id = sent.stdout.strip()
    assert tasks.app.AsyncResult(task_id).get(timeout=30) == "hello cli"
    assert task_id in w.log()


def test_inspect_active_shows_the_running_task(
    worker: WorkerFactory, broker: Broker, tmp_path: Path
) -> None:
    w = worker()
    release, started = tmp_path / "release", tmp_path / "started"
    r = tasks.held.delay(str(release), str(started))
    try:
        wait_until(lambda: tasks.lines(started), what="the held task to start")
        out = run_cli(broker, "inspect", "active", "--destination", w.nodename, "--timeout", "5")
        assert out.returncode == 0, out.stderr
        assert r.id in out.stdout and "tests.e2e.tasks.held" in out.stdout
        as_json = run_cli(broker, "inspect", "active", "--json", "--timeout", "2")
        assert r.id in as_json.stdout
    finally:
        release.touch()
    assert r.get(timeout=10) == "released"


def test_purge(broker: Broker, app: Celery) -> None:
    for _ in range(3):
        tasks.noop.delay()
    tasks.add.delay(1, 1)
    tasks.add.delay(2, 2)
    wait_until(lambda: queue_size(app, "celery") == 3 and queue_size(app, "queue1") == 2)
    out = run_cli(broker, "purge", "-f")
    assert out.returncode == 0, out.stderr
    assert "Purged 3 messages from 1 known task queue." in out.stdout
    assert queue_size(app, "celery") == 0
    assert queue_size(app, "queue1") == 2
    out = run_cli(broker, "purge", "-f", "-Q", "queue1")
    assert "Purged 2 messages" in out.stdout
    assert queue_size(app, "queue1") == 0
    out = run_cli(broker, "purge", "-f")
    assert "No messages purged" in out.stdout


def test_purge_asks_first(broker: Broker, app: Celery) -> None:
    tasks.noop.delay()
    out = run_cli(broker, "purge")  # stdin is empty: the confirmation is refused
    assert out.returncode != 0
    assert queue_size(app, "celery") == 1


def test_control_shutdown(worker: WorkerFactory, broker: Broker) -> None:
    w = worker()
    out = run_cli(broker, "control", "shutdown", "--destination", w.nodename, "--timeout", "5")
    assert out.returncode == 0, out.stderr
    assert w.proc.wait(20) == 0
    assert f"{w.nodename} stopped." in w.log()


@pytest.fixture
def detached(broker: Broker) -> Iterator[list[tuple[int, str | None]]]:
    """(pid, start time) of detached workers, killed at teardown if still running."""
    found: list[tuple[int, str | None]] = []
    yield found
    for pid, started in found:
        if _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _start_time(pid) == started and time.monotonic() < deadline:
                time.sleep(0.05)
            if _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_detached_worker_as_in_the_tutorial(
    broker: Broker, app: Celery, tmp_path: Path, detached: list[tuple[int, str | None]]
) -> None:
    """``celery -A vege3 worker -D -l info -Q queue1,queue2 --pidfile=``, then status."""
    node = f"detached-{os.getpid()}@e2e"
    log = tmp_path / "detached.log"
    out = run_cli(
        broker, "worker", "-D", "-l", "info", "-Q", "queue1,queue2", "--pidfile=",
        "-n", node, "-f", str(log), "-c", "1",
    )
    assert out.returncode == 0, out.stderr
    wait_until(lambda: log.exists() and f"{node} ready." in log.read_text(), what="ready")
    stats = (app.control.inspect([node], timeout=5).stats() or {}).get(node)
    assert stats is not None
    pid = int(stats["pid"])
    detached.append((pid, _start_time(pid)))
    assert node in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert not list(tmp_path.glob("*.pid")) and not list(ROOT.glob("detached-*.pid"))
    assert tasks.add.delay(20, 22).get(timeout=30) == 42
    assert tasks.hello.delay("detached").get(timeout=30) == "hello detached"
    status = run_cli(broker, "status", "--timeout", "2")
    assert node in status.stdout
    run_cli(broker, "control", "shutdown", "--destination", node, "--timeout", "5")
    wait_until(lambda: _start_time(pid) is None, what="the detached worker to exit")
    assert f"{node} stopped." in log.read_text()
