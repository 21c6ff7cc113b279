"""Broker URL scheme -> transport class, imported only when used."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import Any

from ..exceptions import ImproperlyConfigured
from .base import Transport

TRANSPORTS: dict[str, str] = {
    "memory": "celeriac.transport.memory:MemoryTransport",
    "sqlite": "celeriac.transport.sqlite:SQLiteTransport",
    "redis": "celeriac.transport.redis:RedisTransport",
    "rediss": "celeriac.transport.redis:RedisTransport",
    "redis+socket": "celeriac.transport.redis:RedisTransport",
    "sentinel": "celeriac.transport.redis:RedisTransport",
    "amqp": "celeriac.transport.amqp:AMQPTransport",
    "amqps": "celeriac.transport.amqp:AMQPTransport",
    "pyamqp": "celeriac.transport.amqp:AMQPTransport",
}


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else url.lower()


def resolve(table: Mapping[str, str], url: str, kind: str) -> type[Any]:
    """Import the class registered for ``url``'s scheme, with a did-you-mean on a typo."""
    scheme = scheme_of(url)
    target = table.get(scheme)
    if target is None:
        close = difflib.get_close_matches(scheme, table, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ImproperlyConfigured(
            f"Unknown {kind} scheme {scheme!r} in {url!r}.{hint} "
            f"Known schemes: {', '.join(sorted(table))}."
        )
    module, _, name = target.partition(":")
    try:
        cls: type[Any] = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"The {scheme!r} {kind} needs a package that is not installed: {exc}"
        ) from exc
    return cls


def create_transport(url: str, options: Mapping[str, Any] | None = None) -> Transport:
    cls = resolve(TRANSPORTS, url, "broker")
    transport: Transport = cls(url, options)
    return transport
