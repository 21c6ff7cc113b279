"""Queues, exchanges and the task router: where a task message is published.

``Queue`` and ``Exchange`` keep kombu's constructor signatures so Celery configs run
unchanged, but unknown keywords are errors (kombu drops them silently) and a queue's
``delivery_mode`` is honoured. ``Router`` turns ``task_routes``/``task_queues`` and the
``task_default_*`` settings into a :class:`Route` per message, with Celery's precedence:
explicit options > the task's own ``queue``/``exchange``/``routing_key``/``priority``/
``delivery_mode`` attributes > ``task_routes`` > the ``task_default_*`` settings.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from .exceptions import ImproperlyConfigured, QueueNotFound
from .transport.base import QueueSpec

__all__ = [
    "EXCHANGE_TYPES",
    "Exchange",
    "Queue",
    "Route",
    "Router",
    "coerce_queues",
    "delivery_mode_of",
    "prepare_routes",
]

logger = logging.getLogger(__name__)

ExchangeType = Literal["direct", "topic", "fanout"]
EXCHANGE_TYPES: tuple[ExchangeType, ...] = ("direct", "topic", "fanout")
_DELIVERY_MODES = {"transient": 1, "persistent": 2, 1: 1, 2: 2}


def delivery_mode_of(value: Any) -> int | None:
    """1 (transient) or 2 (persistent) from Celery's spellings; None stays None."""
    if value is None:
        return None
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, bool) or key not in _DELIVERY_MODES:
        raise ValueError(f"delivery_mode must be 1, 2, 'transient' or 'persistent', not {value!r}")
    return _DELIVERY_MODES[key]


