"""Result backend URL scheme -> backend class, imported only when used."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..transport import resolve
from .base import ResultBackend

BACKENDS: dict[str, str] = {
    "memory": "celeriac.backends.memory:MemoryBackend",
    "cache+memory": "celeriac.backends.memory:MemoryBackend",
    "sqlite": "celeriac.backends.sqlite:SQLiteBackend",
    "redis": "celeriac.backends.redis:RedisBackend",
    "rediss": "celeriac.backends.redis:RedisBackend",
    "redis+socket": "celeriac.backends.redis:RedisBackend",
    "disabled": "celeriac.backends.disabled:DisabledBackend",
    "rpc": "celeriac.backends.rpc:RPCBackend",
}


def create_backend(url: str, options: Mapping[str, Any] | None = None) -> ResultBackend:
    cls = resolve(BACKENDS, url, "result backend")
    backend: ResultBackend = cls(url, options)
    return backend
