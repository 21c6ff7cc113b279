"""The interop tasks as a celeriac app: run by ``python -m celeriac -A
tests.interop.celeriac_side worker`` and used as a celeriac client by the tests.

Mirrors :mod:`tests.interop.celery_side` task for task (same names, same behaviour).
"""

from __future__ import annotations

import time
from pathlib import Path

from celeriac import Celery

REDIS_URL = "redis://127.0.0.1:6379/8"

app = Celery("interop", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)


@app.task(name="interop.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="interop.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="interop.now")
def now() -> float:
    """When the task ran (unix time), to check a countdown from the client's side."""
    return time.time()


@app.task(name="interop.record")
def record(path: str, tag: str) -> str:
    """Append ``tag`` to ``path``: the file shows the order tasks ran in."""
    with open(Path(path), "a") as fh:
        fh.write(tag + "\n")
    return tag


@app.task(name="interop.tsum")
def tsum(values: list[int]) -> int:
    """A chord body: the sum of its header's results."""
    return sum(values)