def _seconds(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds, not {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True, init=False)
class Exchange:
    """Where a message is published; bound queues receive it by routing key."""

    name: str
    type: ExchangeType
    durable: bool
    auto_delete: bool
    delivery_mode: int | None
    arguments: Mapping[str, Any]

    def __init__(
        self,
        name: str = "",
        type: str = "direct",
        *,
        durable: bool = True,
        auto_delete: bool = False,
        delivery_mode: int | str | None = None,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Exchange name must be a str, not {name!r}")
        if type not in EXCHANGE_TYPES:
            raise ValueError(
                f"Exchange {name!r}: type {type!r} is not supported; "
                f"use one of {', '.join(EXCHANGE_TYPES)}"
            )
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "durable", bool(durable))
        object.__setattr__(self, "auto_delete", bool(auto_delete))
        object.__setattr__(self, "delivery_mode", delivery_mode_of(delivery_mode))
        object.__setattr__(self, "arguments", dict(arguments or {}))

    def __hash__(self) -> int:
        return hash((self.name, self.type))

    def __repr__(self) -> str:
        return f"<Exchange {self.name}({self.type})>"


# kombu keywords that only add queue arguments, mapped to their AMQP argument names.
_ARGUMENT_KEYWORDS = {"max_length": "x-max-length", "max_length_bytes": "x-max-length-bytes"}
# kombu keywords we keep for callers without acting on them here.
_KEPT_KEYWORDS = frozenset({"alias", "no_declare", "binding_arguments", "consumer_arguments"})


@dataclass(frozen=True, slots=True, init=False)
class Queue:
    """A named queue bound to one exchange by a routing key.

    Without an exchange the queue gets its own direct exchange and, without a routing
    key, its own name as binding key, so ``Queue('q1')`` receives what is routed to q1.
    """

    name: str
    exchange: Exchange
    routing_key: str
    durable: bool
    exclusive: bool
    auto_delete: bool
    queue_arguments: Mapping[str, Any]
    max_priority: int | None
    delivery_mode: int | None
    expires: float | None
    message_ttl: float | None
    no_ack: bool | None
    options: Mapping[str, Any]
    # Whether exchange/routing key were left to defaults: the router may then bind the
    # queue to the configured default exchange, as Celery does for task_queues.
    exchange_given: bool = field(compare=False, repr=False)
    routing_key_given: bool = field(compare=False, repr=False)

    def __init__(
        self,
        name: str = "",
        exchange: Exchange | str | None = None,
        routing_key: str = "",
        *,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        queue_arguments: Mapping[str, Any] | None = None,
        max_priority: int | None = None,
        delivery_mode: int | str | None = None,
        expires: float | None = None,
        message_ttl: float | None = None,
        no_ack: bool | None = None,
        **rest: Any,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Queue name must be a str, not {name!r}")
        for key in rest:
            if key not in _ARGUMENT_KEYWORDS and key not in _KEPT_KEYWORDS:
                raise TypeError(f"Queue({name!r}) got an unsupported keyword argument {key!r}")
        if isinstance(exchange, str):
            exchange = Exchange(exchange) if exchange else None
        elif exchange is not None and not isinstance(exchange, Exchange):
            raise TypeError(f"Queue({name!r}): exchange must be an Exchange or str")
        if exchange is not None and not exchange.name:
            exchange = None
        if routing_key is None:
            routing_key = ""
        if not isinstance(routing_key, str):
            raise TypeError(f"Queue({name!r}): routing_key must be a str, not {routing_key!r}")
        args = dict(queue_arguments or {})
        if max_priority is not None or "x-max-priority" in args:
            listed = args.get("x-max-priority")
            if max_priority is not None and listed is not None and listed != max_priority:
                raise ValueError(
                    f"Queue({name!r}): max_priority={max_priority!r} disagrees with "
                    f"queue_arguments['x-max-priority']={listed!r}"
                )
            max_priority = max_priority if max_priority is not None else listed
            if isinstance(max_priority, bool) or not isinstance(max_priority, int):
                raise ValueError(f"Queue({name!r}): max_priority must be an int")
            args["x-max-priority"] = max_priority
        for key, arg in _ARGUMENT_KEYWORDS.items():
            limit = rest.pop(key, None)
            if limit is not None:
                args[arg] = int(limit)
        set_ = object.__setattr__
        set_(self, "name", name)
        set_(self, "exchange", exchange or Exchange(name))
        set_(self, "routing_key", routing_key or name)
        set_(self, "durable", bool(durable))
        set_(self, "exclusive", bool(exclusive))
        set_(self, "auto_delete", bool(auto_delete))
        set_(self, "queue_arguments", args)
        set_(self, "max_priority", max_priority)
        set_(self, "delivery_mode", delivery_mode_of(delivery_mode))
        set_(self, "expires", _seconds("expires", expires))
        set_(self, "message_ttl", _seconds("message_ttl", message_ttl))
        set_(self, "no_ack", no_ack)
        set_(self, "options", dict(rest))
        set_(self, "exchange_given", exchange is not None)
        set_(self, "routing_key_given", bool(routing_key))

    def __hash__(self) -> int:
        return hash((self.name, self.exchange, self.routing_key))

    def __repr__(self) -> str:
        return f"<Queue {self.name} -> {self.exchange!r} -> {self.routing_key}>"

    def replace(self, **changes: Any) -> Queue:
        """A copy with some constructor arguments changed."""
        kwargs: dict[str, Any] = {
            "exchange": self.exchange if self.exchange_given else None,
            "routing_key": self.routing_key if self.routing_key_given else "",
            "durable": self.durable,
            "exclusive": self.exclusive,
            "auto_delete": self.auto_delete,
            "queue_arguments": self.queue_arguments,
            "max_priority": self.max_priority,
            "delivery_mode": self.delivery_mode,
            "expires": self.expires,
            "message_ttl": self.message_ttl,
            "no_ack": self.no_ack,
            **self.options,
        }
        if "queue_arguments" in changes:
            kwargs["max_priority"] = None  # read from the new arguments unless given
        elif "max_priority" in changes:
            args = dict(self.queue_arguments)
            args.pop("x-max-priority", None)
            kwargs["queue_arguments"] = args
        kwargs.update(changes)
        return Queue(kwargs.pop("name", self.name), **kwargs)

    @property
    def persistent(self) -> bool | None:
        """This queue's own delivery mode (its own, else its exchange's); None if unset."""
        mode = self.delivery_mode or self.exchange.delivery_mode
        return None if mode is None else mode == 2

    def to_spec(self) -> QueueSpec:
        """The broker-facing declaration (TTLs become AMQP ``x-`` arguments in ms)."""
        args = dict(self.queue_arguments)
        if self.expires is not None:
            args.setdefault("x-expires", int(self.expires * 1000))
        if self.message_ttl is not None:
            args.setdefault("x-message-ttl", int(self.message_ttl * 1000))
        return QueueSpec(
            name=self.name,
            exchange=self.exchange.name,
            exchange_type=self.exchange.type,
            routing_key=self.routing_key,
            durable=self.durable,
            auto_delete=self.auto_delete,
            max_priority=self.max_priority,
            arguments=args,
        )

    @classmethod
    def coerce(cls, value: Any) -> Queue:
        """A Queue from a Queue, a name, a dict of Queue keywords or a kombu Queue."""
        if isinstance(value, Queue):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            return cls(**value)
        if hasattr(value, "name") and hasattr(value, "routing_key"):
            return _from_kombu(value)
        raise TypeError(f"expected a Queue, a queue name or a dict, not {value!r}")


def _from_kombu(q: Any) -> Queue:
    """Convert a kombu.Queue so configs that still import kombu keep working."""
    ex = getattr(q, "exchange", None)
    exchange = None
    if ex is not None and getattr(ex, "name", None):
        exchange = Exchange(
            ex.name,
            getattr(ex, "type", "direct") or "direct",
            durable=getattr(ex, "durable", True),
            auto_delete=getattr(ex, "auto_delete", False),
            delivery_mode=getattr(ex, "delivery_mode", None),
        )
    return Queue(
        q.name,
        exchange,
        q.routing_key or "",
        durable=getattr(q, "durable", True),
        exclusive=getattr(q, "exclusive", False),
        auto_delete=getattr(q, "auto_delete", False),
        queue_arguments=getattr(q, "queue_arguments", None),
        max_priority=getattr(q, "max_priority", None),
        expires=getattr(q, "expires", None),
        message_ttl=getattr(q, "message_ttl", None),
        no_ack=getattr(q, "no_ack", None),
    )


def coerce_queues(value: Any) -> list[Queue]:
    """The queues of a ``task_queues`` value: a list/tuple of queues (or names), or
    Celery 3's ``{name: {exchange, exchange_type, routing_key|binding_key, ...}}``."""
    if value is None:
        return []
    queues: list[Queue] = []
    if isinstance(value, Mapping):
        for name, spec in value.items():
            if isinstance(spec, Mapping):
                opts = dict(spec)
                ex_type = opts.pop("exchange_type", None)
                exchange = opts.pop("exchange", None)
                if isinstance(exchange, str) and exchange and ex_type is not None:
                    exchange = Exchange(exchange, ex_type)
                elif exchange is None and ex_type not in (None, "direct"):
                    exchange = Exchange(name, ex_type)
                rk = opts.pop("routing_key", None) or opts.pop("binding_key", None) or ""
                queues.append(Queue(name, exchange, rk, **opts))
            else:
                queue = Queue.coerce(spec)
                if queue.name != name:
                    raise ValueError(f"task_queues key {name!r} holds queue {queue.name!r}")
                queues.append(queue)
    elif isinstance(value, list | tuple | set | frozenset):
        queues = [Queue.coerce(item) for item in value]
    else:
        raise TypeError(f"expected a list or tuple of Queue objects, not {value!r}")
    names = [q.name for q in queues]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"queue(s) listed twice: {', '.join(dupes)}")
    return queues


# -- task_routes ---------------------------------------------------------------------


class _MapRoute:
    """Exact task names first, then glob and regex keys in the order given."""

    def __init__(self, items: Iterable[tuple[Any, Any]]) -> None:
        self.exact: dict[str, Any] = {}
        self.patterns: list[tuple[re.Pattern[str], Any]] = []
        for key, route in items:
            _check_route_value(key, route)
            if isinstance(key, re.Pattern):
                self.patterns.append((key, route))
            elif not isinstance(key, str):
                raise TypeError(f"task_routes key {key!r} must be a str or re.Pattern")
            elif "*" in key:
                self.patterns.append((re.compile(fnmatch.translate(key)), route))
            else:
                self.exact[key] = route

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None) -> Any:
        if name in self.exact:
            return self.exact[name]
        for pattern, route in self.patterns:
            if pattern.match(name):
                return route
        return None


