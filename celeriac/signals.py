"""Celery's signals: the one hook system (no middleware beside it).

``@task_success.connect``, ``@worker_ready.connect(sender=...)`` and
``app.on_after_configure.connect`` work as in Celery. Two deliberate differences: handlers
are held strongly unless ``weak=True`` is passed (Celery's weak default silently drops
handlers defined inline), and ``retry`` is accepted but ignored.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, overload

__all__ = [
    "Signal",
    "after_setup_logger",
    "after_setup_task_logger",
    "after_task_publish",
    "beat_embedded_init",
    "beat_init",
    "before_task_publish",
    "celeryd_after_setup",
    "celeryd_init",
    "heartbeat_sent",
    "import_modules",
    "send_app_configured",
    "setup_logging",
    "task_failure",
    "task_internal_error",
    "task_postrun",
    "task_prerun",
    "task_received",
    "task_rejected",
    "task_retry",
    "task_revoked",
    "task_success",
    "task_unknown",
    "user_preload_options",
    "worker_before_create_process",
    "worker_init",
    "worker_process_init",
    "worker_process_shutdown",
    "worker_ready",
    "worker_shutdown",
    "worker_shutting_down",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
_Receiver = Callable[..., Any]


def _ref(receiver: _Receiver, weak: bool) -> Callable[[], _Receiver | None]:
    if not weak:
        return lambda: receiver
    if hasattr(receiver, "__self__") and hasattr(receiver, "__func__"):
        return weakref.WeakMethod(receiver)
    return weakref.ref(receiver)


def _key(receiver: _Receiver) -> Any:
    if hasattr(receiver, "__self__") and hasattr(receiver, "__func__"):
        return (id(receiver.__self__), id(receiver.__func__))
    return id(receiver)


def _same_sender(wanted: Any, sender: Any) -> bool:
    if wanted is None or wanted is sender:
        return True
    try:
        return bool(wanted == sender)
    except Exception:
        return False


class Signal:
    """Receivers called with ``(sender=..., signal=..., **named)`` when the signal is sent."""

    def __init__(
        self,
        name: str | None = None,
        providing_args: Any = None,
        use_caching: bool = False,
    ) -> None:
        self.name = name
        self._lock = threading.Lock()
        # (dispatch key, sender filter, receiver reference)
        self._receivers: list[tuple[Any, Any, Callable[[], _Receiver | None]]] = []

    def __repr__(self) -> str:
        return f"<Signal: {self.name or 'anonymous'}>"

    @overload
    def connect(
        self,
        receiver: F,
        /,
        *,
        sender: Any = None,
        weak: bool = False,
        dispatch_uid: Any = None,
        retry: bool = False,
    ) -> F: ...

    @overload
    def connect(
        self,
        receiver: None = None,
        /,
        *,
        sender: Any = None,
        weak: bool = False,
        dispatch_uid: Any = None,
        retry: bool = False,
    ) -> Callable[[F], F]: ...

    def connect(
        self,
        receiver: Any = None,
        /,
        *,
        sender: Any = None,
        weak: bool = False,
        dispatch_uid: Any = None,
        retry: bool = False,
    ) -> Any:
        """``sig.connect(fn)``, ``@sig.connect`` or ``@sig.connect(sender=...)``."""

        def add(fun: F) -> F:
            if not callable(fun):
                raise TypeError(f"Signal receivers must be callable, not {fun!r}")
            key = (dispatch_uid if dispatch_uid is not None else _key(fun), id(sender))
            with self._lock:
                self._prune()
                if all(existing != key for existing, _, _ in self._receivers):
                    self._receivers.append((key, sender, _ref(fun, weak)))
            return fun

        if receiver is not None:
            return add(receiver)
        return add

    def disconnect(
        self, receiver: _Receiver | None = None, sender: Any = None, dispatch_uid: Any = None
    ) -> bool:
        """Remove one receiver; true if it was connected."""
        if receiver is None and dispatch_uid is None:
            return False
        key = (dispatch_uid if dispatch_uid is not None else _key(receiver), id(sender))  # type: ignore[arg-type]
        with self._lock:
            before = len(self._receivers)
            self._receivers = [r for r in self._receivers if r[0] != key]
            return len(self._receivers) != before

    def _prune(self) -> None:
        self._receivers = [r for r in self._receivers if r[2]() is not None]

    @property
    def receivers(self) -> list[_Receiver]:
        with self._lock:
            return [fn for _, _, ref in self._receivers if (fn := ref()) is not None]

    def has_listeners(self, sender: Any = None) -> bool:
        return bool(self._live(sender))

    def _live(self, sender: Any) -> list[_Receiver]:
        with self._lock:
            found = [
                (wanted, ref()) for _, wanted, ref in self._receivers
            ]
        return [fn for wanted, fn in found if fn is not None and _same_sender(wanted, sender)]

    def __bool__(self) -> bool:
        """True when anything is connected: hot paths skip building a send's arguments."""
        return bool(self._receivers)

    def send(self, sender: Any, **named: Any) -> list[tuple[_Receiver, Any]]:
        """Call every matching receiver; a receiver's error is logged and returned, not raised.

        Celery does the same, so a broken handler cannot stop a worker or lose a task.
        """
        responses: list[tuple[_Receiver, Any]] = []
        for fn in self._live(sender):
            try:
                responses.append((fn, fn(signal=self, sender=sender, **named)))
            except Exception as exc:
                logger.exception("Signal handler %r raised: %r", fn, exc)
                responses.append((fn, exc))
        return responses

    send_robust = send


