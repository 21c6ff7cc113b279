"""Fixtures for the Celery interop suite: Redis database 8, real Celery and celeriac workers.

``redis8`` flushes database 8 before and after each test, under a file lock so that two
pytest sessions on this machine never share it. Redis down, or the ``celery`` package
missing, fails the test under ``CI=true`` and skips it otherwise.

``celeriac_worker(...)`` runs ``python -m celeriac -A tests.interop.celeriac_side worker``
and ``celery_worker(...)`` runs ``<venv>/bin/celery -A tests.interop.celery_side worker``,
each in its own session with its log in tmp_path; both wait for ``<nodename> ready.``
and are stopped by pid on teardown (SIGTERM, then SIGKILL after a deadline). Worker logs
are attached to the test report.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/8"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CELERY_BIN = Path(sys.executable).with_name("celery")


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)")
    pytest.skip(reason)


def wait_until(
    condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = ""
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


@contextlib.contextmanager
def _exclusive(path: Path, timeout: float = 90.0) -> Iterator[None]:
    """Hold an flock on ``path``: two test sessions on this machine never share db 8."""
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


@pytest.fixture
def redis8() -> Iterator[Any]:
    """A raw redis-py client on database 8, flushed before and after the test."""
    try:
        import celery  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        unavailable(f"the real celery package is not installed (pip install celery[redis]): {exc}")
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        client.close()
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    try:
        with _exclusive(Path(tempfile.gettempdir()) / "celeriac-interop-redis-db8.lock"):
            client.flushdb()
            try:
                yield client
            finally:
                client.flushdb()
    finally:
        client.close()


@pytest.fixture
def celery_client(redis8: Any) -> Iterator[Any]:
    """The real Celery app of ``celery_side``, as a client; its connections closed after."""
    from . import celery_side

    try:
        yield celery_side
    finally:
        _close_celery(celery_side.app)


def _close_celery(app: Any) -> None:
    """Close the Celery client's sockets: its result backend and broker pools are
    dropped, so the next test builds fresh ones (as Celery does after a fork)."""
    backend = app._backend
    if backend is not None:
        consumer = getattr(backend, "result_consumer", None)
        if consumer is not None:
            consumer.stop()
        backend.client.connection_pool.disconnect()
        app._backend_cache = None
        with contextlib.suppress(AttributeError):
            del app._local.backend
    import kombu.pools

    kombu.pools.reset()  # type: ignore[no-untyped-call]  # as Celery does after a fork
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None


@pytest.fixture
def celeriac_client(redis8: Any) -> Iterator[Any]:
    """The celeriac app of ``celeriac_side``, as a client; closed after the test."""
    from . import celeriac_side

    celeriac_side.app.close()
    try:
        yield celeriac_side
    finally:
        celeriac_side.app.close()


# -- worker processes ---------------------------------------------------------------------


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    nodename: str
    log_path: Path
    forced: bool = False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        marker = f"{self.nodename} ready."
        while marker not in self.log():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"worker {self.nodename} exited with {self.proc.returncode} before "
                    f"it was ready:\n{self.log()[-4000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"worker {self.nodename} not ready in {timeout} s:\n{self.log()[-4000:]}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Warm shutdown by SIGTERM; SIGKILL (by pid) if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.forced = True
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)


WorkerFactory = Callable[..., WorkerProcess]


@contextlib.contextmanager
def _workers(
    request: pytest.FixtureRequest, tmp_path: Path, command: Callable[[str], list[str]], prefix: str
) -> Iterator[WorkerFactory]:
    started: list[WorkerProcess] = []

    def start(*extra: str) -> WorkerProcess:
        nodename = f"{prefix}{len(started) + 1}-{uuid.uuid4().hex[:6]}@interop"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERIAC_", "CELERY_"))}
        env["PYTHONUNBUFFERED"] = "1"
        log_path = tmp_path / f"{nodename}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [*command(nodename), *extra],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        w = WorkerProcess(proc, nodename, log_path)
        started.append(w)
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


@pytest.fixture
def celeriac_worker(
    request: pytest.FixtureRequest, tmp_path: Path, redis8: Any
) -> Iterator[WorkerFactory]:
    """``celeriac_worker('-P', 'solo', ...)``: extra args follow the defaults (last wins)."""

    def command(nodename: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celeriac",
            "-A",
            "tests.interop.celeriac_side",
            "worker",
            "-l",
            "info",
            "-n",
            nodename,
            "-P",
            "threads",
            "-c",
            "2",
        ]

    with _workers(request, tmp_path, command, "celeriac") as factory:
        yield factory


@pytest.fixture
def celery_worker(
    request: pytest.FixtureRequest, tmp_path: Path, redis8: Any
) -> Iterator[WorkerFactory]:
    """A real Celery worker: solo pool, no gossip/mingle/heartbeat, so it starts fast."""
    if not CELERY_BIN.exists():
        unavailable(f"the celery command is not installed at {CELERY_BIN}")

    def command(nodename: str) -> list[str]:
        return [
            str(CELERY_BIN),
            "-A",
            "tests.interop.celery_side",
            "worker",
            "-P",
            "solo",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "info",
            "-n",
            nodename,
        ]

    with _workers(request, tmp_path, command, "celery") as factory:
        yield factory
