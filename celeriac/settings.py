"""Celery's settings: one table of names, defaults, types and legacy names, and the
validating mapping behind ``app.conf``.

Names are Celery's lowercase ones; the old upper-case names (``BROKER_URL``,
``CELERY_TASK_SERIALIZER``, ``CELERYD_CONCURRENCY`` ...) map to them on read and write.
Writes are checked against the table, so a typo or a wrong type fails where it is made,
with the close matches listed, instead of being ignored as Celery does.

A value is looked up in three layers: explicit (set or loaded) > environment
(``CELERIAC_BROKER_URL`` and friends, see :data:`ENV_VARS`) > the table's default.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import importlib
import inspect
import json
import logging
import os
import re
import types
import zoneinfo
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

from . import routing
from .exceptions import ImproperlyConfigured

__all__ = [
    "ALIASES",
    "ENV_VARS",
    "SETTINGS",
    "Setting",
    "Settings",
    "UnknownSetting",
    "import_symbol",
]

logger = logging.getLogger(__name__)

Kind = Literal[
    "str",
    "bool",
    "int",
    "float",
    "seconds",
    "list",
    "dict",
    "any",
    "ref",
    "routes",
    "queues",
    "annotations",
    "delivery_mode",
    "timezone",
]


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of the table. ``legacy`` lists the upper-case names that map to it."""

    name: str
    default: Any
    type: Kind
    doc: str
    legacy: tuple[str, ...] = ()
    nullable: bool = False


_PROCESS_LOG_FMT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
_TASK_LOG_FMT = (
    "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s"
)
_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_max": 1, "interval_step": 0.2}
_NULLABLE = frozenset(
    {"result_expires", "broker_heartbeat", "broker_pool_limit", "broker_connection_max_retries"}
)

