"""Worker side of remote control: the command registry and its handlers.

Handlers take the worker (any :class:`ControlTarget`) and the request's arguments as
keywords, and return something JSON-able. Users add their own exactly as in Celery::

    from celeriac.worker.commands import control_command

    @control_command(args=[("n", int)], signature="[N=1]")
    def increase_prefetch_count(worker, n=1):
        ...
        return {"ok": "prefetch count incremented"}

``dispatch`` decides whether a request is for this node and runs the handler;
``serve`` is the worker loop's listener over the transport's broadcast channel.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import os
import platform
import re
import signal as _signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Literal, Protocol, overload

from ..control import PIDBOX_CHANNEL, decode, encode, reply_channel
from ..transport.base import redact_url

__all__ = [
    "COMMANDS",
    "Command",
    "ControlTarget",
    "control_command",
    "dispatch",
    "handle_message",
    "inspect_command",
    "serve",
]

logger = logging.getLogger(__name__)


class ControlTarget(Protocol):
    """What command handlers need from a worker (``WorkController`` implements it).

    ``shutdown`` must only start the shutdown: the reply is sent after it returns.
    A target may also offer ``send_heartbeat()`` (sync or async) for ``heartbeat``.
    """

    hostname: str
    app: Any
    revoked: set[str]
    events_enabled: bool

    def active_requests(self) -> list[dict[str, Any]]: ...
    def reserved_requests(self) -> list[dict[str, Any]]: ...
    def scheduled_requests(self) -> list[dict[str, Any]]: ...
    def stats(self) -> dict[str, Any]: ...
    def active_queues(self) -> list[dict[str, Any]]: ...
    async def add_consumer(
        self, queue: str, exchange: str | None, exchange_type: str, routing_key: str | None
    ) -> None: ...
    async def cancel_consumer(self, queue: str) -> None: ...
    def revoke(self, ids: list[str], terminate: bool, signal: str) -> None: ...
    def set_rate_limit(self, task_name: str, rate: str | None) -> None: ...
    def set_time_limit(self, task_name: str, soft: float | None, hard: float | None) -> None: ...
    def pool_grow(self, n: int) -> None: ...
    def pool_shrink(self, n: int) -> None: ...
    def autoscale(self, max: int, min: int) -> None: ...
    def shutdown(self) -> None: ...
    def enable_events(self) -> bool: ...
    def disable_events(self) -> bool: ...
    def clock(self) -> int: ...


Handler = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Command:
    """A registered command; ``args`` and ``variadic`` tell the CLI how to parse ARGS."""

    name: str
    kind: Literal["inspect", "control"]
    handler: Handler
    args: tuple[tuple[str, Callable[[str], Any]], ...] = ()
    variadic: str | None = None
    signature: str = ""
    help: str = ""
    default_timeout: float = 1.0
    aliases: tuple[str, ...] = field(default=())

    def required(self) -> list[str]:
        """Argument names the handler cannot do without (no default)."""
        params = list(inspect.signature(self.handler).parameters.values())[1:]
        return [
            p.name
            for p in params
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]


COMMANDS: dict[str, Command] = {}
_ALIASES: dict[str, str] = {}


def lookup(name: str) -> Command | None:
    return COMMANDS.get(_ALIASES.get(name, name))


def _register(
    kind: Literal["inspect", "control"],
    fn: Handler | None,
    name: str | None,
    args: list[tuple[str, Callable[[str], Any]]] | None,
    variadic: str | None,
    signature: str | None,
    help: str | None,
    default_timeout: float,
    alias: str | None,
) -> Any:
    def decorate(handler: Handler) -> Handler:
        cmd_name = name or handler.__name__
        doc = help or (inspect.getdoc(handler) or "").split("\n", 1)[0]
        COMMANDS[cmd_name] = Command(
            name=cmd_name,
            kind=kind,
            handler=handler,
            args=tuple(args or ()),
            variadic=variadic,
            signature=signature or "",
            help=doc,
            default_timeout=default_timeout,
            aliases=(alias,) if alias else (),
        )
        if alias:
            _ALIASES[alias] = cmd_name
        return handler

    return decorate(fn) if fn is not None else decorate


@overload
def inspect_command(fn: Handler, /) -> Handler: ...
@overload
def inspect_command(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    args: list[tuple[str, Callable[[str], Any]]] | None = None,
    variadic: str | None = None,
    signature: str | None = None,
    help: str | None = None,
    default_timeout: float = 1.0,
    alias: str | None = None,
) -> Callable[[Handler], Handler]: ...
def inspect_command(
    fn: Handler | None = None,
    /,
    *,
    name: str | None = None,
    args: list[tuple[str, Callable[[str], Any]]] | None = None,
    variadic: str | None = None,
    signature: str | None = None,
    help: str | None = None,
    default_timeout: float = 1.0,
    alias: str | None = None,
) -> Any:
    """Register a read-only command (shown by ``celeriac inspect``)."""
    return _register("inspect", fn, name, args, variadic, signature, help, default_timeout, alias)


@overload
def control_command(fn: Handler, /) -> Handler: ...
@overload
def control_command(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    args: list[tuple[str, Callable[[str], Any]]] | None = None,
    variadic: str | None = None,
    signature: str | None = None,
    help: str | None = None,
    default_timeout: float = 1.0,
    alias: str | None = None,
) -> Callable[[Handler], Handler]: ...
def control_command(
    fn: Handler | None = None,
    /,
    *,
    name: str | None = None,
    args: list[tuple[str, Callable[[str], Any]]] | None = None,
    variadic: str | None = None,
    signature: str | None = None,
    help: str | None = None,
    default_timeout: float = 1.0,
    alias: str | None = None,
) -> Any:
    """Register a command that changes the worker (shown by ``celeriac control``)."""
    return _register("control", fn, name, args, variadic, signature, help, default_timeout, alias)


def ok(value: Any) -> dict[str, Any]:
    return {"ok": value}


def nok(value: Any) -> dict[str, Any]:
    return {"error": value}


# -- dispatch -------------------------------------------------------------------


def _is_for(hostname: str, request: Mapping[str, Any]) -> bool:
    destination = request.get("destination")
    if destination:
        return hostname in destination
    pattern = request.get("pattern")
    if pattern:
        matcher = request.get("matcher") or "glob"
        if matcher == "pcre":
            return re.search(pattern, hostname) is not None
        return fnmatch.fnmatchcase(hostname, pattern)
    return True


async def dispatch(target: ControlTarget, request: Mapping[str, Any]) -> dict[str, Any] | None:
    """Run the request's command; ``{hostname: result}``, or None if it is not for us."""
    if not _is_for(target.hostname, request):
        return None
    expires = request.get("expires")
    method = request.get("method")
    if expires and time.time() > float(expires):
        logger.debug("Dropping expired remote-control request %r", method)
        return None
    command = lookup(str(method))
    if command is None:
        return {target.hostname: nok(f"unknown command {method!r}")}
    arguments = request.get("arguments") or {}
    try:
        result = command.handler(target, **arguments)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:
        logger.exception("Remote-control command %r failed", method)
        result = nok(repr(exc))
    return {target.hostname: result}


