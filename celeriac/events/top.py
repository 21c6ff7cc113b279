"""``celeriac events``: a live, top-like view of workers and recent tasks.

A plain terminal table redrawn every ``frequency`` seconds (ANSI home + clear when the
output is a terminal; successive snapshots otherwise). No curses and no TUI library:
it runs wherever the worker does, over ssh, inside containers, in CI logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import sys
import time
from typing import Any, TextIO

from .receiver import EventReceiver
from .state import State, TaskState

__all__ = ["atop", "render"]

_CLEAR = "\x1b[H\x1b[2J"


def _age(since: float | None, now: float) -> str:
    if since is None:
        return "-"
    return f"{max(0.0, now - since):.0f}s ago"


def _info(task: TaskState) -> str:
    if task.exception:
        return task.exception
    if task.result is not None:
        runtime = f" in {task.runtime:.3f}s" if task.runtime is not None else ""
        return f"{task.result}{runtime}"
    if task.args is not None:
        return f"args={task.args} kwargs={task.kwargs}"
    return ""


def render(state: State, *, width: int = 100, height: int = 40, now: float | None = None) -> str:
    """One screen of text for ``state``; pure, so it is tested without a terminal."""
    now = time.time() if now is None else now
    clock = dt.datetime.fromtimestamp(now).strftime("%H:%M:%S")
    alive = state.alive_workers()
    lines = [
        f"celeriac events  {clock}  workers: {len(alive)} online / {len(state.workers)} seen"
        f"  tasks: {state.task_count}  events: {state.event_count}",
        "",
        f"{'WORKER':<32} {'STATUS':<8} {'ACTIVE':>6} {'PROCESSED':>9}  {'LOAD':<16} HEARTBEAT",
    ]
    for w in sorted(state.workers.values(), key=lambda w: w.hostname):
        load = " ".join(f"{x:.2f}" for x in w.loadavg)
        status = "online" if w.alive_at(now) else "OFFLINE"
        lines.append(
            f"{w.hostname:<32.32} {status:<8} {w.active:>6} {w.processed:>9}  {load:<16} "
            f"{_age(w.last_heartbeat, now)}"
        )
    if not state.workers:
        lines.append("(no workers seen yet: waiting for heartbeats)")
    lines += ["", f"{'STATE':<9} {'NAME':<24} {'WORKER':<18} {'UUID':<36} INFO"]
    room = max(1, height - len(lines) - 1)
    for task in state.tasks_by_time(room):
        lines.append(
            f"{task.state:<9.9} {task.name or '?':<24.24} {task.hostname or '':<18.18} "
            f"{task.uuid:<36.36} {_info(task)}"
        )
    if not state.tasks:
        lines.append("(no task events yet: enable them with `celeriac control enable_events`)")
    return "\n".join(line[:width] for line in lines)


async def atop(
    app: Any,
    *,
    frequency: float = 1.0,
    out: TextIO | None = None,
    clear: bool | None = None,
    stop: asyncio.Event | None = None,
) -> State:
    """Draw the view every ``frequency`` seconds until ``stop`` is set or cancelled."""
    out = out or sys.stdout
    if clear is None:
        clear = out.isatty()
    state = State()
    stop = stop or asyncio.Event()
    receiver = EventReceiver(app, handlers={"*": state.event})
    async with receiver.stream(wakeup=True) as events:

        async def feed() -> None:
            async for event in events:
                receiver.process(event)

        feeder = asyncio.create_task(feed())
        try:
            while True:
                size = shutil.get_terminal_size((160, 40))
                width = size.columns if clear else max(size.columns, 160)
                screen = render(state, width=width, height=size.lines)
                out.write((_CLEAR + screen) if clear else screen + "\n\n")
                out.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), frequency)
                if stop.is_set() or feeder.done():
                    break
            failure = feeder.exception() if feeder.done() and not feeder.cancelled() else None
            if failure is not None:
                raise failure
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
    return state