# name, default, type, doc[, extra legacy names]. Legacy names Celery derives from the
# prefix (task_ -> CELERY_, worker_ -> CELERYD_, beat_ -> CELERYBEAT_, broker_ -> BROKER_)
# and CELERY_<NAME> (Django namespace style) are added by _legacy_names().
# fmt: off
_ROWS: tuple[tuple[Any, ...], ...] = (
    # general
    ("accept_content", ["json"], "list", "Serializers (or MIME types) a worker accepts."),
    ("result_accept_content", None, "list", "Accepted result serializers; None = accept_content."),
    ("enable_utc", True, "bool", "Keep message dates in UTC.", "ENABLE_UTC"),
    ("timezone", None, "timezone", "IANA zone for schedules and dates; None = UTC."),
    ("imports", (), "list", "Modules the worker imports at start-up."),
    ("include", (), "list", "More modules to import, after imports."),
    # broker
    ("broker_url", None, "str", "Broker URL; None = CELERIAC_BROKER_URL or the default."),
    ("broker_read_url", None, "str", "Broker URL for consuming, if different."),
    ("broker_write_url", None, "str", "Broker URL for publishing, if different."),
    ("broker_transport", None, "str", "Transport name when the URL has no scheme."),
    ("broker_transport_options", {}, "dict", "Extra options passed to the transport."),
    ("broker_connection_timeout", 4.0, "float", "Seconds to wait when connecting."),
    ("broker_connection_retry", True, "bool", "Retry a lost broker connection."),
    ("broker_connection_retry_on_startup", None, "bool", "Retry the first connection too."),
    ("broker_connection_max_retries", 100, "int", "Connection retries; None = forever."),
    ("broker_channel_error_retry", False, "bool", "Retry on channel errors too."),
    ("broker_failover_strategy", None, "str", "Order to try several broker URLs in."),
    ("broker_heartbeat", 120.0, "float", "AMQP heartbeat seconds; None or 0 = off."),
    ("broker_heartbeat_checkrate", 3.0, "float", "Heartbeat checks per interval."),
    ("broker_login_method", None, "str", "AMQP login method."),
    ("broker_pool_limit", 10, "int", "Connections kept per process; None = unlimited."),
    ("broker_use_ssl", False, "any", "True, or a dict of TLS options."),
    # results
    ("result_backend", None, "str", "Result backend URL; None = CELERIAC_RESULT_BACKEND."),
    ("result_backend_transport_options", {}, "dict", "Extra options for the backend."),
    ("result_serializer", "json", "str", "Serializer for stored results."),
    ("result_compression", None, "str", "Compression for stored results."),
    ("result_expires", datetime.timedelta(days=1), "seconds",
     "How long results are kept; None = forever.", "CELERY_TASK_RESULT_EXPIRES"),
    ("result_extended", False, "bool", "Also store name, args, kwargs, worker, queue."),
    ("result_persistent", None, "bool", "Durable result messages (rpc backend)."),
    ("result_cache_max", -1, "int",
     "Results cached by the client; -1 = off.", "CELERY_MAX_CACHED_RESULTS"),
    ("result_chord_join_timeout", 3.0, "float", "Seconds to wait for chord members."),
    ("result_chord_retry_interval", 1.0, "float", "Seconds between chord_unlock polls."),
    ("result_exchange", "celeryresults", "str", "Exchange for result messages."),
    ("result_exchange_type", "direct", "str", "Type of result_exchange."),
    ("result_backend_always_retry", False, "bool", "Retry backend errors that may recover."),
    ("result_backend_max_retries", float("inf"), "float", "Backend retries before giving up."),
    ("result_backend_base_sleep_between_retries_ms", 10, "int", "First backoff, ms."),
    ("result_backend_max_sleep_between_retries_ms", 10000, "int", "Largest backoff, ms."),
    # tasks
    ("task_serializer", "json", "str", "Serializer for task messages."),
    ("task_compression", None, "str",
     "Compression for task messages.", "CELERY_MESSAGE_COMPRESSION"),
    ("task_protocol", 2, "int", "Task message protocol version."),
    ("task_routes", None, "routes", "Routers: dict, glob/regex map, callable or dotted path."),
    ("task_queues", None, "queues", "Queues to declare and consume; None = the default."),
    ("task_default_queue", "celery", "str", "Queue for tasks no route names."),
    ("task_default_exchange", None, "str", "Default exchange; None = task_default_queue."),
    ("task_default_exchange_type", "direct", "str", "Type of the default exchange."),
    ("task_default_routing_key", None, "str", "Default routing key; None = queue name."),
    ("task_default_priority", None, "int", "Priority for messages that set none."),
    ("task_queue_max_priority", None, "int", "x-max-priority for every queue."),
    ("task_inherit_parent_priority", False, "bool", "Child tasks take the parent's priority."),
    ("task_default_delivery_mode", "persistent", "delivery_mode",
     "'persistent' (2) or 'transient' (1)."),
    ("task_default_rate_limit", None, "str", "Rate limit for every task, e.g. '10/m'."),
    ("task_create_missing_queues", True, "bool", "Create queues routes name but never declared."),
    ("task_acks_late", False, "bool", "Ack after the task ran, not before."),
    ("task_acks_on_failure_or_timeout", True, "bool", "With acks_late, ack failed tasks."),
    ("task_reject_on_worker_lost", False, "bool", "Requeue if the worker process dies."),
    ("task_ignore_result", False, "bool", "Store no results by default."),
    ("task_store_errors_even_if_ignored", False, "bool", "Store errors of ignored tasks."),
    ("task_track_started", False, "bool", "Report the STARTED state."),
    ("task_time_limit", None, "float",
     "Hard time limit, seconds.", "CELERYD_TASK_TIME_LIMIT", "CELERYD_TIME_LIMIT"),
    ("task_soft_time_limit", None, "float",
     "Soft time limit, seconds.", "CELERYD_TASK_SOFT_TIME_LIMIT", "CELERYD_SOFT_TIME_LIMIT"),
    ("task_always_eager", False, "bool", "Run tasks in the caller, not on a worker."),
    ("task_eager_propagates", False, "bool",
     "Eager tasks re-raise their errors.", "CELERY_EAGER_PROPAGATES_EXCEPTIONS"),
    ("task_store_eager_result", False, "bool", "Eager tasks store their results."),
    ("task_annotations", None, "annotations", "Task attribute overrides."),
    ("task_publish_retry", True, "bool", "Retry publishing on connection errors."),
    ("task_publish_retry_policy", _RETRY_POLICY, "dict", "Publish retry schedule."),
    ("task_send_sent_event", False, "bool",
     "Send task-sent events.", "CELERY_SEND_TASK_SENT_EVENT"),
    ("task_remote_tracebacks", False, "bool", "Show the worker's traceback in errors."),
    ("task_allow_error_cb_on_chord_header", False, "bool", "Errbacks on chord header tasks."),
    # worker
    ("worker_concurrency", None, "int", "Pool size; None = number of CPUs."),
    ("worker_prefetch_multiplier", 4, "int", "Messages reserved per pool slot."),
    ("worker_disable_prefetch", False, "bool", "Reserve only what the pool can start."),
    ("worker_disable_rate_limits", False, "bool",
     "Ignore task rate limits.", "CELERY_DISABLE_RATE_LIMITS"),
    ("worker_max_tasks_per_child", None, "int", "Replace a pool child after N tasks."),
    ("worker_max_memory_per_child", None, "int", "Replace a pool child above N KiB."),
    ("worker_send_task_events", False, "bool", "Send task events (-E).", "CELERY_SEND_EVENTS"),
    ("worker_hijack_root_logger", True, "bool", "Replace the root logger's handlers."),
    ("worker_log_color", None, "bool", "Colour log output; None = if a tty."),
    ("worker_log_format", _PROCESS_LOG_FMT, "str", "Log format of the worker."),
    ("worker_task_log_format", _TASK_LOG_FMT, "str", "Log format inside tasks."),
    ("worker_redirect_stdouts", True, "bool",
     "Send print() output to the log.", "CELERY_REDIRECT_STDOUTS"),
    ("worker_redirect_stdouts_level", "WARNING", "str",
     "Log level of print() output.", "CELERY_REDIRECT_STDOUTS_LEVEL"),
    ("worker_pool", "prefork", "str", "Pool: prefork, threads, asyncio or solo."),
    ("worker_pool_restarts", False, "bool", "Allow the pool_restart control command."),
    ("worker_autoscaler", "celeriac.worker.autoscale:Autoscaler", "ref", "Autoscaler class."),
    ("worker_lost_wait", 10.0, "float",
     "Seconds to wait for a lost child's result.", "CELERYD_WORKER_LOST_WAIT"),
    ("worker_state_db", None, "str", "File keeping revokes across restarts."),
    ("worker_timer_precision", 1.0, "float", "Timer resolution, seconds."),
    ("worker_enable_remote_control", True, "bool",
     "Answer control and inspect commands.", "CELERY_ENABLE_REMOTE_CONTROL"),
    ("worker_direct", False, "bool", "Give each worker its own queue."),
    ("worker_cancel_long_running_tasks_on_connection_loss", False, "bool",
     "Cancel running acks_late tasks when the broker connection drops."),
    ("worker_deduplicate_successful_tasks", False, "bool", "Skip redelivered done tasks."),
    ("worker_soft_shutdown_timeout", 0.0, "float", "Seconds granted on a cold shutdown."),
    ("worker_enable_soft_shutdown_on_idle", False, "bool", "Soft shutdown even when idle."),
    ("worker_proc_alive_timeout", 4.0, "float", "Seconds for a pool child to start."),
    ("worker_eta_task_limit", None, "int", "ETA tasks held at once; None = no limit."),
    ("worker_enable_prefetch_count_reduction", True, "bool", "Shrink prefetch after loss."),
    # events and remote control
    ("event_queue_ttl", 5.0, "float", "Message TTL of event queues, seconds."),
    ("event_queue_expires", 60.0, "float", "Idle expiry of event queues, seconds."),
    ("event_queue_prefix", "celeryev", "str", "Name prefix of event receiver queues."),
    ("event_queue_durable", False, "bool", "Durable event queues."),
    ("event_queue_exclusive", False, "bool", "Exclusive event queues."),
    ("event_exchange", "celeryev", "str", "Exchange events are sent to."),
    ("event_serializer", "json", "str", "Serializer for events."),
    ("control_queue_ttl", 300.0, "float", "Message TTL of control queues, seconds."),
    ("control_queue_expires", 10.0, "float", "Idle expiry of control queues, seconds."),
    ("control_queue_durable", False, "bool", "Durable control queues."),
    ("control_queue_exclusive", False, "bool", "Exclusive control queues."),
    ("control_exchange", "celery", "str", "Name of the remote-control exchange."),
    # beat
    ("beat_schedule", {}, "dict", "Periodic tasks: name -> {task, schedule, args, ...}."),
    ("beat_scheduler", "celeriac.beat:PersistentScheduler", "ref", "Scheduler class."),
    ("beat_schedule_filename", "celerybeat-schedule", "str", "Where beat keeps last runs."),
    ("beat_sync_every", 0, "int", "Save last runs after N sends; 0 = by time."),
    ("beat_max_loop_interval", 0.0, "float", "Longest beat sleep; 0 = scheduler default."),
    ("beat_cron_starting_deadline", None, "int", "Skip cron runs missed by over N seconds."),
    # redis
    ("redis_max_connections", None, "int", "Redis connection pool size."),
    ("redis_socket_timeout", 120.0, "float", "Redis socket read timeout, seconds."),
    ("redis_socket_connect_timeout", None, "float", "Redis connect timeout, seconds."),
    ("redis_retry_on_timeout", False, "bool", "Retry Redis commands on timeout."),
    ("redis_socket_keepalive", False, "bool", "TCP keepalive on Redis sockets."),
    ("redis_backend_use_ssl", None, "dict", "TLS options for a Redis result backend."),
    # security
    ("security_key", None, "str", "Private key file for signed messages."),
    ("security_key_password", None, "any", "Password of security_key."),
    ("security_certificate", None, "str", "Certificate file for signed messages."),
    ("security_cert_store", None, "str", "Directory of trusted certificates."),
    ("security_digest", "sha256", "str", "Digest for message signatures."),
)
# fmt: on

