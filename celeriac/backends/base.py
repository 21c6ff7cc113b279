"""The result-backend contract, and ``KeyValueBackend`` which builds it on six primitives.

Key layout (Celery's, so Celery clients can read our results):

* ``celery-task-meta-<task_id>``: the task meta document (JSON by default)
  ``{"status", "result", "traceback", "children", "date_done", "task_id", ...}``
* ``celery-taskset-meta-<group_id>``: ``{"result": [[gid, null], [[[id, null], null], ...]]}``
* ``celery-taskset-meta-<group_id>.j``: chord join set; its members are header task ids,
  so a redelivered header task is counted once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import states
from ..serialization import codec

TASK_PREFIX = "celery-task-meta-"
GROUP_PREFIX = "celery-taskset-meta-"
JOIN_SUFFIX = ".j"


@dataclass(frozen=True, slots=True)
class ResultMeta:
    task_id: str
    status: str
    result: Any = None
    traceback: str | None = None
    children: Sequence[Any] = ()
    date_done: str | None = None
    extended: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.status in states.READY_STATES

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "status": self.status,
            "result": self.result,
            "traceback": self.traceback,
            "children": list(self.children),
            "date_done": self.date_done,
            "task_id": self.task_id,
        }
        doc.update(self.extended)
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ResultMeta:
        known = {"status", "result", "traceback", "children", "date_done", "task_id"}
        return cls(
            task_id=doc.get("task_id", ""),
            status=doc.get("status", states.PENDING),
            result=doc.get("result"),
            traceback=doc.get("traceback"),
            children=doc.get("children") or (),
            date_done=doc.get("date_done"),
            extended={k: v for k, v in doc.items() if k not in known},
        )


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class ResultBackend:
    """Stores task results, groups and chord joins; one instance per event loop."""

    persistent = True

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.options = dict(options or {})
        self.serializer = str(self.options.get("serializer", "json"))

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def store(
        self, meta: ResultMeta, *, ttl: float | None, reply_to: str | None = None
    ) -> None:
        """Store ``meta``; ``reply_to`` is the sending client's address (used by rpc://)."""
        raise NotImplementedError

    async def store_raw(
        self, task_id: str, data: bytes, *, ttl: float | None, reply_to: str | None = None
    ) -> None:
        """Store a meta document already encoded with this backend's serializer.

        Prefork children encode their results, so the parent never decodes user objects.
        """
        raise NotImplementedError

    async def get(self, task_id: str) -> ResultMeta | None:
        raise NotImplementedError

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, ResultMeta]:
        raise NotImplementedError

    def wait(
        self, task_ids: Sequence[str], *, timeout: float | None
    ) -> AsyncGenerator[ResultMeta, None]:
        """Yield each task's meta once it is ready; raise TimeoutError when time runs out."""
        raise NotImplementedError

    async def forget(self, task_id: str) -> None:
        raise NotImplementedError

    async def save_group(
        self, group_id: str, task_ids: Sequence[str], *, ttl: float | None
    ) -> None:
        raise NotImplementedError

    async def load_group(self, group_id: str) -> list[str] | None:
        raise NotImplementedError

    async def forget_group(self, group_id: str) -> None:
        raise NotImplementedError

    async def chord_join(
        self, group_id: str, task_id: str, size: int, *, ttl: float | None = None
    ) -> bool:
        """Count ``task_id`` as done in chord ``group_id``; true for exactly one caller."""
        raise NotImplementedError

    def encode(self, doc: Mapping[str, Any]) -> bytes:
        return codec(self.serializer).encode(doc)

    def decode(self, data: bytes) -> Any:
        return codec(self.serializer).decode(data)


