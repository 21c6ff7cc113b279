"""The tutorial's ``vege`` module: a small app with a few tasks.

Run a worker for it from this directory::

    celeriac -A vege worker -l info

The broker is the embedded SQLite file ``./celeriac.sqlite`` unless ``CELERIAC_BROKER_URL``
(or ``CELERY_BROKER_URL``) says otherwise, e.g. ``redis://127.0.0.1:6379/0``; results are
kept in the same SQLite file. With Celery you would write ``from celery import Celery``.
"""

from __future__ import annotations

from typing import Any

from celeriac import Celery

app = Celery("vege")


@app.task
def add(x: Any, y: Any) -> Any:
    """Numbers add, strings concatenate: ``add('chris', 'kuan') == 'chriskuan'``."""
    return x + y


@app.task
def hello(name: str) -> str:
    return f"hello {name}"


@app.task
def tsum(numbers: list[int]) -> int:
    """A chord body: gets the header's results as one list, in order."""
    return sum(numbers)


@app.task(bind=True)
def where(self: Any, label: str = "") -> dict[str, Any]:
    """Report where this call was delivered: the queue (routing key) and the worker."""
    info = self.request.delivery_info or {}
    return {
        "label": label,
        "queue": info.get("routing_key"),
        "priority": info.get("priority"),
        "worker": self.request.hostname,
    }


@app.task
def fail(message: str) -> None:
    """Always raises, to show how errors travel through workflows."""
    raise ValueError(message)