_PREFIX_LEGACY = {
    "task_": "CELERY_",
    "worker_": "CELERYD_",
    "beat_": "CELERYBEAT_",
    "broker_": "BROKER_",
    "control_": "CONTROL_",
}


def _legacy_names(name: str, extra: tuple[str, ...]) -> tuple[str, ...]:
    names = dict.fromkeys(extra)
    for prefix, old in _PREFIX_LEGACY.items():
        if name.startswith(prefix):
            names[old + name[len(prefix) :].upper()] = None
    names["CELERY_" + name.upper()] = None
    return tuple(names)


def _build() -> tuple[dict[str, Setting], dict[str, str]]:
    table: dict[str, Setting] = {}
    aliases: dict[str, str] = {}
    for name, default, kind, doc, *extra in _ROWS:
        row = Setting(
            name,
            default,
            kind,
            doc,
            _legacy_names(name, tuple(extra)),
            nullable=default is None or name in _NULLABLE,
        )
        table[name] = row
        for old in row.legacy:
            if aliases.setdefault(old, name) != name:
                raise AssertionError(f"legacy name {old} maps to {aliases[old]} and {name}")
    return table, aliases


SETTINGS, ALIASES = _build()
"""Every setting by name, and every legacy upper-case name -> its setting."""

# Environment variables that supply a setting's value when it is not configured.
ENV_VARS: dict[str, tuple[str, ...]] = {
    "broker_url": ("CELERIAC_BROKER_URL", "CELERY_BROKER_URL"),
    "broker_read_url": ("CELERIAC_BROKER_READ_URL", "CELERY_BROKER_READ_URL"),
    "broker_write_url": ("CELERIAC_BROKER_WRITE_URL", "CELERY_BROKER_WRITE_URL"),
    "result_backend": ("CELERIAC_RESULT_BACKEND", "CELERY_RESULT_BACKEND"),
}

