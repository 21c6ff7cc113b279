"""Result backend in a SQLite file: the zero-setup default, safe across processes.

URLs: ``sqlite://`` is ``./celeriac.sqlite`` (the file the SQLite broker uses by default,
so one file holds a whole small deployment), ``sqlite:///relative.sqlite`` and
``sqlite:////absolute/path.sqlite``. Option ``busy_timeout`` (30 s): how long a call
may wait for another process's write lock before it raises BackendError.

Storage layout (the broker's tables ``messages, bindings, consumers, broadcast, locks``
live in the same file; these names never collide with them)::

    celeriac_results(key TEXT PRIMARY KEY,   -- celery-task-meta-<id>, celery-taskset-meta-<id>
                     value BLOB NOT NULL,    -- the encoded meta / group document
                     expires REAL)           -- unix time; NULL = never; past = missing
    celeriac_sets(key TEXT PRIMARY KEY,      -- one row per chord join/claim set
                  size INTEGER NOT NULL,     -- members so far = the last rank handed out
                  expires REAL)              -- the whole set's expiry; NULL = never
    celeriac_members(key TEXT, member TEXT,  -- PRIMARY KEY (key, member)
                     rank INTEGER)           -- 1-based insertion position within the key

Rows past ``expires`` read as missing; a sweep deletes them (and the members of expired
sets) at most once a minute per backend instance, in batches. ``_add_member`` ranks a
new member from its set's ``size`` inside the ``BEGIN IMMEDIATE`` transaction that
inserts it, so concurrent chord joins from many processes get distinct ranks, and each
join costs a few primary-key lookups however large the chord (a count or a per-member
expiry would make a chord of n cost O(n^2)). There is no change feed: ``wait`` polls
with backoff.

Why sqlite3 runs inline on the event loop, not on a thread: each call is one or two
indexed statements, and the hop to a thread costs more than the work (measured on a
2-core box: ``store_raw`` 95 µs through a one-thread executor against 25 µs inline;
the transport measured the same). The loop could only stall waiting for another
process's write lock, so each attempt waits at most ``ATTEMPT_WAIT`` (5 ms) inside
SQLite and longer waits are retried with ``await asyncio.sleep`` backoff, until
``busy_timeout``. Writes are single statements or ``BEGIN IMMEDIATE`` transactions,
so a busy attempt has changed nothing and is safe to repeat. Opening the file (WAL
switch, schema) is retried the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..exceptions import BackendError
from .base import KeyValueBackend

__all__ = ["DEFAULT_PATH", "SQLiteBackend", "database_path"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PATH = "celeriac.sqlite"
ATTEMPT_WAIT = 0.005  # seconds one attempt may wait for the lock inside SQLite
_CHUNK = 500  # keys per IN (...) query, under SQLite's variable limit
_SWEEP_BATCH = 1000  # results per sweep transaction, so a big sweep never stalls the loop
_SWEEP_SETS = 50  # expired sets (with their members) per sweep transaction
_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED (extended codes share the low byte)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS celeriac_results (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS celeriac_results_expires
    ON celeriac_results (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS celeriac_sets (
    key TEXT PRIMARY KEY, size INTEGER NOT NULL, expires REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS celeriac_sets_expires
    ON celeriac_sets (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS celeriac_members (
    key TEXT NOT NULL, member TEXT NOT NULL, rank INTEGER NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
"""
_SQL_SET = "INSERT OR REPLACE INTO celeriac_results (key, value, expires) VALUES (?, ?, ?)"
_SQL_SIZE = "SELECT size, expires FROM celeriac_sets WHERE key = ?"
_SQL_RANK = "SELECT rank FROM celeriac_members WHERE key = ? AND member = ?"
_SQL_SAVE_SET = "INSERT OR REPLACE INTO celeriac_sets (key, size, expires) VALUES (?, ?, ?)"
# Connections inherited over fork are never used or closed in the child (SQLite forbids
# both); they are parked here so garbage collection does not close them either.
_inherited: list[sqlite3.Connection] = []


class _Busy(Exception):
    """The lock was busy before anything changed: safe to retry."""


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF in _BUSY_CODES if code is not None else "locked" in str(exc)


