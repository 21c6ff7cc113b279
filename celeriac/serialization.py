"""Codec registry: JSON (orjson) by default, msgpack if installed, pickle only when accepted.

JSON uses kombu's type envelope (``{"__type__": T, "__value__": V}``) for values JSON
cannot hold, so datetimes and decimals round-trip with Celery peers.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import pickle
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from .exceptions import ContentDisallowed, DecodeError

__all__ = [
    "Codec",
    "content_type_of",
    "dumps",
    "loads",
    "register_serializer",
]


@dataclass(frozen=True, slots=True)
class Codec:
    name: str
    content_type: str
    content_encoding: str
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


_by_name: dict[str, Codec] = {}
_by_type: dict[str, Codec] = {}


def register_serializer(
    name: str,
    encoder: Callable[[Any], bytes | str],
    decoder: Callable[[bytes], Any],
    content_type: str,
    content_encoding: str = "utf-8",
) -> None:
    """Register a codec under ``name`` and its MIME type (Celery's ``register``)."""

    def encode(obj: Any) -> bytes:
        out = encoder(obj)
        return out.encode(content_encoding) if isinstance(out, str) else out

    codec = Codec(name, content_type, content_encoding, encode, decoder)
    _by_name[name] = codec
    _by_type[content_type] = codec


# -- json -------------------------------------------------------------------

_JSON_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS


def _json_default(obj: Any) -> Any:
    if isinstance(obj, dt.datetime):
        return {"__type__": "datetime", "__value__": obj.isoformat()}
    if isinstance(obj, dt.date):
        return {"__type__": "date", "__value__": obj.isoformat()}
    if isinstance(obj, dt.time):
        return {"__type__": "time", "__value__": obj.isoformat()}
    if isinstance(obj, decimal.Decimal):
        return {"__type__": "decimal", "__value__": str(obj)}
    if isinstance(obj, uuid.UUID):  # kombu's form: UUID(**value) rebuilds it
        return {"__type__": "uuid", "__value__": {"hex": obj.hex, "version": obj.version}}
    if isinstance(obj, bytes | bytearray):
        try:
            return {"__type__": "bytes", "__value__": bytes(obj).decode("utf-8")}
        except UnicodeDecodeError:
            return {"__type__": "base64", "__value__": base64.b64encode(obj).decode()}
    if isinstance(obj, set | frozenset):
        return list(obj)
    if hasattr(obj, "__json__"):
        return obj.__json__()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_TYPE_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "decimal": decimal.Decimal,
    "uuid": lambda v: uuid.UUID(**v) if isinstance(v, dict) else uuid.UUID(v),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": base64.b64decode,
}


