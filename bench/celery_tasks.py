"""The same tasks as ``bench/tasks.py``, for real Celery (imported in bench/.celery-venv).

The Redis URL comes from ``BENCH_CELERY_URL`` (default db 11, apart from celeriac's 10).
"""

# mypy: disable-error-code="untyped-decorator"

from __future__ import annotations

import os

from celery import Celery, chord, group  # type: ignore[import-not-found]

__all__ = ["add", "app", "chord", "group", "noop", "tsum"]

_URL = os.environ.get("BENCH_CELERY_URL", "redis://127.0.0.1:6379/11")

app = Celery("bench", broker=_URL, backend=_URL)
app.conf.broker_connection_retry_on_startup = True

_counter: tuple[int, int] | None = None  # (pid, fd): each prefork child opens its own


def _count() -> None:
    """Append one byte to ``$BENCH_COUNTER`` (see ``bench/tasks.py``)."""
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
