"""The application: settings, the task registry, and the send path.

Creating an app or declaring a task does no I/O. Connections are made on first use, one
transport and one backend per event loop (see ``_bridge``), so a sync producer thread,
an async web handler and the worker each use their own sockets with the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import difflib
import importlib
import inspect
import logging
import os
import threading
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, overload

from . import signals, states
from ._bridge import portal
from .backends import create_backend
from .backends.base import ResultBackend, ResultMeta
from .protocol import build_task_message
from .routing import Router
from .settings import Settings
from .signals import Signal, send_app_configured
from .task import Task, current
from .transport import create_transport, scheme_of
from .transport.base import Outgoing, QueueSpec, Transport

logger = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_BROKER = "sqlite://"

_collector: contextvars.ContextVar[list[tuple[Outgoing, QueueSpec | None]] | None] = (
    contextvars.ContextVar("celeriac_collector", default=None)
)


@dataclass
class Connections:
    """The transport and backend that belong to one event loop."""

    transport: Transport
    backend: ResultBackend
    declared: set[str] = field(default_factory=set)
    ready: asyncio.Future[None] | None = None


_TASK_OPTIONS = {
    name for name in dir(Task) if not name.startswith("_") and not callable(getattr(Task, name))
} | {"base", "name", "bind", "shared", "typing"}


class Celery:
    """A celeriac application: ``Celery('vege', broker=..., backend=..., include=[...])``."""

    def __init__(
        self,
        main: str | None = None,
        loader: Any = None,
        backend: str | None = None,
        amqp: Any = None,
        events: Any = None,
        log: Any = None,
        control: Any = None,
        set_as_current: bool = True,
        tasks: Any = None,
        broker: str | None = None,
        include: Sequence[str] | None = None,
        changes: Any = None,
        config_source: Any = None,
        fixups: Any = None,
        task_cls: type[Task[..., Any]] | str | None = None,
        autofinalize: bool = True,
        namespace: str | None = None,
        strict_typing: bool = True,
        **settings: Any,
    ) -> None:
        self.main = main
        self.conf = Settings(env=os.environ)
        if config_source is not None:
            self.conf.load_object(config_source, namespace=namespace)
        if broker is not None:
            self.conf.broker_url = broker
        if backend is not None:
            self.conf.result_backend = backend
        if include:
            self.conf.include = tuple(include)
        if settings:
            self.conf.update(settings)
        self.namespace = namespace
        if isinstance(task_cls, str):
            mod, _, attr = task_cls.rpartition(":") if ":" in task_cls else task_cls.rpartition(".")
            task_cls = getattr(importlib.import_module(mod), attr)
        self.task_cls: type[Task[..., Any]] = task_cls or Task  # type: ignore[assignment]
        self.tasks: dict[str, Task[..., Any]] = {}
        self._conns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Connections] = (
            weakref.WeakKeyDictionary()
        )
        self._conns_lock = threading.Lock()
        self._router: Router | None = None
        self._router_key: Any = None
        self._control: Any = None
        self._pending_autodiscover: list[tuple[Sequence[str], str]] = []
        self.portal = portal
        self.on_after_configure = Signal(name="on_after_configure")
        self.on_after_finalize = Signal(name="on_after_finalize")
        _register_builtins(self)
        for fun, opts in list(_shared):
            self._task_from_fun(fun, **opts)
        _apps.add(self)
        if set_as_current:
            set_current_app(self)
        os.register_at_fork(after_in_child=self._forget_connections)

    def __repr__(self) -> str:
        return f"<Celery {self.main or '__main__'} at {id(self):#x}>"

    # -- configuration --------------------------------------------------------

    def config_from_object(
        self, obj: Any, silent: bool = False, force: bool = False, namespace: str | None = None
    ) -> None:
        try:
            self.conf.load_object(obj, namespace=namespace or self.namespace)
        except ImportError:
            if not silent:
                raise
        self._router = None

    def config_from_envvar(
        self, variable_name: str, silent: bool = False, force: bool = False
    ) -> None:
        module = os.environ.get(variable_name)
        if not module:
            if silent:
                return
            from .exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(f"The environment variable {variable_name!r} is not set")
        self.config_from_object(module, silent=silent)

    def broker_url_resolved(self) -> str:
        return str(self.conf.broker_url or DEFAULT_BROKER)

    def backend_url_resolved(self) -> str:
        """The result backend; the embedded brokers keep results beside their messages."""
        backend = self.conf.result_backend
        if backend:
            return str(backend)
        broker = self.broker_url_resolved()
        if scheme_of(broker) in ("sqlite", "memory"):
            return broker
        return "disabled://"

    @property
    def router(self) -> Router:
        key = (id(self.conf.task_routes), id(self.conf.task_queues), self.conf.task_default_queue)
        if self._router is None or key != self._router_key:
            self._router = Router(self.conf)
            self._router_key = key
        return self._router

    @property
    def control(self) -> Any:
        if self._control is None:
            from .control import Control

            self._control = Control(self)
        return self._control

    @property
    def events(self) -> Any:
        """Celery's ``app.events``: ``Receiver(conn, handlers=...)`` and ``State()``."""
        from .events import Events

        return Events(self)

    @property
    def amqp(self) -> Any:
        return self

    @property
    def backend(self) -> Any:
        return self

    # -- tasks ----------------------------------------------------------------------

    @overload
    def task(self, fun: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, **opts: Any) -> Callable[[Callable[..., Any]], Task[..., Any]]: ...

    def task(self, *args: Any, **opts: Any) -> Any:
        """Decorator: ``@app.task`` or ``@app.task(bind=True, queue='q1', ...)``."""
        if len(args) == 1 and callable(args[0]) and not opts:
            return self._task_from_fun(args[0])
        if args:
            raise TypeError("app.task() takes options as keyword arguments only")

        def deco(fun: Callable[..., Any]) -> Task[..., Any]:
            return self._task_from_fun(fun, **opts)

        return deco

    def _task_from_fun(
        self,
        fun: Callable[..., Any],
        name: str | None = None,
        base: type[Task[..., Any]] | None = None,
        **options: Any,
    ) -> Task[..., Any]:
        cls = base or self.task_cls
        for key in options:
            if key not in _TASK_OPTIONS and not hasattr(cls, key):
                close = difflib.get_close_matches(key, sorted(_TASK_OPTIONS), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"Unknown task option {key!r} for {fun.__qualname__}.{hint}")
        options.pop("shared", None)
        if name is None:
            module = fun.__module__
            if module == "__main__" and self.main:
                module = self.main
            name = f"{module}.{fun.__name__}"
        existing = self.tasks.get(name)
        if existing is not None and existing._fun is fun:
            return existing
        task = cls()
        task.name = name
        task.app = self
        task._fun = fun
        task.__doc__ = fun.__doc__
        task.__name__ = fun.__name__  # type: ignore[attr-defined]
        task.__module__ = fun.__module__
        task.__qualname__ = fun.__qualname__  # type: ignore[attr-defined]
        for key, value in options.items():
            if key in ("autoretry_for", "dont_autoretry_for", "throws"):
                value = tuple(value)
            setattr(task, key, value)
        self._annotate(task)
        self.tasks[name] = task
        return task

    def register_task(self, task: Task[..., Any] | type[Task[..., Any]]) -> Task[..., Any]:
        """Register a class-based task (``class MyTask(Task): def run(...)``)."""
        obj = task() if isinstance(task, type) else task
        if not obj.name:
            obj.name = f"{type(obj).__module__}.{type(obj).__name__}"
        obj.app = self
        self._annotate(obj)
        self.tasks[obj.name] = obj
        return obj

    def _annotate(self, task: Task[..., Any]) -> None:
        annotations = self.conf.task_annotations
        if not annotations:
            return
        for entry in annotations if isinstance(annotations, list | tuple) else [annotations]:
            found: Any = None
            if callable(entry):
                found = entry(task)
            elif isinstance(entry, Mapping):
                # Celery applies the exact match and the '*' wildcard, the exact one last.
                found = {**(entry.get("*") or {}), **(entry.get(task.name) or {})}
            for key, value in (found or {}).items():
                setattr(task, key, value)

    def autodiscover_tasks(
        self,
        packages: Sequence[str] | Callable[[], Sequence[str]] = (),
        related_name: str = "tasks",
        force: bool = False,
    ) -> None:
        pkgs = packages() if callable(packages) else packages
        for pkg in pkgs:
            with contextlib.suppress(ModuleNotFoundError):
                importlib.import_module(f"{pkg}.{related_name}")

    def loader_import_default_modules(self) -> None:
        for module in (*tuple(self.conf.imports or ()), *tuple(self.conf.include or ())):
            importlib.import_module(module)
        for task in self.tasks.values():
            self._annotate(task)
        send_app_configured(self)

    def add_periodic_task(
        self,
        schedule: Any,
        sig: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        **opts: Any,
    ) -> str:
        """Add a beat entry (Celery's ``add_periodic_task``), e.g. from on_after_configure."""
        from .beat import add_periodic_task

        key: str = add_periodic_task(self, schedule, sig, args, kwargs or {}, name, **opts)
        return key

    def finalize(self, auto: bool = False) -> None:
        self.loader_import_default_modules()

    def signature(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        from .canvas import Signature

        return Signature(name, args, kwargs, options, app=self)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> Any:
        from .result import AsyncResult

        return AsyncResult(task_id, app=self, **kwargs)

    def GroupResult(self, group_id: str | None = None, results: Any = None, **kw: Any) -> Any:
        from .result import GroupResult

        return GroupResult(group_id, results, app=self, **kw)

    # -- sending ------------------------------------------------------------------

    def prepare_message(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task: Task[..., Any] | None = None,
        **options: Any,
    ) -> tuple[Outgoing, QueueSpec, str]:
        """Build the message for one task call (pure: no I/O). Returns (message, queue, id)."""
        conf = self.conf
        if task is None:
            task = self.tasks.get(name)
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        task_id = options.get("task_id") or str(uuid.uuid4())
        if task is not None and task.queue and not options.get("queue"):
            options.setdefault("queue", task.queue)
        route = self.router.route(name, args, kwargs, options, task=task)
        now = dt.datetime.now(dt.UTC)
        eta = options.get("eta")
        countdown = options.get("countdown")
        if countdown is not None:
            eta = now + dt.timedelta(seconds=float(countdown))
        elif isinstance(eta, str):
            eta = dt.datetime.fromisoformat(eta)
        if isinstance(eta, dt.datetime) and eta.tzinfo is None:
            eta = eta.replace(tzinfo=self.conf.tz())
        expires = options.get("expires", task.expires if task is not None else None)
        if isinstance(expires, int | float):
            expires = now + dt.timedelta(seconds=float(expires))
        elif isinstance(expires, str):
            expires = dt.datetime.fromisoformat(expires)
        parent = current()
        parent_id = options.get("parent_id")
        root_id = options.get("root_id")
        if parent is not None and parent_id is None:
            parent_id = parent[1].id
            root_id = root_id or parent[1].root_id
        serializer = options.get("serializer") or (task and task.serializer) or conf.task_serializer
        ignore = options.get("ignore_result")
        if ignore is None:
            ignore = (
                task.ignore_result
                if task is not None and task.ignore_result is not None
                else conf.task_ignore_result
            )
        priority = route.priority
        if priority is None and task is not None:
            priority = task.priority
        if priority is None:
            priority = conf.task_default_priority

        def sigs(value: Any) -> list[Any] | None:
            if not value:
                return None
            items = value if isinstance(value, list | tuple) else [value]
            return [dict(s) for s in items]

        env = build_task_message(
            name=name,
            task_id=task_id,
            args=args,
            kwargs=kwargs,
            serializer=serializer,
            root_id=root_id,
            parent_id=parent_id,
            group_id=options.get("group_id"),
            group_index=options.get("group_index"),
            eta=eta if isinstance(eta, dt.datetime) else None,
            expires=expires if isinstance(expires, dt.datetime) else None,
            retries=int(options.get("retries") or 0),
            time_limit=options.get("time_limit"),
            soft_time_limit=options.get("soft_time_limit"),
            callbacks=sigs(options.get("link")),
            errbacks=sigs(options.get("link_error")),
            chain=options.get("chain") or None,
            chord=dict(options["chord"]) if options.get("chord") else None,
            ignore_result=bool(ignore),
            priority=priority,
            reply_to=options.get("reply_to") or self._reply_to(parent),
            persistent=route.persistent,
            compression=options.get("compression")
            or (task and task.compression)
            or conf.task_compression,
            shadow=options.get("shadow"),
            headers=options.get("headers"),
        )
        not_before = eta.timestamp() if isinstance(eta, dt.datetime) and eta > now else None
        out = Outgoing(env, route.exchange, route.routing_key, not_before)
        return out, route.queue.to_spec(), task_id

    def _reply_to(self, parent: Any) -> str | None:
        """rpc://: replies go to the client that started the work (a chain keeps it)."""
        if parent is not None and parent[1].reply_to:
            return str(parent[1].reply_to)
        if scheme_of(self.backend_url_resolved()) == "rpc":
            from .backends.rpc import oid

            return oid()
        return None

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Send a task by name; returns its AsyncResult (no I/O when inside ``batch()``)."""
        item, result = self._stage(name, args, kwargs, options)
        if item is not None:
            self.portal.run(self._apublish([item]))
        return result

    async def asend_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        item, result = self._stage(name, args, kwargs, options)
        if item is not None:
            await self._apublish([item])
        return result

    def _stage(
        self, name: str, args: Any, kwargs: Any, options: dict[str, Any]
    ) -> tuple[tuple[Outgoing, QueueSpec] | None, Any]:
        """Build the message in the caller's context (its current task and collector).

        Returns the message to publish now, or None when a ``batch()``/worker collector
        took it.
        """
        from .result import AsyncResult

        task = options.pop("_task", None)
        out, spec, task_id = self.prepare_message(name, args, kwargs, task, **options)
        result = AsyncResult(task_id, app=self, task_name=name)
        collected = _collector.get()
        if collected is not None:
            collected.append((out, spec))
            return None, result
        return (out, spec), result

    @contextlib.contextmanager
    def batch(self) -> Iterator[list[tuple[Outgoing, QueueSpec | None]]]:
        """Collect sends made inside the block and publish them in one round trip."""
        outer = _collector.get()
        if outer is not None:
            yield outer
            return
        items: list[tuple[Outgoing, QueueSpec | None]] = []
        token = _collector.set(items)
        try:
            yield items
        finally:
            _collector.reset(token)
        if items:
            self.portal.run(self._apublish(items))

    @contextlib.contextmanager
    def collecting(self) -> Iterator[list[tuple[Outgoing, QueueSpec | None]]]:
        """Collect sends without publishing them (the worker publishes follow-ups itself)."""
        items: list[tuple[Outgoing, QueueSpec | None]] = []
        token = _collector.set(items)
        try:
            yield items
        finally:
            _collector.reset(token)

    async def _apublish(self, items: Sequence[tuple[Outgoing, QueueSpec | None]]) -> None:
        conns = await self.connection_for_current_loop()
        await self.declare_for(conns, [spec for _, spec in items])
        listen = getattr(conns.backend, "listen", None)
        if listen is not None:  # rpc://: subscribe to replies before anything is sent
            await listen()
        hooks = bool(signals.before_task_publish or signals.after_task_publish)
        if hooks:
            _publish_signal(signals.before_task_publish, items)
        if len(items) == 1:
            await conns.transport.publish(items[0][0])
        else:
            await conns.transport.publish_many([out for out, _ in items])
        if hooks:
            _publish_signal(signals.after_task_publish, items)

    async def declare_for(self, conns: Connections, specs: Sequence[QueueSpec | None]) -> None:
        """Declare the configured queues once per connection, and any queue first seen."""
        todo: dict[str, QueueSpec] = {}
        if "*" not in conns.declared:
            for q in self.router.declared_queues():
                todo[q.name] = q.to_spec()
            conns.declared.add("*")
        for spec in specs:
            if spec is not None and spec.name not in conns.declared and spec.exchange:
                todo[spec.name] = spec
        if todo:
            await conns.transport.declare(list(todo.values()))
            conns.declared.update(todo)

    # -- connections ---------------------------------------------------------------

    async def connection_for_current_loop(self) -> Connections:
        loop = asyncio.get_running_loop()
        conns = self._conns.get(loop)
        if conns is None:
            with self._conns_lock:
                conns = self._conns.get(loop)
                if conns is None:
                    opts = dict(self.conf.broker_transport_options or {})
                    transport = create_transport(self.broker_url_resolved(), opts)
                    bopts = dict(self.conf.result_backend_transport_options or {})
                    bopts.setdefault("serializer", self.conf.result_serializer)
                    bopts["transport"] = transport  # rpc:// replies ride on the broker
                    backend = create_backend(self.backend_url_resolved(), bopts)
                    conns = Connections(transport, backend)
                    self._conns[loop] = conns
        if conns.ready is None:
            conns.ready = loop.create_future()
            try:
                await conns.transport.connect()
                await conns.backend.connect()
            except BaseException as exc:
                conns.ready.set_exception(exc)
                conns.ready.exception()
                del self._conns[loop]
                raise
            conns.ready.set_result(None)
        elif not conns.ready.done():
            await asyncio.shield(conns.ready)
        return conns

    async def aclose(self) -> None:
        """Close this loop's connections."""
        loop = asyncio.get_running_loop()
        conns = self._conns.pop(loop, None)
        if conns is not None and conns.ready is not None and conns.ready.done():
            await conns.transport.close()
            await conns.backend.close()

    def close(self) -> None:
        if self.portal.thread_loop() is not None:
            self.portal.run(self.aclose())

    def _forget_connections(self) -> None:
        self._conns = weakref.WeakKeyDictionary()
        self._conns_lock = threading.Lock()

    # -- results -------------------------------------------------------------------

    def result_ttl(self) -> float | None:
        value = self.conf.result_expires
        if value is None:
            return None
        if isinstance(value, dt.timedelta):
            value = value.total_seconds()
        return float(value) if value else None

    async def aget_result_meta(self, task_id: str) -> ResultMeta | None:
        conns = await self.connection_for_current_loop()
        return await conns.backend.get(task_id)

    async def aget_result_metas(self, task_ids: Sequence[str]) -> Mapping[str, ResultMeta]:
        conns = await self.connection_for_current_loop()
        return await conns.backend.get_many(task_ids)

    async def await_results(
        self, task_ids: Sequence[str], *, timeout: float | None
    ) -> AsyncGenerator[ResultMeta, None]:
        conns = await self.connection_for_current_loop()
        async with contextlib.aclosing(conns.backend.wait(task_ids, timeout=timeout)) as metas:
            async for meta in metas:
                yield meta

    async def astore_result(self, meta: ResultMeta) -> None:
        conns = await self.connection_for_current_loop()
        await conns.backend.store(meta, ttl=self.result_ttl())

    async def aforget(self, task_id: str) -> None:
        conns = await self.connection_for_current_loop()
        await conns.backend.forget(task_id)

    async def asave_group(self, group_id: str, task_ids: Sequence[str]) -> None:
        conns = await self.connection_for_current_loop()
        await conns.backend.save_group(group_id, task_ids, ttl=self.result_ttl())

    async def aload_group(self, group_id: str) -> list[str] | None:
        conns = await self.connection_for_current_loop()
        return await conns.backend.load_group(group_id)

    async def aforget_group(self, group_id: str) -> None:
        conns = await self.connection_for_current_loop()
        await conns.backend.forget_group(group_id)

    def save_group_for_chord(self, group_id: str, task_ids: Sequence[str]) -> None:
        """A chord's header ids, stored once so the join can read results in order."""
        self.portal.run(self.asave_group(group_id, task_ids))

    # -- worker entry points ----------------------------------------------------------

    def worker_main(self, argv: Sequence[str] | None = None) -> None:
        from .cli import main

        main(args=list(argv or ["worker"]), obj={"app": self}, standalone_mode=True)

    def start(self, argv: Sequence[str] | None = None) -> None:
        from .cli import main

        main(args=list(argv or []), obj={"app": self}, standalone_mode=True)

    def now(self) -> dt.datetime:
        return dt.datetime.now(self.conf.tz())


Celeriac = Celery


def _publish_signal(signal: Signal, items: Sequence[tuple[Outgoing, QueueSpec | None]]) -> None:
    for out, _ in items:
        env = out.envelope
        signal.send(
            env.headers.get("task"),
            body=env.body,
            exchange=out.exchange,
            routing_key=out.routing_key,
            headers=env.headers,
            properties={"correlation_id": env.correlation_id, "priority": env.priority},
        )


# -- current app, shared tasks ---------------------------------------------------------

_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_current_app: Celery | None = None
_default_app: Celery | None = None
_shared: list[tuple[Callable[..., Any], dict[str, Any]]] = []


def set_current_app(app: Celery) -> None:
    global _current_app
    _current_app = app


def current_app() -> Celery:
    global _default_app
    if _current_app is not None:
        return _current_app
    if _default_app is None:
        _default_app = Celery("default", set_as_current=False)
    return _default_app


class _SharedTask:
    """``@shared_task``: resolves to the current app's copy of the task on each use."""

    def __init__(self, fun: Callable[..., Any], opts: dict[str, Any]) -> None:
        self._fun = fun
        self._opts = opts

    def _task(self) -> Task[..., Any]:
        # Registering is idempotent, and each app names a __main__ function after itself.
        return current_app()._task_from_fun(self._fun, **self._opts)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._task(), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._task()(*args, **kwargs)

    def __repr__(self) -> str:
        return repr(self._task())


def shared_task(*args: Any, **opts: Any) -> Any:
    """Declare a task for every app, present and future (Celery's ``shared_task``)."""

    def deco(fun: Callable[..., Any]) -> Any:
        _shared.append((fun, opts))
        for app in {*_apps, current_app()}:
            app._task_from_fun(fun, **opts)
        return _SharedTask(fun, opts)

    if len(args) == 1 and callable(args[0]) and not opts:
        return deco(args[0])
    return deco


task = shared_task


# -- built-in tasks -----------------------------------------------------------------------


def _register_builtins(app: Celery) -> None:
    from .canvas import chunks, signature

    def _map(task: Any, it: Any) -> list[Any]:
        fun = signature(task, app=app).type
        return [fun(item) for item in it]

    def _starmap(task: Any, it: Any) -> list[Any]:
        fun = signature(task, app=app).type
        return [fun(*item) for item in it]

    def _chunks(task: Any, it: Any, n: int) -> Any:
        return chunks(task, it, n, app=app).apply_async().id

    def _ping() -> str:
        return "pong"

    def _backend_cleanup() -> None:
        return None

    for name, fun in (
        ("celery.map", _map),
        ("celery.starmap", _starmap),
        ("celery.chunks", _chunks),
        ("celery.ping", _ping),
        ("celery.backend_cleanup", _backend_cleanup),
    ):
        t = app.task_cls()
        t.name, t.app, t._fun = name, app, fun
        t.typing = not inspect.isbuiltin(fun)
        app.tasks[name] = t


__all__ = ["Celeriac", "Celery", "current_app", "shared_task", "states", "task"]