# Settings whose None reads as another setting's value, as Celery's conf does.
_DERIVED = {
    "task_default_exchange": "task_default_queue",
    "task_default_routing_key": "task_default_queue",
    "result_accept_content": "accept_content",
}

_EXPECTED: dict[Kind, str] = {
    "str": "a str",
    "bool": "a bool (True or False)",
    "int": "an int",
    "float": "a number",
    "seconds": "a number of seconds or a datetime.timedelta",
    "list": "a list or tuple of str",
    "dict": "a dict",
    "any": "any value",
    "ref": "a dotted path 'module:Name' or the object itself",
    "routes": "a dict, a list/tuple of routers, a callable or a dotted path",
    "queues": "a list or tuple of Queue objects",
    "annotations": "a dict, a list/tuple, an object with .annotate() or a dotted path",
    "delivery_mode": "'persistent', 'transient', 2 or 1",
    "timezone": "an IANA time zone name such as 'Europe/London', or a tzinfo",
}
_NONE_TEXT = frozenset({"", "none", "null"})
_TRUE = frozenset({"1", "true", "yes", "on", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "n"})
_UNSET: Any = object()
_SECRET = re.compile(r"secret|password|passwd|token|api_?key|signature|^security_key$", re.I)
_URL_PASSWORD = re.compile(r"(?<=://)([^:/@]*):([^@/]+)@")


