"""A real worker in this process, on the memory broker and backend.

The worker runs ``WorkController.run()`` on a thread of its own and is stopped with
``shutdown()``, which is safe from any thread. While it runs it lends its loop to the
portal, so ``delay()`` and ``get()`` from the test thread use the worker's connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac import Celery, ChordError, chain, chord, group, states
from celeriac.backends import memory as memory_backend
from celeriac.task import Task
from celeriac.transport import memory as memory_transport
from celeriac.worker.worker import WorkController

TIMEOUT = 30


@contextlib.contextmanager
def running_worker(
    app: Celery, pool: str = "threads", concurrency: int = 2
) -> Iterator[WorkController]:
    worker = WorkController(app, pool=pool, concurrency=concurrency, setup_logs=False,
                            hostname=f"test-{uuid.uuid4().hex[:6]}@localhost")
    failure: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # surfaced in the test thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name="celeriac-test-worker", daemon=True)
    thread.start()
    try:
        while not worker.ready.wait(0.05):
            if not thread.is_alive():
                raise RuntimeError(f"the worker stopped before it was ready: {failure!r}")
        yield worker
    finally:
        worker.shutdown()
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the worker did not stop"
    assert not failure, failure


@pytest.fixture
def app() -> Iterator[Celery]:
    url = f"memory://inprocess-{uuid.uuid4().hex}"
    app = Celery("vege", broker=url, backend=url, set_as_current=False)

    @app.task(name="vege.add")
    def add(x: Any, y: Any) -> Any:
        return x + y

    @app.task(name="vege.hello")
    def hello(name: str) -> str:
        return f"hello {name}"

    @app.task(name="vege.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="vege.boom")
    def boom(*args: Any) -> None:
        raise KeyError("boom")

    yield app
    app.close()
    memory_transport.reset(url)
    memory_backend.reset(url)


def t(app: Celery, name: str) -> Task[..., Any]:
    return app.tasks[f"vege.{name}"]


# -- plain tasks and the tutorial's workflows ------------------------------------------------


def test_task_runs_and_result_is_stored(app: Celery) -> None:
    with running_worker(app):
        res = t(app, "add").delay(2, 3)
        assert res.get(timeout=TIMEOUT) == 5
        assert res.state == states.SUCCESS and res.successful()
        assert res.date_done is not None
        assert t(app, "hello").s("haha").delay().get(timeout=TIMEOUT) == "hello haha"


def test_send_task_by_name(app: Celery) -> None:
    with running_worker(app):
        assert app.send_task("vege.add", (1, 1)).get(timeout=TIMEOUT) == 2


def test_group(app: Celery) -> None:
    add = t(app, "add")
    with running_worker(app):
        res = group(add.s(i, i) for i in range(10))()
        assert res.get(timeout=TIMEOUT) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
        partial = group(add.s(i) for i in range(10))
        assert partial(10).get(timeout=TIMEOUT) == [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]


def test_chain(app: Celery) -> None:
    add, hello = t(app, "add"), t(app, "hello")
    with running_worker(app):
        assert chain(add.s("chris", "kuan") | hello.s())().get(timeout=TIMEOUT) == "hello chriskuan"
        assert (add.s("chris", "kuan") | hello.s())().get(timeout=TIMEOUT) == "hello chriskuan"
        assert chain(add.s("kuan") | hello.s())("chris").get(timeout=TIMEOUT) == "hello chriskuan"
        res = (add.s(1, 1) | add.s(1) | add.s(1))()
        assert res.get(timeout=TIMEOUT) == 4
        assert res.parent is not None and res.parent.get(timeout=TIMEOUT) == 3


def test_frozen_chain_runs_under_its_frozen_ids(app: Celery) -> None:
    add = t(app, "add")
    workflow = add.s(1, 1) | add.s(10)
    frozen = workflow.freeze()
    with running_worker(app):
        res = workflow.apply_async()
        assert res.id == frozen.id
        assert app.AsyncResult(frozen.id).get(timeout=TIMEOUT) == 12


def test_chord(app: Celery) -> None:
    add, tsum = t(app, "add"), t(app, "tsum")
    with running_worker(app):
        assert chord([add.s(i, i) for i in range(5)], tsum.s())().get(timeout=TIMEOUT) == 20
        assert chord([add.s(i, i) for i in range(3)])(tsum.s()).get(timeout=TIMEOUT) == 6
        assert (group(add.s(i, i) for i in range(4)) | tsum.s())().get(timeout=TIMEOUT) == 12


def test_chord_inside_a_chain(app: Celery) -> None:
    add, tsum = t(app, "add"), t(app, "tsum")
    with running_worker(app):
        res = chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s(), add.s(100))()
        assert res.get(timeout=TIMEOUT) == 107  # (2+1) + (2+2) = 7, then + 100


def test_map_starmap_chunks(app: Celery) -> None:
    add, hello = t(app, "add"), t(app, "hello")
    with running_worker(app):
        assert hello.map(["a", "b"]).delay().get(timeout=TIMEOUT) == ["hello a", "hello b"]
        assert add.starmap([(1, 2), (3, 4)]).delay().get(timeout=TIMEOUT) == [3, 7]
        res = add.chunks(zip(range(7), range(7), strict=True), 3)()
        assert res.get(timeout=TIMEOUT) == [[0, 2, 4], [6, 8, 10], [12]]


def test_links(app: Celery) -> None:
    add, hello, boom = t(app, "add"), t(app, "hello"), t(app, "boom")
    recorded: list[Any] = []
    done = threading.Event()

    @app.task(name="vege.record")
    def record(value: Any) -> None:
        recorded.append(value)
        done.set()

    with running_worker(app):
        cb = hello.s().freeze()
        add.apply_async(("a", "b"), link=hello.s().set(task_id=cb.id))
        assert app.AsyncResult(cb.id).get(timeout=TIMEOUT) == "hello ab"
        failed = boom.apply_async(link_error=record.s())
        assert done.wait(TIMEOUT)
        assert recorded == [failed.id]


# -- failures ---------------------------------------------------------------------------------


def test_failure_propagates_to_get(app: Celery) -> None:
    with running_worker(app):
        res = t(app, "boom").delay()
        with pytest.raises(KeyError, match="boom"):
            res.get(timeout=TIMEOUT)
        assert res.state == states.FAILURE and res.failed()
        assert "KeyError" in (res.traceback or "")
        assert isinstance(res.get(timeout=TIMEOUT, propagate=False), KeyError)


def test_failure_in_a_chain_fails_the_chain(app: Celery) -> None:
    add, boom = t(app, "add"), t(app, "boom")
    with running_worker(app):
        res = (add.s(1, 1) | boom.s() | add.s(5))()
        with pytest.raises(KeyError):
            res.get(timeout=TIMEOUT)


def test_failure_in_a_chord_header_fails_the_body(app: Celery) -> None:
    add, boom, tsum = t(app, "add"), t(app, "boom"), t(app, "tsum")
    with running_worker(app):
        res = chord([add.s(1, 1), boom.s()], tsum.s())()
        with pytest.raises(ChordError, match="KeyError"):
            res.get(timeout=TIMEOUT)


def test_group_failure_is_returned_in_place(app: Celery) -> None:
    add, boom = t(app, "add"), t(app, "boom")
    with running_worker(app):
        values = group(add.s(1, 1), boom.s(), add.s(2, 2))().get(timeout=TIMEOUT, propagate=False)
        assert values[0] == 2 and values[2] == 4 and isinstance(values[1], KeyError)


def test_retry_with_countdown(app: Celery) -> None:
    @app.task(name="vege.flaky", bind=True, max_retries=3)
    def flaky(self: Task[..., Any], fail_times: int) -> int:
        if self.request.retries < fail_times:
            raise self.retry(countdown=0.2)
        return self.request.retries

    with running_worker(app):
        start = time.monotonic()
        assert flaky.delay(2).get(timeout=TIMEOUT) == 2
        assert time.monotonic() - start >= 0.3  # two countdowns were honoured


def test_retries_exhausted_raise_the_original_error(app: Celery) -> None:
    @app.task(name="vege.hopeless", bind=True, max_retries=1)
    def hopeless(self: Task[..., Any]) -> None:
        try:
            raise ConnectionError("unreachable")
        except ConnectionError as exc:
            raise self.retry(exc=exc, countdown=0) from None

    with running_worker(app), pytest.raises(ConnectionError, match="unreachable"):
        hopeless.delay().get(timeout=TIMEOUT)


def test_autoretry(app: Celery) -> None:
    calls: list[int] = []

    @app.task(name="vege.auto", bind=True, autoretry_for=(ValueError,),
              retry_kwargs={"countdown": 0}, max_retries=5)
    def auto(self: Task[..., Any]) -> int:
        calls.append(self.request.retries)
        if len(calls) < 3:
            raise ValueError("again")
        return len(calls)

    with running_worker(app):
        assert auto.delay().get(timeout=TIMEOUT) == 3
    assert calls == [0, 1, 2]


def test_bound_task_sees_its_request(app: Celery) -> None:
    @app.task(name="vege.who", bind=True)
    def who(self: Task[..., Any]) -> dict[str, Any]:
        r = self.request
        return {"id": r.id, "is_eager": r.is_eager, "hostname": r.hostname,
                "routing_key": r.delivery_info.get("routing_key")}

    with running_worker(app) as worker:
        res = who.delay()
        info = res.get(timeout=TIMEOUT)
    assert info == {"id": res.id, "is_eager": False, "hostname": worker.hostname,
                    "routing_key": "celery"}


def test_ignore_result(app: Celery) -> None:
    ran = threading.Event()

    @app.task(name="vege.quiet", ignore_result=True)
    def quiet() -> int:
        ran.set()
        return 1

    with running_worker(app):
        ignored = quiet.delay()
        assert ran.wait(TIMEOUT)
    # a warm shutdown waits for running tasks to be settled: nothing was stored
    assert ignored.state == states.PENDING


# -- async def tasks ----------------------------------------------------------------------------


def test_async_tasks_on_the_asyncio_pool(app: Celery) -> None:
    barrier_box: dict[str, asyncio.Barrier] = {}

    @app.task(name="vege.aadd")
    async def aadd(x: int, y: int) -> int:
        await asyncio.sleep(0.01)
        return x + y

    @app.task(name="vege.meet")
    async def meet() -> str:
        # both calls must be running at once on the loop for the barrier to open
        barrier = barrier_box.setdefault("b", asyncio.Barrier(2))
        async with asyncio.timeout(TIMEOUT):
            await barrier.wait()
        return "met"

    @app.task(name="vege.afail")
    async def afail() -> None:
        await asyncio.sleep(0)
        raise ValueError("async boom")

    with running_worker(app, pool="asyncio", concurrency=4):
        assert aadd.delay(2, 3).get(timeout=TIMEOUT) == 5
        assert group(meet.s(), meet.s())().get(timeout=TIMEOUT) == ["met", "met"]
        with pytest.raises(ValueError, match="async boom"):
            afail.delay().get(timeout=TIMEOUT)
        assert (aadd.s(1, 1) | t(app, "add").s(1))().get(timeout=TIMEOUT) == 3  # mixed kinds


def test_async_task_on_the_threads_pool(app: Celery) -> None:
    @app.task(name="vege.aadd")
    async def aadd(x: int, y: int) -> int:
        await asyncio.sleep(0)
        return x + y

    with running_worker(app, pool="threads"):
        assert aadd.delay(4, 5).get(timeout=TIMEOUT) == 9


def test_messages_sent_while_no_worker_runs_wait_in_the_broker(app: Celery) -> None:
    with running_worker(app, concurrency=1):
        assert t(app, "add").delay(1, 2).get(timeout=TIMEOUT) == 3
    # after shutdown the portal no longer hops to the worker's loop: sends still work
    res = t(app, "add").delay(5, 5)
    assert res.state == states.PENDING
    with running_worker(app):
        assert res.get(timeout=TIMEOUT) == 10
