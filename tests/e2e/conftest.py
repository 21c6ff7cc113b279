"""Fixtures that run real ``celeriac worker`` processes against a real broker.

``broker`` is parametrised over the embedded SQLite broker (a file in tmp_path) and Redis
database 12 (flushed before and after each test, under a file lock so that two pytest
sessions on this machine never share it: pub/sub and queues would cross). Redis down, or
``celeriac.transport.redis`` not importable, fails the test under ``CI=true`` and skips
it otherwise.

``worker(...)`` starts ``python -m celeriac -A tests.e2e.tasks worker ...`` in its own
session with the broker URLs in its environment, waits for ``<nodename> ready.`` in its
log, and on teardown stops it by pid (SIGTERM, then SIGKILL after a deadline), then kills
any of its pool children left behind. Worker logs are attached to the test report.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery

from . import tasks

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/12"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)")
    pytest.skip(reason)


def wait_until(
    condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what or condition!r}")
        time.sleep(interval)


@dataclass(frozen=True)
class Broker:
    kind: str
    url: str
    tmp: Path

    @property
    def env(self) -> dict[str, str]:
        return {"CELERIAC_BROKER_URL": self.url, "CELERIAC_RESULT_BACKEND": self.url}


def _redis_client() -> Any:
    try:
        importlib.import_module("celeriac.transport.redis")
        importlib.import_module("celeriac.backends.redis")
    except ImportError as exc:
        unavailable(f"celeriac's Redis transport cannot be imported: {exc}")
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        client.close()
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    return client


@contextlib.contextmanager
def _exclusive(path: Path, timeout: float = 90.0) -> Iterator[None]:
    """Hold an flock on ``path``: two pytest sessions on this machine never share db 12."""
    with open(path, "a") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session held {path} for {timeout:.0f} s")
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(params=["sqlite", "redis"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    if request.param == "sqlite":
        yield Broker("sqlite", f"sqlite:///{tmp_path / 'broker.sqlite'}", tmp_path)
        return
    client = _redis_client()
    try:
        with _exclusive(Path(tempfile.gettempdir()) / "celeriac-e2e-redis-db12.lock"):
            client.flushdb()
            try:
                yield Broker("redis", REDIS_URL, tmp_path)
            finally:
                client.flushdb()
    finally:
        client.close()


def _use(app: Celery, b: Broker) -> None:
    app.close()
    app.conf.broker_url = b.url
    app.conf.result_backend = b.url


@pytest.fixture
def app(broker: Broker) -> Iterator[Celery]:
    """The tasks module's app, pointed at this test's broker for the test process."""
    _use(tasks.app, broker)
    try:
        yield tasks.app
    finally:
        tasks.app.close()


# -- worker processes ---------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid``: tells our process apart from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found.extend(int(p) for p in text.split())
    return found


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    nodename: str
    log_path: Path
    args: list[str]
    #: (pid, start time) of every process seen under this worker, for a safe cleanup.
    family: dict[int, str | None] = field(default_factory=dict)
    #: Set when SIGTERM did not stop it in time and SIGKILL had to.
    forced: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def note_children(self) -> list[int]:
        kids = children_of(self.pid)
        for kid in kids:
            self.family.setdefault(kid, _start_time(kid))
        return kids

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        marker = f"{self.nodename} ready."
        while marker not in self.log():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"worker {self.nodename} exited with {self.proc.returncode} before it was "
                    f"ready:\n{self.log()[-4000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"worker {self.nodename} not ready in {timeout} s:\n{self.log()[-4000:]}"
                )
            time.sleep(0.02)
        self.note_children()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Warm shutdown by SIGTERM; SIGKILL if it does not exit in time. Returns the code."""
        if self.alive():
            self.note_children()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.forced = True
                self.proc.kill()
                self.proc.wait(timeout)
        self.reap_family()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL the main process and its pool children: a machine-crash stand-in."""
        kids = self.note_children()
        self.proc.kill()
        for kid in kids:
            self._kill_if_ours(kid)
        self.proc.wait(STOP_TIMEOUT)

    def _kill_if_ours(self, pid: int) -> None:
        started = self.family.get(pid)
        if started is not None and _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def reap_family(self) -> None:
        """Kill pool children that outlived the main process (only those we saw start)."""
        deadline = time.monotonic() + 5
        for pid in list(self.family):
            while _start_time(pid) == self.family[pid] and time.monotonic() < deadline:
                time.sleep(0.02)
            self._kill_if_ours(pid)


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def worker(
    request: pytest.FixtureRequest, broker: Broker, app: Celery
) -> Iterator[WorkerFactory]:
    """``worker(pool='prefork', concurrency=2, queues='celery,queue1,queue2', ...)``."""
    with _workers(request, broker) as factory:
        yield factory


@contextlib.contextmanager
def _workers(request: pytest.FixtureRequest, broker: Broker) -> Iterator[WorkerFactory]:
    started: list[WorkerProcess] = []

    def start(
        *extra: str,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: str | None = "celery,queue1,queue2",
        name: str | None = None,
        conf: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerProcess:
        node = name or f"w{len(started) + 1}-{uuid.uuid4().hex[:6]}"
        nodename = f"{node}@e2e"
        args = [
            sys.executable, "-m", "celeriac", "-A", "tests.e2e.tasks", "worker",
            "-l", "info", "-P", pool, "-c", str(concurrency), "-n", nodename,
        ]
        if queues:
            args += ["-Q", queues]
        args += list(extra)
        full_env = {**os.environ, **broker.env, "PYTHONUNBUFFERED": "1"}
        full_env.pop("CELERIAC_E2E_CONF", None)
        if conf:
            full_env["CELERIAC_E2E_CONF"] = json.dumps(conf)
        full_env.update(env or {})
        log_path = broker.tmp / f"{node}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                args, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        w = WorkerProcess(proc, nodename, log_path, args)
        started.append(w)
        if wait:
            w.wait_ready()
        return w

    try:
        yield start
    finally:
        for w in started:
            with contextlib.suppress(Exception):
                w.stop()
        for w in started:
            request.node.add_report_section(
                "teardown", f"worker {w.nodename} (exit {w.proc.returncode})", w.log()[-20000:]
            )
        stuck = [w.nodename for w in started if w.forced]
        if stuck:
            pytest.fail(f"SIGTERM did not stop {stuck} within {STOP_TIMEOUT} s (SIGKILL did)")


def run_cli(broker: Broker, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m celeriac -A tests.e2e.tasks <args>`` with this broker; output as text."""
    env = {**os.environ, **broker.env}
    env.pop("CELERIAC_E2E_CONF", None)
    return subprocess.run(
        [sys.executable, "-m", "celeriac", "-A", "tests.e2e.tasks", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


def queue_size(app: Celery, queue: str) -> int:
    """Ready plus delayed messages in ``queue``, through the app's own transport."""

    async def size() -> int:
        conns = await app.connection_for_current_loop()
        return int(await conns.transport.size(queue))

    return int(app.portal.run(size()))


def publish_raw(app: Celery, queue: str, payloads: Sequence[bytes], broker: Broker) -> None:
    """Put undecodable messages straight into the broker's storage for ``queue``."""
    if broker.kind == "sqlite":
        import sqlite3

        path = broker.url.removeprefix("sqlite:///")
        db = sqlite3.connect(path)
        try:
            with db:
                db.executemany(
                    "INSERT INTO messages (queue, priority, not_before, owner, redelivered,"
                    " payload) VALUES (?, 0, 0, NULL, 0, ?)",
                    [(queue, p) for p in payloads],
                )
        finally:
            db.close()
    else:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            for p in payloads:
                client.lpush(queue, p)
        finally:
            client.close()
