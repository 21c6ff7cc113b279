"""Celery message protocol v2: building task messages and reading them back.

Headers carry everything the worker needs before it decodes the body, so a worker can
route, expire, revoke and rate-limit without touching user data. The body is
``[args, kwargs, embed]`` with ``embed = {callbacks, errbacks, chain, chord}``.
Protocol v1 messages (everything in the body) are converted on receipt.
"""

from __future__ import annotations

import datetime as dt
import os
import reprlib
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from .exceptions import InvalidTaskError
from .serialization import compress, decompress, dumps, loads
from .transport.base import Envelope

_repr = reprlib.Repr()
_repr.maxstring = 1024
_repr.maxother = 1024
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 64
_repr.maxlevel = 4


def saferepr(obj: Any, maxsize: int = 1024) -> str:
    """A repr that never fails and never grows past ``maxsize``."""
    try:
        text = _repr.repr(obj)
    except Exception:  # a broken __repr__ must not break sending
        text = f"<unrepresentable {type(obj).__name__}>"
    return text if len(text) <= maxsize else text[: maxsize - 3] + "..."


_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"


def origin() -> str:
    return _ORIGIN


def _refresh_origin() -> None:
    global _ORIGIN
    _ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"


os.register_at_fork(after_in_child=_refresh_origin)


def iso(when: dt.datetime | None) -> str | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.isoformat()


def parse_iso(text: Any) -> dt.datetime | None:
    """Read an ``eta``/``expires`` header; naive times are taken as UTC."""
    if text is None or text == "":
        return None
    if isinstance(text, dt.datetime):
        when = text
    elif isinstance(text, int | float):
        return dt.datetime.fromtimestamp(float(text), dt.UTC)
    else:
        try:
            when = dt.datetime.fromisoformat(str(text))
        except ValueError:
            raise InvalidTaskError(f"invalid ISO-8601 time {text!r} in message header") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def build_task_message(
    *,
    name: str,
    task_id: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    serializer: str = "json",
    root_id: str | None = None,
    parent_id: str | None = None,
    group_id: str | None = None,
    group_index: int | None = None,
    eta: dt.datetime | None = None,
    expires: dt.datetime | None = None,
    retries: int = 0,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    callbacks: list[Any] | None = None,
    errbacks: list[Any] | None = None,
    chain: list[Any] | None = None,
    chord: Any = None,
    ignore_result: bool = False,
    priority: int | None = None,
    reply_to: str | None = None,
    persistent: bool = True,
    compression: str | None = None,
    shadow: str | None = None,
    headers: Mapping[str, Any] | None = None,
    argsrepr: str | None = None,
    kwargsrepr: str | None = None,
) -> Envelope:
    if not isinstance(args, list | tuple):
        raise TypeError(f"task args must be a list or tuple, not {type(args).__name__}")
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"task keyword arguments must be a mapping, not {type(kwargs).__name__}")
    hdrs: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": shadow,
        "eta": iso(eta),
        "expires": iso(expires),
        "group": group_id,
        "group_index": group_index,
        "retries": retries,
        "timelimit": [time_limit, soft_time_limit],
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": argsrepr if argsrepr is not None else saferepr(tuple(args)),
        "kwargsrepr": kwargsrepr if kwargsrepr is not None else saferepr(dict(kwargs)),
        "origin": _ORIGIN,
        "ignore_result": ignore_result,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    if headers:
        hdrs.update(headers)
    embed = {"callbacks": callbacks, "errbacks": errbacks, "chain": chain, "chord": chord}
    body, content_type, encoding = dumps([list(args), dict(kwargs), embed], serializer)
    if compression:
        body, hdrs["compression"] = compress(body, compression)
    return Envelope(
        body=body,
        headers=hdrs,
        content_type=content_type,
        content_encoding=encoding,
        priority=priority,
        correlation_id=task_id,
        reply_to=reply_to,
        persistent=persistent,
    )


def decode_body(
    env: Envelope, accept: frozenset[str] | None
) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """Decode a v2 body into ``(args, kwargs, embed)``; InvalidTaskError if malformed."""
    body = env.body
    if env.headers.get("compression"):
        body = decompress(body, str(env.headers["compression"]))
    decoded = loads(body, env.content_type, accept)
    if isinstance(decoded, dict) and "task" in decoded:  # protocol v1
        return (
            list(decoded.get("args") or ()),
            dict(decoded.get("kwargs") or {}),
            {
                "callbacks": decoded.get("callbacks"),
                "errbacks": decoded.get("errbacks"),
                "chain": None,
                "chord": decoded.get("chord"),
            },
        )
    if not isinstance(decoded, list | tuple) or len(decoded) != 3:
        raise InvalidTaskError("task body is not a [args, kwargs, embed] triple")
    args, kwargs, embed = decoded
    if not isinstance(args, list | tuple):
        raise InvalidTaskError(f"task args must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise InvalidTaskError(f"task kwargs must be a mapping, got {type(kwargs).__name__}")
    return list(args), kwargs, dict(embed or {})


def upgrade_v1(env: Envelope, accept: frozenset[str] | None) -> Envelope:
    """Give a protocol v1 message (task fields in the body) v2 headers and body."""
    body = loads(env.body, env.content_type, accept)
    if not isinstance(body, dict) or "task" not in body or "id" not in body:
        raise InvalidTaskError("message has no 'task' header and is not a protocol v1 task")
    tl = body.get("timelimit") or (None, None)
    return build_task_message(
        name=body["task"],
        task_id=body["id"],
        args=body.get("args") or [],
        kwargs=body.get("kwargs") or {},
        eta=parse_iso(body.get("eta")),
        expires=parse_iso(body.get("expires")),
        retries=int(body.get("retries") or 0),
        time_limit=tl[0],
        soft_time_limit=tl[1],
        callbacks=body.get("callbacks"),
        errbacks=body.get("errbacks"),
        chord=body.get("chord"),
        group_id=body.get("taskset"),
        priority=env.priority,
        reply_to=env.reply_to,
    )
