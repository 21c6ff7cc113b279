"""The web dashboard: its JSON API, event stream, metrics and auth against a real
in-process worker (memory broker), and ``celeriac dashboard`` itself as a subprocess
serving a SQLite broker that another process's worker uses."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

pytest.importorskip("starlette")
pytest.importorskip("httpx")
with warnings.catch_warnings():
    # Newer Starlette prefers the httpx2 fork for its TestClient and warns about httpx.
    warnings.filterwarnings("ignore", message=r".*httpx.*starlette\.testclient")
    from starlette.testclient import TestClient

from celeriac import Celery, states
from celeriac.backends import memory as memory_backend
from celeriac.cli import main
from celeriac.dashboard import create_app
from celeriac.dashboard.app import parse_credentials
from celeriac.transport import memory as memory_transport
from celeriac.worker.worker import WorkController

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 30.0


def until(check: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_worker(app: Celery, hostname: str) -> Iterator[WorkController]:
    worker = WorkController(
        app,
        pool="threads",
        concurrency=2,
        setup_logs=False,
        hostname=hostname,
        heartbeat_interval=0.5,
    )
    failure: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # surfaced below
            failure.append(exc)

    thread = threading.Thread(target=run, name="dashboard-test-worker", daemon=True)
    thread.start()
    try:
        while not worker.ready.wait(0.05):
            if not thread.is_alive():
                raise RuntimeError(f"the worker stopped before it was ready: {failure!r}")
        yield worker
    finally:
        worker.shutdown()
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the worker did not stop"
    assert not failure, failure


def make_app(broker: str, backend: str | None = None) -> tuple[Celery, threading.Event]:
    app = Celery(
        "dash",
        broker=broker,
        backend=backend or broker,
        set_as_current=False,
        worker_send_task_events=True,
    )
    gate = threading.Event()

    @app.task(name="dash.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="dash.boom")
    def boom() -> None:
        raise KeyError("boom")

    @app.task(name="dash.wait")
    def wait() -> str:
        deadline = time.monotonic() + TIMEOUT
        while not gate.is_set() and time.monotonic() < deadline:
            gate.wait(0.05)  # short waits, so the pool's termination can land
        return "released"

    return app, gate


@pytest.fixture
def memory_app() -> Iterator[tuple[Celery, threading.Event]]:
    url = f"memory://dashboard-{uuid.uuid4().hex}"
    app, gate = make_app(url)
    yield app, gate
    gate.set()
    app.close()
    memory_transport.reset(url)
    memory_backend.reset(url)


@pytest.fixture
def cluster(
    memory_app: tuple[Celery, threading.Event],
) -> Iterator[tuple[TestClient, WorkController, threading.Event]]:
    app, gate = memory_app
    with (
        running_worker(app, f"dash-{uuid.uuid4().hex[:6]}@localhost") as worker,
        TestClient(create_app(app)) as client,
    ):
        yield client, worker, gate
        gate.set()


def worker_row(client: TestClient, name: str, refresh: bool = False) -> dict[str, Any] | None:
    rows = client.get("/api/workers", params={"refresh": "1"} if refresh else {}).json()
    return next((w for w in rows if w["hostname"] == name), None)


def task_in(client: TestClient, task_id: str, **params: str) -> dict[str, Any] | None:
    rows = client.get("/api/tasks", params=params).json()
    return next((t for t in rows if t["uuid"] == task_id), None)


def send(client: TestClient, **body: Any) -> str:
    response = client.post("/api/task/send", json=body)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["task_id"]
    return task_id


# -- the API against a live worker -----------------------------------------------------------


def test_workers_tasks_and_task_detail(
    cluster: tuple[TestClient, WorkController, threading.Event],
) -> None:
    client, worker, _ = cluster
    name = worker.hostname
    row = until(lambda: worker_row(client, name), what="the worker's heartbeat")
    assert row["status"] == "online" and row["last_heartbeat"] is not None
    assert row["stats"] is None  # inspect only on demand
    row = worker_row(client, name, refresh=True)
    assert row is not None and row["stats"]["pool"]["implementation"] == "threads"
    assert [q["name"] for q in row["queues"]] == ["celery"]

    ok_id = send(client, name="dash.add", args=[2, 3])
    bad_id = send(client, name="dash.boom")
    done = until(lambda: task_in(client, ok_id, state="SUCCESS"), what="a SUCCESS task")
    assert done["name"] == "dash.add" and done["result"] == "5" and done["worker"] == name
    assert done["args"] == "(2, 3)" and done["runtime"] >= 0 and done["succeeded"]
    failed = until(lambda: task_in(client, bad_id, state="FAILURE"), what="a FAILURE task")
    assert "KeyError" in failed["exception"] and failed["traceback"]

    assert task_in(client, ok_id, state="failure,retry") is None
    assert task_in(client, ok_id, name="ADD") is not None  # case-insensitive part of the name
    assert task_in(client, ok_id, name="boom") is None
    assert task_in(client, ok_id, worker="nobody@nowhere") is None
    assert len(client.get("/api/tasks", params={"limit": "1"}).json()) == 1
    assert client.get("/api/tasks", params={"limit": "x"}).status_code == 400

    detail = client.get(f"/api/task/{ok_id}").json()
    assert detail["source"] == "events" and detail["state"] == states.SUCCESS
    assert detail["backend"]["state"] == states.SUCCESS and detail["backend"]["result"] == 5
    unknown = client.get(f"/api/task/{uuid.uuid4()}").json()
    assert unknown["source"] == "backend" and unknown["state"] == states.PENDING

    status = client.get("/api/status").json()
    assert status["connected"] and status["workers"] == 1 and status["tasks"] >= 2


def test_send_validates_its_input(
    cluster: tuple[TestClient, WorkController, threading.Event],
) -> None:
    client, _, _ = cluster
    assert client.post("/api/task/send", json={}).status_code == 400
    bad_args = client.post("/api/task/send", json={"name": "dash.add", "args": {"x": 1}})
    assert bad_args.status_code == 400 and "args" in bad_args.json()["error"]
    json_type = {"content-type": "application/json"}
    not_json = client.post("/api/task/send", content=b"{", headers=json_type)
    assert not_json.status_code == 400
    # A form post (args as JSON text) works as well as JSON.
    form = client.post("/api/task/send", data={"name": "dash.add", "args": "[20, 22]"})
    assert form.status_code == 200
    task_id = form.json()["task_id"]
    until(lambda: task_in(client, task_id, state="SUCCESS"), what="the form-sent task")
    assert client.get(f"/api/task/{task_id}").json()["backend"]["result"] == 42


def test_queues_and_metrics(cluster: tuple[TestClient, WorkController, threading.Event]) -> None:
    client, worker, _ = cluster
    until(lambda: worker_row(client, worker.hostname), what="the worker")
    task_id = send(client, name="dash.add", args=[1, 1])
    until(lambda: task_in(client, task_id, state="SUCCESS"), what="a SUCCESS task")
    send(client, name="dash.add", args=[1, 1], countdown=600)  # held by the broker
    assert client.get("/api/queues").json() == [{"name": "celery", "messages": 1, "dead": 0}]

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    lines = text.splitlines()
    assert "celeriac_workers_online 1" in lines
    assert f'celeriac_worker_active_tasks{{worker="{worker.hostname}"}} 0' in lines
    assert "# TYPE celeriac_tasks_total counter" in lines
    assert 'celeriac_tasks_total{state="SUCCESS"} 1' in lines
    assert 'celeriac_tasks_total{state="RECEIVED"} 1' in lines
    assert 'celeriac_task_runtime_seconds_count{task="dash.add"} 1' in lines
    runtime_sum = 'celeriac_task_runtime_seconds_sum{task="dash.add"} '
    assert any(line.startswith(runtime_sum) for line in lines)
    assert 'celeriac_queue_length{queue="celery"} 1' in lines
    for line in lines:  # every sample is "name{labels} number"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_revoke_and_terminate(cluster: tuple[TestClient, WorkController, threading.Event]) -> None:
    client, worker, _ = cluster
    until(lambda: worker_row(client, worker.hostname), what="the worker")
    # Held by the broker for 5 s, so the revoke is known before the worker ever sees it.
    later = send(client, name="dash.add", args=[1, 2], countdown=5)
    response = client.post(f"/api/task/{later}/revoke")
    assert response.json() == {"ok": True, "task_id": later, "terminate": False}
    until(
        lambda: client.get(f"/api/task/{later}").json()["state"] == states.REVOKED,
        what="the revoked task",
    )

    running = send(client, name="dash.wait")
    until(lambda: task_in(client, running, state="STARTED"), what="the waiting task to start")
    response = client.post(f"/api/task/{running}/revoke", json={"terminate": True})
    assert response.json()["terminate"] is True
    final = until(
        lambda: (t := task_in(client, running)) and t["state"] in states.READY_STATES and t,
        what="the terminated task to finish",
    )
    assert final["state"] != states.SUCCESS, final


def test_pool_grow_shrink_and_shutdown(
    cluster: tuple[TestClient, WorkController, threading.Event],
) -> None:
    client, worker, _ = cluster
    name = worker.hostname
    until(lambda: worker_row(client, name), what="the worker")
    assert worker.pool is not None
    size = worker.pool.size
    grown = client.post(f"/api/workers/{name}/pool/grow", json={"n": 2})
    assert grown.status_code == 200 and "ok" in grown.json()["reply"], grown.text
    assert worker.pool.size == size + 2
    shrunk = client.post(f"/api/workers/{name}/pool/shrink")
    assert shrunk.status_code == 200 and worker.pool.size == size + 1
    assert client.post(f"/api/workers/{name}/pool/explode").status_code == 404
    nobody = client.post("/api/workers/nobody@nowhere/pool/grow")
    assert nobody.status_code == 504 and "no reply" in nobody.json()["error"]

    stop = client.post(f"/api/workers/{name}/shutdown")
    assert stop.status_code == 200 and "ok" in stop.json()["reply"]
    until(
        lambda: (w := worker_row(client, name)) and w["status"] == "offline",
        what="the worker-offline event",
    )


def test_event_stream(cluster: tuple[TestClient, WorkController, threading.Event]) -> None:
    client, worker, _ = cluster
    seen: list[dict[str, Any]] = []
    with client.stream("GET", "/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert next(lines) == "retry: 3000"
        task_id = None
        for line in lines:
            if not line.startswith("data: "):
                continue
            seen.append(orjson.loads(line[len("data: ") :]))
            if task_id is None and seen[-1]["type"] == "worker-heartbeat":
                task_id = send(client, name="dash.add", args=[3, 4])
            if task_id and seen[-1].get("uuid") == task_id and seen[-1]["type"] == "task-succeeded":
                break
        client.app.state.dashboard.request_close()  # type: ignore[attr-defined]
        assert all(line in ("", ": keepalive") for line in lines)  # then the stream ends
    types = {e["type"] for e in seen}
    assert {"worker-heartbeat", "task-received", "task-succeeded"} <= types
    assert all(e["hostname"] == worker.hostname for e in seen)


# -- auth -----------------------------------------------------------------------------------


def test_basic_auth(memory_app: tuple[Celery, threading.Event]) -> None:
    app, _ = memory_app
    with TestClient(create_app(app, basic_auth="admin:s3cret,ops:pa:ss")) as client:
        for path in ("/", "/api/workers", "/metrics", "/events"):
            denied = client.get(path)
            assert denied.status_code == 401, path
            assert denied.headers["www-authenticate"] == 'Basic realm="celeriac"'
        assert client.get("/api/workers", auth=("admin", "wrong")).status_code == 401
        assert client.get("/api/workers", auth=("nobody", "s3cret")).status_code == 401
        broken = {"Authorization": "Basic !!not-base64!!"}
        assert client.get("/api/workers", headers=broken).status_code == 401
        assert client.get("/api/workers", auth=("admin", "s3cret")).json() == []
        page = client.get("/", auth=("ops", "pa:ss"))  # the password may hold a colon
        assert page.status_code == 200 and "<title>celeriac dashboard</title>" in page.text
    assert parse_credentials("a:b, c:d") == [("a", "b"), ("c", "d")]
    with pytest.raises(ValueError, match="user:password"):
        parse_credentials("nocolon")


def test_cli_rejects_bad_basic_auth() -> None:
    result = CliRunner().invoke(main, ["-b", "memory://", "dashboard", "--basic-auth", "nope"])
    assert result.exit_code == 2 and "user:password" in result.output


# -- the real command ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, auth: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_cli_serves_a_sqlite_cluster(tmp_path: Path) -> None:
    broker = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    app, gate = make_app(broker)
    gate.set()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "CELERIAC_DASHBOARD_AUTH": "admin:s3cret",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    log = (tmp_path / "dashboard.log").open("wb")
    command = [
        sys.executable,
        "-m",
        "celeriac",
        "-b",
        broker,
        "dashboard",
        "--port",
        str(port),
        "-l",
        "WARNING",
    ]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
        with contextlib.suppress(OSError):
            return http_get(base + "/", timeout=1)[0] == 401
        return False

    try:
        with running_worker(app, f"cli-{uuid.uuid4().hex[:6]}@localhost") as worker:
            until(up, what="the dashboard to listen")
            status, body = http_get(base + "/", "admin:s3cret")
            assert status == 200 and b"<title>celeriac dashboard</title>" in body

            def online() -> bool:
                rows = orjson.loads(http_get(base + "/api/workers", "admin:s3cret")[1])
                return any(
                    r["hostname"] == worker.hostname and r["status"] == "online" for r in rows
                )

            until(online, what="the worker to show in the subprocess's dashboard")
            result = app.send_task("dash.add", (20, 22))
            assert result.get(timeout=TIMEOUT) == 42
            status, body = http_get(f"{base}/api/task/{result.id}", "admin:s3cret")
            assert status == 200 and orjson.loads(body)["state"] == states.SUCCESS

            # An open event stream must not hold the server up when it is told to stop.
            request = urllib.request.Request(base + "/events")
            token = base64.b64encode(b"admin:s3cret").decode()
            request.add_header("Authorization", f"Basic {token}")
            with urllib.request.urlopen(request, timeout=TIMEOUT) as stream:
                assert stream.readline() == b"retry: 3000\n"
                proc.terminate()
                # uvicorn re-raises the signal once it has shut down cleanly.
                assert proc.wait(TIMEOUT) in (0, -signal.SIGTERM)
                stream.read()  # the server ended the stream cleanly (no IncompleteRead)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        log.close()
        app.close()
