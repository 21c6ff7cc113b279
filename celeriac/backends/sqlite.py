"""Result backend in a SQLite file: the zero-setup default, safe across processes.

URLs: ``sqlite://`` is ``./celeriac.sqlite`` (the file the SQLite broker uses by default,
so one file holds a whole small deployment), ``sqlite:///relative.sqlite`` and
``sqlite:////absolute/path.sqlite``.

Storage layout (the broker's tables ``messages, bindings, consumers, broadcast, locks``
live in the same file; these names never collide with them)::

    celeriac_results(key TEXT PRIMARY KEY,   -- celery-task-meta-<id>, celery-taskset-meta-<id>
                     value BLOB NOT NULL,    -- the encoded meta / group document
                     expires REAL)           -- unix time; NULL = never; past = missing
    celeriac_members(key TEXT, member TEXT,  -- chord join/claim sets; PRIMARY KEY (key, member)
                     rank INTEGER,           -- 1-based insertion position within the key
                     expires REAL)           -- the set's expiry, kept equal on every member

Rows past ``expires`` read as missing and are deleted by a sweep at most once a minute per
backend instance. The file runs in WAL mode with ``synchronous=NORMAL`` and a busy
timeout, every write is one short transaction, and ``_add_member`` ranks inside the
``BEGIN IMMEDIATE`` transaction that inserts, so concurrent chord joins from many
processes get distinct ranks. There is no change feed: ``wait`` polls with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from ..exceptions import BackendError
from .base import KeyValueBackend

__all__ = ["DEFAULT_PATH", "SQLiteBackend", "database_path"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PATH = "celeriac.sqlite"
_CHUNK = 500  # keys per IN (...) query, under SQLite's variable limit
_SCHEMA = """
CREATE TABLE IF NOT EXISTS celeriac_results (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS celeriac_results_expires
    ON celeriac_results (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS celeriac_members (
    key TEXT NOT NULL, member TEXT NOT NULL, rank INTEGER NOT NULL, expires REAL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS celeriac_members_expires
    ON celeriac_members (expires) WHERE expires IS NOT NULL;
"""
# Connections inherited over fork are never used or closed in the child (SQLite forbids
# both); they are parked here so garbage collection does not close them either.
_inherited: list[sqlite3.Connection] = []


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` takes the write lock first, so reads inside see the latest rows."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def database_path(url: str) -> str:
    """The file a ``sqlite://`` URL names; bare ``sqlite://`` is ``./celeriac.sqlite``."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    rest = rest.split("?", 1)[0]
    if rest.startswith("/"):
        rest = rest[1:]  # sqlite:///rel -> "rel", sqlite:////abs -> "/abs"
    return rest or DEFAULT_PATH


class SQLiteBackend(KeyValueBackend):
    """Results as rows of one file, with I/O on a private thread so the loop never blocks."""

    cleanup_interval = 60.0

    def __init__(self, url: str = "sqlite://", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.path = database_path(url)
        self.busy_timeout = float(self.options.get("busy_timeout", 30.0))
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._next_sweep = 0.0

    # -- connection ---------------------------------------------------------------

    async def connect(self) -> None:
        await self._run(lambda conn: None)

    async def close(self) -> None:
        executor, conn = self._executor, self._conn
        if executor is None or self._pid != os.getpid():
            return
        self._executor = self._conn = None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=False)

    def _open(self) -> sqlite3.Connection:
        """Runs on the backend's thread: open the file and make sure the tables exist."""
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the backend's own thread; sqlite3 errors become BackendError."""
        if self._pid != os.getpid():  # forked: drop the parent's thread and connection
            if self._conn is not None:
                _inherited.append(self._conn)
            self._conn, self._executor, self._pid = None, None, os.getpid()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="celeriac-sqlite-results")

        def call() -> T:
            if self._conn is None:
                self._conn = self._open()
            return fn(self._conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.Error as exc:
            raise BackendError(f"SQLite result backend {self.path!r} failed: {exc}") from exc

    # -- primitives ---------------------------------------------------------------

    async def _get(self, key: str) -> bytes | None:
        return (await self._mget([key]))[0]

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = list(keys)

        def read(conn: sqlite3.Connection) -> list[bytes | None]:
            now, found = time.time(), dict[str, bytes]()
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT key, value FROM celeriac_results WHERE key IN ({marks})"
                    " AND (expires IS NULL OR expires > ?)",
                    (*chunk, now),
                )
                found.update(rows)
            return [found.get(k) for k in keys]

        return await self._run(read) if keys else []

    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        def write(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute(
                "INSERT OR REPLACE INTO celeriac_results (key, value, expires) VALUES (?, ?, ?)",
                (key, value, None if ttl is None else now + ttl),
            )
            if now >= self._next_sweep:
                self._next_sweep = now + self.cleanup_interval
                self._sweep(conn, now)

        await self._run(write)

    async def _delete(self, *keys: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            marks = ",".join("?" * len(keys))
            with _transaction(conn):
                conn.execute(f"DELETE FROM celeriac_results WHERE key IN ({marks})", keys)
                conn.execute(f"DELETE FROM celeriac_members WHERE key IN ({marks})", keys)

        if keys:
            await self._run(delete)

    async def _add_member(self, key: str, member: str, ttl: float | None) -> int:
        """The member's 1-based insertion rank (the size after adding, for a new member)."""

        def add(conn: sqlite3.Connection) -> int:
            now = time.time()
            with _transaction(conn):
                # An expired set starts again empty, as an expired Redis key would.
                conn.execute(
                    "DELETE FROM celeriac_members WHERE key = ? AND expires <= ?", (key, now)
                )
                conn.execute(
                    "INSERT OR IGNORE INTO celeriac_members (key, member, rank, expires) VALUES"
                    " (?, ?, (SELECT count(*) + 1 FROM celeriac_members WHERE key = ?),"
                    " (SELECT expires FROM celeriac_members WHERE key = ? LIMIT 1))",
                    (key, member, key, key),
                )
                if ttl is not None:
                    conn.execute(
                        "UPDATE celeriac_members SET expires = ? WHERE key = ?", (now + ttl, key)
                    )
                (rank,) = conn.execute(
                    "SELECT rank FROM celeriac_members WHERE key = ? AND member = ?", (key, member)
                ).fetchone()
            return int(rank)

        return await self._run(add)

    def _changes(self, keys: Sequence[str]) -> None:
        return None

    @staticmethod
    def _sweep(conn: sqlite3.Connection, now: float) -> None:
        with _transaction(conn):
            gone = conn.execute("DELETE FROM celeriac_results WHERE expires <= ?", (now,))
            gone_members = conn.execute("DELETE FROM celeriac_members WHERE expires <= ?", (now,))
        if gone.rowcount or gone_members.rowcount:
            log.debug(
                "swept %d expired results, %d set members", gone.rowcount, gone_members.rowcount
            )
