"""``celeriac events --dump``: every event as one line, like tcpdump for the cluster.

Line format (Celery's dumper layout)::

    celery@host [2026-05-01 12:00:00.123456] task received: proj.add(<uuid>) args=(2, 2)
        kwargs={} eta=None, expires=None, parent_id=None, retries=0, root_id=<uuid>
    celery@host [2026-05-01 12:00:00.130001] task succeeded: proj.add(<uuid>) args=(2, 2)
        kwargs={} result=4, runtime=0.0012
    celery@host [2026-05-01 12:00:02.000000] heartbeat: active=0, freq=2.0, ...

(each event is one line; the task lines are wrapped here only to fit).

Timestamps are UTC, as Celery prints them. The task's name and arguments come only with
``task-received``/``task-sent``, so they are remembered (bounded) for the later events.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, TextIO

from .receiver import EventReceiver

__all__ = ["Dumper", "aevdump", "evdump", "humanize_type"]

HUMAN_TYPES = {
    "worker-online": "started",
    "worker-offline": "shutdown",
    "worker-heartbeat": "heartbeat",
}
#: Bookkeeping fields that say nothing to a person reading the dump.
_HIDDEN = {"type", "hostname", "timestamp", "uuid", "local_received", "utcoffset", "clock"}
_NAMES_KEPT = 4096


def humanize_type(type: str) -> str:
    return HUMAN_TYPES.get(type.lower(), type.lower().replace("-", " "))


class Dumper:
    """Formats events as lines on ``out``; ``on_event`` is a receiver handler."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self._tasks: OrderedDict[str, str] = OrderedDict()

    def format(self, event: Mapping[str, Any]) -> str:
        type = str(event.get("type", "")).lower()
        stamp = dt.datetime.fromtimestamp(float(event.get("timestamp") or 0), dt.UTC)
        head = f"{event.get('hostname')} [{stamp.replace(tzinfo=None)}] {humanize_type(type)}"
        rest = {k: v for k, v in event.items() if k not in _HIDDEN}
        if type.startswith("task-"):
            task = self._describe(type, str(event.get("uuid")), rest)
            fields = _fields(rest, skip={"pid"})
            return f"{head}: {task} {fields}".rstrip()
        fields = _fields(rest)
        return f"{head}: {fields}" if fields else head

    def _describe(self, type: str, uuid: str, rest: dict[str, Any]) -> str:
        if type in ("task-received", "task-sent"):
            desc = (
                f"{rest.pop('name', None)}({uuid}) "
                f"args={rest.pop('args', None)} kwargs={rest.pop('kwargs', None)}"
            )
            self._tasks[uuid] = desc
            while len(self._tasks) > _NAMES_KEPT:
                self._tasks.popitem(last=False)
            return desc
        return self._tasks.get(uuid, f"({uuid})")

    def on_event(self, event: Mapping[str, Any]) -> None:
        self.out.write(self.format(event) + "\n")
        self.out.flush()


def _fields(values: Mapping[str, Any], skip: set[str] | frozenset[str] = frozenset()) -> str:
    return ", ".join(f"{k}={values[k]}" for k in sorted(values) if k not in skip)


async def aevdump(app: Any, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """Print events until cancelled."""
    (err or sys.stderr).write("-> evdump: starting capture...\n")
    dumper = Dumper(out)
    await EventReceiver(app, handlers={"*": dumper.on_event}).acapture(wakeup=True)


def evdump(app: Any, out: TextIO | None = None) -> None:
    app.portal.run(aevdump(app, out))
