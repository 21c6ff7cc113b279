"""``rpc://``: results travel back to the client that sent the task, over the broker.

Nothing is stored. Each client process has an address (``oid``); its task messages carry
it as ``reply_to``, and the worker broadcasts each result document on the broker channel
``celeriac.rpc.<oid>``, which only that client listens to. So, as with Celery's rpc
backend, only the sender can read a result, results live in the client's memory, and
chords are not possible (a worker cannot read its siblings' results): building one raises
NotSupported. Use ``redis://`` or ``sqlite://`` for those.

The client subscribes before its first send, so no reply can be missed; a sync client's
replies wait in the subscription (broker side) until its next ``get()`` runs the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from ..exceptions import NotSupported
from ..transport.base import Transport
from .base import ResultBackend, ResultMeta

logger = logging.getLogger(__name__)

CHANNEL = "celeriac.rpc."

_oid = str(uuid.uuid4())


def _new_oid() -> None:
    global _oid
    _oid = str(uuid.uuid4())


os.register_at_fork(after_in_child=_new_oid)


def oid() -> str:
    """This process's reply address."""
    return _oid


class RPCBackend(ResultBackend):
    """Results as replies to the sending client (Celery's ``rpc://``)."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        transport = self.options.get("transport")
        if not isinstance(transport, Transport):
            raise NotSupported("rpc:// results need the app's broker connection")
        self.transport = transport
        self._results: dict[str, ResultMeta] = {}
        self._changed: asyncio.Event | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None

    async def listen(self) -> None:
        """Subscribe to this client's reply channel (before the first send)."""
        if self._reader is None:
            self._changed, self._ready = asyncio.Event(), asyncio.Event()
            self._reader = asyncio.get_running_loop().create_task(self._read(oid()))
        assert self._ready is not None
        await self._ready.wait()

    async def _read(self, address: str) -> None:
        assert self._ready is not None and self._changed is not None
        async with self.transport.subscribe(CHANNEL + address) as replies:
            self._ready.set()
            async for payload in replies:
                try:
                    meta = ResultMeta.from_dict(self.decode(payload))
                except Exception as exc:
                    logger.error("Ignoring an rpc reply that cannot be decoded: %s", exc)
                    continue
                self._results[meta.task_id] = meta
                self._changed.set()

    # -- worker side ---------------------------------------------------------------------

    async def store(
        self, meta: ResultMeta, *, ttl: float | None, reply_to: str | None = None
    ) -> None:
        await self.store_raw(meta.task_id, self.encode(meta.to_dict()), ttl=ttl, reply_to=reply_to)

    async def store_raw(
        self, task_id: str, data: bytes, *, ttl: float | None, reply_to: str | None = None
    ) -> None:
        if not reply_to:
            logger.debug("rpc result of %s has no reply_to; nobody is waiting for it", task_id)
            return
        await self.transport.broadcast(CHANNEL + reply_to, data)

    # -- client side ---------------------------------------------------------------------

    async def get(self, task_id: str) -> ResultMeta | None:
        await self.listen()
        await asyncio.sleep(0)  # let the reader take what has arrived
        return self._results.get(task_id)

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, ResultMeta]:
        await self.listen()
        await asyncio.sleep(0)
        return {t: self._results[t] for t in task_ids if t in self._results}

    async def wait(
        self, task_ids: Sequence[str], *, timeout: float | None
    ) -> AsyncGenerator[ResultMeta, None]:
        await self.listen()
        assert self._changed is not None
        pending = list(dict.fromkeys(task_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            for tid in list(pending):
                meta = self._results.get(tid)
                if meta is not None and meta.ready:
                    pending.remove(tid)
                    yield meta
            if not pending:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"{len(pending)} result(s) not ready in time")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=left)

    async def forget(self, task_id: str) -> None:
        self._results.pop(task_id, None)

    async def save_group(
        self, group_id: str, task_ids: Sequence[str], *, ttl: float | None
    ) -> None:
        raise NotSupported(
            "The rpc:// result backend cannot save groups or run chords: a worker cannot "
            "read the other members' results. Set result_backend to redis://... or sqlite://."
        )

    async def load_group(self, group_id: str) -> list[str] | None:
        await self.save_group(group_id, (), ttl=None)
        return None

    async def forget_group(self, group_id: str) -> None:
        return None

    async def chord_join(
        self, group_id: str, task_id: str, size: int, *, ttl: float | None = None
    ) -> bool:
        await self.save_group(group_id, (), ttl=None)
        return False