class UnknownSetting(ImproperlyConfigured, KeyError):
    """A name that is neither a setting nor a legacy name (a KeyError for ``conf.get``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _close(key: str) -> list[str]:
    """Setting (or, for upper-case keys, legacy) names that look like ``key``: the best
    match and any nearly as good, so one clear typo gets one suggestion."""
    if key.isupper():
        found = _closest(key, ALIASES)
        if found:
            return found
    return _closest(key.lower(), SETTINGS)


def _closest(key: str, names: Iterable[str]) -> list[str]:
    matcher = difflib.SequenceMatcher(b=key)
    scored = []
    for name in names:
        matcher.set_seq1(name)
        if matcher.real_quick_ratio() >= 0.6 and matcher.ratio() >= 0.6:
            scored.append((matcher.ratio(), name))
    scored.sort(reverse=True)
    if not scored:
        return []
    best = scored[0][0]
    return [name for score, name in scored[:3] if score >= best - 0.1]


def _did_you_mean(names: list[str]) -> str:
    if not names:
        return ""
    quoted = [repr(n) for n in names]
    tail = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f" Did you mean {tail}?"


def unknown(key: object, hint: str = "") -> UnknownSetting:
    name = key if isinstance(key, str) else repr(key)
    return UnknownSetting(f"Unknown setting {name!r}.{_did_you_mean(_close(name))}{hint}")


def resolve(key: object) -> str:
    """The setting a name or legacy name stands for; :class:`UnknownSetting` otherwise."""
    if isinstance(key, str):
        if key in SETTINGS:
            return key
        if key in ALIASES:
            return ALIASES[key]
    raise unknown(key)


def _is_list_of_str(value: Any) -> bool:
    return isinstance(value, list | tuple | set | frozenset) and all(
        isinstance(v, str) for v in value
    )


def _valid_timezone(value: Any) -> bool:
    if isinstance(value, datetime.tzinfo):
        return True
    if not isinstance(value, str):
        return False
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return value.upper() == "UTC"
    return True


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_CHECKS: dict[Kind, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": _number,
    "seconds": lambda v: _number(v) or isinstance(v, datetime.timedelta),
    "list": _is_list_of_str,
    "dict": lambda v: isinstance(v, Mapping),
    "any": lambda v: True,
    "ref": lambda v: isinstance(v, str) or callable(v),
    "annotations": lambda v: (
        isinstance(v, Mapping | list | tuple | str) or callable(v) or hasattr(v, "annotate")
    ),
    "timezone": _valid_timezone,
}


def check(name: str, value: Any, given_as: str | None = None) -> Any:
    """``value`` if it suits setting ``name``; ImproperlyConfigured naming all three if not."""
    row = SETTINGS[name]
    if value is None and row.nullable:
        return value
    problem = ""
    if value is None:
        ok = False
    elif row.type == "routes":
        ok, problem = _try(routing.prepare_routes, value)
    elif row.type == "queues":
        ok, problem = _try(routing.coerce_queues, value)
    elif row.type == "delivery_mode":
        ok, problem = _try(routing.delivery_mode_of, value)
    else:
        ok = _CHECKS[row.type](value)
    if ok:
        return value
    shown = f" (given as {given_as})" if given_as and given_as != name else ""
    detail = f" ({problem})" if problem else ""
    none = " or None" if row.nullable else ""
    raise ImproperlyConfigured(
        f"Invalid value for setting {name!r}{shown}: {value!r} ({type(value).__name__}); "
        f"expected {_EXPECTED[row.type]}{none}{detail}."
    )


def _try(fn: Callable[[Any], Any], value: Any) -> tuple[bool, str]:
    try:
        fn(value)
    except (TypeError, ValueError) as exc:
        return False, str(exc)
    return True, ""


def import_symbol(path: str, what: str = "object") -> Any:
    """Import ``pkg.mod``, ``pkg.mod:attr`` or ``pkg.mod.attr``; errors name ``what``."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        try:
            return importlib.import_module(path)
        except ModuleNotFoundError as exc:
            # Only "path itself is not a module" may mean "path ends in an attribute".
            if exc.name != path or "." not in path:
                raise ImproperlyConfigured(f"Cannot import {what} {path!r}: {exc}") from exc
        module_name, _, attr = path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ImproperlyConfigured(f"Cannot import {what} {path!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImproperlyConfigured(
                f"Cannot import {what} {path!r}: no module or attribute {attr!r} in {module_name!r}"
            ) from None
    return obj


