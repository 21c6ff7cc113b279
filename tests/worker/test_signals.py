"""Celery's signals are sent by the worker and the publisher, with Celery's arguments."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac import Celery, signals
from celeriac.transport import memory as memory_transport

from .test_inprocess import TIMEOUT, running_worker


@pytest.fixture
def app() -> Iterator[Celery]:
    url = f"memory://signals-{uuid.uuid4().hex}"
    app = Celery("sig", broker=url, backend=url, set_as_current=False)

    @app.task(name="sig.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="sig.boom")
    def boom() -> None:
        raise KeyError("boom")

    yield app
    app.close()
    memory_transport.reset(url)


def test_task_and_worker_signals(app: Celery) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def record(name: str) -> Any:
        def handler(sender: Any = None, **kw: Any) -> None:
            seen.append((name, {"sender": sender, **kw}))

        return handler

    names = [
        "worker_init",
        "worker_ready",
        "worker_shutdown",
        "task_received",
        "task_prerun",
        "task_postrun",
        "task_success",
        "task_failure",
        "before_task_publish",
        "after_task_publish",
    ]
    handlers = {n: record(n) for n in names}
    for n, h in handlers.items():
        getattr(signals, n).connect(h)
    try:
        with running_worker(app):
            assert app.tasks["sig.add"].delay(2, 3).get(timeout=TIMEOUT) == 5
            with pytest.raises(KeyError):
                app.tasks["sig.boom"].delay().get(timeout=TIMEOUT)
    finally:
        for n, h in handlers.items():
            getattr(signals, n).disconnect(h)
    got = [n for n, _ in seen]
    for n in names:
        assert n in got, f"{n} was never sent: {got}"
    success = next(kw for n, kw in seen if n == "task_success")
    assert success["result"] == 5 and success["sender"].name == "sig.add"
    failure = next(kw for n, kw in seen if n == "task_failure")
    assert isinstance(failure["exception"], KeyError)
    post = [kw for n, kw in seen if n == "task_postrun" and kw["task"].name == "sig.add"]
    assert post[0]["retval"] == 5 and post[0]["state"] == "SUCCESS"
    published = next(kw for n, kw in seen if n == "before_task_publish")
    assert published["sender"] in ("sig.add", "sig.boom") and "id" in published["headers"]
    assert got.index("worker_ready") < got.index("task_prerun") < got.index("worker_shutdown")


def test_no_receivers_means_the_signal_is_falsy() -> None:
    assert not signals.Signal(name="unused")