def _attempt(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], txn: bool) -> T:
    """Run ``fn`` once: alone (one statement is its own transaction) or inside
    ``BEGIN IMMEDIATE``, which takes the write lock first so reads inside see the latest
    rows. A busy error raised before any change becomes :class:`_Busy`."""
    try:
        if not txn:
            return fn(conn)
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if _is_busy(exc) and not conn.in_transaction:
            raise _Busy from exc
        raise
    try:
        out = fn(conn)
        conn.execute("COMMIT")
        return out
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def database_path(url: str) -> str:
    """The file a ``sqlite://`` URL names; bare ``sqlite://`` is ``./celeriac.sqlite``."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    rest = rest.split("?", 1)[0]
    if rest.startswith("/"):
        rest = rest[1:]  # sqlite:///rel -> "rel", sqlite:////abs -> "/abs"
    return rest or DEFAULT_PATH


class SQLiteBackend(KeyValueBackend):
    """Results as rows of one file, read and written inline on the caller's loop."""

    cleanup_interval = 60.0

    def __init__(self, url: str = "sqlite://", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self.path = database_path(url)
        self.busy_timeout = float(self.options.get("busy_timeout", 30.0))
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._next_sweep = 0.0

    # -- connection ---------------------------------------------------------------

    async def connect(self) -> None:
        await self._db()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            conn.close()

    async def _db(self) -> sqlite3.Connection:
        """The connection, opened on first use in this process.

        Concurrent first opens of a new file can get SQLITE_BUSY at once (switching it
        to WAL needs an exclusive lock), so opening retries like any other call.
        """
        if self._pid != os.getpid():  # forked: never touch the parent's connection
            if self._conn is not None:
                _inherited.append(self._conn)
            self._conn, self._pid = None, os.getpid()
        deadline, delay = time.monotonic() + self.busy_timeout, 0.001
        while self._conn is None:
            try:
                conn = self._open()
            except sqlite3.Error as exc:
                if not (isinstance(exc, sqlite3.OperationalError) and _is_busy(exc)) or (
                    time.monotonic() > deadline
                ):
                    msg = f"cannot open SQLite result backend {self.path!r}: {exc}"
                    raise BackendError(msg) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            if self._conn is None:  # another call on this loop may have opened it meanwhile
                self._conn = conn
            else:
                conn.close()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=ATTEMPT_WAIT, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(ATTEMPT_WAIT * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, txn: bool = False) -> T:
        """Run ``fn(conn)`` inline, sleeping without blocking the loop while the file is
        locked; sqlite3 errors become BackendError. ``fn`` never awaits."""
        conn, delay = await self._db(), 0.001
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return _attempt(conn, fn, txn)
            except _Busy:
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"SQLite result backend {self.path!r} stayed locked for "
                        f"{self.busy_timeout}s (option busy_timeout)"
                    ) from None
            except sqlite3.Error as exc:
                raise BackendError(f"SQLite result backend {self.path!r} failed: {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

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
        now = time.time()
        args = (key, value, None if ttl is None else now + ttl)
        await self._run(lambda conn: conn.execute(_SQL_SET, args))
        if now >= self._next_sweep:
            self._next_sweep = now + self.cleanup_interval
            await self._sweep(now)

    async def _delete(self, *keys: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            marks = ",".join("?" * len(keys))
            conn.execute(f"DELETE FROM celeriac_results WHERE key IN ({marks})", keys)
            conn.execute(f"DELETE FROM celeriac_sets WHERE key IN ({marks})", keys)
            conn.execute(f"DELETE FROM celeriac_members WHERE key IN ({marks})", keys)

        if keys:
            await self._run(delete, txn=True)

    async def _add_member(self, key: str, member: str, ttl: float | None) -> int:
        """The member's 1-based insertion rank (the size after adding, for a new member)."""

        def add(conn: sqlite3.Connection) -> int:
            now = time.time()
            size, expires = conn.execute(_SQL_SIZE, (key,)).fetchone() or (0, None)
            if expires is not None and expires <= now:
                # An expired set starts again empty, as an expired Redis key would.
                conn.execute("DELETE FROM celeriac_members WHERE key = ?", (key,))
                size, expires = 0, None
            found = conn.execute(_SQL_RANK, (key, member)).fetchone()
            if found is not None and ttl is None:
                return int(found[0])
            if found is None:
                size += 1
                conn.execute(
                    "INSERT INTO celeriac_members (key, member, rank) VALUES (?, ?, ?)",
                    (key, member, size),
                )
            conn.execute(_SQL_SAVE_SET, (key, size, expires if ttl is None else now + ttl))
            return size if found is None else int(found[0])

        return await self._run(add, txn=True)

    def _changes(self, keys: Sequence[str]) -> None:
        return None

    async def _sweep(self, now: float) -> None:
        """Delete expired rows in batches, yielding to the loop between them."""

        def results(conn: sqlite3.Connection) -> int:
            sql = ("DELETE FROM celeriac_results WHERE key IN (SELECT key FROM celeriac_results"
                   " WHERE expires <= ? LIMIT ?)")  # fmt: skip
            return int(conn.execute(sql, (now, _SWEEP_BATCH)).rowcount)

        def sets(conn: sqlite3.Connection) -> int:
            sql = "SELECT key FROM celeriac_sets WHERE expires <= ? LIMIT ?"
            keys = [(k,) for (k,) in conn.execute(sql, (now, _SWEEP_SETS))]
            conn.executemany("DELETE FROM celeriac_members WHERE key = ?", keys)
            conn.executemany("DELETE FROM celeriac_sets WHERE key = ?", keys)
            return len(keys)

        gone = 0
        for step, limit in ((results, _SWEEP_BATCH), (sets, _SWEEP_SETS)):
            while True:
                n = await self._run(step, txn=True)
                gone += n
                if n < limit:
                    break
                await asyncio.sleep(0)
        if gone:
            log.debug("swept %d expired results and sets", gone)
