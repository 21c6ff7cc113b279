"""The cluster as seen through events: workers (alive by heartbeat) and recent tasks.

Feed it with ``state.event(event)`` (usable directly as a receiver handler). Tasks are
kept newest-updated last in an ordered dict and the least recently updated are
forgotten past ``max_tasks_in_memory``, so a long-running monitor stays bounded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import states

__all__ = ["HEARTBEAT_EXPIRE_WINDOW", "State", "TaskState", "WorkerState"]

#: A worker is alive while ``now < last heartbeat + freq * window`` (Celery: 200 %).
HEARTBEAT_EXPIRE_WINDOW = 2.0

TASK_EVENT_TO_STATE = {
    "sent": states.PENDING,
    "received": states.RECEIVED,
    "started": states.STARTED,
    "succeeded": states.SUCCESS,
    "failed": states.FAILURE,
    "retried": states.RETRY,
    "revoked": states.REVOKED,
    "rejected": states.REJECTED,
}

#: Fields an event that arrives out of order (an earlier state) may still fill in.
_MESSAGE_FIELDS = {"name", "args", "kwargs", "eta", "expires", "retries", "root_id", "parent_id"}
_LATE_FIELDS = {
    states.PENDING: _MESSAGE_FIELDS | {"sent"},
    states.RECEIVED: _MESSAGE_FIELDS | {"hostname", "received"},
    states.STARTED: {"hostname", "started"},
}
_WORKER_FIELDS = (
    "pid",
    "freq",
    "clock",
    "active",
    "processed",
    "loadavg",
    "sw_ident",
    "sw_ver",
    "sw_sys",
)


@dataclass
class WorkerState:
    hostname: str
    pid: int | None = None
    freq: float = 2.0
    last_heartbeat: float | None = None
    clock: int = 0
    active: int = 0
    processed: int = 0
    loadavg: list[float] = field(default_factory=list)
    sw_ident: str | None = None
    sw_ver: str | None = None
    sw_sys: str | None = None

    def update(self, type: str, event: Mapping[str, Any]) -> None:
        for name in _WORKER_FIELDS:
            if event.get(name) is not None:
                setattr(self, name, event[name])
        if type == "worker-offline":
            self.last_heartbeat = None
        else:
            self.last_heartbeat = float(event.get("local_received") or event["timestamp"])

    def alive_at(self, now: float) -> bool:
        if self.last_heartbeat is None:
            return False
        return now < self.last_heartbeat + float(self.freq) * HEARTBEAT_EXPIRE_WINDOW

    @property
    def alive(self) -> bool:
        return self.alive_at(time.time())


@dataclass
class TaskState:
    uuid: str
    name: str | None = None
    state: str = states.PENDING
    hostname: str | None = None
    args: str | None = None
    kwargs: str | None = None
    result: str | None = None
    exception: str | None = None
    traceback: str | None = None
    runtime: float | None = None
    retries: int | None = None
    eta: str | None = None
    expires: str | None = None
    root_id: str | None = None
    parent_id: str | None = None
    timestamp: float | None = None
    sent: float | None = None
    received: float | None = None
    started: float | None = None
    succeeded: float | None = None
    failed: float | None = None
    retried: float | None = None
    revoked: float | None = None
    rejected: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def update(self, type: str, event: Mapping[str, Any]) -> None:
        kind = type[len("task-") :]
        new = TASK_EVENT_TO_STATE.get(kind, kind.upper())
        fields = {k: v for k, v in event.items() if k not in ("type", "uuid", "clock")}
        if kind in TASK_EVENT_TO_STATE:
            fields[kind] = event.get("timestamp")
        # A retried task runs again under the same id, so RETRY is never "earlier".
        retry = states.RETRY in (new, self.state)
        earlier = not retry and states.precedence(new) > states.precedence(self.state)
        if earlier:  # keeps the later state; fills in only what the earlier one knows
            keep = _LATE_FIELDS.get(new)
            if keep is not None:
                fields = {k: v for k, v in fields.items() if k in keep}
        else:
            self.state = new
        for key, value in fields.items():
            if key in self.__dataclass_fields__ and key != "extra":
                setattr(self, key, value)
            else:
                self.extra[key] = value

    @property
    def ready(self) -> bool:
        return self.state in states.READY_STATES


class State:
    """Workers and tasks rebuilt from events; ``event`` never raises on odd input."""

    def __init__(self, max_tasks_in_memory: int = 10_000) -> None:
        self.max_tasks_in_memory = max_tasks_in_memory
        self.workers: dict[str, WorkerState] = {}
        self.tasks: OrderedDict[str, TaskState] = OrderedDict()
        self.event_count = 0
        self.task_count = 0

    def event(self, event: Mapping[str, Any]) -> None:
        self.event_count += 1
        type = str(event.get("type", ""))
        hostname = event.get("hostname")
        if type.startswith("worker-") and hostname:
            worker = self.workers.get(hostname)
            if worker is None:
                worker = self.workers[hostname] = WorkerState(str(hostname))
            worker.update(type, event)
        elif type.startswith("task-") and event.get("uuid"):
            self._task_event(type, event)

    def _task_event(self, type: str, event: Mapping[str, Any]) -> None:
        uuid = str(event["uuid"])
        task = self.tasks.get(uuid)
        if task is None:
            task = self.tasks[uuid] = TaskState(uuid)
            self.task_count += 1
            while len(self.tasks) > self.max_tasks_in_memory:
                self.tasks.popitem(last=False)
        else:
            self.tasks.move_to_end(uuid)
        task.update(type, event)

    def alive_workers(self) -> list[WorkerState]:
        now = time.time()
        return [w for w in self.workers.values() if w.alive_at(now)]

    def tasks_by_time(self, limit: int | None = None) -> list[TaskState]:
        """Most recently updated first."""
        out: list[TaskState] = []
        for task in reversed(self.tasks.values()):
            if limit is not None and len(out) >= limit:
                break
            out.append(task)
        return out

    def clear(self) -> None:
        self.workers.clear()
        self.tasks.clear()
        self.event_count = self.task_count = 0
