"""Remote debugging: ``rdb.set_trace()`` opens pdb on a TCP port of the worker's host.

A worker's tasks run in pool processes or threads with no terminal, so pdb talks over a
socket instead: the task logs (at WARNING, as Celery does)::

    Remote Debugger:6900: Please telnet 127.0.0.1 6900.  Type `exit` in session to continue.
    Remote Debugger:6900: Waiting for client...

and blocks until one client connects (``telnet``, ``nc``). ``continue`` resumes the task
and ends the session unless breakpoints remain; ``exit``/``quit``/end of input end the
session and let the task run on with no further stops (the task is never aborted).

Settings (environment): ``CELERIAC_RDB_HOST`` (default 127.0.0.1) and
``CELERIAC_RDB_PORT`` (default 6899); ``CELERY_RDB_HOST``/``CELERY_RDB_PORT`` are
honoured too. A busy port is skipped for the next one, up to 100 further, so several
pool processes can each debug at once. ``PYTHONBREAKPOINT=celeriac.contrib.rdb.set_trace``
makes ``breakpoint()`` use it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import pdb
import socket
import sys
from types import FrameType
from typing import IO, Any, cast

__all__ = ["DEFAULT_PORT", "PORT_SEARCH_LIMIT", "Rdb", "set_trace"]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6899
PORT_SEARCH_LIMIT = 100


def _setting(name: str, default: str) -> str:
    return os.environ.get(f"CELERIAC_{name}") or os.environ.get(f"CELERY_{name}") or default


class _Channel:
    """The session's text stream; a client that hangs up reads as end of input and
    swallows writes, so a lost connection never raises inside the task."""

    def __init__(self, sock: socket.socket) -> None:
        self._file = sock.makefile("rw", encoding="utf-8", errors="replace")

    def write(self, s: str) -> int:
        try:
            return self._file.write(s)
        except (OSError, ValueError):
            return len(s)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._file.flush()

    def readline(self, size: int = -1) -> str:
        try:
            return self._file.readline(size)
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        self.flush()
        with contextlib.suppress(OSError):
            self._file.close()


def _listen(host: str, port: int, search: int) -> tuple[socket.socket, int]:
    for candidate in range(port, port + search + 1):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
            sock.listen(1)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                continue
            raise
        return sock, candidate
    raise OSError(
        errno.EADDRINUSE,
        f"Remote Debugger: no free port in {port}-{port + search} on {host} "
        "(set CELERIAC_RDB_PORT to another base port)",
    )


class Rdb(pdb.Pdb):
    """pdb whose terminal is one TCP client; waits for it in ``__init__``."""

    me = "Remote Debugger"

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        port_search_limit: int = PORT_SEARCH_LIMIT,
    ) -> None:
        self.host = host or _setting("RDB_HOST", DEFAULT_HOST)
        base = port if port is not None else int(_setting("RDB_PORT", str(DEFAULT_PORT)))
        self._listener, self.port = _listen(self.host, base, port_search_limit)
        self.ident = f"{self.me}:{self.port}"
        logger.warning(
            "%s: Please telnet %s %s.  Type `exit` in session to continue.",
            self.ident,
            self.host,
            self.port,
        )
        logger.warning("%s: Waiting for client...", self.ident)
        try:
            self._client, address = self._listener.accept()
        finally:
            self._listener.close()
        self.remote_addr = ":".join(str(part) for part in address[:2])
        logger.warning("%s: In session with %s.", self.ident, self.remote_addr)
        self._channel: _Channel | None = _Channel(self._client)
        stream = cast(IO[str], self._channel)  # pdb only reads lines, writes and flushes
        super().__init__(stdin=stream, stdout=stream, nosigint=True, readrc=False)

    def _close_session(self) -> None:
        channel, self._channel = self._channel, None
        if channel is None:
            return
        self.stdin = self.stdout = io.StringIO()  # anything pdb says later goes nowhere
        channel.close()
        self._client.close()
        logger.warning("%s: Session with %s ended.", self.ident, self.remote_addr)

    def do_continue(self, arg: str) -> bool | None:
        stop: bool | None = super().do_continue(arg)
        if not self.breaks:
            self._close_session()
        return stop

    do_c = do_cont = do_continue

    def do_exit(self, arg: str) -> bool:
        """exit | quit | q: end the session; the task runs on with no further stops."""
        self.clear_all_breaks()
        self.set_continue()
        self._close_session()
        return True

    do_quit = do_q = do_EOF = do_exit

    def set_quit(self) -> None:
        # Never abort the task with BdbQuit: quitting the debugger lets the task finish.
        self.clear_all_breaks()
        self.set_continue()
        self._close_session()


def set_trace(frame: FrameType | None = None, **options: Any) -> None:
    """Break here (or at ``frame``) and wait for a remote pdb client."""
    if frame is None:
        frame = sys._getframe().f_back
    Rdb(**options).set_trace(frame)
