"""The dashboard's Starlette app: JSON API, a live event stream and ``/metrics``.

One :class:`~celeriac.events.EventReceiver` per dashboard feeds a bounded events
:class:`~celeriac.events.State` and fans every event out to the ``/events`` clients, each
through its own bounded queue (a slow browser loses events, it never slows the feed).
Everything it does goes through the app's transport and ``app.control``, so it works on
every broker; it keeps no storage of its own, and what it shows starts when it starts.

Routes::

    GET  /                              the single page (static/index.html)
    GET  /api/status                    feed connected?, broker, counts
    GET  /api/workers[?refresh=1]       workers by heartbeat; refresh adds inspect stats
                                        and active_queues
    GET  /api/tasks?state=&name=&worker=&limit=
    GET  /api/task/{id}                 from the events State, else the result backend
    POST /api/task/{id}/revoke          {"terminate": bool, "signal": "SIGTERM"}
    POST /api/task/send                 {"name", "args", "kwargs", "queue", "countdown"}
    POST /api/workers/{name}/pool/grow  {"n": 1}    (and .../pool/shrink)
    POST /api/workers/{name}/shutdown
    GET  /api/queues                    ready and dead-letter sizes
    GET  /events                        Server-Sent Events: one JSON event per message
    GET  /metrics                       Prometheus text format
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import logging
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from importlib import resources
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..events import EventReceiver, State
from ..events.state import TASK_EVENT_TO_STATE, TaskState, WorkerState
from ..transport.base import dead_letter_name, redact_url

__all__ = ["BasicAuth", "Dashboard", "create_app", "parse_credentials", "render_metrics"]

logger = logging.getLogger(__name__)

Event = dict[str, Any]

#: Seconds between SSE comments that keep proxies from closing an idle stream.
KEEPALIVE = 15.0
#: Events a slow ``/events`` client may fall behind before it loses the newest ones.
LISTENER_BUFFER = 1000
MAX_LIMIT = 10_000
_TRUE = {"1", "true", "yes", "on"}
_WORKER_FIELDS = ("pid", "freq", "active", "processed", "loadavg", "sw_ident", "sw_ver", "sw_sys")


class BadRequest(Exception):
    """A request the API refuses; becomes a 400 with the message."""


def _default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return repr(obj)


def _json(data: Any, status: int = 200) -> Response:
    body = orjson.dumps(data, default=_default, option=orjson.OPT_NON_STR_KEYS)
    return Response(body, status, media_type="application/json")


def _error(message: str, status: int = 400) -> Response:
    return _json({"error": message}, status)


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in _TRUE


async def _params(request: Request) -> dict[str, Any]:
    """Query parameters overlaid with a JSON or url-encoded form body (curl, fetch, forms)."""
    params: dict[str, Any] = dict(request.query_params)
    kind = request.headers.get("content-type", "")
    if "json" in kind:
        raw = await request.body()
        if raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"the body is not JSON: {exc}") from None
            if not isinstance(body, dict):
                raise BadRequest("the JSON body must be an object")
            params.update(body)
    elif "x-www-form-urlencoded" in kind:  # parsed here: Starlette's needs python-multipart
        text = (await request.body()).decode("utf-8", "replace")
        params.update(urllib.parse.parse_qsl(text, keep_blank_values=True))
    return params


def _number(params: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = params.get(key)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{key} must be a number, not {value!r}") from None


def _decoded(params: Mapping[str, Any], key: str, kind: type[Any]) -> Any:
    """``args``/``kwargs`` given as JSON values, or as JSON text (from a form field)."""
    value = params.get(key)
    if value is None or value == "":
        return kind()
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise BadRequest(f"{key} is not valid JSON: {value!r}") from None
    if not isinstance(value, kind):
        raise BadRequest(f"{key} must be a JSON {'list' if kind is list else 'object'}")
    return value


def task_json(task: TaskState) -> dict[str, Any]:
    data = dataclasses.asdict(task)
    extra = data.pop("extra")
    for key in ("local_received", "utcoffset", "pid"):
        extra.pop(key, None)
    data.update({k: v for k, v in extra.items() if k not in data})
    data["worker"] = task.hostname
    return data


class Dashboard:
    """The live side of the dashboard: event feed, cluster state, SSE listeners, counters."""

    def __init__(self, app: Any, *, max_tasks: int = 10_000, inspect_timeout: float = 1.0) -> None:
        self.app = app
        self.state = State(max_tasks_in_memory=max_tasks)
        self.inspect_timeout = inspect_timeout
        #: hostname -> {"stats": ..., "queues": ...} from the last refresh that reached it.
        self.worker_info: dict[str, dict[str, Any]] = {}
        self.repliers: set[str] = set()
        self.listeners: set[asyncio.Queue[Event | None]] = set()
        self.task_totals: Counter[str] = Counter()
        self.runtimes: dict[str, list[float]] = {}  # task name -> [sum, count]
        self.connected = False
        self.closing = False
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.closing = False
        self._task = asyncio.create_task(self._consume(), name="celeriac-dashboard-events")

    async def stop(self, *, close_connections: bool = True) -> None:
        self.close_streams()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if close_connections:
            await self.app.aclose()

    def request_close(self) -> None:
        """End the ``/events`` streams from any thread (a server about to stop waits for them)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.close_streams)

    def close_streams(self) -> None:
        self.closing = True
        for queue in list(self.listeners):
            self._offer(queue, None, force=True)

    async def _consume(self) -> None:
        """Follow the event channel for as long as the dashboard runs, reconnecting."""
        receiver = EventReceiver(self.app)
        delay = 0.5
        while True:
            try:
                async with receiver.stream(wakeup=True) as events:
                    self.connected, delay = True, 0.5
                    async for event in events:
                        self.on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("Event feed lost (%r); retrying in %.1fs", exc, delay)
            self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)

    # -- events ------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        self.state.event(event)
        kind = str(event.get("type", ""))
        if kind.startswith("task-") and event.get("uuid"):
            state = TASK_EVENT_TO_STATE.get(kind[5:], kind[5:].upper())
            self.task_totals[state] += 1
            runtime = event.get("runtime")
            if kind == "task-succeeded" and isinstance(runtime, int | float):
                task = self.state.tasks.get(str(event["uuid"]))
                name = (task.name if task else None) or "unknown"
                acc = self.runtimes.setdefault(name, [0.0, 0])
                acc[0] += float(runtime)
                acc[1] += 1
        for queue in list(self.listeners):
            self._offer(queue, event)

    def _offer(
        self, queue: asyncio.Queue[Event | None], item: Event | None, force: bool = False
    ) -> None:
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            if not force:
                self.dropped += 1
                return
            queue.get_nowait()
            queue.put_nowait(item)

    async def stream_events(self) -> AsyncIterator[str]:
        """Server-Sent Events text for one client, until it leaves or the server stops."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(LISTENER_BUFFER)
        self.listeners.add(queue)
        try:
            yield "retry: 3000\n\n"
            while not self.closing:
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                if item is None:
                    break
                yield f"data: {orjson.dumps(item, default=_default).decode()}\n\n"
        finally:
            self.listeners.discard(queue)

    # -- views -------------------------------------------------------------------------

    def worker_json(self, name: str, worker: WorkerState | None, now: float) -> dict[str, Any]:
        """Heartbeat decides; a reply to the last refresh counts only for a worker
        that sends no heartbeats at all."""
        info = self.worker_info.get(name, {})
        beat = worker.last_heartbeat if worker is not None else None
        alive = worker.alive_at(now) if worker is not None else name in self.repliers
        fields = {k: getattr(worker, k) for k in _WORKER_FIELDS} if worker is not None else {}
        return {
            "hostname": name,
            "status": "online" if alive else "offline",
            "last_heartbeat": beat,
            "heartbeat_age": None if beat is None else max(0.0, now - beat),
            **fields,
            "stats": info.get("stats"),
            "queues": info.get("queues"),
        }

    async def refresh_workers(self) -> None:
        inspect = self.app.control.inspect(timeout=self.inspect_timeout)
        stats, queues = await asyncio.gather(
            inspect.arequest("stats"), inspect.arequest("active_queues")
        )
        self.repliers = set(stats or {}) | set(queues or {})
        for name, value in (stats or {}).items():
            self.worker_info.setdefault(name, {})["stats"] = value
        for name, value in (queues or {}).items():
            self.worker_info.setdefault(name, {})["queues"] = value

    def queue_names(self) -> list[str]:
        names = [q.name for q in self.app.router.declared_queues()]
        for info in self.worker_info.values():
            for queue in info.get("queues") or ():
                if isinstance(queue, dict) and queue.get("name") not in names:
                    names.append(str(queue["name"]))
        return names

    async def queue_sizes(self) -> list[dict[str, Any]]:
        conns = await self.app.connection_for_current_loop()
        out: list[dict[str, Any]] = []
        for name in self.queue_names():
            row: dict[str, Any] = {"name": name, "messages": None, "dead": None}
            try:
                row["messages"] = await conns.transport.size(name)
                row["dead"] = await conns.transport.size(dead_letter_name(name))
            except Exception as exc:
                row["error"] = str(exc) or type(exc).__name__
            out.append(row)
        return out


# -- metrics -------------------------------------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(dash: Dashboard, queues: Sequence[Mapping[str, Any]]) -> str:
    """Prometheus text exposition format 0.0.4, written out by hand."""
    now = time.time()
    lines: list[str] = []

    def family(name: str, kind: str, doc: str) -> None:
        lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}"])

    family("celeriac_workers_online", "gauge", "Workers whose heartbeat is current.")
    lines.append(f"celeriac_workers_online {len(dash.state.alive_workers())}")
    family("celeriac_worker_active_tasks", "gauge", "Tasks running, from the last heartbeat.")
    for worker in dash.state.workers.values():
        if worker.alive_at(now):
            lines.append(
                f'celeriac_worker_active_tasks{{worker="{_label(worker.hostname)}"}} '
                f"{int(worker.active or 0)}"
            )
    family("celeriac_tasks_total", "counter", "Task events seen, by the state they report.")
    for state, count in sorted(dash.task_totals.items()):
        lines.append(f'celeriac_tasks_total{{state="{_label(state)}"}} {count}')
    family("celeriac_task_runtime_seconds", "summary", "Runtime of succeeded tasks.")
    for name, (seconds, runs) in sorted(dash.runtimes.items()):
        label = f'{{task="{_label(name)}"}}'
        lines.append(f"celeriac_task_runtime_seconds_sum{label} {seconds!r}")
        lines.append(f"celeriac_task_runtime_seconds_count{label} {int(runs)}")
    family("celeriac_queue_length", "gauge", "Messages waiting in a queue (not leased).")
    for row in queues:
        if row.get("messages") is not None:
            lines.append(
                f'celeriac_queue_length{{queue="{_label(str(row["name"]))}"}} {row["messages"]}'
            )
    family("celeriac_events_total", "counter", "Events received by this dashboard.")
    lines.append(f"celeriac_events_total {dash.state.event_count}")
    return "\n".join(lines) + "\n"


# -- basic auth ----------------------------------------------------------------------------


def parse_credentials(spec: str) -> list[tuple[str, str]]:
    """``user:pass`` or ``u1:p1,u2:p2`` (Flower's ``--basic-auth`` form)."""
    pairs: list[tuple[str, str]] = []
    for item in spec.split(","):
        user, colon, password = item.strip().partition(":")
        if not colon or not user:
            raise ValueError(f"basic auth must look like user:password, not {item.strip()!r}")
        pairs.append((user, password))
    return pairs


class BasicAuth:
    """ASGI middleware: HTTP basic auth on every route (the event stream included)."""

    def __init__(self, app: ASGIApp, credentials: Sequence[tuple[str, str]]) -> None:
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials]

    def allowed(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, _, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        matches = [
            hmac.compare_digest(user, u) & hmac.compare_digest(password, p)
            for u, p in self.credentials  # compare them all, so timing tells nothing
        ]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        headers = {"WWW-Authenticate": 'Basic realm="celeriac"'}
        await PlainTextResponse("Unauthorized", 401, headers=headers)(scope, receive, send)


# -- the app -------------------------------------------------------------------------------


def _page() -> str:
    return resources.files("celeriac.dashboard").joinpath("static/index.html").read_text("utf-8")


def create_app(
    celeriac_app: Any,
    *,
    basic_auth: str | Sequence[tuple[str, str]] | None = None,
    max_tasks: int = 10_000,
    inspect_timeout: float = 1.0,
    close_connections: bool = True,
) -> Starlette:
    """The dashboard for ``celeriac_app``; ``app.state.dashboard`` is its :class:`Dashboard`.

    ``close_connections`` closes the app's connections for the serving loop at shutdown;
    turn it off when mounting the dashboard inside an app that keeps using them.
    """
    dash = Dashboard(celeriac_app, max_tasks=max_tasks, inspect_timeout=inspect_timeout)
    page = _page()

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await dash.start()
        try:
            yield
        finally:
            await dash.stop(close_connections=close_connections)

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    async def status(request: Request) -> Response:
        return _json(
            {
                "connected": dash.connected,
                "broker": redact_url(celeriac_app.broker_url_resolved()),
                "events": dash.state.event_count,
                "tasks": len(dash.state.tasks),
                "workers": len(dash.state.alive_workers()),
                "dropped": dash.dropped,
            }
        )

    async def workers(request: Request) -> Response:
        if _flag(request.query_params.get("refresh", "")):
            await dash.refresh_workers()
        now = time.time()
        names = sorted(set(dash.state.workers) | set(dash.worker_info))
        return _json([dash.worker_json(n, dash.state.workers.get(n), now) for n in names])

    async def tasks(request: Request) -> Response:
        q = request.query_params
        wanted = {s.strip().upper() for s in q.get("state", "").split(",") if s.strip()}
        name = q.get("name", "").strip().lower()
        worker = q.get("worker", "").strip()
        try:
            limit = max(0, min(int(q.get("limit") or 100), MAX_LIMIT))
        except ValueError:
            return _error("limit must be an integer")
        out: list[dict[str, Any]] = []
        for task in dash.state.tasks_by_time():
            if len(out) >= limit:
                break
            if wanted and task.state not in wanted:
                continue
            if name and name not in (task.name or "").lower():
                continue
            if worker and task.hostname != worker:
                continue
            out.append(task_json(task))
        return _json(out)

    async def task_info(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        known = dash.state.tasks.get(task_id)
        data: dict[str, Any] = task_json(known) if known else {"uuid": task_id}
        data["source"] = "events" if known else "backend"
        try:
            meta = await celeriac_app.aget_result_meta(task_id)
        except Exception as exc:  # e.g. the disabled backend: the events view still stands
            data["backend_error"] = str(exc) or type(exc).__name__
            meta = None
        if meta is not None:
            data["backend"] = {
                "state": meta.status,
                "result": meta.result,
                "traceback": meta.traceback,
                "date_done": meta.date_done,
            }
        if not known:
            data["state"] = meta.status if meta is not None else "PENDING"
            data["result"] = meta.result if meta is not None else None
            if meta is not None and meta.extended.get("name"):
                data["name"] = meta.extended["name"]
        return _json(data)

    async def revoke(request: Request) -> Response:
        params = await _params(request)
        task_id = request.path_params["task_id"]
        terminate = _flag(params.get("terminate", False))
        signal = str(params.get("signal") or "SIGTERM")
        arguments = {"task_id": task_id, "terminate": terminate, "signal": signal}
        await celeriac_app.control.abroadcast("revoke", arguments)
        return _json({"ok": True, "task_id": task_id, "terminate": terminate})

    async def send(request: Request) -> Response:
        params = await _params(request)
        name = params.get("name")
        if not isinstance(name, str) or not name.strip():
            return _error("name is required")
        options: dict[str, Any] = {}
        if params.get("queue"):
            options["queue"] = str(params["queue"])
        countdown = _number(params, "countdown", None)
        if countdown is not None:
            options["countdown"] = countdown
        args, kwargs = _decoded(params, "args", list), _decoded(params, "kwargs", dict)
        result = await celeriac_app.asend_task(name.strip(), args, kwargs, **options)
        return _json({"task_id": result.id, "name": name.strip()})

    async def worker_command(request: Request) -> Response:
        name = request.path_params["name"]
        action = request.path_params.get("action", "shutdown")
        params = await _params(request)
        arguments: dict[str, Any] = {}
        if action in ("grow", "shrink"):
            command = f"pool_{action}"
            arguments["n"] = int(_number(params, "n", 1) or 1)
        elif action == "shutdown":
            command = "shutdown"
        else:
            return _error(f"unknown worker action {action!r}", 404)
        replies = await celeriac_app.control.abroadcast(
            command, arguments, [name], reply=True, timeout=dash.inspect_timeout, limit=1
        )
        merged = {k: v for reply in replies for k, v in reply.items()}
        if name not in merged:
            return _error(f"no reply from {name} within {dash.inspect_timeout}s", 504)
        return _json({"worker": name, "command": command, "reply": merged[name]})

    async def queues(request: Request) -> Response:
        return _json(await dash.queue_sizes())

    async def events(request: Request) -> Response:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            dash.stream_events(), media_type="text/event-stream", headers=headers
        )

    async def metrics(request: Request) -> Response:
        text = render_metrics(dash, await dash.queue_sizes())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def bad_request(request: Request, exc: Exception) -> Response:
        return _error(str(exc))

    routes = [
        Route("/", index),
        Route("/api/status", status),
        Route("/api/workers", workers),
        Route("/api/workers/{name}/pool/{action}", worker_command, methods=["POST"]),
        Route("/api/workers/{name}/shutdown", worker_command, methods=["POST"]),
        Route("/api/tasks", tasks),
        Route("/api/task/send", send, methods=["POST"]),
        Route("/api/task/{task_id}", task_info),
        Route("/api/task/{task_id}/revoke", revoke, methods=["POST"]),
        Route("/api/queues", queues),
        Route("/events", events),
        Route("/metrics", metrics),
    ]
    middleware: list[Middleware] = []
    if basic_auth:
        creds = parse_credentials(basic_auth) if isinstance(basic_auth, str) else basic_auth
        middleware.append(Middleware(BasicAuth, credentials=list(creds)))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={BadRequest: bad_request},
    )
    app.state.dashboard = dash
    return app