def _object_items(obj: Any, is_key: Callable[[str], bool]) -> Iterator[tuple[str, Any]]:
    """Public attributes of a module/class/object that could be settings: modules,
    classes, functions and Queue/Exchange helpers are skipped unless ``is_key(name)``."""
    if isinstance(obj, Mapping):
        yield from ((str(k), v) for k, v in obj.items())
        return
    for key in dir(obj):
        if key.startswith("_"):
            continue
        try:
            value = getattr(obj, key)
        except AttributeError:
            continue
        if not is_key(key) and (
            isinstance(value, types.ModuleType)
            or inspect.isclass(value)
            or inspect.isroutine(value)
            or isinstance(value, routing.Queue | routing.Exchange)
        ):
            continue
        yield key, value


class Settings(MutableMapping[str, Any]):
    """``app.conf``: every setting, validated on write, readable as ``conf.name``.

    Iterating yields every setting name (unset ones read as their default); ``changes``
    holds only what was configured. Reading an unset mutable default returns this
    object's own copy, so ``conf.beat_schedule['x'] = ...`` sticks without touching the
    table.
    """

    __slots__ = ("_cache", "_env", "_values")
    _values: dict[str, Any]
    _env: dict[str, Any]
    _cache: dict[str, Any]

    def __init__(
        self,
        mapping: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        /,
        *,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_env", self._env_layer(env) if env is not None else {})
        self.update(mapping, **kwargs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings whose unset broker/backend URLs come from ``environ`` (os.environ)."""
        return cls(env=os.environ if environ is None else environ)

    @classmethod
    def _env_layer(cls, environ: Mapping[str, str]) -> dict[str, Any]:
        layer: dict[str, Any] = {}
        for name, variables in ENV_VARS.items():
            for var in variables:
                text = environ.get(var)
                if text:
                    layer[name] = cls.cast(name, text)
                    break
        return layer

    # -- mapping protocol ------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self._lookup(resolve(key))

    def _lookup(self, name: str) -> Any:
        value = self._values.get(name, _UNSET)
        if value is None or value is _UNSET:
            env = self._env.get(name)
            if env is not None:
                return env
        if value is _UNSET:
            value = self._default(name)
        if value is None and name in _DERIVED:
            return self._lookup(_DERIVED[name])
        return value

    def _default(self, name: str) -> Any:
        default = SETTINGS[name].default
        if isinstance(default, dict | list | set):
            if name not in self._cache:
                self._cache[name] = copy.deepcopy(default)
            return self._cache[name]
        return default

    def __setitem__(self, key: str, value: Any) -> None:
        name = resolve(key)
        self._values[name] = check(name, value, given_as=key)
        self._cache.pop(name, None)

    def __delitem__(self, key: str) -> None:
        """Forget the configured value, so the setting reads its default again."""
        name = resolve(key)
        if name not in self._values:
            raise KeyError(key)
        del self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(SETTINGS)

    def __len__(self) -> int:
        return len(SETTINGS)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in SETTINGS or key in ALIASES)

    def __repr__(self) -> str:
        return f"<Settings: {len(self._values)} configured>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (dict(self._values), dict(self._env)))

    def update(  # type: ignore[override]
        self,
        mapping: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        /,
        **kwargs: Any,
    ) -> None:
        """Set many settings at once; all are checked before any is written."""
        pairs: list[tuple[str, Any]] = []
        if isinstance(mapping, Mapping):
            pairs.extend(mapping.items())
        elif mapping is not None:
            pairs.extend(mapping)
        pairs.extend(kwargs.items())
        checked = [(resolve(k), v, k) for k, v in pairs]
        staged = {name: check(name, v, given_as=k) for name, v, k in checked}
        self._values.update(staged)
        for name in staged:
            self._cache.pop(name, None)

    def setdefault(self, key: str, default: Any = None) -> Any:
        """Set ``key`` only if nothing configured it (the table default does not count)."""
        name = resolve(key)
        if name not in self._values and name not in self._env:
            self[name] = default
        return self._lookup(name)

    def pop(self, key: str, default: Any = _UNSET) -> Any:
        """Remove and return the configured value; ``default`` if none was configured."""
        name = resolve(key)
        if name in self._values:
            return self._values.pop(name)
        if default is _UNSET:
            raise KeyError(key)
        return default

    def popitem(self) -> tuple[str, Any]:
        if not self._values:
            raise KeyError("popitem(): no configured settings")
        return self._values.popitem()

    def clear(self) -> None:
        """Forget every configured value (the environment layer stays)."""
        self._values.clear()
        self._cache.clear()

    def copy(self) -> Settings:
        return _rebuild(dict(self._values), dict(self._env))

    # -- attribute access ------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except UnknownSetting as exc:
            raise AttributeError(str(exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self[name] = value

    def __delattr__(self, name: str) -> None:
        if name.startswith("_"):
            object.__delattr__(self, name)
        else:
            self.pop(name, None)

    def __dir__(self) -> Iterable[str]:
        return [*super().__dir__(), *SETTINGS]

    # -- Celery's conf helpers -------------------------------------------------------

    @property
    def changes(self) -> dict[str, Any]:
        """Configured values, plus defaults that were changed in place."""
        mutated = {k: v for k, v in self._cache.items() if v != SETTINGS[k].default}
        return {**mutated, **self._values}

    def find_value_for_key(self, name: str, namespace: str = "celery") -> Any:
        """Celery's lookup by short name: ``('always_eager', 'task')`` -> task_always_eager."""
        for candidate in (
            f"{namespace}_{name}".lower(),
            name.lower(),
            f"{namespace}_{name}".upper(),
            name.upper(),
        ):
            if candidate in self:
                return self[candidate]
        raise unknown(name)

    def table(self, with_defaults: bool = False, censored: bool = True) -> dict[str, Any]:
        """The configuration as a dict (for ``inspect conf`` and reports), secrets masked."""
        source = dict(self.items()) if with_defaults else self.changes
        if not censored:
            return source
        return {k: _censor(k, v) for k, v in source.items()}

    @classmethod
    def cast(cls, name: str, text: str) -> Any:
        """Read setting ``name`` from environment/CLI text, with errors naming both."""
        key = resolve(name)
        row = SETTINGS[key]
        raw = text.strip()
        try:
            if row.nullable and row.type not in ("str", "ref") and raw.lower() in _NONE_TEXT:
                return None
            return check(key, _parse(row.type, raw, text), given_as=name)
        except (ValueError, ImproperlyConfigured) as exc:
            detail = f" ({exc})" if not isinstance(exc, ImproperlyConfigured) else ""
            raise ImproperlyConfigured(
                f"Cannot read setting {key!r} from {text!r}: expected "
                f"{_EXPECTED[row.type]}{detail}."
            ) from None

    def load_object(self, obj: Any, namespace: str | None = None) -> None:
        """Celery's ``config_from_object``: take settings from a module, object, dict or
        dotted path (``'proj.celeryconfig'``, ``'django.conf:settings'``).

        Without ``namespace``, lowercase names must be settings (prefix helpers with
        ``_``) and upper-case names are taken only if they are legacy names. With
        ``namespace='CELERY'`` only ``CELERY_*`` keys are read, prefix removed.
        Values are merged into what is already configured; nothing is written if any
        key or value is wrong.
        """
        if isinstance(obj, str):
            obj = import_symbol(obj, "configuration")
        found: dict[str, tuple[str, Any]] = {}
        errors: list[ImproperlyConfigured] = []
        prefix = f"{namespace.rstrip('_')}_" if namespace else ""

        def is_key(key: str) -> bool:
            if prefix and key.upper().startswith(prefix.upper()):
                return True
            return key in SETTINGS or key in ALIASES

        for key, value in _object_items(obj, is_key):
            try:
                name = self._config_key(key, prefix)
            except UnknownSetting as exc:
                errors.append(exc)
                continue
            if name is None:
                continue
            if name in found and found[name][1] != value:
                errors.append(
                    ImproperlyConfigured(
                        f"Setting {name!r} is given twice with different values, as "
                        f"{found[name][0]} and as {key}; keep one."
                    )
                )
                continue
            found[name] = (key, value)
        staged: dict[str, Any] = {}
        for name, (key, value) in found.items():
            try:
                staged[name] = check(name, value, given_as=key)
            except ImproperlyConfigured as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ImproperlyConfigured(
                f"{len(errors)} problems in configuration {_describe(obj)}:\n  "
                + "\n  ".join(map(str, errors))
            )
        self._values.update(staged)
        for name in staged:
            self._cache.pop(name, None)

    @staticmethod
    def _config_key(key: str, prefix: str) -> str | None:
        """The setting a config attribute sets; None to skip it."""
        if prefix:
            if not key.upper().startswith(prefix.upper()):
                return None
            short = key[len(prefix) :].lower()
            if short in SETTINGS:
                return short
            if key in ALIASES:
                return ALIASES[key]
            close = [prefix + n.upper() for n in _close(short)]
            raise UnknownSetting(
                f"Unknown setting {key!r} (read as {short!r}).{_did_you_mean(close)}"
            )
        if key in SETTINGS:
            return key
        if key in ALIASES:
            return ALIASES[key]
        if key.islower():
            raise unknown(key, " Prefix helper variables with '_' to keep them out.")
        logger.debug("ignoring config attribute %r: not a setting", key)
        return None

    # -- typed reads -----------------------------------------------------------------

    def seconds(self, name: str) -> float | None:
        """A duration setting as float seconds (timedelta or number), None if unset."""
        value = self[name]
        if value is None:
            return None
        if isinstance(value, datetime.timedelta):
            return value.total_seconds()
        return float(value)

    @property
    def result_expires_seconds(self) -> float | None:
        return self.seconds("result_expires")

    def tz(self) -> datetime.tzinfo:
        """The configured zone: ``timezone``, else UTC (local time if enable_utc is off)."""
        value = self["timezone"]
        if isinstance(value, datetime.tzinfo):
            return value
        if value is None:
            if not self["enable_utc"]:
                local = datetime.datetime.now().astimezone().tzinfo
                return local if local is not None else datetime.UTC
            value = "UTC"
        try:
            return zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            if value.upper() == "UTC":
                return datetime.UTC
            raise ImproperlyConfigured(
                f"Unknown time zone {value!r} in setting 'timezone'; use an IANA name "
                f"such as 'UTC' or 'Europe/London'."
            ) from None


def _rebuild(values: dict[str, Any], env: dict[str, Any]) -> Settings:
    settings = Settings()
    settings._values.update(values)
    settings._env.update(env)
    return settings


def _parse(kind: Kind, raw: str, text: str) -> Any:
    if kind in ("str", "ref", "timezone"):
        return text
    if kind == "bool":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("use 1/0, true/false, yes/no or on/off")
    if kind == "int":
        return int(raw)
    if kind in ("float", "seconds"):
        return float(raw)
    if kind == "list" or (kind == "queues" and not raw.startswith(("[", "{"))):
        return [part.strip() for part in raw.split(",") if part.strip()]
    if kind == "delivery_mode":
        return int(raw) if raw.isdigit() else raw.lower()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        if kind == "any" or (kind in ("routes", "annotations") and re.fullmatch(r"[\w.:]+", raw)):
            return text  # plain text, or a dotted path to a router/annotation
        raise ValueError(f"invalid JSON: {exc}") from None


def _censor(key: str, value: Any) -> Any:
    if value is not None and _SECRET.search(key):
        return "********"
    if isinstance(value, str) and "://" in value:
        return _URL_PASSWORD.sub(r"\1:********@", value)
    return value


def _describe(obj: Any) -> str:
    name = getattr(obj, "__name__", None)
    return repr(name) if isinstance(name, str) else type(obj).__name__