async def handle_message(target: ControlTarget, transport: Any, raw: bytes) -> None:
    """Decode one broadcast request, run it, and publish the reply if one is wanted."""
    try:
        request = decode(raw)
    except ValueError:
        logger.warning("Ignoring a remote-control request that is not JSON: %r", raw[:200])
        return
    if not isinstance(request, dict):
        return
    reply = await dispatch(target, request)
    reply_to = request.get("reply_to")
    if reply is None or not isinstance(reply_to, dict) or not reply_to.get("routing_key"):
        return
    payload = encode({"ticket": request.get("ticket"), "node": reply})
    await transport.broadcast(reply_channel(str(reply_to["routing_key"])), payload)


async def serve(
    target: ControlTarget, transport: Any, ready: Callable[[], None] | None = None
) -> None:
    """Answer remote-control requests until cancelled; ``ready`` runs once subscribed."""
    async with transport.subscribe(PIDBOX_CHANNEL) as stream:
        if ready is not None:
            ready()
        async for raw in stream:
            try:
                await handle_message(target, transport, raw)
            except Exception:  # one bad request must not end the listener
                logger.exception("Remote-control request failed")


# -- inspect commands -----------------------------------------------------------


@inspect_command
def ping(target: ControlTarget, **_: Any) -> dict[str, Any]:
    """Ping the workers."""
    return ok("pong")