def _check_route_value(key: Any, route: Any) -> None:
    if not isinstance(route, str | Mapping | Queue):
        raise TypeError(
            f"task_routes[{key!r}] must be a queue name or a dict like "
            f"{{'queue': 'name'}}, not {route!r}"
        )


class _LazyRouter:
    """A router named by a dotted path, imported on first use (the app may not be ready)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fn: Callable[..., Any] | None = None

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None) -> Any:
        if self._fn is None:
            from .settings import import_symbol  # settings imports this module

            self._fn = _as_router(import_symbol(self.path, "task_routes router"))
        return self._fn(name, args, kwargs, options, task=task)


def _as_router(obj: Any) -> Callable[..., Any]:
    if isinstance(obj, type) and hasattr(obj, "route_for_task"):
        obj = obj()  # a pre-4.0 router class
    if hasattr(obj, "route_for_task"):
        method = obj.route_for_task
        return lambda name, args, kwargs, options, task=None: method(name, args, kwargs)
    if not callable(obj):
        raise ImproperlyConfigured(f"task_routes router {obj!r} is not callable")
    return cast(Callable[..., Any], obj)


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], str | re.Pattern)
        and isinstance(item[1], str | Mapping | Queue)
    )


def prepare_routes(routes: Any) -> list[Callable[..., Any]]:
    """Compile ``task_routes`` into route functions, tried in order; first non-None wins.

    Accepts a dict (exact names, ``'glob.*'`` keys, ``re.Pattern`` keys), a callable,
    a dotted path to a callable or router class, a list of ``(pattern, route)`` pairs,
    or a list/tuple mixing all of these.
    """
    if routes is None:
        return []
    items = list(routes) if isinstance(routes, list | tuple) else [routes]
    out: list[Callable[..., Any]] = []
    for item in items:
        if isinstance(item, Mapping):
            out.append(_MapRoute(item.items()))
        elif _is_pair(item):
            out.append(_MapRoute([item]))
        elif isinstance(item, list | tuple):
            pairs = list(item)
            if not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
                raise TypeError(f"task_routes entry {item!r} is not a list of (pattern, route)")
            out.append(_MapRoute((p[0], p[1]) for p in pairs))
        elif isinstance(item, str):
            out.append(_LazyRouter(item))
        elif callable(item) or hasattr(item, "route_for_task"):
            out.append(_as_router(item))
        else:
            raise TypeError(
                f"task_routes entry {item!r} must be a dict, a callable or a dotted path"
            )
    return out


# -- the router ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """Where one message goes. ``options`` holds other publish options the route set
    (serializer, expires, ...) for the caller to merge under its own."""

    queue: Queue
    exchange: str
    routing_key: str
    persistent: bool
    priority: int | None
    options: Mapping[str, Any] = field(default_factory=dict)


_ROUTE_KEYS = frozenset(
    {"queue", "exchange", "exchange_type", "routing_key", "priority", "delivery_mode"}
)


_TASK_ATTRS = ("queue", "exchange", "routing_key", "priority", "delivery_mode")


def _priority(value: Any, where: str) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"{where}: priority must be an int, not {value!r}") from None


class Router:
    """Routes task messages from the routing settings of ``conf`` (any mapping).

    Reads task_routes, task_queues, task_default_queue, task_default_exchange,
    task_default_exchange_type, task_default_routing_key, task_create_missing_queues,
    task_default_delivery_mode, task_default_priority and task_queue_max_priority.
    """

    def __init__(self, conf: Mapping[str, Any] | None = None) -> None:
        conf = conf if conf is not None else {}

        def get(key: str, fallback: Any) -> Any:
            value = conf.get(key)
            return fallback if value is None else value

        self.default_queue_name: str = get("task_default_queue", "celery")
        self.default_exchange_type: str = get("task_default_exchange_type", "direct")
        self.default_exchange_name: str = get("task_default_exchange", self.default_queue_name)
        # Celery reads an unset default routing key as the default queue's name.
        self.default_routing_key: str = get("task_default_routing_key", self.default_queue_name)
        self.create_missing: bool = bool(get("task_create_missing_queues", True))
        self.default_persistent = (
            delivery_mode_of(get("task_default_delivery_mode", "persistent")) == 2
        )
        self.default_priority = _priority(conf.get("task_default_priority"), "default priority")
        self.max_priority = _priority(conf.get("task_queue_max_priority"), "queue max priority")
        self._bind_to_default = (
            self.default_exchange_type != "direct"
            or self.default_exchange_name != self.default_queue_name
        )
        try:
            configured = coerce_queues(conf.get("task_queues"))
            self.routes = prepare_routes(conf.get("task_routes"))
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"Invalid routing configuration: {exc}") from exc
        if not configured:
            configured = [
                Queue(
                    self.default_queue_name,
                    Exchange(self.default_exchange_name, self.default_exchange_type),
                    self.default_routing_key,
                )
            ]
        self._configured: dict[str, Queue] = {}
        for queue in configured:
            self._configured[queue.name] = self._adopt(queue)
        self._queues: dict[str, Queue] = dict(self._configured)

    def _adopt(self, queue: Queue) -> Queue:
        """Apply Celery's task_queues defaults to a configured queue."""
        changes: dict[str, Any] = {}
        if not queue.exchange_given and self._bind_to_default:
            # Celery's topic recipe: queues without an exchange join the default one. On a
            # direct exchange each keeps its own name as binding key; a shared key would
            # deliver one message to all of them.
            changes["exchange"] = Exchange(self.default_exchange_name, self.default_exchange_type)
            if not queue.routing_key_given and self.default_exchange_type != "direct":
                changes["routing_key"] = self.default_routing_key
        if self.max_priority is not None and queue.max_priority is None:
            changes["max_priority"] = self.max_priority
        return queue.replace(**changes) if changes else queue

    @property
    def queues(self) -> Mapping[str, Queue]:
        """Every queue known so far: configured ones plus those created on the fly."""
        return dict(self._queues)

    def declared_queues(self) -> list[Queue]:
        return list(self._queues.values())

    def queue(self, name: str) -> Queue:
        """The queue called ``name``; created as a direct queue if allowed."""
        found = self._queues.get(name)
        if found is not None:
            return found
        if not self.create_missing:
            raise QueueNotFound(
                f"Queue {name!r} missing from task_queues (add it there, or set "
                f"task_create_missing_queues=True)"
            )
        created = Queue(name, Exchange(name, "direct"), name)
        if self.max_priority is not None:
            created = created.replace(max_priority=self.max_priority)
        logger.debug("creating missing queue %r", name)
        return self._queues.setdefault(name, created)

    def queues_for_worker(
        self, names: Sequence[str] | None = None, exclude: Sequence[str] | None = None
    ) -> list[Queue]:
        """The queues a worker consumes: ``-Q names`` (created if missing) minus ``-X``."""

        def split(values: Sequence[str] | None) -> list[str]:
            out: list[str] = []
            for value in values or ():
                out.extend(n.strip() for n in value.split(",") if n.strip())
            return list(dict.fromkeys(out))

        wanted = split(names)
        dropped = set(split(exclude))
        chosen = [self.queue(n) for n in wanted] if wanted else list(self._configured.values())
        return [q for q in chosen if q.name not in dropped]

    def route(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        task: Any = None,
    ) -> Route:
        """Decide queue, exchange, routing key, persistence and priority for one send."""
        opts = {k: v for k, v in (options or {}).items() if v is not None}
        if task is not None:  # Celery: the task's own routing attributes are options too
            for attr in _TASK_ATTRS:
                value = getattr(task, attr, None)
                if value is not None:
                    opts.setdefault(attr, value)
        found: dict[str, Any] = {}
        for router in self.routes:
            result = router(task_name, args, kwargs or {}, dict(opts), task=task)
            if result is not None:
                found = self._as_route_dict(result, router)
                break
        merged = {**found, **opts}  # explicit options win over task_routes
        queue_value = merged.get("queue") or self.default_queue_name
        queue = queue_value if isinstance(queue_value, Queue) else self.queue(str(queue_value))

        exchange_value = merged.get("exchange")
        exchange_type = merged.get("exchange_type")
        if isinstance(exchange_value, Exchange):
            exchange_type = exchange_type or exchange_value.type
            exchange_value = exchange_value.name
        exchange_type = exchange_type or queue.exchange.type
        routing_key = merged.get("routing_key")
        if exchange_type == "direct" and not (exchange_value and routing_key):
            # Celery publishes direct routes through the default exchange, by queue name.
            exchange, rk = "", queue.name
        else:
            exchange = exchange_value or queue.exchange.name or self.default_exchange_name
            rk = routing_key or queue.routing_key or self.default_routing_key

        mode = delivery_mode_of(merged.get("delivery_mode"))
        persistent = (
            mode == 2
            if mode is not None
            else queue.persistent
            if queue.persistent is not None
            else self.default_persistent
        )
        priority = _priority(merged.get("priority"), f"route for {task_name!r}")
        extra = {k: v for k, v in found.items() if k not in _ROUTE_KEYS and k not in opts}
        return Route(
            queue=queue,
            exchange=exchange,
            routing_key=rk,
            persistent=persistent,
            priority=priority if priority is not None else self.default_priority,
            options=extra,
        )

    @staticmethod
    def _as_route_dict(result: Any, router: Any) -> dict[str, Any]:
        if isinstance(result, str | Queue):
            return {"queue": result}
        if isinstance(result, Mapping):
            return {k: v for k, v in result.items() if v is not None}
        raise ImproperlyConfigured(
            f"task_routes router {router!r} returned {result!r}; "
            f"expected a dict, a queue name or None"
        )
