"""``rpc://`` results: replies travel over the broker to the client that sent the task."""

from __future__ import annotations

import pytest

from celeriac import Celery, chain, chord
from celeriac.exceptions import NotSupported

from . import tasks
from .conftest import WorkerFactory

RPC = {"CELERIAC_RESULT_BACKEND": "rpc://"}


@pytest.fixture
def rpc_app(app: Celery) -> Celery:
    app.close()
    app.conf.result_backend = "rpc://"
    return app


def test_results_come_back_to_the_sender(worker: WorkerFactory, rpc_app: Celery) -> None:
    worker(env=RPC)
    assert tasks.add.delay(2, 2).get(timeout=20) == 4
    results = [tasks.add.delay(i, i) for i in range(20)]
    assert [r.get(timeout=20) for r in results] == [2 * i for i in range(20)]
    assert chain(tasks.add.s("chris", "kuan") | tasks.hello.s())().get(timeout=20) == (
        "hello chriskuan"
    )
    with pytest.raises(ValueError, match="bad"):
        tasks.fail.delay("value", "bad").get(timeout=20)


def test_chords_are_refused_with_a_clear_error(rpc_app: Celery) -> None:
    with pytest.raises(NotSupported, match="rpc://"):
        chord([tasks.add.s(1, 1)], tasks.tsum.s())()
