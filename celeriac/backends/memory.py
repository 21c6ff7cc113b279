"""In-process result backend, for tests and single-process apps.

Storage layout: one ``_Store`` per URL (``memory://`` and ``cache+memory://`` with the
same remainder share one), held in a module-level table so every backend instance in
the process sees the same results, whichever thread or event loop it runs on.

* ``values``: key -> ``(value bytes, expires)``: task meta and group documents.
* ``sets``: key -> ``({member: rank}, expires)``: chord join and claim sets; rank is
  the member's 1-based insertion position (see ``MemoryBackend._add_member``).
* ``watches``: key -> the ``_Watch`` objects of ``wait`` calls interested in it.

``expires`` is a ``time.monotonic()`` deadline or None. Expired entries read as
missing and are dropped when read and by an occasional sweep on write.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import KeyValueBackend

__all__ = ["MemoryBackend", "reset"]

_SWEEP_EVERY = 1000  # writes between sweeps of expired entries


class _Watch:
    """Keys one ``wait`` call watches; stores on any thread wake its own loop."""

    def __init__(self, store: _Store, keys: Sequence[str]) -> None:
        self._store = store
        self._keys = list(dict.fromkeys(keys))
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        with store.lock:
            for key in self._keys:
                store.watches.setdefault(key, set()).add(self)

    def notify(self, key: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, key)
        except RuntimeError:  # the waiter's loop is closed; it will never read again
            self._remove()

    def __aiter__(self) -> _Watch:
        return self

    async def __anext__(self) -> str:
        return await self._queue.get()

    async def aclose(self) -> None:
        self._remove()

    def _remove(self) -> None:
        with self._store.lock:
            for key in self._keys:
                watchers = self._store.watches.get(key)
                if watchers is not None:
                    watchers.discard(self)
                    if not watchers:
                        del self._store.watches[key]


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    values: dict[str, tuple[bytes, float | None]] = field(default_factory=dict)
    sets: dict[str, tuple[dict[str, int], float | None]] = field(default_factory=dict)
    watches: dict[str, set[_Watch]] = field(default_factory=dict)
    writes: int = 0

    def sweep(self, now: float) -> None:
        """Drop expired entries; the caller holds the lock."""
        for table in (self.values, self.sets):
            dead = [k for k, (_, exp) in table.items() if exp is not None and exp <= now]
            for key in dead:
                del table[key]


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


def _name(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/") if "://" in url else ""


def _store_for(url: str) -> _Store:
    with _stores_lock:
        return _stores.setdefault(_name(url), _Store())


def reset(url: str | None = None) -> None:
    """Forget everything stored for ``url`` (or for every URL); for tests.

    Stores are emptied in place, so instances made before the reset keep sharing
    state with those made after it.
    """
    with _stores_lock:
        stores = list(_stores.values()) if url is None else [_stores.get(_name(url))]
    for store in stores:
        if store is not None:
            with store.lock:
                store.values.clear()
                store.sets.clear()


def _deadline(ttl: float | None) -> float | None:
    return None if ttl is None else time.monotonic() + ttl


def _live(expires: float | None, now: float) -> bool:
    return expires is None or expires > now


class MemoryBackend(KeyValueBackend):
    """Results in process memory, shared by every instance with the same URL."""

    def __init__(self, url: str = "memory://", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self._store = _store_for(url)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None  # the state outlives the instance, as a server's would

    reset = staticmethod(reset)

    async def _get(self, key: str) -> bytes | None:
        return (await self._mget([key]))[0]

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        store, now = self._store, time.monotonic()
        out: list[bytes | None] = []
        with store.lock:
            for key in keys:
                entry = store.values.get(key)
                if entry is None:
                    out.append(None)
                elif _live(entry[1], now):
                    out.append(entry[0])
                else:
                    del store.values[key]
                    out.append(None)
        return out

    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        store = self._store
        with store.lock:
            store.values[key] = (value, _deadline(ttl))
            store.writes += 1
            if store.writes % _SWEEP_EVERY == 0:
                store.sweep(time.monotonic())
            watchers = list(store.watches.get(key, ()))
        for watch in watchers:
            watch.notify(key)

    async def _delete(self, *keys: str) -> None:
        store = self._store
        with store.lock:
            for key in keys:
                store.values.pop(key, None)
                store.sets.pop(key, None)

    async def _add_member(self, key: str, member: str, ttl: float | None) -> int:
        """The member's 1-based insertion rank: the set's size after adding a new member.

        A re-added member gets its first rank back, not the current size, so a chord
        member redelivered after the join completed can never look like the completer.
        """
        store, now = self._store, time.monotonic()
        with store.lock:
            entry = store.sets.get(key)
            if entry is None or not _live(entry[1], now):
                entry = ({}, None)
            ranks, expires = entry
            rank = ranks.setdefault(member, len(ranks) + 1)
            store.sets[key] = (ranks, expires if ttl is None else now + ttl)
            return rank

    def _changes(self, keys: Sequence[str]) -> _Watch:
        return _Watch(self._store, keys)
