"""The SQLite consumer: leased claims, batched acks, heartbeats, reaping, broadcast reads.

See ``celeriac/transport/sqlite.py`` for the tables and the lease rules.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING

from ._sqlite_common import (
    HAS_RETURNING,
    HOSTNAME,
    MAX_BATCH,
    POLL_MAX,
    POLL_MIN,
    REFILL_WHILE,
    SQL_BEAT,
    SQL_CANDIDATES,
    SQL_RETURN,
    SQL_UNSEEN,
    Conn,
    _delete,
    _pid_gone,
    _poke,
    claim_sql,
)
from .base import (
    Consumer,
    Delivery,
    Envelope,
    QueueSpec,
    TransportError,
    dead_letter_name,
    pack,
    unpack,
    with_dead_reason,
)
from .memory import Waker

if TYPE_CHECKING:
    from .sqlite import SQLiteTransport

logger = logging.getLogger("celeriac.transport.sqlite")  # one name for the whole transport


class _Backoff:
    """Poll delay from 1 ms doubling to 25 ms; a poke or a find resets it."""

    def __init__(self) -> None:
        self.waker = Waker()
        self.delay = POLL_MIN

    async def idle(self) -> None:
        poked = await self.waker.nap(self.delay)
        self.delay = POLL_MIN if poked else min(self.delay * 2, POLL_MAX)


class _BroadcastReader(_Backoff):
    """Yields payloads after a rowid cursor."""

    def __init__(self, transport: SQLiteTransport, channel: str, cursor: int) -> None:
        super().__init__()
        self._t, self._channel, self._cursor = transport, channel, cursor
        self._buffer: deque[bytes] = deque()

    def __aiter__(self) -> _BroadcastReader:
        return self

    async def __anext__(self) -> bytes:
        sql = "SELECT id, payload FROM broadcast WHERE id > ? AND channel = ? ORDER BY id LIMIT 500"
        while not self._buffer:
            rows = await self._t._read(
                lambda c: c.execute(sql, (self._cursor, self._channel)).fetchall()
            )
            if rows:
                self._cursor, self.delay = rows[-1][0], POLL_MIN
                self._buffer.extend(bytes(r[1]) for r in rows)
            else:
                await self.idle()
        return self._buffer.popleft()


def _raw(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    return str(payload).encode()


def _tag(delivery: Delivery) -> int:
    if not isinstance(delivery.tag, int):
        raise TransportError(f"delivery tag {delivery.tag!r} is not from the sqlite transport")
    return delivery.tag


class SQLiteConsumer(_Backoff, Consumer):
    """Leases rows by writing its owner id into them; the delivery tag is the row id.

    Writes are batched so a busy worker commits about once per group of acks: pending
    acks are deleted in the transaction of the next claim, an ack that finds no claim
    coming refills the prefetch window in its own transaction, and the heartbeat row is
    upserted at most once per ``heartbeat_interval``.
    """

    def __init__(
        self, transport: SQLiteTransport, queues: list[QueueSpec], prefetch: int, cid: str
    ) -> None:
        super().__init__()
        self._t = transport
        self._queues = queues
        self._prefetch = max(0, prefetch)
        self.consumer_id = cid
        # Unique per context, so a restarted worker with the same name never inherits
        # (and so never strands) the leases of its dead predecessor.
        self.owner = f"{cid}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.leased: set[int] = set()  # claimed, neither acked nor rejected
        self._buffer: deque[Delivery] = deque()
        self._closed = False
        self._ack_ids: list[int] = []  # acked; DELETE not committed yet
        self._ack_done: asyncio.Future[None] | None = None  # resolved by that commit
        self._flush_task: asyncio.Future[None] | None = None
        self._starved = False  # the iterator waits for a free prefetch slot
        self._pulled_at = -1e9  # time.monotonic() of the iterator's last delivery
        self._beat_at = 0.0
        # Never let the row age towards lease_timeout, even with a slow heartbeat.
        self._beat_every = min(transport.heartbeat_interval, transport.lease_timeout / 2)
        self.heartbeat_task: asyncio.Future[None] | None = None

    @property
    def queues(self) -> list[QueueSpec]:
        return list(self._queues)

    def __aiter__(self) -> SQLiteConsumer:
        return self

    async def __anext__(self) -> Delivery:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            free = self._free()
            if free == 0:
                self._starved = True
                try:
                    await self.waker.nap(None)  # an ack, reject or set_prefetch wakes us
                finally:
                    self._starved = False
                continue
            names = [q.name for q in self._queues]
            # Look first with a read, which never waits for (or takes) the write lock.
            ids = await self._t._read(partial(self._candidates, names=names, n=free))
            if ids:
                await self._commit(partial(self._claim, names=names, ids=ids), wake=False)
                self.delay = POLL_MIN
            else:
                await self.idle()
        self._pulled_at = time.monotonic()
        return self._buffer.popleft()

    def _free(self) -> int:
        if not self._queues:
            return 0
        if not self._prefetch:
            return MAX_BATCH
        return min(MAX_BATCH, max(0, self._prefetch - len(self.leased)))

    @staticmethod
    def _candidates(conn: Conn, names: list[str], n: int) -> list[int]:
        # One ordered index scan per queue, merged here: SQLite cannot merge several
        # index ranges in order and would sort the whole queues instead.
        now, rows = time.time(), []
        for name in names:
            rows += conn.execute(SQL_CANDIDATES, (name, now, n)).fetchall()
        if len(names) > 1:
            rows.sort(key=lambda r: (-r[1], r[0]))
        return [r[0] for r in rows[:n]]

    async def _commit(self, claim: Callable[[Conn], list[Delivery]], *, wake: bool) -> None:
        """One write transaction: the pending acks' DELETE, the heartbeat if due, ``claim``.

        The acks share the fate of the transaction: they are resolved after its COMMIT,
        or fail with its error.
        """
        taken: list[tuple[list[int], asyncio.Future[None]]] = []
        beat: list[float] = []

        def txn(conn: Conn) -> list[Delivery]:
            taken.clear()
            beat.clear()
            if self._ack_ids and self._ack_done is not None:
                taken.append((self._ack_ids, self._ack_done))
                self._ack_ids, self._ack_done = [], None
                _delete(conn, taken[0][0])
            if not self._closed and time.time() - self._beat_at >= self._beat_every:
                beat.append(self.beat(conn))
            return claim(conn)

        try:
            got = await self._t._write(txn)
        except BaseException as exc:
            for _, done in taken:
                done.set_exception(exc)
                done.exception()  # retrieved here too, in case every acker was cancelled
            raise
        if beat:
            self._beat_at = beat[0]
        if got:
            self.leased.update(_tag(d) for d in got)  # only once committed
            self._buffer += got
            if wake:  # the iterator may be napping; it did not claim these itself
                self.waker.wake()
        for _, done in taken:
            done.set_result(None)

    def _claim(self, conn: Conn, names: list[str], ids: list[int]) -> list[Delivery]:
        if self._closed:  # close() already returned our leases; take no more
            return []
        ids = ids[: self._free()]  # a refill may have filled the window since the read
        if not ids:
            return []
        args = (self.owner, *ids, *names)
        if HAS_RETURNING:
            rows = conn.execute(claim_sql(len(ids), len(names)), args).fetchall()
        else:  # pragma: no cover - SQLite < 3.35
            rows = conn.execute(claim_sql(len(ids), len(names), select=True), args[1:]).fetchall()
            conn.execute(claim_sql(len(ids), len(names), returning=False), args)
        out = []
        for row_id, queue, _, redelivered, payload in sorted(rows, key=lambda r: (-r[2], r[0])):
            try:
                if not isinstance(payload, bytes | str):
                    raise ValueError(f"payload is {type(payload).__name__}, not bytes")
                env, exchange, rkey, flagged = unpack(payload)
            except Exception as exc:  # any undecodable row must not stop the consumer
                self._bury(conn, row_id, queue, payload, str(exc) or type(exc).__name__)
                continue
            out.append(Delivery(env, queue, exchange, rkey, bool(redelivered or flagged), row_id))
        return out

    def _refill(self, conn: Conn) -> list[Delivery]:
        """Claim into the free prefetch slots inside an ack flush's transaction.

        Only with a prefetch limit (so the buffer stays bounded) and only while the
        worker still pulls deliveries: a stopped iterator (a warm shutdown) stops
        reserving messages other workers could run within ``REFILL_WHILE`` seconds.
        """
        if not self._prefetch or self._closed:
            return []
        free = self._free()
        if not free or time.monotonic() - self._pulled_at > REFILL_WHILE:
            return []
        names = [q.name for q in self._queues]
        ids = self._candidates(conn, names, free)
        return self._claim(conn, names, ids) if ids else []

    @staticmethod
    def _bury(conn: Conn, row_id: int, queue: str, payload: object, reason: str) -> None:
        dead = dead_letter_name(queue)
        env = Envelope(_raw(payload), {"x-dead-reason": reason}, "application/octet-stream")
        conn.execute(
            "UPDATE messages SET queue = ?, owner = NULL, priority = 0, not_before = 0, "
            "redelivered = 0, payload = ? WHERE id = ?",
            (dead, pack(env, "", queue), row_id),
        )
        logger.error("message %d in %r cannot be decoded (%s); moved to %r", row_id, queue,
                     reason, dead)  # fmt: skip

    # -- leases -----------------------------------------------------------------------

    def beat(self, conn: Conn) -> float:
        """Upsert our consumers row; returns the time written (kept once committed)."""
        now = time.time()
        conn.execute(SQL_BEAT, (self.owner, os.getpid(), HOSTNAME, now))
        return now

    async def register(self) -> None:
        self._beat_at = await self._t._write(self.beat)

    async def heartbeat(self) -> None:
        """Keep our leases alive and return the leases of dead consumers."""
        while True:
            await asyncio.sleep(self._t.heartbeat_interval)
            try:
                self._beat_at = await self._t._write(self._beat_checked)
                dead = await self._t._read(self._dead_consumers)
                if dead:
                    await self._t._write(partial(self._reap, dead=dead))
            except Exception as exc:  # keep beating: a missed beat only costs latency
                logger.warning("consumer %s heartbeat failed: %s", self.owner, exc)

    def _beat_checked(self, conn: Conn) -> float:
        now, sql = time.time(), "UPDATE consumers SET heartbeat = ? WHERE id = ?"
        if conn.execute(sql, (now, self.owner)).rowcount == 0:
            msg = "consumer %s was presumed dead (no heartbeat for %ss); its leases were returned"
            logger.warning(msg, self.owner, self._t.lease_timeout)
            self.beat(conn)
        return now

    def _dead_consumers(self, conn: Conn) -> dict[str, str]:
        now = time.time()
        dead = {}
        for cid, pid, host, beat in conn.execute(
            "SELECT * FROM consumers WHERE id != ?", (self.owner,)
        ):
            if beat < now - self._t.lease_timeout:
                dead[cid] = f"no heartbeat for {now - beat:.1f}s"
            elif host == HOSTNAME and _pid_gone(pid):
                dead[cid] = f"process {pid} is gone"
        return dead

    def _reap(self, conn: Conn, dead: dict[str, str]) -> None:
        still = self._dead_consumers(conn)  # re-check under the write lock
        for cid in (c for c in dead if c in still):
            returned = conn.execute(SQL_RETURN, (cid,)).rowcount
            conn.execute("DELETE FROM consumers WHERE id = ?", (cid,))
            logger.warning("consumer %s is dead (%s); returned its %d leased messages",
                           cid, still[cid], returned)  # fmt: skip

    # -- settling -------------------------------------------------------------------

    def _release(self, tags: Iterable[int]) -> None:
        self.leased.difference_update(tags)
        self.waker.wake()

    async def ack(self, delivery: Delivery) -> None:
        """Delete the row; returns once the DELETE committed.

        The DELETE rides in this consumer's next write: the iterator's claim if it is
        waiting for the slot this ack frees, else a flush scheduled now, which also
        refills the prefetch window. Acks of one loop tick share that commit.
        """
        tag = _tag(delivery)
        if self._ack_done is None:
            self._ack_done = asyncio.get_running_loop().create_future()
        done = self._ack_done
        self._ack_ids.append(tag)
        self.leased.discard(tag)
        if self._starved:
            self.waker.wake()
        if self._flush_task is None:
            self._flush_task = asyncio.ensure_future(self._flush())
        await asyncio.shield(done)

    async def _flush(self) -> None:
        try:
            if self._ack_ids:  # unless a claim carried them already
                await self._commit(self._refill, wake=True)
        except asyncio.CancelledError:
            # Cancelled while waiting for the lock (the loop is shutting down): these
            # acks never committed; their rows go back as unacked when we leave.
            if self._ack_done is not None:
                self._ack_done.cancel()
            self._ack_ids, self._ack_done = [], None
            raise
        except Exception as exc:  # the ackers raise it; nothing else to do here
            logger.debug("consumer %s: ack flush failed: %r", self.owner, exc)
        finally:
            self._flush_task = None

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        tag = _tag(delivery)
        # Guarded by owner: if we were reaped and someone else leased it, leave it alone.
        guard = "id = ? AND (owner = ? OR owner IS NULL)"
        if requeue:
            sql = f"UPDATE messages SET owner = NULL, redelivered = 1 WHERE {guard}"
            await self._t._run(sql, (tag, self.owner))
        else:
            env = with_dead_reason(delivery.envelope, reason or "rejected")
            payload = pack(env, delivery.exchange, delivery.routing_key)
            sql = ("UPDATE messages SET queue = ?, owner = NULL, redelivered = 0, not_before = 0, "
                   f"payload = ? WHERE {guard}")  # fmt: skip
            await self._t._run(sql, (dead_letter_name(delivery.queue), payload, tag, self.owner))
        self._release([tag])
        _poke(self._t.path)

    async def set_prefetch(self, count: int) -> None:
        self._prefetch = max(0, count)
        self.waker.wake()

    async def add_queue(self, queue: QueueSpec) -> None:
        await self._t.declare([queue])
        if all(q.name != queue.name for q in self._queues):
            self._queues.append(queue)
        self.waker.wake()

    async def cancel_queue(self, name: str) -> None:
        """Stop reading ``name``; claimed-but-unseen messages from it go straight back."""
        self._queues = [q for q in self._queues if q.name != name]
        back = [_tag(d) for d in self._buffer if d.queue == name]
        if back:
            self._buffer = deque(d for d in self._buffer if d.queue != name)
            args = [(t, self.owner) for t in back]
            await self._t._write(lambda c: c.executemany(SQL_UNSEEN, args))
            self._release(back)

    async def close(self) -> None:
        """Return every lease, flagged redelivered unless it was never handed out.

        Blocking inside, so it completes even while the worker is being cancelled.
        """
        self._closed = True
        self.waker.wake()
        if self.heartbeat_task is not None:
            self.heartbeat_task.cancel()
        # Acks not committed yet are deleted here, so they are not returned as unacked.
        acked, done = self._ack_ids, self._ack_done
        self._ack_ids, self._ack_done = [], None
        unseen = [(_tag(d), self.owner) for d in self._buffer]
        self._buffer.clear()

        def txn(conn: Conn) -> None:
            _delete(conn, acked)
            conn.executemany(SQL_UNSEEN, unseen)
            conn.execute(SQL_RETURN, (self.owner,))
            conn.execute("DELETE FROM consumers WHERE id = ?", (self.owner,))

        if self._t._conn is None:  # the transport was closed first: nothing to write to
            if done is not None:
                done.set_exception(TransportError(
                    f"SQLite broker {self._t.path!r} was closed before its consumer; "
                    f"{len(acked)} ack(s) were not committed"))  # fmt: skip
                done.exception()
        else:
            try:
                self._t._write_now(txn)
            except BaseException as exc:
                if done is not None:
                    done.set_exception(exc)
                    done.exception()
                raise
            if done is not None:
                done.set_result(None)
            _poke(self._t.path)
        self.leased.clear()