def _revive(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__type__" in obj and "__value__" in obj and len(obj) == 2:
            decoder = _TYPE_DECODERS.get(obj["__type__"])
            if decoder is not None:
                return decoder(obj["__value__"])
        return {k: _revive(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_revive(v) for v in obj]
    return obj


def _has_uuid(obj: Any, depth: int = 0) -> bool:
    cls = type(obj)
    if cls is str or cls is int or obj is None:  # the common leaves, cheaply
        return False
    if isinstance(obj, uuid.UUID):
        return True
    if depth > 64:  # orjson reports structures too deep to encode
        return False
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, list | tuple):
        return False
    for value in obj:  # noqa: SIM110 - a plain loop is cheaper than any() on this hot path
        if _has_uuid(value, depth + 1):
            return True
    return False


def _envelop_uuids(obj: Any) -> Any:
    if isinstance(obj, uuid.UUID):
        return _json_default(obj)
    if isinstance(obj, list | tuple):
        return [_envelop_uuids(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _envelop_uuids(v) for k, v in obj.items()}
    return obj


def json_dumps(obj: Any) -> bytes:
    # orjson writes a UUID as a bare string and has no pass-through option for it, so
    # UUIDs are wrapped first; Celery peers then receive uuid.UUID objects, as from kombu.
    if _has_uuid(obj):
        obj = _envelop_uuids(obj)
    return orjson.dumps(obj, default=_json_default, option=_JSON_OPTS)


def json_loads(data: bytes | str) -> Any:
    obj = orjson.loads(data)
    # Walking the tree is only needed when an envelope may be inside.
    marker = b'"__type__"' if isinstance(data, bytes) else '"__type__"'
    if marker in data:  # type: ignore[operator]
        return _revive(obj)
    return obj


register_serializer("json", json_dumps, json_loads, "application/json")


def _pickle_dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


register_serializer(
    "pickle", _pickle_dumps, pickle.loads, "application/x-python-serialize", "binary"
)

try:
    import msgpack

    def _msgpack_dumps(obj: Any) -> bytes:
        return msgpack.packb(obj, use_bin_type=True, default=_json_default)  # type: ignore[no-any-return]

    def _msgpack_loads(data: bytes) -> Any:
        return _revive(msgpack.unpackb(data, raw=False))

    register_serializer(
        "msgpack", _msgpack_dumps, _msgpack_loads, "application/x-msgpack", "binary"
    )
except ImportError:  # pragma: no cover - msgpack is optional
    pass


def _text_loads(data: bytes) -> Any:
    return data.decode()


register_serializer("text/plain", lambda s: str(s).encode(), _text_loads, "text/plain")


# -- lookups ----------------------------------------------------------------


def codec(name_or_type: str) -> Codec:
    """Find a codec by name (``json``) or MIME type (``application/json``)."""
    found = _by_name.get(name_or_type) or _by_type.get(name_or_type)
    if found is None:
        known = ", ".join(sorted(_by_name))
        raise ContentDisallowed(
            f"No serializer registered for {name_or_type!r}; known serializers: {known}"
        )
    return found


def content_type_of(name: str) -> str:
    return codec(name).content_type


def accepted_types(accept: Iterable[str]) -> frozenset[str]:
    """Turn ``accept_content`` (names or MIME types) into a set of MIME types."""
    return frozenset(codec(a).content_type for a in accept)


def dumps(obj: Any, serializer: str) -> tuple[bytes, str, str]:
    """Encode ``obj``; returns ``(body, content_type, content_encoding)``."""
    c = codec(serializer)
    try:
        return c.encode(obj), c.content_type, c.content_encoding
    except (TypeError, ValueError, orjson.JSONEncodeError) as exc:
        raise TypeError(f"Cannot serialize {obj!r:.200} with {c.name}: {exc}") from exc


def loads(data: bytes, content_type: str, accept: frozenset[str] | None = None) -> Any:
    """Decode ``data``, refusing content types outside ``accept`` (the pickle guard)."""
    if accept is not None and content_type not in accept:
        raise ContentDisallowed(
            f"Refusing to deserialize content of type {content_type!r}: it is not in "
            f"accept_content ({', '.join(sorted(accept))})"
        )
    c = _by_type.get(content_type)
    if c is None:
        raise ContentDisallowed(f"No decoder for content type {content_type!r}")
    try:
        return c.decode(data)
    except Exception as exc:
        raise DecodeError(f"Cannot decode {content_type} body: {exc}") from exc


# -- compression (header value is a MIME type, as kombu writes it) -----------

COMPRESSION = {"zlib": "application/x-gzip", "gzip": "application/x-gzip"}


def compress(data: bytes, method: str) -> tuple[bytes, str]:
    if method not in COMPRESSION:
        raise ValueError(f"Unknown compression {method!r}; use one of {sorted(COMPRESSION)}")
    return zlib.compress(data), COMPRESSION[method]


def decompress(data: bytes, mime: str) -> bytes:
    if mime in ("application/x-gzip", "zlib", "gzip"):
        return zlib.decompress(data)
    raise DecodeError(f"Unsupported compression {mime!r}")
