"""Task and worker events: what monitors (``celeriac events``, the dashboard) watch.

Events ride on the transport's broadcast channel ``celeriac.events``, so they work on
every broker, the embedded SQLite one included. ``app.events`` is an :class:`Events`
handle, mirroring Celery's ``app.events.Receiver(...)`` / ``app.events.State()``.
"""

from __future__ import annotations

from typing import Any

from .dispatcher import (
    EVENT_CHANNEL,
    SW_IDENT,
    EventDispatcher,
    Heart,
    LamportClock,
    event,
    utcoffset,
)
from .receiver import EventReceiver, Handler
from .state import State

__all__ = [
    "EVENT_CHANNEL",
    "SW_IDENT",
    "TASK_EVENTS",
    "WORKER_EVENTS",
    "Event",
    "EventDispatcher",
    "EventReceiver",
    "Events",
    "Heart",
    "LamportClock",
    "State",
    "event",
    "group_from",
    "utcoffset",
]

TASK_EVENTS = (
    "task-sent",
    "task-received",
    "task-started",
    "task-succeeded",
    "task-failed",
    "task-retried",
    "task-rejected",
    "task-revoked",
    "task-cancelled",
)
WORKER_EVENTS = ("worker-online", "worker-heartbeat", "worker-offline")

#: Celery's name for the event constructor.
Event = event


def group_from(type: str) -> str:
    """``task-succeeded`` -> ``task``: the group an event type belongs to."""
    return type.partition("-")[0]


class Events:
    """``app.events``: factories bound to one app (connections are the app's own)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def Receiver(
        self,
        connection: Any = None,
        handlers: dict[str, Handler] | None = None,
        **kwargs: Any,
    ) -> EventReceiver:
        """``connection`` is accepted for Celery compatibility; the app's broker is used."""
        return EventReceiver(self.app, handlers=handlers, **kwargs)

    def State(self, **kwargs: Any) -> State:
        return State(**kwargs)