@inspect_command(alias="dump_active")
def active(target: ControlTarget, safe: bool | None = None, **_: Any) -> list[dict[str, Any]]:
    """Tasks being executed right now."""
    return target.active_requests()


@inspect_command(alias="dump_reserved")
def reserved(target: ControlTarget, safe: bool | None = None, **_: Any) -> list[dict[str, Any]]:
    """Tasks received and waiting for a free pool slot."""
    return target.reserved_requests()


@inspect_command(alias="dump_schedule")
def scheduled(target: ControlTarget, safe: bool | None = None, **_: Any) -> list[dict[str, Any]]:
    """Tasks with an ETA or countdown held by this worker."""
    return target.scheduled_requests()


@inspect_command(alias="dump_revoked")
def revoked(target: ControlTarget, **_: Any) -> list[str]:
    """Ids of the tasks this worker knows are revoked."""
    return sorted(target.revoked)


DEFAULT_TASK_INFO_ITEMS = ("exchange", "routing_key", "rate_limit")


@inspect_command(
    alias="dump_tasks",
    variadic="taskinfoitems",
    signature="[attr1 [attr2 [... [attrN]]]]",
)
def registered(
    target: ControlTarget,
    taskinfoitems: list[str] | None = None,
    builtins: bool = False,
    **_: Any,
) -> list[str]:
    """Names of the registered tasks (with attributes that are set, as Celery shows them)."""
    items = taskinfoitems or DEFAULT_TASK_INFO_ITEMS
    tasks = target.app.tasks
    out = []
    for name in sorted(tasks):
        if not builtins and name.startswith(("celery.", "celeriac.")):
            continue
        task = tasks[name]
        fields = [
            f"{item}={getattr(task, item)}"
            for item in items
            if getattr(task, item, None) is not None
        ]
        out.append(f"{name} [{' '.join(fields)}]" if fields else name)
    return out


@inspect_command
def stats(target: ControlTarget, **_: Any) -> dict[str, Any]:
    """Statistics: pool, prefetch, totals, uptime, broker."""
    return target.stats()


@inspect_command
def active_queues(target: ControlTarget, **_: Any) -> list[dict[str, Any]]:
    """The queues this worker consumes from."""
    return target.active_queues()


@inspect_command(variadic="ids", signature="[id1 [id2 [... [idN]]]]")
def query_task(target: ControlTarget, ids: str | list[str], **_: Any) -> dict[str, Any]:
    """State and request of tasks by id, if this worker holds them."""
    wanted = {ids} if isinstance(ids, str) else set(ids)
    found: dict[str, Any] = {}
    for state, requests in (
        ("active", target.active_requests()),
        ("reserved", target.reserved_requests()),
    ):
        for request in requests:
            if request.get("id") in wanted:
                found.setdefault(request["id"], [state, request])
    for entry in target.scheduled_requests():
        request = entry.get("request", entry)
        if request.get("id") in wanted:
            found.setdefault(request["id"], ["scheduled", request])
    return found


