"""Schema, SQL and connection helpers shared by the SQLite transport and its consumer.

The storage layout is described in ``celeriac/transport/sqlite.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..exceptions import ImproperlyConfigured
from .memory import Waker

logger = logging.getLogger("celeriac.transport.sqlite")

T = TypeVar("T")

HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
POLL_MIN, POLL_MAX = 0.001, 0.025
MAX_BATCH = 256
REFILL_WHILE = 1.0
BROADCAST_KEEP = 60.0
HOSTNAME = socket.gethostname()
_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED (extended codes share the low byte)
Conn = sqlite3.Connection

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0,
    owner TEXT, redelivered INTEGER NOT NULL DEFAULT 0, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS messages_ready
    ON messages (queue, priority DESC, id) WHERE owner IS NULL;
CREATE INDEX IF NOT EXISTS messages_owner ON messages (owner) WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS bindings (
    exchange TEXT NOT NULL, exchange_type TEXT NOT NULL, binding_key TEXT NOT NULL,
    queue TEXT NOT NULL, PRIMARY KEY (exchange, binding_key, queue));
CREATE TABLE IF NOT EXISTS consumers (
    id TEXT PRIMARY KEY, pid INTEGER NOT NULL, hostname TEXT NOT NULL, heartbeat REAL NOT NULL);
CREATE TABLE IF NOT EXISTS broadcast (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, payload BLOB NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
"""
SQL_CANDIDATES = """SELECT id, priority FROM messages WHERE queue = ? AND owner IS NULL
    AND not_before <= ? ORDER BY priority DESC, id LIMIT ?"""
SQL_BEAT = """INSERT INTO consumers (id, pid, hostname, heartbeat) VALUES (?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat"""
SQL_LOCK = """INSERT INTO locks (name, owner, expires) VALUES (?, ?, ?)
    ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires = excluded.expires
    WHERE locks.expires < ? OR locks.owner = excluded.owner"""
SQL_RETURN = "UPDATE messages SET owner = NULL, redelivered = 1 WHERE owner = ?"
SQL_UNSEEN = "UPDATE messages SET owner = NULL WHERE id = ? AND owner = ?"


def path_of(url: str) -> str:
    """The database file a ``sqlite://`` URL names, made absolute now (cwd may change)."""
    rest = (url.split("://", 1)[1] if "://" in url else "").split("?", 1)[0]
    rest = rest[1:] if rest.startswith("/") else rest
    if rest == ":memory:":
        raise ImproperlyConfigured(
            f"{url!r}: an in-memory SQLite database cannot be shared between connections; "
            "use 'memory://' for an in-process broker"
        )
    return os.path.abspath(rest or "celeriac.sqlite")


def _in(n: int) -> str:
    return ",".join("?" * n)


def claim_sql(n_ids: int, n_queues: int, *, returning: bool = True, select: bool = False) -> str:
    """The claim statement for ``n_ids`` candidate ids (parameters: owner, ids, queues).

    "owner IS NULL" under the write lock is what makes a claim exclusive. NOT INDEXED
    keeps the rowid plan (rowid lookups are not an index, so they stay allowed): with
    bound parameters SQLite 3.40 would otherwise walk messages_ready over the queue.
    """
    where = f"owner IS NULL AND id IN ({_in(n_ids)}) AND queue IN ({_in(n_queues)})"
    cols = "id, queue, priority, redelivered, payload"
    if select:
        return f"SELECT {cols} FROM messages NOT INDEXED WHERE {where}"
    tail = f" RETURNING {cols}" if returning else ""
    return f"UPDATE messages NOT INDEXED SET owner = ? WHERE {where}{tail}"


def _delete(conn: Conn, ids: Sequence[int]) -> None:
    """Acked rows, one statement per 500 ids (under SQLite's variable limit)."""
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        conn.execute(f"DELETE FROM messages WHERE id IN ({_in(len(chunk))})", chunk)


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF in _BUSY_CODES if code is not None else "locked" in str(exc)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, someone else's
        pass
    return False


class _Busy(Exception):
    """The write lock (or, rarely, a read) was busy before anything ran: safe to retry."""


def _attempt(conn: Conn, fn: Callable[[Conn], T], txn: bool) -> T:
    """Run ``fn`` once, inside BEGIN IMMEDIATE ... COMMIT if ``txn``."""
    try:
        if not txn:
            return fn(conn)
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if _is_busy(exc):
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


# Publishers poke consumers and subscribers of the same file in this process, so
# in-process latency does not depend on the poll backoff.
_local_lock = threading.Lock()
_local: dict[str, set[Waker]] = {}


def _poke(path: str) -> None:
    with _local_lock:
        wakers = list(_local.get(path, ()))
    for w in wakers:
        w.wake()


def _watch(path: str, waker: Waker, on: bool) -> None:
    with _local_lock:
        if on:
            _local.setdefault(path, set()).add(waker)
        else:
            _local.get(path, set()).discard(waker)