class KeyValueBackend(ResultBackend):
    """Everything of :class:`ResultBackend` written once over six storage primitives."""

    async def _get(self, key: str) -> bytes | None:
        raise NotImplementedError

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        raise NotImplementedError

    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        raise NotImplementedError

    async def _delete(self, *keys: str) -> None:
        raise NotImplementedError

    async def _add_member(self, key: str, member: str, ttl: float | None) -> int:
        """Add ``member`` to the set at ``key``; return its 1-based insertion rank.

        For a new member that is the set's size after adding; a re-added member gets
        its first rank back, which is what makes ``chord_join`` idempotent.
        """
        raise NotImplementedError

    def _changes(self, keys: Sequence[str]) -> AsyncIterator[str] | None:
        """Push hints: yields keys that may have changed, or None to poll with backoff."""
        return None

    # -- the contract, written once ----------------------------------------

    async def store(
        self, meta: ResultMeta, *, ttl: float | None, reply_to: str | None = None
    ) -> None:
        await self.store_raw(meta.task_id, self.encode(meta.to_dict()), ttl=ttl)

    async def store_raw(
        self, task_id: str, data: bytes, *, ttl: float | None, reply_to: str | None = None
    ) -> None:
        await self._set(TASK_PREFIX + task_id, data, ttl)

    def _meta(self, task_id: str, raw: bytes | None) -> ResultMeta | None:
        if raw is None:
            return None
        doc = self.decode(raw)
        meta = ResultMeta.from_dict(doc)
        return meta if meta.task_id else ResultMeta.from_dict({**doc, "task_id": task_id})

    async def get(self, task_id: str) -> ResultMeta | None:
        return self._meta(task_id, await self._get(TASK_PREFIX + task_id))

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, ResultMeta]:
        raws = await self._mget([TASK_PREFIX + t for t in task_ids]) if task_ids else []
        out: dict[str, ResultMeta] = {}
        for tid, raw in zip(task_ids, raws, strict=True):
            meta = self._meta(tid, raw)
            if meta is not None:
                out[tid] = meta
        return out

    async def wait(
        self, task_ids: Sequence[str], *, timeout: float | None
    ) -> AsyncGenerator[ResultMeta, None]:
        pending = list(dict.fromkeys(task_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        # Subscribe before the first read, so a result stored in between is not missed.
        changes = self._changes([TASK_PREFIX + t for t in pending])
        if changes is not None:
            first = asyncio.ensure_future(anext(changes))
            await asyncio.sleep(0)
        delay = 0.001
        try:
            while pending:
                found = await self.get_many(pending)
                for tid in list(pending):
                    meta = found.get(tid)
                    if meta is not None and meta.ready:
                        pending.remove(tid)
                        yield meta
                if not pending:
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{len(pending)} result(s) not ready in time")
                if changes is not None:
                    done, _ = await asyncio.wait({first}, timeout=min(left or 1.0, 1.0))
                    if done and first.exception() is None:
                        first = asyncio.ensure_future(anext(changes))
                    elif done:  # the hint stream ended or broke: poll from now on
                        await changes.aclose()  # type: ignore[attr-defined]
                        changes = None
                else:
                    await asyncio.sleep(min(delay, left) if left is not None else delay)
                    delay = min(delay * 1.5, 0.05)
        finally:
            if changes is not None:
                first.cancel()
                await asyncio.wait({first})  # an async generator cannot aclose mid-anext
                await changes.aclose()  # type: ignore[attr-defined]

    async def forget(self, task_id: str) -> None:
        await self._delete(TASK_PREFIX + task_id)

    async def save_group(
        self, group_id: str, task_ids: Sequence[str], *, ttl: float | None
    ) -> None:
        doc = {"result": [[group_id, None], [[[t, None], None] for t in task_ids]]}
        await self._set(GROUP_PREFIX + group_id, self.encode(doc), ttl)

    async def load_group(self, group_id: str) -> list[str] | None:
        raw = await self._get(GROUP_PREFIX + group_id)
        if raw is None:
            return None
        doc = self.decode(raw)
        return [child[0][0] for child in doc["result"][1]]

    async def forget_group(self, group_id: str) -> None:
        join = GROUP_PREFIX + group_id + JOIN_SUFFIX
        await self._delete(GROUP_PREFIX + group_id, join, join + ".claim")

    async def chord_join(
        self, group_id: str, task_id: str, size: int, *, ttl: float | None = None
    ) -> bool:
        key = GROUP_PREFIX + group_id + JOIN_SUFFIX
        if await self._add_member(key, task_id, ttl) != size:
            return False
        # A redelivered member re-adds itself and sees the full size again. The claim
        # set remembers who completed the join: only that member (re-run after a crash
        # before its ack) may fire again, so the body is never lost and no other
        # member can publish it a second time.
        return await self._add_member(key + ".claim", task_id, ttl) == 1
