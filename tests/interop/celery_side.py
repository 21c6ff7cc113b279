"""The interop tasks as a real Celery app: run by ``celery -A tests.interop.celery_side
worker`` and used as a Celery client by the tests.

The same task names live in :mod:`tests.interop.celeriac_side`, so either side's client
can drive either side's worker. Broker and result backend are Redis database 8.
"""

from __future__ import annotations

import time
from pathlib import Path

from celery import Celery  # type: ignore[import-untyped]

REDIS_URL = "redis://127.0.0.1:6379/8"

app = Celery("interop", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)


@app.task(name="interop.add")  # type: ignore[untyped-decorator]
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="interop.fail")  # type: ignore[untyped-decorator]
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="interop.now")  # type: ignore[untyped-decorator]
def now() -> float:
    """When the task ran (unix time), to check a countdown from the client's side."""
    return time.time()


@app.task(name="interop.record")  # type: ignore[untyped-decorator]
def record(path: str, tag: str) -> str:
    """Append ``tag`` to ``path``: the file shows the order tasks ran in."""
    with open(Path(path), "a") as fh:
        fh.write(tag + "\n")
    return tag


@app.task(name="interop.tsum")  # type: ignore[untyped-decorator]
def tsum(values: list[int]) -> int:
    """A chord body: the sum of its header's results."""
    return sum(values)