_HIDDEN = re.compile(
    r"pass|secret|token|api_?key|signature|private|credential|^security_key$", re.I
)
_MASK = "********"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_url(value) if "://" in value else value
    if isinstance(value, Mapping):
        return {
            str(k): _MASK if _HIDDEN.search(str(k)) else _jsonable(v)
            for k, v in value.items()
            if not str(k).startswith("__")
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return repr(value)


def _settings(app: Any, with_defaults: bool) -> dict[str, Any]:
    conf = app.conf
    table = getattr(conf, "table", None)
    if callable(table):
        return dict(table(with_defaults=with_defaults))
    return {str(k): conf[k] for k in conf}


@inspect_command(alias="dump_conf", signature="[include_defaults=False]")
def conf(target: ControlTarget, with_defaults: bool = False, **_: Any) -> Any:
    """The worker's configuration, with passwords and secrets hidden."""
    return _jsonable(_settings(target.app, with_defaults))


def _bugreport(app: Any) -> str:
    custom = getattr(app, "bugreport", None)
    if callable(custom):
        return str(custom())
    try:
        from importlib.metadata import version

        ours = version("celeriac")
    except Exception:
        ours = "unknown"
    conf = app.conf
    broker = redact_url(str(conf.get("broker_url") or ""))
    backend = redact_url(str(conf.get("result_backend") or ""))
    return (
        f"software -> celeriac:{ours} py:{platform.python_version()}\n"
        f"platform -> system:{platform.system()} arch:{platform.machine()} "
        f"kernel version:{platform.release()} imp:{platform.python_implementation()}\n"
        f"settings -> transport:{broker.split('://', 1)[0]} results:{backend or 'disabled'}\n"
        f"executable -> {sys.executable} pid:{os.getpid()}\n"
    )


@inspect_command
def report(target: ControlTarget, **_: Any) -> dict[str, Any]:
    """Software and platform versions, for bug reports."""
    return ok(_bugreport(target.app))


@inspect_command
def clock(target: ControlTarget, **_: Any) -> dict[str, Any]:
    """The worker's logical (Lamport) clock."""
    return {"clock": target.clock()}


# -- control commands -----------------------------------------------------------


@control_command
def enable_events(target: ControlTarget, **_: Any) -> dict[str, Any]:
    """Start sending task events."""
    if target.enable_events():
        logger.info("Events of group {task} enabled by remote.")
        return ok("task events enabled")
    return ok("task events already enabled")


@control_command
def disable_events(target: ControlTarget, **_: Any) -> dict[str, Any]:
    """Stop sending task events."""
    if target.disable_events():
        logger.info("Events of group {task} disabled by remote.")
        return ok("task events disabled")
    return ok("task events already disabled")


_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(?:/\s*([smh]))?\s*$")


def _check_rate(rate: Any) -> str | None:
    """Validate a Celery rate ("10/m", "2/s", "100"); None or 0 means no limit."""
    if rate is None or rate == "":
        return None
    match = _RATE.match(str(rate))
    if match is None:
        raise ValueError(f"{rate!r} is not a rate: use N, N/s, N/m or N/h")
    return None if float(match.group(1)) == 0 else str(rate).strip()


@control_command(
    args=[("task_name", str), ("rate_limit", str)],
    signature="<task_name> <rate_limit (e.g., 5/s | 5/m | 5/h)>",
)
def rate_limit(target: ControlTarget, task_name: str, rate_limit: Any, **_: Any) -> Any:
    """Set the rate limit of a task type (0 removes it)."""
    try:
        rate = _check_rate(rate_limit)
    except ValueError as exc:
        return nok(f"Invalid rate limit string: {exc!r}")
    if task_name not in target.app.tasks:
        logger.error("Rate limit attempt for unknown task %s", task_name)
        return nok("unknown task")
    target.set_rate_limit(task_name, rate)
    if rate is None:
        logger.info("Rate limits disabled for tasks of type %s", task_name)
        return ok("rate limit disabled successfully")
    logger.info("New rate limit for tasks of type %s: %s.", task_name, rate)
    return ok("new rate limit set successfully")


@control_command(
    args=[("task_name", str), ("soft", float), ("hard", float)],
    signature="<task_name> <soft_secs> [hard_secs]",
)
def time_limit(
    target: ControlTarget,
    task_name: str,
    soft: float | None = None,
    hard: float | None = None,
    **_: Any,
) -> dict[str, Any]:
    """Set the soft and hard time limits (seconds) of a task type."""
    if task_name not in target.app.tasks:
        logger.error("Change time limit attempt for unknown task %s", task_name)
        return nok("unknown task")
    target.set_time_limit(
        task_name, None if soft is None else float(soft), None if hard is None else float(hard)
    )
    logger.info("New time limits for tasks of type %s: soft=%s hard=%s", task_name, soft, hard)
    return ok("time limits set successfully")


@control_command(
    args=[("queue", str), ("exchange", str), ("exchange_type", str), ("routing_key", str)],
    signature="<queue> [exchange [type [routing_key]]]",
)
async def add_consumer(
    target: ControlTarget,
    queue: str,
    exchange: str | None = None,
    exchange_type: str | None = None,
    routing_key: str | None = None,
    **_: Any,
) -> dict[str, Any]:
    """Start consuming from a queue."""
    if any(q.get("name") == queue for q in target.active_queues()):
        return ok(f"already consuming from {queue}")
    await target.add_consumer(queue, exchange, exchange_type or "direct", routing_key)
    return ok(f"add consumer {queue}")


@control_command(args=[("queue", str)], signature="<queue>")
async def cancel_consumer(target: ControlTarget, queue: str, **_: Any) -> dict[str, Any]:
    """Stop consuming from a queue."""
    await target.cancel_consumer(queue)
    return ok(f"no longer consuming from {queue}")


@control_command(args=[("n", int)], signature="[N=1]")
def pool_grow(target: ControlTarget, n: int = 1, **_: Any) -> dict[str, Any]:
    """Add N processes (threads) to the pool."""
    target.pool_grow(int(n))
    return ok("pool will grow")


@control_command(args=[("n", int)], signature="[N=1]")
def pool_shrink(target: ControlTarget, n: int = 1, **_: Any) -> dict[str, Any]:
    """Remove N processes (threads) from the pool."""
    target.pool_shrink(int(n))
    return ok("pool will shrink")


@control_command(args=[("max", int), ("min", int)], signature="[max [min]]")
def autoscale(target: ControlTarget, max: int, min: int = 0, **_: Any) -> dict[str, Any]:
    """Change the --autoscale bounds."""
    target.autoscale(int(max), int(min))
    return ok(f"autoscale now max={max} min={min}")


def _signal_name(sig: Any) -> str:
    """Accept 9, "KILL", "SIGKILL" (any case) and give "SIGKILL"; errors name the value."""
    text = str(sig or "SIGTERM").strip().upper()
    if text.isdigit():
        return _signal.Signals(int(text)).name
    name = text if text.startswith("SIG") else "SIG" + text
    if name not in _signal.Signals.__members__:
        raise ValueError(f"unknown signal {sig!r}")
    return name


@control_command(variadic="task_id", signature="[id1 [id2 [... [idN]]]]")
def revoke(
    target: ControlTarget,
    task_id: str | list[str],
    terminate: bool = False,
    signal: str | int | None = None,
    **_: Any,
) -> dict[str, Any]:
    """Revoke tasks by id (with terminate, also kill them if they are running)."""
    ids = [task_id] if isinstance(task_id, str) else [str(i) for i in task_id]
    signame = _signal_name(signal)
    target.revoke(ids, bool(terminate), signame)
    idstr = ", ".join(ids)
    logger.info("Tasks flagged as revoked: %s", idstr)
    return ok(f"tasks {idstr} flagged as revoked")


@control_command
def shutdown(target: ControlTarget, msg: str = "Got shutdown from remote", **_: Any) -> Any:
    """Shut the worker down (warm: running tasks finish first)."""
    logger.warning(msg)
    target.shutdown()
    return ok("shutdown")


@control_command
async def heartbeat(target: ControlTarget, **_: Any) -> dict[str, Any]:
    """Ask the worker to send a worker-heartbeat event now."""
    send: Callable[[], Awaitable[None] | None] | None = getattr(target, "send_heartbeat", None)
    if send is None:
        return nok("heartbeats are not available on this worker")
    result = send()
    if inspect.isawaitable(result):
        await result
    return ok("heartbeat sent")
