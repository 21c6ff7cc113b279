"""celeriac: a distributed task queue that speaks Celery's API, CLI, settings and wire protocol.

Change ``from celery import Celery`` to ``from celeriac import Celery``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import states
from .app import Celeriac, Celery, current_app, shared_task, task
from .canvas import Signature, chain, chord, chunks, group, signature, subtask, xmap, xstarmap
from .exceptions import (
    ChordError,
    Ignore,
    ImproperlyConfigured,
    MaxRetriesExceededError,
    NotRegistered,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    TimeoutError,
)
from .result import AsyncResult, EagerResult, GroupResult, ResultSet
from .routing import Exchange, Queue
from .task import Task

__all__ = [
    "AsyncResult",
    "Celeriac",
    "Celery",
    "ChordError",
    "EagerResult",
    "Exchange",
    "GroupResult",
    "Ignore",
    "ImproperlyConfigured",
    "MaxRetriesExceededError",
    "NotRegistered",
    "Queue",
    "Reject",
    "ResultSet",
    "Retry",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TimeLimitExceeded",
    "TimeoutError",
    "__version__",
    "chain",
    "chord",
    "chunks",
    "current_app",
    "group",
    "shared_task",
    "signature",
    "states",
    "subtask",
    "task",
    "xmap",
    "xstarmap",
]
