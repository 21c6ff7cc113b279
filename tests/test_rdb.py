"""Remote pdb for real: a thread hits ``set_trace()`` and the test is the telnet client."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celeriac.contrib import rdb

WAITING = re.compile(r"Remote Debugger:(\d+): Waiting for client\.\.\.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Debugged:
    """Runs ``fn`` on a thread; a client that never came is let in at teardown."""

    def __init__(self, fn: Callable[[], Any], caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.result: list[Any] = []
        self.thread = threading.Thread(target=lambda: self.result.append(fn()), daemon=True)
        self.thread.start()

    def port(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in list(self.caplog.records):
                match = WAITING.fullmatch(record.getMessage())
                if match:
                    return int(match.group(1))
            time.sleep(0.01)
        raise AssertionError("the debugger never said it was waiting")

    def connect(self) -> Session:
        return Session(socket.create_connection(("127.0.0.1", self.port()), timeout=10))

    def finish(self) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(OSError, AssertionError):
                socket.create_connection(("127.0.0.1", self.port(0.5)), timeout=1).close()
            self.thread.join(10)


class Session:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def until(self, marker: bytes) -> str:
        while marker not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"connection closed before {marker!r}: {self.buffer!r}")
            self.buffer += chunk
        text, _, self.buffer = self.buffer.partition(marker)
        return text.decode()

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        return self.until(b"(Pdb) ")

    def rest(self) -> str:
        """Everything until the debugger closes the connection."""
        while chunk := self.sock.recv(4096):
            self.buffer += chunk
        self.sock.close()
        return self.buffer.decode()


@pytest.fixture
def debug(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Callable[[], Any]], Debugged]]:
    caplog.set_level(logging.WARNING, logger="celeriac.contrib.rdb")
    monkeypatch.setenv("CELERIAC_RDB_PORT", str(free_port()))
    started: list[Debugged] = []

    def start(fn: Callable[[], Any]) -> Debugged:
        started.append(Debugged(fn, caplog))
        return started[-1]

    yield start
    for d in started:
        d.finish()


def add(x: int, y: int) -> int:
    result = x + y
    rdb.set_trace()  # <- the tutorial's break-point
    return result * 10


def test_print_a_variable_then_continue(
    debug: Callable[[Callable[[], Any]], Debugged], caplog: pytest.LogCaptureFixture
) -> None:
    run = debug(lambda: add(1, 2))
    session = run.connect()
    banner = session.until(b"(Pdb) ")
    assert "return result * 10" in banner  # stopped on the line after set_trace()
    assert session.command("p result").strip() == "3"
    assert "x = 1" in session.command("!print('x =', x)")
    session.sock.sendall(b"c\n")
    session.rest()  # the session ends: the server closes the connection
    run.thread.join(10)
    assert run.result == [30]
    port = run.port()
    messages = [r.getMessage() for r in caplog.records]
    assert (
        f"Remote Debugger:{port}: Please telnet 127.0.0.1 {port}.  "
        "Type `exit` in session to continue." in messages
    )
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert any(m.startswith(f"Remote Debugger:{port}: Session with 127.0.0.1:") for m in messages)


@pytest.mark.parametrize("how", ["exit", "quit", "hangup"])
def test_exit_quit_or_hangup_let_the_task_finish(
    debug: Callable[[Callable[[], Any]], Debugged], how: str
) -> None:
    run = debug(lambda: add(4, 5))
    session = run.connect()
    session.until(b"(Pdb) ")
    if how == "hangup":
        session.sock.close()
    else:
        session.sock.sendall(how.encode() + b"\n")
        session.rest()
    run.thread.join(10)
    assert run.result == [90]  # never aborted with BdbQuit


def test_breakpoints_keep_the_session_open(
    debug: Callable[[Callable[[], Any]], Debugged],
) -> None:
    def looped() -> int:
        total = 0
        rdb.set_trace()
        for i in range(3):
            total += i  # line hit by the breakpoint below
        return total

    run = debug(looped)
    session = run.connect()
    session.until(b"(Pdb) ")
    lineno = looped.__code__.co_firstlineno + 4
    assert "Breakpoint 1" in session.command(f"b {lineno}")
    assert "total += i" in session.command("c")
    assert session.command("p i").strip() == "0"
    session.command("cl 1")
    session.sock.sendall(b"c\n")
    session.rest()
    run.thread.join(10)
    assert run.result == [3]


def test_busy_port_moves_to_the_next_one(
    debug: Callable[[Callable[[], Any]], Debugged], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        base = taken.getsockname()[1]
        monkeypatch.delenv("CELERIAC_RDB_PORT")
        monkeypatch.setenv("CELERY_RDB_PORT", str(base))  # Celery's variable is honoured
        run = debug(lambda: add(0, 1))
        port = run.port()
        assert port > base
        session = run.connect()
        session.until(b"(Pdb) ")
        session.sock.sendall(b"c\n")
        session.rest()
    run.thread.join(10)
    assert run.result == [10]


def test_no_free_port_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        base = taken.getsockname()[1]
        with pytest.raises(OSError, match="no free port"):
            rdb.Rdb(port=base, port_search_limit=0)
