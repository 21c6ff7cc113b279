"""celeriac tasks for ``bench.run``; ``bench/celery_tasks.py`` defines the same for Celery.

The broker and result backend come from ``CELERIAC_BROKER_URL`` /
``CELERIAC_RESULT_BACKEND``, so one module serves every broker the harness runs.
"""

from __future__ import annotations

import os

from celeriac import Celery, chord, group

__all__ = ["add", "app", "chord", "group", "noop", "tsum"]

app = Celery("bench")

_counter: tuple[int, int] | None = None  # (pid, fd): each prefork child opens its own


def _count() -> None:
    """Append one byte to ``$BENCH_COUNTER``: the harness sees completions by file size.

    An ``O_APPEND`` write of one byte is atomic across processes and costs ~2 µs, so W1
    can be timed without stored results or any broker round trip.
    """
    global _counter
    path = os.environ.get("BENCH_COUNTER")
    if not path:
        return
    if _counter is None or _counter[0] != os.getpid():
        _counter = (os.getpid(), os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    os.write(_counter[1], b".")


@app.task(ignore_result=True)
def noop() -> None:
    """W1/W2: a task that does nothing but mark itself done."""
    _count()


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def tsum(values: list[int]) -> int:
    return sum(values)