_configured: weakref.WeakSet[Any] = weakref.WeakSet()
_configured_lock = threading.Lock()


def send_app_configured(app: Any) -> None:
    """Send ``app.on_after_configure`` then ``app.on_after_finalize``, once per app.

    Celery sends them when the app's configuration is first read; the worker and beat
    call this before they read ``beat_schedule``, so ``sender.add_periodic_task(...)``
    in an ``on_after_configure`` handler is seen. Safe to call any number of times.
    """
    with _configured_lock:
        if app in _configured:
            return
        _configured.add(app)
    for attr in ("on_after_configure", "on_after_finalize"):
        hook = getattr(app, attr, None)
        if isinstance(hook, Signal):
            hook.send(sender=app, source=app.conf)
        elif isinstance(hook, list):
            for fn in list(hook):
                fn(sender=app, source=app.conf)


# -- Celery's signals ---------------------------------------------------------------------

before_task_publish = Signal(name="before_task_publish")
after_task_publish = Signal(name="after_task_publish")
task_received = Signal(name="task_received")
task_prerun = Signal(name="task_prerun")
task_postrun = Signal(name="task_postrun")
task_success = Signal(name="task_success")
task_retry = Signal(name="task_retry")
task_failure = Signal(name="task_failure")
task_internal_error = Signal(name="task_internal_error")
task_revoked = Signal(name="task_revoked")
task_rejected = Signal(name="task_rejected")
task_unknown = Signal(name="task_unknown")
celeryd_init = Signal(name="celeryd_init")
celeryd_after_setup = Signal(name="celeryd_after_setup")
import_modules = Signal(name="import_modules")
worker_init = Signal(name="worker_init")
worker_before_create_process = Signal(name="worker_before_create_process")
worker_process_init = Signal(name="worker_process_init")
worker_process_shutdown = Signal(name="worker_process_shutdown")
worker_ready = Signal(name="worker_ready")
worker_shutdown = Signal(name="worker_shutdown")
worker_shutting_down = Signal(name="worker_shutting_down")
heartbeat_sent = Signal(name="heartbeat_sent")
beat_init = Signal(name="beat_init")
beat_embedded_init = Signal(name="beat_embedded_init")
setup_logging = Signal(name="setup_logging")
after_setup_logger = Signal(name="after_setup_logger")
after_setup_task_logger = Signal(name="after_setup_task_logger")
user_preload_options = Signal(name="user_preload_options")
