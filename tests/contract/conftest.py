"""Broker fixtures for the transport contract suite: memory, sqlite and Redis db 15.

A server that is down (or a transport module not written yet) fails the test under
``CI=true`` and skips it otherwise, as dramatiq's conftest does.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REDIS_BROKER_URL = "redis://127.0.0.1:6379/15"
#: Short leases so "a live consumer keeps its lease" is checked past the timeout.
LEASE_OPTIONS = {"lease_timeout": 1.5, "heartbeat_interval": 0.2}


@dataclass(frozen=True)
class Broker:
    kind: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def lease_timeout(self) -> float:
        return float(self.options.get("lease_timeout", 0.3))


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)")
    pytest.skip(reason)


def _redis_db15() -> Any:
    try:
        importlib.import_module("celeriac.transport.redis")
    except ImportError as exc:
        unavailable(f"celeriac.transport.redis cannot be imported: {exc}")
    import redis

    client = redis.Redis.from_url(REDIS_BROKER_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        client.close()
        unavailable(f"Redis is not reachable at {REDIS_BROKER_URL}: {exc}")
    return client


@pytest.fixture(params=["memory", "sqlite", "redis"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    kind = request.param
    if kind == "memory":
        from celeriac.transport import memory

        url = f"memory://contract-{uuid.uuid4().hex}"
        yield Broker(kind, url)
        memory.reset(url)
    elif kind == "sqlite":
        yield Broker(kind, f"sqlite:///{tmp_path / 'broker.sqlite'}", dict(LEASE_OPTIONS))
    else:
        client = _redis_db15()
        client.flushdb()
        try:
            yield Broker(kind, REDIS_BROKER_URL, dict(LEASE_OPTIONS))
        finally:
            client.flushdb()
            client.close()


@pytest.fixture
def sqlite_broker(tmp_path: Path) -> Broker:
    return Broker("sqlite", f"sqlite:///{tmp_path / 'broker.sqlite'}", dict(LEASE_OPTIONS))
